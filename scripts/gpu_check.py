"""Every GPU measurement the training recipe needs, in one call on a GPU machine, inside a fixed time budget.

GPU time is scarce, so this runs in order of importance and stops each phase at its deadline:
  1. the CUDA graph tests (tests/training/test_cuda_graphs.py, test_training_step.py): that a graphed step trains
     like an eager one, which no machine without a GPU can check;
  2. `scripts/train_step_launches.py --device cuda` on Beauty, eager and with optim.cuda_graphs: kernel launches,
     host waits and milliseconds per step of the committed recipe, so a time per epoch can be read as launches;
  3. the committed Beauty recipe (training/configs/amazon-towers.yaml) alone on the GPU with CUDA graphs, then
     eager: seconds per epoch and seconds to its best validation epoch (the time-to-target);
  4. with --pool, variants of the recipe in parallel that could reach the target in fewer seconds (each selected
     on validation like any other run); with --encoder, the encoder benchmarks (eager, compiled, graphs).
Results go to $OUT when set (else runs/gpu-check): step JSON, summary.json, a runs.tgz of
every run's metrics, config and log, and the table printed last.

    python3 scripts/gpu_check.py --budget 480            # on the device machine, data in .gpu-data/
    python3 scripts/gpu_check.py --device cpu --budget 420 --smoke   # the same steps on a CPU, tiny

The device image has torch, transformers and pytest but not Ray, hnswlib or this repo's gRPC pins: every step goes
through `python -m seqrank.serving.cli` subcommands or scripts that import none of them; where seqrank is not
installed, the children import it from this checkout through a folder of links (`source_tree_env`). ../shared does not travel to the
device, so copy the data into the ignored .gpu-data/ first and carry it:
    mkdir -p .gpu-data && cp ../shared/data/amazon-beauty/Beauty{.txt,_item2attributes.json} \\
        ../shared/data/amazon-sports-outdoors/Sports_and_Outdoors{.txt,_item2attributes.json} .gpu-data/
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
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
# Fewer, larger steps and a shorter schedule are what could bring the recipe to its target in fewer seconds.
POOL = [
    ("beauty_graphs_batch256", "beauty", ["optim.cuda_graphs=true", "optim.batch_size=256"]),
    ("beauty_graphs_10epochs", "beauty", ["optim.cuda_graphs=true", "optim.max_epochs=10", "optim.patience=10"]),
    ("beauty_graphs_batch256_lr3e-3", "beauty", ["optim.cuda_graphs=true", "optim.batch_size=256", "optim.lr=0.003"]),
    ("sports_graphs", "sports", ["optim.cuda_graphs=true"]),
]
SMOKE = ["data.path=", "data.attributes=", "data.synthetic_users=300", "data.synthetic_items=100",
         "optim.max_epochs=2", "model.hidden_size=16", "model.intermediate_size=32"]


@functools.cache
def source_tree_env() -> dict[str, str]:
    """The environment for child processes: where seqrank is not installed (a bare GPU image), a temporary folder
    of links gives them the import names pyproject.toml maps onto this checkout's folders."""
    env = dict(os.environ)
    if importlib.util.find_spec("seqrank") is not None:
        return env
    shim = Path(tempfile.mkdtemp(prefix="seqrank-source-")) / "seqrank"
    shim.mkdir()
    for name, folder in (("serving", "serving"), ("training", "training"), ("v1", "serving/generated/seqrank/v1")):
        (shim / name).symlink_to(ROOT / folder, target_is_directory=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), env.get("PYTHONPATH", "")]))
    return env


def run(cmd: list[str], log: Path, timeout: float) -> str:
    """Run to completion or kill at `timeout`; returns how it ended, for the summary."""
    if timeout <= 5:
        return "skipped (deadline)"
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=source_tree_env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"killed at the deadline after {time.perf_counter() - started:.0f} s"
    return f"exit {code} after {time.perf_counter() - started:.0f} s"


