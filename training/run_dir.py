"""The run directory: every file a training run writes, and the one place that knows their names.

Layout (everything evaluation and export need, nothing pickled):
    config.yaml          the resolved TrainConfig
    data.json            data fingerprint, counts, behaviour names, source
    item_ids.json        raw item id per internal index (0 = PAD)
    item_popularity.npy  test-visible event counts per item: the service's cold-start list
    encoder_config.json  + encoder.safetensors: the best checkpoint by validation NDCG@10 (written by model.py)
    metrics.jsonl        one line per epoch: loss, validation metrics, seconds
    valid_metrics.json, test_metrics.json   of the best checkpoint; test_metrics.json adds the run's summary
    transitions.json     the chosen transition-prior weight and the validation score of each weight tried
    curves.png           loss and validation NDCG@10 / HR@10 per epoch
    parent.json          warm-started runs only: the model it continued from (training/warm_start.py)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import yaml

from seqrank.training.config import TrainConfig, config_from_dict
from seqrank.training.data import SequenceData
from seqrank.training.transitions import TransitionPrior, load_transitions

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
ITEM_IDS_FILE = "item_ids.json"
ITEM_POPULARITY_FILE = "item_popularity.npy"
METRICS_FILE = "metrics.jsonl"
VALID_METRICS_FILE = "valid_metrics.json"
TEST_METRICS_FILE = "test_metrics.json"
TRANSITIONS_FILE = "transitions.json"
CURVES_FILE = "curves.png"
PARENT_FILE = "parent.json"


@dataclass(frozen=True)
class DataInfo:
    """data.json: what the run was trained on; `fingerprint` ties a run to the exact preprocessed data."""

    fingerprint: str
    num_users: int
    num_items: int
    num_events: int
    behavior_names: list[str]
    num_attributes: int
    source: str


@dataclass(frozen=True)
class FitResult:
    """What a finished run reports: the best checkpoint's test metrics and how the run went."""

    test: dict[str, float]  # full-ranking test metrics of the best checkpoint (with the chosen prior)
    valid: dict[str, float]  # the same on validation, on the final-evaluation users
    best_epoch: int
    epochs_run: int
    seconds: float
    seconds_to_best: float
    device: str
    workers: int
    transition_weight: float

    def summary(self) -> dict:
        """The run's bookkeeping, as test_metrics.json stores it beside the test metrics."""
        return {"best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "seconds": self.seconds,
                "seconds_to_best": self.seconds_to_best, "device": self.device, "workers": self.workers,
                "transition_weight": self.transition_weight}



def write_run_metadata(run_dir: Path, config: TrainConfig, data: SequenceData, item_popularity: np.ndarray) -> None:
    """config.yaml, item_ids.json, item_popularity.npy and data.json, written before the first epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run_dir / ITEM_IDS_FILE).write_text(json.dumps([str(x) for x in data.item_ids]))
    np.save(run_dir / ITEM_POPULARITY_FILE, item_popularity.astype(np.float32))
    info = DataInfo(
        fingerprint=data.fingerprint, num_users=data.num_users, num_items=data.num_items,
        num_events=int(len(data.items)), behavior_names=list(data.behavior_names),
        num_attributes=data.num_attributes, source=config.data.path or "synthetic",
    )
    (run_dir / DATA_FILE).write_text(json.dumps(info.__dict__, indent=2))


def write_parent(run_dir: Path, record: dict) -> None:
    (run_dir / PARENT_FILE).write_text(json.dumps(record, indent=2))


def read_parent(run_dir: str | Path) -> dict | None:
    """parent.json: what a warm-started run continued from; None for a run trained from scratch."""
    path = Path(run_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_config(run_dir: str | Path) -> TrainConfig:
    return config_from_dict(yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()))


def read_data_info(run_dir: str | Path) -> DataInfo:
    return DataInfo(**json.loads((Path(run_dir) / DATA_FILE).read_text()))


def read_item_ids(run_dir: str | Path) -> list[str]:
    return json.loads((Path(run_dir) / ITEM_IDS_FILE).read_text())


def read_item_popularity(run_dir: str | Path) -> np.ndarray:
    return np.load(Path(run_dir) / ITEM_POPULARITY_FILE, allow_pickle=False)


def open_metrics_log(run_dir: Path) -> IO[str]:
    """metrics.jsonl, truncated: `log_epoch` appends one record per epoch."""
    return open(run_dir / METRICS_FILE, "w")


def log_epoch(metrics_log: IO[str], record: dict) -> None:
    metrics_log.write(json.dumps(record) + "\n")
    metrics_log.flush()


def read_epochs(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's records, one per epoch run; [] before the first epoch ends."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_final_metrics(run_dir: Path, valid: dict, test_with_summary: dict) -> None:
    (run_dir / VALID_METRICS_FILE).write_text(json.dumps(valid, indent=2))
    (run_dir / TEST_METRICS_FILE).write_text(json.dumps(test_with_summary, indent=2))


def read_valid_metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / VALID_METRICS_FILE).read_text())


def read_test_metrics(run_dir: str | Path) -> dict:
    """test_metrics.json: the best checkpoint's test metrics and the run's summary ({} before the run ends)."""
    path = Path(run_dir) / TEST_METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_result(run_dir: str | Path) -> FitResult:
    """A finished run's result, rebuilt from test_metrics.json and valid_metrics.json."""
    test_metrics, names = read_test_metrics(run_dir), set(FitResult.__dataclass_fields__) - {"test", "valid"}
    return FitResult(test={key: value for key, value in test_metrics.items() if key not in names},
                     valid=read_valid_metrics(run_dir), **{name: test_metrics[name] for name in names})


def write_transition_choice(run_dir: Path, weight: float, scores: dict[float, float], metric: str) -> None:
    (run_dir / TRANSITIONS_FILE).write_text(json.dumps(
        {"weight": weight, f"valid {metric} by weight": {str(w): score for w, score in scores.items()}}, indent=2))


def read_transition_choice(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / TRANSITIONS_FILE).read_text())


def load_run_transitions(run_dir: str | Path) -> TransitionPrior | None:
    """The prior a run chose (None when it has none or chose weight 0)."""
    path = Path(run_dir) / TRANSITIONS_FILE
    if not path.exists():
        return None
    weight = json.loads(path.read_text())["weight"]
    return load_transitions(run_dir, weight) if weight else None
