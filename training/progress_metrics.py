"""A training run's progress as Prometheus gauges: the `ProgressHook` that `seqrank train --metrics-port N` and
`--metrics-textfile PATH.prom` pass to `fit` (training/train.py).

The gauges live in the reporter's own registry (never prometheus_client's global one), labelled `run` (the run
directory's name, so that the textfiles of several runs on one node stay apart). Two ways out, either or both:

- a port (`start_http_server`): Prometheus scrapes the live run; the step count moves with every optimizer step;
- a textfile for node-exporter's textfile collector (`write_to_textfile`: a temporary file, then an atomic rename,
  so a scrape never reads half a file), written when the run starts, at the end of each epoch and when the run
  finishes. node-exporter reads only `*.prom`, hence the required suffix.

Every series and how to alert on it: docs/metrics.md "Training progress". Times are seconds, timestamps Unix seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Gauge, start_http_server, write_to_textfile

from seqrank.training.run_dir import FitResult
from seqrank.training.train import EpochProgress

TEXTFILE_SUFFIX = ".prom"  # node-exporter's textfile collector reads only these
RUN_LABEL = "run"
DEFAULT_ADDRESS = "0.0.0.0"  # where --metrics-port listens: reachable by a Prometheus outside the machine


def eta_seconds(progress: EpochProgress) -> float:
    """Seconds of training left at most: the epochs up to max_epochs at the mean epoch time so far (early stopping
    may end sooner; the final evaluation comes on top); 0 once no epoch follows."""
    if progress.stopping:
        return 0.0
    return progress.elapsed_seconds / progress.epoch * (progress.max_epochs - progress.epoch)


class ProgressMetrics:
    """Gauges of run `run` (its `max_epochs`: optim.max_epochs), served on `port` (0 = any free one; `self.port`
    tells which) and/or written to `textfile`. `clock`: Unix seconds, for the timestamps. Call `close` when the
    command ends (stops the server)."""

    def __init__(self, run: str, max_epochs: int, *, textfile: str | Path | None = None, port: int | None = None,
                 address: str = DEFAULT_ADDRESS, clock: Callable[[], float] = time.time) -> None:
        if textfile is not None and Path(textfile).suffix != TEXTFILE_SUFFIX:
            raise ValueError(f"metrics textfile: must end in {TEXTFILE_SUFFIX} (node-exporter reads only those), "
                             f"got {textfile}")
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"metrics port: must be in [0, 65535], got {port}")
        self.registry = CollectorRegistry()
        self.textfile = Path(textfile) if textfile is not None else None
        self._run = run
        self._clock = clock

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, (RUN_LABEL,), registry=self.registry)

        # A labelled gauge has no series until first set: those of an epoch appear after the first epoch (never a
        # made-up 0 NDCG or ETA before), last_success only once the run succeeded.
        self.epoch = gauge("seqrank_train_epoch", "Epochs finished (validated) so far.")
        self.max_epochs = gauge("seqrank_train_max_epochs", "optim.max_epochs: the most epochs the run may take.")
        self.step = gauge("seqrank_train_step", "Optimizer steps taken so far, all epochs together.")
        self.started = gauge("seqrank_train_start_timestamp_seconds", "Unix time the run started.")
        self.loss = gauge("seqrank_train_loss", "Mean training loss of the last finished epoch.")
        self.valid_ndcg = gauge("seqrank_train_valid_ndcg_at_10", "Validation NDCG@10 of the last finished epoch.")
        self.best_ndcg = gauge("seqrank_train_best_valid_ndcg_at_10",
                               "Best validation NDCG@10 so far (the checkpoint the run keeps).")
        self.best_epoch = gauge("seqrank_train_best_epoch", "Epoch of the best validation NDCG@10 so far.")
        self.eta = gauge("seqrank_train_eta_seconds", "Training seconds left at most: epochs up to max_epochs at "
                                                      "the mean epoch time so far; 0 once training ended.")
        self.last_epoch = gauge("seqrank_train_last_epoch_timestamp_seconds", "Unix time the last epoch finished.")
        self.last_success = gauge("seqrank_train_last_success_timestamp_seconds",
                                  "Unix time the run finished and wrote its final metrics.")
        self._steps = self.step.labels(run)
        self._set(self.epoch, 0)
        self._set(self.max_epochs, max_epochs)
        self._steps.set(0)
        self._set(self.started, self._clock())
        self._server = None
        if port is not None:
            self._server, self._thread = start_http_server(port, address, registry=self.registry)
        self.port = self._server.server_port if self._server is not None else None
        self.write()

    def step_done(self) -> None:
        self._steps.inc()

    def epoch_done(self, progress: EpochProgress) -> None:
        for gauge, value in ((self.epoch, progress.epoch), (self.loss, progress.loss),
                             (self.valid_ndcg, progress.valid_ndcg_at_10),
                             (self.best_ndcg, progress.best_valid_ndcg_at_10), (self.best_epoch, progress.best_epoch),
                             (self.eta, eta_seconds(progress)), (self.last_epoch, self._clock())):
            self._set(gauge, value)
        self.write()

    def run_done(self, result: FitResult) -> None:
        self._set(self.eta, 0.0)
        self._set(self.last_success, self._clock())
        self.write()

    def _set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(self._run).set(value)

    def write(self) -> None:
        """The textfile, replaced atomically (no-op without one)."""
        if self.textfile is not None:
            write_to_textfile(str(self.textfile), self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
