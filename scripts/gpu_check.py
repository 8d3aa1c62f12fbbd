"""Every GPU measurement of issues 2 and 6 in one device call, inside a fixed time budget.

A lent GPU comes for minutes, once, so this runs in order of importance and stops each phase at its deadline:
  1. `seqrank bench encoder` on CUDA: default and large model, fp32 / bf16 autocast / bf16 weights, batch 1..1024,
     with the card's measured matmul rates (the table's "% peak" column);
  2. the committed Beauty recipe (training/configs/amazon-towers.yaml) alone on the GPU: seconds per epoch and
     seconds to its best validation epoch, with nothing else on the card;
  3. a pool of training runs in parallel (the card is mostly idle under one small model): the same recipe on
     Sports, then one-factor variations of it on Beauty, each selected on validation like any other run;
  4. torch.compile probes of the encoder (large model at its big batches, default model with CUDA graphs).
Results go to $OUT (the device tool's output folder; runs/gpu-check here): the bench JSON, summary.json, a
runs.tgz of every run's metrics, config and log, and the table printed last.

    python3 scripts/gpu_check.py --budget 420            # on the device machine, data in .gpu-data/
    python3 scripts/gpu_check.py --device cpu --budget 120 --smoke   # the same steps on a CPU, tiny

The device image has torch and transformers but not Ray, hnswlib or this repo's gRPC pins: every step goes through
`python -m serving.cli` subcommands that import none of them. ../shared does not travel to the device, so copy the
data into the ignored .gpu-data/ first and carry it:
    mkdir -p .gpu-data && cp ../shared/data/amazon-beauty/Beauty{.txt,_item2attributes.json} \\
        ../shared/data/amazon-sports-outdoors/Sports_and_Outdoors{.txt,_item2attributes.json} .gpu-data/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "training/configs/amazon-towers.yaml"
DATA = {
    "beauty": ("Beauty.txt", "Beauty_item2attributes.json"),
    "sports": ("Sports_and_Outdoors.txt", "Sports_and_Outdoors_item2attributes.json"),
}
# (run name, data set, overrides on top of RECIPE), most wanted first: whatever the deadline leaves out is skipped.
POOL = [
    ("sports_recipe", "sports", []),
    ("beauty_dropout02", "beauty", ["model.dropout=0.2", "model.attention_dropout=0.2"]),
    ("beauty_3towers", "beauty", ["model.towers=[gpt2,llama,gpt2]"]),
    ("beauty_hidden128", "beauty", ["model.hidden_size=128", "model.intermediate_size=512"]),
    ("beauty_seed1", "beauty", ["optim.seed=1"]),
    ("beauty_2layers_dropout02", "beauty", ["model.num_layers=2", "model.dropout=0.2", "model.attention_dropout=0.2"]),
    ("beauty_fp32", "beauty", ["optim.bf16=false"]),
    ("beauty_4towers_dropout02", "beauty", ["model.towers=[gpt2,llama,gpt2,llama]", "model.dropout=0.2",
                                            "model.attention_dropout=0.2"]),
    ("sports_dropout02", "sports", ["model.dropout=0.2", "model.attention_dropout=0.2"]),
    ("beauty_lr1e-3", "beauty", ["optim.lr=0.001"]),
    ("beauty_batch256", "beauty", ["optim.batch_size=256"]),
    ("beauty_25epochs", "beauty", ["optim.max_epochs=25", "optim.patience=25"]),
    ("beauty_heads2", "beauty", ["model.num_heads=2"]),
    ("beauty_wd03", "beauty", ["optim.weight_decay=0.3"]),
    ("beauty_itemdrop01", "beauty", ["model.item_dropout=0.1"]),
    ("beauty_hidden128_dropout04", "beauty", ["model.hidden_size=128", "model.intermediate_size=512",
                                              "model.dropout=0.4", "model.attention_dropout=0.4"]),
    ("sports_hidden128", "sports", ["model.hidden_size=128", "model.intermediate_size=512"]),
    ("beauty_3towers_dropout02", "beauty", ["model.towers=[gpt2,llama,gpt2]", "model.dropout=0.2",
                                            "model.attention_dropout=0.2"]),
]
SMOKE = ["data.path=", "data.attributes=", "data.synthetic_users=300", "data.synthetic_items=100",
         "optim.max_epochs=2", "model.hidden_size=16", "model.intermediate_size=32"]


def run(cmd: list[str], log: Path, timeout: float) -> str:
    """Run to completion or kill at `timeout`; returns how it ended, for the summary."""
    if timeout <= 5:
        return "skipped (deadline)"
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"killed at the deadline after {time.perf_counter() - started:.0f} s"
    return f"exit {code} after {time.perf_counter() - started:.0f} s"


def seqrank(*args: str) -> list[str]:
    return [sys.executable, "-m", "serving.cli", *args]


def train_command(name: str, dataset: str, overrides: list[str], args) -> list[str]:
    text, attributes = DATA[dataset]
    sets = [f"optim.device={args.device}", f"optim.num_threads={args.threads}", *overrides, *(SMOKE if args.smoke else [])]
    return seqrank("train", "--data", str(args.data_dir / text), "--attributes", str(args.data_dir / attributes),
                   "--config", RECIPE, *[a for s in sets for a in ("--set", s)], "--out", str(args.runs / name),
                   "--quiet")


def run_summary(run_dir: Path, ended: str) -> dict:
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    test = json.loads((run_dir / "test_metrics.json").read_text()) if (run_dir / "test_metrics.json").exists() else {}
    best = max(epochs, key=lambda e: e["valid"]["NDCG@10"], default=None)
    return {
        "run": run_dir.name, "ended": ended, "epochs": len(epochs),
        "best_epoch": best["epoch"] if best else None,
        "valid_NDCG@10": best["valid"]["NDCG@10"] if best else None,
        "test_NDCG@10": test.get("NDCG@10"), "test_HR@10": test.get("HR@10"),
        "seconds_to_best": best["elapsed_seconds"] if best else None,
        "train_s_per_epoch": sorted(e["train_seconds"] for e in epochs)[len(epochs) // 2] if epochs else None,
        "epoch_s": sorted(e["epoch_seconds"] for e in epochs)[len(epochs) // 2] if epochs else None,
    }


def fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole check")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--parallel", type=int, default=8, help="training runs at once in the pool")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per training run")
    parser.add_argument("--compile-reserve", type=float, default=90, help="seconds kept for the compile probes")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".gpu-data")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic runs and batches (a CPU dry run)")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + args.budget
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    args.runs = ROOT / "runs" / "gpu"
    for folder in (out, args.runs):
        folder.mkdir(parents=True, exist_ok=True)
    logs = args.runs / "logs"
    logs.mkdir(exist_ok=True)
    ended: dict[str, str] = {}

    def remaining(reserve: float = 0.0) -> float:
        return deadline - reserve - time.perf_counter()

    def step(title: str, cmd: list[str], name: str, timeout: float) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {title}", flush=True)
        ended[name] = run(cmd, logs / f"{name}.log", timeout)
        print(f"[{time.perf_counter() - started:5.0f} s] {name}: {ended[name]}", flush=True)

    batches = ["1", "8"] if args.smoke else ["1", "8", "64", "256", "1024"]
    models = ["default"] if args.smoke else ["default", "large"]
    step("bench encoder, eager", seqrank(
        "bench", "encoder", "--devices", args.device, "--models", *models, "--dtypes", "fp32", "bf16", "bf16w",
        "--batch-sizes", *batches, "--seconds", "0.5", "--matmul-peak", "--json", str(out / "encoder_eager.json")),
        "encoder_eager", min(120, remaining(args.compile_reserve)))
    step("the Beauty recipe alone", train_command("beauty_recipe", "beauty", [], args), "beauty_recipe",
         min(180, remaining(args.compile_reserve)))

    if not ended["beauty_recipe"].startswith(("exit 0", "killed")):  # the pool would fail the same way: stop here
        for name in ("encoder_eager", "beauty_recipe"):
            print(f"--- {name}.log\n" + (logs / f"{name}.log").read_text()[-3000:])
        return 1
    pool_deadline = deadline - args.compile_reserve

    def pool_job(job) -> None:
        name, dataset, overrides = job
        ended[name] = run(train_command(name, dataset, overrides, args), logs / f"{name}.log",
                          pool_deadline - time.perf_counter())
        print(f"[{time.perf_counter() - started:5.0f} s] {name}: {ended[name]}", flush=True)

    print(f"[{time.perf_counter() - started:5.0f} s] pool: {len(POOL)} runs, {args.parallel} at once", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(pool_job, POOL))

    compile_batches = ["8"] if args.smoke else ["256", "1024"]
    step("bench encoder, torch.compile (large, bf16 weights)", seqrank(
        "bench", "encoder", "--devices", args.device, "--models", models[-1], "--dtypes", "bf16w",
        "--batch-sizes", *compile_batches, "--seconds", "0.5", "--compile", "default",
        "--json", str(out / "encoder_compiled.json")), "encoder_compiled", min(60, remaining(30)))
    step("bench encoder, CUDA graphs (default, bf16 weights)", seqrank(
        "bench", "encoder", "--devices", args.device, "--models", "default", "--dtypes", "bf16w",
        "--batch-sizes", *batches[:3], "--seconds", "0.5", "--compile", "reduce-overhead",
        "--json", str(out / "encoder_graphs.json")), "encoder_graphs", remaining(8))

    summaries = [run_summary(args.runs / name, ended[name]) for name, *_ in [("beauty_recipe",), *POOL]
                 if (args.runs / name).exists() or name in ended]
    (out / "summary.json").write_text(json.dumps({"ended": ended, "runs": summaries}, indent=2))
    with tarfile.open(out / "runs.tgz", "w:gz") as tar:  # metrics, configs, curves and logs; no weights
        for path in sorted(args.runs.rglob("*")):
            if path.is_file() and path.suffix in {".jsonl", ".json", ".yaml", ".png", ".log"} \
                    and path.name != "item_ids.json":
                tar.add(path, arcname=str(path.relative_to(args.runs)))
    for name in ("encoder_eager", "encoder_compiled", "encoder_graphs"):
        print((logs / f"{name}.log").read_text() if (logs / f"{name}.log").exists() else f"{name}: no log")
    print(f"{'run':<28} {'ended':<24} {'ep':>3} {'best':>4} {'valid N@10':>10} {'test N@10':>9} {'test HR@10':>10} "
          f"{'s to best':>9} {'train s/ep':>10} {'epoch s':>7}")
    for s in summaries:
        print(f"{s['run']:<28} {s['ended'][:24]:<24} {s['epochs']:>3} {fmt(s['best_epoch'], '>4')} "
              f"{fmt(s['valid_NDCG@10'], '10.4f')} {fmt(s['test_NDCG@10'], '9.4f')} {fmt(s['test_HR@10'], '10.4f')} "
              f"{fmt(s['seconds_to_best'], '9.1f')} {fmt(s['train_s_per_epoch'], '10.2f')} {fmt(s['epoch_s'], '7.2f')}")
    print(f"total {time.perf_counter() - started:.0f} s of a {args.budget:.0f} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
