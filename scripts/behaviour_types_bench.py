"""Behaviour-type embeddings under the temporal protocol, next item and next purchase, with 95 % bootstrap CIs.

Trains three causal (SASRec-like, gpt2 backbone) runs on a behaviour-typed log under `data.protocol: temporal`:
sampled softmax with behaviour-type embeddings on, the same with them off, and BCE with one sampled negative (the
original SASRec loss, no behaviour types); each stops early on next-item validation NDCG@10. Every run and the
most-popular baseline are then ranked on the test targets twice: the first event after the test cutoff (next
item) and the first purchase after it (next purchase, `data.target_behavior: buy`), over the same input histories,
with the items of each history masked (Rank's default) and kept as candidates (Rank's include_seen).
Prints one markdown table (docs/benchmarks/behaviour-types.md) and writes the numbers as JSON beside the runs.
A run directory that already holds test_metrics.json is reused, so a second call only re-evaluates.

    python scripts/behaviour_types_bench.py \
        --data ../shared/data/taobao-userbehavior-prefix/UserBehavior_prefix.csv.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from seqrank.training.bootstrap import bootstrap_interval, paired_difference
from seqrank.training.config import load_config
from seqrank.training.evaluate import Evaluation, per_user_metrics, rank_model, rank_popularity, split_summary
from seqrank.training.model import load_encoder_dir
from seqrank.training.run_dir import load_run_transitions
from seqrank.training.sources import load_sequences
from seqrank.training.train import fit

METRICS = ("NDCG@10", "HR@10", "HR@100")
SEEN = {"masked": True, "kept": False}  # Rank excludes seen items unless include_seen
# name -> overrides on top of the shared ones. Sampled softmax (256 shared negatives, logQ-corrected) rather than
# the full softmax: the log has one item per 1.5 events (55k items), where a full softmax step costs ~100x more.
VARIANTS = {
    "sampled softmax, behaviour types on": ["model.use_behaviors=true", "optim.loss=sampled"],
    "sampled softmax, behaviour types off": ["model.use_behaviors=false", "optim.loss=sampled"],
    "BCE (SASRec loss), types off": ["model.use_behaviors=false", "optim.loss=bce"],
}
ON, OFF = "sampled softmax, behaviour types on", "sampled softmax, behaviour types off"
TARGETS = {"next item": "", "next purchase": "buy"}


def shared_overrides(args) -> list[str]:
    return [f"data.path={json.dumps(args.data)}", "data.protocol=temporal",
            f"data.valid_cutoff={args.valid_cutoff}", f"data.test_cutoff={args.test_cutoff}",
            f"optim.max_epochs={args.epochs}", f"optim.patience={args.patience}",
            f"optim.num_threads={args.threads}", f"data.kcore={args.kcore}", "eval.ks=[10]"]


def train_variants(args) -> dict[str, Path]:
    runs = {}
    for number, (name, overrides) in enumerate(VARIANTS.items()):
        run = Path(args.out) / f"run-{number}"
        if not (run / "test_metrics.json").exists():
            started = time.perf_counter()
            fit(load_config(None, shared_overrides(args) + overrides), run, progress=False)
            print(f"trained {name} in {time.perf_counter() - started:.0f} s -> {run}", flush=True)
        runs[name] = run
    return runs


def interval_text(interval) -> str:
    return f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a behaviour-typed events log with buy events")
    parser.add_argument("--out", default="runs/behaviour-types")
    parser.add_argument("--valid-cutoff", type=float, default=0.8)
    parser.add_argument("--test-cutoff", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--kcore", type=int, default=0, help="data.kcore (counted over the whole log, future included)")
    args = parser.parse_args()

    runs = train_variants(args)
    base = load_config(None, shared_overrides(args))
    rows, results = [], {}
    for target_name, behavior in TARGETS.items():
        data = load_sequences(dataclasses.replace(base.data, target_behavior=behavior))
        summary = split_summary(data, "test")
        print(f"{target_name}: {summary}", flush=True)
        models = {name: (load_encoder_dir(run), load_run_transitions(run)) for name, run in runs.items()}
        for seen_name, seen_masked in SEEN.items():
            how = Evaluation(ks=(10, 100), batch_size=256, diversity=False, seen_masked=seen_masked)
            ranked = {"most popular": rank_popularity(data, "test", how)}
            for name, (model, prior) in models.items():
                ranked[name] = rank_model(model, data, "test", how, prior)
            values = {name: per_user_metrics(r.target_ranks, how.ks) for name, r in ranked.items()}
            key = f"{target_name}, seen items {seen_name}"
            results[key] = {"split": summary, "models": {}}
            for name, per_user in values.items():
                intervals = {m: bootstrap_interval(per_user[m], resamples=args.resamples) for m in METRICS}
                results[key]["models"][name] = {m: dataclasses.asdict(i) for m, i in intervals.items()}
                rows.append(f"| {target_name} | {seen_name} | {name} | {summary['users']} | "
                            + " | ".join(interval_text(intervals[m]) for m in METRICS) + " |")
            differences = {m: paired_difference(values[ON][m], values[OFF][m], resamples=args.resamples)
                           for m in METRICS}
            results[key]["types on minus off"] = {m: dataclasses.asdict(d) for m, d in differences.items()}
            rows.append(f"| {target_name} | {seen_name} | *types on minus off (paired)* | {summary['users']} | "
                        + " | ".join(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" for d in differences.values())
                        + " |")
    print()
    print("| target | seen items | model | users | NDCG@10 [95 % CI] | HR@10 [95 % CI] | HR@100 [95 % CI] |")
    print("|---|---|---|---:|---|---|---|")
    print("\n".join(rows))
    epochs = {name: json.loads((run / "test_metrics.json").read_text()).get("best_epoch") for name, run in runs.items()}
    print(f"\nbest epochs (next-item validation): {epochs}")
    (Path(args.out) / "behaviour_types.json").write_text(json.dumps({"results": results, "best_epochs": epochs},
                                                                    indent=2, default=float))
    print(f"wrote {Path(args.out) / 'behaviour_types.json'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
