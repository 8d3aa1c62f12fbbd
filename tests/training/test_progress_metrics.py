"""Training progress for Prometheus: tiny real runs on the synthetic log with `--metrics-textfile` and a metrics
port, the exposition read with prometheus_client's parser and checked against the run's own history file
(metrics.jsonl, written by the training loop, not by the reporter) and a step count worked out from the data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from seqrank.serving.cli import main
from seqrank.training.config import load_config
from seqrank.training.data import history_bounds
from seqrank.training.progress_metrics import ProgressMetrics, eta_seconds
from seqrank.training.sources import load_sequences
from seqrank.training.train import EpochProgress, fit
from tests import exposition

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
BATCH_SIZE = 128
SMALL = ["data.synthetic_users=300", "data.synthetic_items=100", "model.hidden_size=16", "model.intermediate_size=32",
         "optim.patience=10", f"optim.batch_size={BATCH_SIZE}", "optim.num_threads=1"]


def overrides(max_epochs: int) -> list[str]:
    return SMALL + [f"optim.max_epochs={max_epochs}"]


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_per_epoch(max_epochs: int) -> int:
    """Batches per epoch: every user whose training history has an input and a target, BATCH_SIZE at a time."""
    start, end = history_bounds(load_sequences(load_config(None, overrides(max_epochs)).data), "train")
    return math.ceil(int(((end - start) >= 2).sum()) / BATCH_SIZE)


def gauges(text: str, run: str) -> dict[str, float]:
    """Sample name -> value; every sample must carry exactly the run's label."""
    found = {}
    for sample in exposition.samples(text):
        assert sample.labels == {"run": run}, sample
        found[sample.name] = sample.value
    return found


def test_cli_textfile_ends_with_the_runs_own_epochs_and_best_validation(tmp_path):
    out, collector = tmp_path / "run-a", tmp_path / "textfile-collector"
    collector.mkdir()
    textfile = collector / "seqrank-train.prom"
    argv = ["train", "--quiet", "--out", str(out), "--metrics-textfile", str(textfile)]
    assert main(argv + [arg for override in overrides(3) for arg in ("--set", override)]) == 0

    records = history(out)
    final = gauges(textfile.read_text(), "run-a")
    ndcg = [record["valid"]["NDCG@10"] for record in records]
    assert final["seqrank_train_epoch"] == len(records) == 3
    assert final["seqrank_train_max_epochs"] == 3
    assert final["seqrank_train_step"] == 3 * steps_per_epoch(3)
    assert final["seqrank_train_loss"] == records[-1]["loss"]
    assert final["seqrank_train_valid_ndcg_at_10"] == ndcg[-1]
    assert final["seqrank_train_best_valid_ndcg_at_10"] == max(ndcg)
    assert final["seqrank_train_best_epoch"] == ndcg.index(max(ndcg)) + 1
    assert final["seqrank_train_eta_seconds"] == 0.0
    assert (final["seqrank_train_start_timestamp_seconds"] <= final["seqrank_train_last_epoch_timestamp_seconds"]
            <= final["seqrank_train_last_success_timestamp_seconds"])
    assert os.listdir(collector) == ["seqrank-train.prom"]  # written through a temporary file, renamed
    problems = exposition.promtool_problems(textfile.read_text())
    assert not problems, problems  # Prometheus's naming conventions (None: no promtool on this machine)
    for name, row in exposition.documented_rows(textfile.read_text(), DOCS.read_text()).items():
        assert row and "`run`" in row, f"docs/metrics.md lacks {name} or its label run"


class Watching:
    """The reporter as the hook, plus what Prometheus and node-exporter would read at each epoch's end."""

    def __init__(self, reporter: ProgressMetrics) -> None:
        self.reporter = reporter
        self.at_epoch_end: list[tuple[str, str]] = []  # (scraped from the port, the textfile)

    def step_done(self) -> None:
        self.reporter.step_done()

    def epoch_done(self, progress: EpochProgress) -> None:
        self.reporter.epoch_done(progress)
        self.at_epoch_end.append((exposition.scrape(f"http://127.0.0.1:{self.reporter.port}/metrics"),
                                  self.reporter.textfile.read_text()))

    def run_done(self, result) -> None:
        self.reporter.run_done(result)


