"""Training and encoder speed benchmarks (`seqrank bench train`, `seqrank bench encoder`).

Both measure the production code paths, never a copy: `bench_train` runs `fit` for a few epochs and reads its
metrics.jsonl; `bench_encoder` times `encode_histories`, the one history → user vector path that evaluation and
serving share (its host-side padding and the copy of the vectors back to the host included). FLOPs per sequence
are counted analytically (matmuls only, attention scores counted in full even when causal, the PaLM convention),
so a GPU run can be read as a share of the card's measured bf16 matmul rate (`matmul_peak`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from seqrank.training.config import TrainConfig
from seqrank.training.data import SequenceData, history_bounds
from seqrank.training.model import EncoderConfig, SequenceEncoder, encode_histories
from seqrank.training.run_dir import read_epochs
from seqrank.training.sources import load_sequences
from seqrank.training.train import fit

ENCODER_PRESETS = {  # the default config's model, and a large one for GPU sizing
    "default": dict(max_len=50, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=256),
    "large": dict(max_len=200, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
}
BENCH_NUM_ITEMS = 10_000  # the item table does not enter encode_histories' cost beyond one lookup per position
BENCH_NUM_BEHAVIORS = 4
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "bf16w": torch.bfloat16}  # the matmul dtype of each precision
# How the encoder runs per precision: (autocast dtype, dtype its weights are cast to). bf16 autocast keeps fp32
# weights and runs layer norms and residual sums in fp32 (training's mode and serving's default); bf16w casts the
# weights, so every activation is bf16: half the bytes through the memory-bound elementwise ops.
PRECISIONS = {"fp32": (None, None), "bf16": (torch.bfloat16, None), "bf16w": (None, torch.bfloat16)}
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}


@dataclass(frozen=True)
class EncoderTiming:
    model: str
    device: str
    dtype: str
    batch_size: int
    gflop_per_sequence: float
    latency_ms: float | None  # median wall time of one encode_histories call; None when skipped
    sequences_per_s: float | None
    achieved_tflops: float | None
    percent_of_matmul_peak: float | None  # None without a --matmul-peak measurement on the same device and dtype
    skipped: str = ""  # why the cell was not run (its estimated time exceeded the budget)
    compile_mode: str = ""  # torch.compile mode of the encoder's forward; "" = eager


def encoder_flops_per_sequence(config: EncoderConfig, length: int) -> float:
    """Forward FLOPs of one sequence of `length` positions: 2 per multiply-add of every matmul.

    Per layer and position: Q, K, V and output projections 8·D², the MLP 4·D·I (Llama's gated MLP 6·D·I), and
    attention scores plus the weighted sum 4·T·D (full T×T, although causal attention needs only half).
    """
    D, I = config.hidden_size, config.intermediate_size
    mlp = (6 if config.backbone == "llama" else 4) * D * I
    return float(config.num_layers * length * (8 * D * D + mlp + 4 * length * D))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str, dtype: str, seconds: float = 2.0) -> float:
    """Achieved TFLOP/s of a large square matmul on `device` in `dtype`: the practical ceiling for the encoder."""
    device_ = torch.device(device)
    n = MATMUL_SIZE[device_.type]
    torch_dtype = DTYPES[dtype] or torch.float32
    a = torch.randn(n, n, device=device_, dtype=torch_dtype)
    b = torch.randn(n, n, device=device_, dtype=torch_dtype)
    a @ b  # warm-up (cuBLAS heuristics, CPU thread pool)
    _synchronize(device_)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        a @ b
        calls += 1
        if device_.type == "cuda" and calls % 10:
            continue
        _synchronize(device_)
    _synchronize(device_)
    return 2.0 * n**3 * calls / (time.perf_counter() - started) / 1e12


def _time_call(call, seconds: float, warmup: int = 1) -> list[float]:
    for _ in range(warmup):  # cuBLAS heuristics; compilation and CUDA-graph capture when compiled
        call()
    durations = []
    started = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        call()  # encode_histories returns host numpy arrays, so each call ends synchronised
        durations.append(time.perf_counter() - begin)
    return durations


def bench_encoder(models: list[str], devices: list[str], dtypes: list[str], batch_sizes: list[int],
                  seconds: float = 2.0, max_call_seconds: float = 5.0, peaks: dict | None = None,
                  seed: int = 0, compile_mode: str = "") -> list[EncoderTiming]:
    """Latency and throughput of encode_histories over full-length histories, per model × device × dtype × batch.

    A cell whose estimated single-call time (from the previous batch size) exceeds `max_call_seconds` is reported
    as skipped rather than run, which keeps the large model bounded on a CPU.
    dtypes: keys of PRECISIONS. peaks: {(device, dtype): TFLOP/s} from `matmul_peak`, for the percentage column.
    compile_mode: torch.compile the forward (one graph per batch shape; compile time stays out of the timings).
    """
    rng = np.random.default_rng(seed)
    rows: list[EncoderTiming] = []
    for name in models:
        config = EncoderConfig(num_items=BENCH_NUM_ITEMS, num_behaviors=BENCH_NUM_BEHAVIORS, dropout=0.0,
                               attention_dropout=0.0, **ENCODER_PRESETS[name])
        flops = encoder_flops_per_sequence(config, config.max_len)
        for device in devices:
            for dtype in dtypes:
                torch.manual_seed(seed)
                autocast_dtype, weight_dtype = PRECISIONS[dtype]
                model = SequenceEncoder(config).to(device=device, dtype=weight_dtype).eval()
                if compile_mode:
                    model.user_vectors = torch.compile(model.user_vectors, mode=compile_mode, dynamic=False)
                per_sequence_s = 0.0
                for batch_size in sorted(batch_sizes):
                    histories = list(rng.integers(1, BENCH_NUM_ITEMS + 1, (batch_size, config.max_len)))
                    behaviors = list(rng.integers(1, BENCH_NUM_BEHAVIORS + 1, (batch_size, config.max_len)))
                    base = dict(model=name, device=device, dtype=dtype, batch_size=batch_size,
                                gflop_per_sequence=flops / 1e9, compile_mode=compile_mode)
                    estimate = per_sequence_s * batch_size
                    if estimate > max_call_seconds:
                        rows.append(EncoderTiming(**base, latency_ms=None, sequences_per_s=None,
                                                  achieved_tflops=None, percent_of_matmul_peak=None,
                                                  skipped=f"est. {estimate:.0f} s per call"))
                        continue
                    durations = _time_call(
                        lambda: encode_histories(model, histories, behaviors, device, autocast_dtype), seconds,
                        warmup=3 if compile_mode else 1)
                    latency = statistics.median(durations)
                    per_sequence_s = latency / batch_size
                    achieved = flops * batch_size / latency / 1e12
                    peak = next((v for (d, t), v in (peaks or {}).items() if d == device and DTYPES[t] == DTYPES[dtype]),
                                None)  # bf16 and bf16w share the bf16 matmul rate
                    rows.append(EncoderTiming(**base, latency_ms=latency * 1e3, sequences_per_s=batch_size / latency,
                                              achieved_tflops=achieved,
                                              percent_of_matmul_peak=100 * achieved / peak if peak else None))
    return rows


def format_encoder_table(rows: list[EncoderTiming], peaks: dict | None = None) -> str:
    lines = []
    for (device, dtype), tflops in sorted((peaks or {}).items()):
        lines.append(f"matmul peak {device} {dtype}: {tflops:.3f} TFLOP/s (square {MATMUL_SIZE[torch.device(device).type]})")
    lines.append(f"{'model':<8} {'device':<6} {'dtype':<5} {'compile':<8} {'batch':>6} {'ms/batch':>10} {'seq/s':>10} "
                 f"{'GFLOP/seq':>10} {'TFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        head = f"{r.model:<8} {r.device:<6} {r.dtype:<5} {(r.compile_mode or 'eager')[:8]:<8} {r.batch_size:>6} "
        if r.skipped:
            lines.append(head + f"{'skipped: ' + r.skipped:>37}")
            continue
        percent = f"{r.percent_of_matmul_peak:7.1f}" if r.percent_of_matmul_peak is not None else f"{'-':>7}"
        lines.append(head + f"{r.latency_ms:10.2f} {r.sequences_per_s:10.1f} {r.gflop_per_sequence:10.4f} "
                            f"{r.achieved_tflops:8.4f} {percent}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- training


def training_workload(data: SequenceData, max_len: int) -> tuple[int, int]:
    """(sequences, input positions) one causal training epoch processes: users with >= 2 training events,
    each window truncated to max_len inputs."""
    start, end = history_bounds(data, "train")
    total = end - start
    usable = total >= 2
    return int(usable.sum()), int(np.minimum(total[usable] - 1, max_len).sum())


def bench_train(config: TrainConfig, epochs: int, label: str, eval_users: int = 1000) -> dict:
    """Train `epochs` epochs with `fit` (validation and final evaluation on `eval_users` users, to bound them) and
    report seconds per epoch and training throughput; epochs after the first are the steady state."""
    optim = replace(config.optim, max_epochs=epochs, patience=epochs + 1)
    evaluation = replace(config.eval, valid_users=config.eval.valid_users or eval_users,
                         test_users=config.eval.test_users or eval_users)
    config = replace(config, optim=optim, eval=evaluation)
    data = load_sequences(config.data)
    with tempfile.TemporaryDirectory(prefix="seqrank-bench-train-") as run_dir:
        result = fit(config, run_dir, data, progress=False)
        history = read_epochs(run_dir)
    sequences, positions = training_workload(data, config.model.max_len)
    steady = history[1:] or history
    train_seconds = statistics.median(h["train_seconds"] for h in steady)
    return {
        "data": label, "users": data.num_users, "items": data.num_items, "device": result.device,
        "workers": result.workers, "dtype": "bf16" if result.device.startswith("cuda") and config.optim.bf16
        else "fp32", "loss": config.optim.loss, "epochs": len(history), "sequences": sequences,
        "positions": positions, "first_epoch_train_s": history[0]["train_seconds"],
        "train_s_per_epoch": train_seconds, "epoch_s": statistics.median(h["epoch_seconds"] for h in steady),
        "sequences_per_s": sequences / train_seconds, "positions_per_s": positions / train_seconds,
        "valid_NDCG@10": history[-1]["valid"]["NDCG@10"],
        "batch_size": config.optim.batch_size, "num_threads": torch.get_num_threads(),
    }


def format_train_table(rows: list[dict]) -> str:
    lines = [f"{'data':<28} {'users':>7} {'items':>7} {'device':<6} {'wk':>2} {'dtype':<5} {'train s/ep':>10} "
             f"{'epoch s':>8} {'seq/s':>9} {'pos/s':>9} {'valid N@10':>10}"]
    for r in rows:
        lines.append(f"{r['data'][:28]:<28} {r['users']:>7} {r['items']:>7} {r['device']:<6} {r['workers']:>2} "
                     f"{r['dtype']:<5} {r['train_s_per_epoch']:10.2f} {r['epoch_s']:8.2f} {r['sequences_per_s']:9.0f} "
                     f"{r['positions_per_s']:9.0f} {r['valid_NDCG@10']:10.4f}")
    return "\n".join(lines)
