"""`seqrank bench retraining`: daily warm starts against full retrains on a log split into days.

For each of the last `days` days E of the log: the full retrain trains from scratch on every event before E; the
warm start continues from the previous day's warm-started model (the chain starts from a full retrain) on the
events of the day before E alone (`window_days`). Both are exported and ranked on day E's events with the
promotion gate's protocol (serving/ops/promote.py): each user active on E with earlier events, target = the
user's first item on E that is new to them, history = everything before it; NDCG@10 with 95 % bootstrap
intervals and the paired difference warm - full. Time = the wall time of `fit` (training, per-epoch validation,
final evaluation), on this machine, one run at a time.

Input: the Taobao UserBehavior layout (user,item,category,behavior,timestamp, no header); the category becomes
the item's attribute, so new items start from their category's embedding. Items with fewer than
`min_item_events` events in the whole log are dropped first (on the UserBehavior prefix 55k of its items have one
or two events: next-day targets among them are unguessable for any model, and NDCG@10 would be noise around 0.001). Days start at 00:00 in `utc_offset_h`
(the dataset's days are Beijing time, UTC+8); the few events before the first full day count to it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.serving.ops.promote import GATE_METRIC, artifact_ranks, compare, read_holdout
from seqrank.training.artifact import IndexParams, load_artifact
from seqrank.training.bootstrap import Interval
from seqrank.training.config import load_config
from seqrank.training.export import export_run
from seqrank.training.train import fit

DAY_S = 86_400
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "event_type", "timestamp")
# The recipe of both arms; early stopping on the run's own leave-one-out validation, with the default config's
# patience (10): at NDCG@10 near 0.005 validation is noisy, and patience 3 stopped full retrains after 4-9 epochs.
RECIPE = ["model.hidden_size=64", "model.intermediate_size=256", "model.dropout=0.3", "model.attention_dropout=0.3",
          "optim.batch_size=128", "optim.lr=0.001", "optim.max_epochs=40", "optim.patience=10", "optim.num_threads=2"]
WARM = ["optim.max_epochs=3", "optim.patience=1", "optim.lr=0.0005"]  # a few epochs at half the rate, on one day
EXPORT_INDEX = IndexParams(M=8, ef_construction=40, ef_search=40)  # ranking here is exact; the index is unused


@dataclass(frozen=True)
class DayResult:
    day: str  # the evaluated day E
    users: int
    full_seconds: float
    warm_seconds: float
    full_events: int  # training events of each arm
    warm_events: int
    full: Interval  # NDCG@10 on day E
    warm: Interval
    difference: Interval  # warm - full, paired

    @property
    def time_ratio(self) -> float:
        return self.warm_seconds / self.full_seconds

    @property
    def ndcg_ratio(self) -> float:
        return self.warm.mean / self.full.mean if self.full.mean else float("nan")


def split_days(path: str | Path, out: Path, utc_offset_h: float,
               min_item_events: int) -> tuple[list[str], pd.DataFrame, Path]:
    """(day names in order, the events with a `day` index column, attributes.json from the categories)."""
    frame = pd.read_csv(path, header=None, names=list(TAOBAO_COLUMNS), dtype={"user_id": str, "item_id": str,
                                                                            "category_id": str})
    frame = frame[frame["item_id"].map(frame["item_id"].value_counts()) >= min_item_events].copy()
    local = frame["timestamp"] + int(utc_offset_h * 3600)
    days = pd.to_datetime(local, unit="s").dt.strftime("%Y-%m-%d")
    counts = days.value_counts()
    full_days = sorted(counts[counts >= 0.1 * counts.max()].index)  # a handful of stray early events join day 1
    frame["day"] = np.searchsorted(full_days, days.clip(lower=full_days[0]), side="right") - 1
    attributes = out / "attributes.json"
    categories = frame.drop_duplicates("item_id").set_index("item_id")["category_id"]
    attributes.write_text(json.dumps({item: [category] for item, category in categories.items()}))
    return full_days, frame, attributes


def write_events(frame: pd.DataFrame, path: Path) -> Path:
    frame[["user_id", "item_id", "timestamp", "event_type"]].to_csv(path, index=False)
    return path


def timed_fit(overrides: list[str], run: Path, init_from: Path | None = None) -> float:
    config = load_config(None, overrides)
    started = time.perf_counter()
    fit(config, run, progress=False, init_from=init_from)
    return time.perf_counter() - started


def bench_retraining(data: str | Path, out: str | Path, days: int = 3, window_days: int = 1,
                     recipe: list[str] = RECIPE, warm: list[str] = WARM, utc_offset_h: float = 8.0,
                     min_item_events: int = 3, say=print) -> list[DayResult]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, frame, attributes = split_days(data, out, utc_offset_h, min_item_events)
    if days + 1 >= len(names):
        raise ValueError(f"--days: the log has {len(names)} days; at most {len(names) - 2} can be evaluated")
    first = len(names) - days  # index of the first evaluated day
    base = [*recipe, f"data.attributes={attributes}"]

    def full_run(through: int) -> tuple[Path, float, int]:
        """A full retrain on days 0..through (inclusive)."""
        events = frame[frame["day"] <= through]
        log = write_events(events, out / f"through-{names[through]}.csv")
        run = out / f"full-{names[through]}"
        say(f"full retrain on {names[0]}..{names[through]} ({len(events)} events)")
        return run, timed_fit([*base, f"data.path={log}"], run), len(events)

    parent, _, _ = full_run(first - 2)  # the warm chain's start
    results = []
    for evaluated in range(first, len(names)):
        full, full_seconds, full_events = full_run(evaluated - 1)
        window = frame[(frame["day"] <= evaluated - 1) & (frame["day"] > evaluated - 1 - window_days)]
        log = write_events(window, out / f"window-{names[evaluated - 1]}.csv")
        warm_run = out / f"warm-{names[evaluated - 1]}"
        say(f"warm start from {parent.name} on {names[evaluated - 1]} ({len(window)} events)")
        warm_seconds = timed_fit([*base, *warm, f"data.path={log}"], warm_run, init_from=parent)
        holdout = write_events(frame[frame["day"] <= evaluated], out / f"holdout-{names[evaluated]}.csv")
        day_start = int(pd.Timestamp(names[evaluated]).timestamp() - utc_offset_h * 3600)
        users = read_holdout(holdout, since=day_start)
        ranks = {}
        for arm, run in (("full", full), ("warm", warm_run)):
            artifact = export_run(run, out / f"{run.name}-artifact", EXPORT_INDEX, name=arm)
            ranks[arm] = artifact_ranks(load_artifact(artifact), users)
        comparison = compare(ranks["warm"], ranks["full"], min_users=0)
        results.append(DayResult(names[evaluated], comparison.users, full_seconds, warm_seconds, full_events,
                                 len(window), comparison.against[GATE_METRIC], comparison.candidate[GATE_METRIC],
                                 comparison.difference[GATE_METRIC]))
        say(format_table(results[-1:]))
        parent = warm_run
    return results


def _cell(interval: Interval, signed: bool = False) -> str:
    form = "+.4f" if signed else ".4f"
    return f"{interval.mean:{form}} [{interval.low:{form}}, {interval.high:{form}}]"


def format_table(results: list[DayResult]) -> str:
    header = ("next day", "users", "full s", "warm s", "warm/full time", "full NDCG@10", "warm NDCG@10",
              "warm/full NDCG", "warm - full (paired)")
    rows = [(r.day, str(r.users), f"{r.full_seconds:.1f}", f"{r.warm_seconds:.1f}", f"{100 * r.time_ratio:.0f} %",
             _cell(r.full), _cell(r.warm), f"{100 * r.ndcg_ratio:.0f} %", _cell(r.difference, signed=True))
            for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: list[DayResult]) -> list[dict]:
    return [{**asdict(r), "time_ratio": r.time_ratio, "ndcg_ratio": r.ndcg_ratio} for r in results]