def test_port_and_textfile_follow_every_epoch(tmp_path):
    max_epochs, textfile = 2, tmp_path / "progress.prom"
    reporter = ProgressMetrics("run-b", max_epochs, textfile=textfile, port=0, address="127.0.0.1")
    try:
        at_start = gauges(textfile.read_text(), "run-b")
        watching = Watching(reporter)
        fit(load_config(None, overrides(max_epochs)), tmp_path / "run-b", progress=False, hook=watching)
        at_end = gauges(exposition.scrape(f"http://127.0.0.1:{reporter.port}/metrics"), "run-b")
    finally:
        reporter.close()

    assert at_start["seqrank_train_epoch"] == 0 and at_start["seqrank_train_step"] == 0
    assert not {"seqrank_train_valid_ndcg_at_10", "seqrank_train_last_success_timestamp_seconds"} & set(at_start)
    records, per_epoch = history(tmp_path / "run-b"), steps_per_epoch(max_epochs)
    assert len(watching.at_epoch_end) == len(records) == max_epochs
    for epoch, (record, (scraped, written)) in enumerate(zip(records, watching.at_epoch_end), start=1):
        served = gauges(scraped, "run-b")
        assert gauges(written, "run-b") == served  # the textfile was rewritten at this epoch's end
        assert served["seqrank_train_epoch"] == epoch
        assert served["seqrank_train_step"] == epoch * per_epoch
        assert served["seqrank_train_valid_ndcg_at_10"] == record["valid"]["NDCG@10"]
        assert served["seqrank_train_eta_seconds"] == pytest.approx(
            record["elapsed_seconds"] / epoch * (max_epochs - epoch))  # the mean epoch so far, for those left
        assert "seqrank_train_last_success_timestamp_seconds" not in served  # not before the run succeeded
    assert at_end["seqrank_train_last_success_timestamp_seconds"] >= at_end["seqrank_train_last_epoch_timestamp_seconds"]
    assert gauges(textfile.read_text(), "run-b") == at_end


def test_eta_is_the_mean_epoch_time_for_the_epochs_left():
    progress = EpochProgress(epoch=4, max_epochs=10, loss=1.0, valid_ndcg_at_10=0.1, best_valid_ndcg_at_10=0.2,
                             best_epoch=2, elapsed_seconds=60.0, stopping=False)
    assert eta_seconds(progress) == 90.0  # 15 s an epoch, 6 left
    assert eta_seconds(EpochProgress(**{**progress.__dict__, "stopping": True})) == 0.0


def test_latest_and_best_validation_are_kept_apart(tmp_path):
    textfile = tmp_path / "progress.prom"
    reporter = ProgressMetrics("run-c", 10, textfile=textfile, clock=lambda: 1_700_000_000.0)
    reporter.epoch_done(EpochProgress(epoch=5, max_epochs=10, loss=2.5, valid_ndcg_at_10=0.125,
                                      best_valid_ndcg_at_10=0.25, best_epoch=3, elapsed_seconds=50.0, stopping=False))
    assert gauges(textfile.read_text(), "run-c") == {
        "seqrank_train_epoch": 5, "seqrank_train_max_epochs": 10, "seqrank_train_step": 0,
        "seqrank_train_start_timestamp_seconds": 1_700_000_000.0, "seqrank_train_loss": 2.5,
        "seqrank_train_valid_ndcg_at_10": 0.125, "seqrank_train_best_valid_ndcg_at_10": 0.25,
        "seqrank_train_best_epoch": 3, "seqrank_train_eta_seconds": 50.0,
        "seqrank_train_last_epoch_timestamp_seconds": 1_700_000_000.0}


def test_cli_refuses_a_textfile_node_exporter_would_not_read_and_the_ray_backend(tmp_path, capsys):
    base = ["train", "--quiet", "--set", "optim.max_epochs=1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--metrics-textfile", str(tmp_path / "progress.txt")]) == 2
    assert "must end in .prom" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--metrics-port", "0",
                        "--set", "distributed.backend=ray"]) == 2
    assert "need distributed.backend: local" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and os.listdir(tmp_path) == []