def seqrank(*args: str) -> list[str]:
    return [sys.executable, "-m", "seqrank.serving.cli", *args]


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
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads per training run")
    parser.add_argument("--pool", action="store_true", help="then the POOL variants, --parallel at once")
    parser.add_argument("--parallel", type=int, default=4, help="training runs at once in the pool")
    parser.add_argument("--encoder", action="store_true", help="then the encoder benchmarks")
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
    graphs = [] if args.device == "cpu" else ["optim.cuda_graphs=true"]  # a CPU dry run has no graphs to capture

    def remaining(reserve: float = 0.0) -> float:
        return deadline - reserve - time.perf_counter()

    def step(title: str, cmd: list[str], name: str, timeout: float) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {title}", flush=True)
        ended[name] = run(cmd, logs / f"{name}.log", timeout)
        print(f"[{time.perf_counter() - started:5.0f} s] {name}: {ended[name]}", flush=True)

    step("CUDA graph tests", [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                              "tests/training/test_cuda_graphs.py", "tests/training/test_training_step.py"],
         "tests", min(90, remaining(300)))
    text, attributes = DATA["beauty"]
    data = [] if args.smoke else ["--data", str(args.data_dir / text), "--attributes", str(args.data_dir / attributes)]
    for name, sets in (("step_eager", []), ("step_graphs", graphs)):
        if name == "step_graphs" and not graphs:
            continue
        step(f"training step, {name}", [sys.executable, "scripts/train_step_launches.py", "--device", args.device,
                                        *data, "--steps", "3" if args.smoke else "20", "--json", str(out / f"{name}.json"),
                                        *[a for s in sets for a in ("--set", s)]], name, min(90, remaining(240)))
    recipes = [("beauty_recipe_graphs", graphs), ("beauty_recipe", [])] if graphs else [("beauty_recipe", [])]
    for name, sets in recipes:
        step(f"the Beauty recipe alone, {name}", train_command(name, "beauty", sets, args), name,
             min(200, remaining(20)))

    if args.pool:
        def pool_job(job) -> None:
            name, dataset, overrides = job
            ended[name] = run(train_command(name, dataset, overrides, args), logs / f"{name}.log",
                              deadline - 60 * args.encoder - time.perf_counter())
            print(f"[{time.perf_counter() - started:5.0f} s] {name}: {ended[name]}", flush=True)

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(pool_job, POOL))
    if args.encoder:
        batches = ["1", "8"] if args.smoke else ["1", "8", "64", "256", "1024"]
        step("bench encoder, eager", seqrank(
            "bench", "encoder", "--devices", args.device, "--models", "default", "large", "--dtypes", "fp32", "bf16",
            "bf16w", "--batch-sizes", *batches, "--seconds", "0.5", "--matmul-peak", "--json",
            str(out / "encoder_eager.json")), "encoder_eager", remaining(8))

    names = [name for name, _ in recipes] + ([name for name, *_ in POOL] if args.pool else [])
    summaries = [run_summary(args.runs / name, ended.get(name, "not run")) for name in names
                 if (args.runs / name).exists() or name in ended]
    (out / "summary.json").write_text(json.dumps({"ended": ended, "runs": summaries}, indent=2))
    with tarfile.open(out / "runs.tgz", "w:gz") as tar:  # metrics, configs, curves and logs; no weights
        for path in sorted(args.runs.rglob("*")):
            if path.is_file() and path.suffix in {".jsonl", ".json", ".yaml", ".png", ".log"} \
                    and path.name != "item_ids.json":
                tar.add(path, arcname=str(path.relative_to(args.runs)))
    for name in ("tests", "step_eager", "step_graphs", "encoder_eager"):
        if (logs / f"{name}.log").exists():
            print(f"--- {name}\n" + (logs / f"{name}.log").read_text()[-2500:])
    print(f"{'run':<30} {'ended':<24} {'ep':>3} {'best':>4} {'valid N@10':>10} {'test N@10':>9} {'test HR@10':>10} "
          f"{'s to best':>9} {'train s/ep':>10} {'epoch s':>7}")
    for s in summaries:
        print(f"{s['run']:<30} {s['ended'][:24]:<24} {s['epochs']:>3} {fmt(s['best_epoch'], '>4')} "
              f"{fmt(s['valid_NDCG@10'], '10.4f')} {fmt(s['test_NDCG@10'], '9.4f')} {fmt(s['test_HR@10'], '10.4f')} "
              f"{fmt(s['seconds_to_best'], '9.1f')} {fmt(s['train_s_per_epoch'], '10.2f')} {fmt(s['epoch_s'], '7.2f')}")
    print(f"total {time.perf_counter() - started:.0f} s of a {args.budget:.0f} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
