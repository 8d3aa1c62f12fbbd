#!/usr/bin/env bash
# GPU measurements for issue 6 in one go, for a session that has a GPU (none was lent when this was written):
#   1. bench encoder on CUDA, fp32 and bf16, default and large model, batch 1..1024, plus the measured bf16/fp32
#      matmul rate of the card (so the table's "% peak" column is filled in);
#   2. training speed on Amazon Beauty (amazon.yaml, CUDA + bf16 autocast), 3 epochs, the first one warm-up;
#      the synthetic log of Beauty's size stands in when the file is absent.
# Results land in $OUT (the device tool's output folder) or runs/gpu-check: *.json, *.txt and env.txt.
#
# The device image has torch and transformers but not Ray, hnswlib or this repo's gRPC pins, so this calls the
# functions behind `seqrank bench encoder/train` (training/bench.py) directly; none of them imports serving or Ray.
# Beauty lives in ../shared, which does not travel to the device machine: copy it into an ignored folder first,
#   mkdir -p .gpu-data && cp ../shared/data/amazon-beauty/Beauty{.txt,_item2attributes.json} .gpu-data/ \
#     && echo /.gpu-data/ >> .git/info/exclude
# then run `bash scripts/gpu_check.sh` with carry [".gpu-data"] and timeout_s 540 (it needs about 5 minutes).
# GPU_CHECK_DEVICE=cpu GPU_CHECK_EPOCHS=1 GPU_CHECK_MODELS=default runs the same steps on a CPU as a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
DATA_DIR=${DATA_DIR:-$( [ -f .gpu-data/Beauty.txt ] && echo .gpu-data || echo ../shared/data/amazon-beauty )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda} GPU_CHECK_EPOCHS=${GPU_CHECK_EPOCHS:-3}
export GPU_CHECK_MODELS=${GPU_CHECK_MODELS:-default large}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OUT DATA_DIR
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/env.txt"

"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/bench.txt"
import json, os
from dataclasses import asdict
from pathlib import Path

import torch

from training.bench import bench_encoder, bench_train, format_encoder_table, format_train_table, matmul_peak
from training.config import load_config

out, device = Path(os.environ["OUT"]), os.environ["GPU_CHECK_DEVICE"]
if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no GPU")
dtypes = ["fp32", "bf16"]
peaks = {(device, d): matmul_peak(device, d) for d in dtypes}
rows = bench_encoder(os.environ["GPU_CHECK_MODELS"].split(), [device], dtypes, [1, 8, 64, 256, 1024], seconds=1.0,
                     peaks=peaks)
print(format_encoder_table(rows, peaks), flush=True)
(out / f"encoder_{device}.json").write_text(json.dumps({
    "rows": [asdict(r) for r in rows], "torch": torch.__version__,
    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    "matmul_peak_tflops": [{"device": d, "dtype": t, "tflops": v} for (d, t), v in peaks.items()]}, indent=2))

data_dir = Path(os.environ["DATA_DIR"])
if (data_dir / "Beauty.txt").exists():
    label, overrides = "Beauty.txt", [f"data.path={data_dir / 'Beauty.txt'}",
                                      f"data.attributes={data_dir / 'Beauty_item2attributes.json'}"]
else:
    print(f"gpu_check: {data_dir}/Beauty.txt absent; a synthetic log of Beauty's size stands in", flush=True)
    label, overrides = "synthetic 22k users", ["data.synthetic_users=22363", "data.synthetic_items=12101"]
config = load_config("training/configs/amazon.yaml", overrides + [f"optim.device={device}"])
train_rows = [bench_train(config, int(os.environ["GPU_CHECK_EPOCHS"]), label)]
print(format_train_table(train_rows), flush=True)
(out / f"train_{device}.json").write_text(json.dumps(train_rows, indent=2))
PY
