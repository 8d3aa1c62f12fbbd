"""fit(config) → run directory: the training loop, early stopping on validation NDCG@10, best checkpoint.

`fit` reads as its steps: prepare the run (data, model, step machinery), train epoch by epoch while validation
improves, then evaluate the best checkpoint (choosing the transition prior's weight on validation) and write the
final metrics. The run directory's files are named and written by `run_dir.py`; the step machinery lives in
`step.py`.

The same loop runs data-parallel under Ray Train (`distributed.backend: ray`, training/distributed.py): there it is
given a `Worker` that shards the batches, wraps the objective in DDP and averages the logged loss; evaluation,
early stopping and every file of the run directory stay on rank 0, which tells the others when to stop.

Progress goes to the console (tqdm) and, when `fit` is given a `ProgressHook`, to that hook: the CLI's
`--metrics-port` / `--metrics-textfile` pass training/progress_metrics.py's Prometheus reporter (local backend only).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from seqrank.training import run_dir as run_files
from seqrank.training import warm_start
from seqrank.training.batches import causal_train_batches, masked_train_batches, next_item_masked_batches
from seqrank.training.config import TrainConfig
from seqrank.training.data import SequenceData
from seqrank.training.evaluate import Evaluation, evaluate_model, item_popularity
from seqrank.training.model import EncoderConfig, SequenceEncoder, build_encoder, load_encoder_dir, save_encoder
from seqrank.training.sources import load_sequences
from seqrank.training.step import (
    NegativeSampler,
    TrainingObjective,
    TrainingStep,
    Worker,
    build_optimizers,
    lr_factor,
    steps_per_epoch,
    training_samples,
)
from seqrank.training.transitions import TransitionPrior, count_transitions

log = logging.getLogger(__name__)
SELECTION_METRIC = "NDCG@10"


@dataclass
class TrainingRun:
    """Everything `fit` prepares before the first epoch."""

    config: TrainConfig
    run_dir: Path
    data: SequenceData
    model: SequenceEncoder
    step: TrainingStep
    worker: Worker
    device: torch.device
    amp_dtype: torch.dtype | None
    rng: np.random.Generator
    valid_users: np.ndarray | None


@dataclass(frozen=True)
class EpochProgress:
    """An epoch's end as the chief saw it, after validation: what a `ProgressHook` is told."""

    epoch: int
    max_epochs: int  # optim.max_epochs: no epoch past it
    loss: float  # the epoch's mean training loss
    valid_ndcg_at_10: float  # this epoch's validation NDCG@10 (SELECTION_METRIC)
    best_valid_ndcg_at_10: float
    best_epoch: int
    elapsed_seconds: float  # since the first epoch began
    stopping: bool  # no epoch follows: patience ran out or max_epochs was reached


class ProgressHook(Protocol):
    """Told how a run advances, on the chief only (training/progress_metrics.py exports it to Prometheus). Called on
    the training thread, so each method must be quick (`step_done` runs once per optimizer step)."""

    def step_done(self) -> None: ...

    def epoch_done(self, progress: EpochProgress) -> None: ...

    def run_done(self, result: run_files.FitResult) -> None: ...


@dataclass
class TrainingHistory:
    """The epochs run so far and the best one by validation NDCG@10."""

    started: float = field(default_factory=time.perf_counter)
    epochs: list[dict] = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("optim.device: cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoder_config_for(config: TrainConfig, data: SequenceData) -> EncoderConfig:
    """The configured architecture plus the sizes this data gives (behaviour and attribute tables only when the
    data has them and the config uses them)."""
    model = config.model
    use_attributes = model.use_attributes and data.item_attributes is not None
    return EncoderConfig(
        **model.architecture(),
        num_items=data.num_items,
        num_behaviors=data.num_behaviors if model.use_behaviors else 0,
        num_attributes=data.num_attributes if use_attributes else 0,
        max_attributes_per_item=data.item_attributes.shape[1] if use_attributes else 0,
    )


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["loss"] for h in history], marker=".")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in ("NDCG@10", "HR@10"):
        right.plot(epochs, [h["valid"][key] for h in history], marker=".", label=f"valid {key}")
    right.set(xlabel="epoch", title="validation (full ranking)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare_run(config: TrainConfig, run_dir: Path, data: SequenceData | None, worker: Worker,
                init_from: str | Path | None = None) -> TrainingRun:
    """Seeds, device, data, the run directory's metadata, the model and its training step; `init_from` (a run
    directory or an artifact) warm-starts the model from it (training/warm_start.py)."""
    seed_everything(config.optim.seed)
    if config.optim.num_threads:
        torch.set_num_threads(config.optim.num_threads)
    device = worker.device or resolve_device(config.optim.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and config.optim.bf16 else None
    data = data if data is not None else load_sequences(config.data)
    parent = warm_start.load_parent(init_from, config.data.attributes) if init_from else None
    if parent is not None:  # the union vocabulary: the parent's items absent from this data are kept
        data = warm_start.data_for_parent(data, parent, config.data.attributes)
    if worker.is_chief:
        run_files.write_run_metadata(run_dir, config, data, item_popularity(data, "test"))  # cold-start fallback
        if parent is not None:
            run_files.write_parent(run_dir, parent.record())

    model = build_encoder(encoder_config_for(config, data), data.item_attributes)
    if parent is not None:
        warm_start.initialise_from_parent(model, data, parent, config.data.attributes)
    model = model.to(device)
    optimizers = build_optimizers(model, config.optim)
    total_steps = steps_per_epoch(training_samples(data, config), config.optim.batch_size, worker.shard) \
        * config.optim.max_epochs
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, total_steps, config.optim))
                 for o in optimizers]
    sampler = NegativeSampler(item_popularity(data, "train"), device) if config.optim.loss == "sampled" else None
    objective = worker.wrap(TrainingObjective(model, config, sampler))
    step = TrainingStep(objective, model, optimizers, schedules, config, worker, device, amp_dtype)
    rng = np.random.default_rng(config.optim.seed)
    valid_users = subsample_users(data, config.eval.valid_users, rng)
    if worker.shard is not None:  # dropout and negatives differ per worker; the batch order comes from a shared rng
        torch.manual_seed(config.optim.seed + 7919 * worker.shard.rank)
        rng = np.random.default_rng([config.optim.seed, worker.shard.rank])
    return TrainingRun(config, run_dir, data, model, step, worker, device, amp_dtype, rng, valid_users)


def epoch_batches(run: TrainingRun, epoch: int):
    """The epoch's training batches for the model's objective (causal, cloze or next-item masked)."""
    config, shard = run.config, run.worker.shard
    order_rng = None if shard is None else np.random.default_rng([config.optim.seed, epoch])  # same on every rank
    if run.model.config.causal:
        return causal_train_batches(run.data, run.model.config, config.optim.batch_size, run.rng,
                                    config.model.item_dropout, shard, order_rng)
    if config.model.bert_objective == "next":
        return next_item_masked_batches(run.data, run.model.config, config.optim.batch_size, run.rng, shard, order_rng)
    return masked_train_batches(run.data, run.model.config, config.optim.batch_size, config.model.mask_probability,
                                run.rng, shard, order_rng)


def train_epoch(run: TrainingRun, epoch: int, progress: bool,
                hook: ProgressHook | None = None) -> tuple[float, float]:
    """One pass over the training batches; returns (mean loss over the workers, seconds)."""
    run.step.objective.train()
    started, total_loss, steps = time.perf_counter(), 0.0, 0
    for batch in tqdm(epoch_batches(run, epoch), desc=f"epoch {epoch}", leave=False,
                      disable=not (progress and run.worker.is_chief)):
        total_loss = total_loss + run.step(batch)
        steps += 1
        if hook is not None:
            hook.step_done()
    return run.worker.mean(float(total_loss) / max(steps, 1)), time.perf_counter() - started  # one device wait


def validate_epoch(run: TrainingRun, history: TrainingHistory, epoch: int, loss: float, train_seconds: float,
                   epoch_started: float, metrics_log, progress: bool) -> bool:
    """Chief only: validation NDCG@10, the epoch's record, the checkpoint when it improved; True = stop (patience)."""
    how = Evaluation.of(run.config.eval, device=run.device, dtype=run.amp_dtype, users=run.valid_users,
                        diversity=False)
    valid = evaluate_model(run.model, run.data, "valid", how)
    now = time.perf_counter()
    record = {"epoch": epoch, "loss": loss, "valid": valid, "train_seconds": train_seconds,
              "epoch_seconds": now - epoch_started, "elapsed_seconds": now - history.started}
    history.epochs.append(record)
    run_files.log_epoch(metrics_log, record)
    improved = valid[SELECTION_METRIC] > history.best_score
    if improved:
        history.best_score, history.best_epoch = valid[SELECTION_METRIC], epoch
        save_encoder(run.model, run.run_dir)
    if progress:
        tqdm.write(f"epoch {epoch:3d}  loss {loss:.4f}  valid NDCG@10 {valid['NDCG@10']:.4f}  "
                   f"HR@10 {valid['HR@10']:.4f}  {record['epoch_seconds']:.1f}s{'  *' if improved else ''}")
    return epoch - history.best_epoch >= run.config.optim.patience


def epoch_progress(run: TrainingRun, history: TrainingHistory, stop: bool) -> EpochProgress:
    """The hook's view of the epoch `validate_epoch` just recorded."""
    record, max_epochs = history.epochs[-1], run.config.optim.max_epochs
    return EpochProgress(epoch=record["epoch"], max_epochs=max_epochs, loss=record["loss"],
                         valid_ndcg_at_10=record["valid"][SELECTION_METRIC], best_valid_ndcg_at_10=history.best_score,
                         best_epoch=history.best_epoch, elapsed_seconds=record["elapsed_seconds"],
                         stopping=stop or record["epoch"] >= max_epochs)


def train_until_stopped(run: TrainingRun, progress: bool, hook: ProgressHook | None = None) -> TrainingHistory:
    """Epochs until validation stops improving for optim.patience epochs (or optim.max_epochs)."""
    history = TrainingHistory()
    metrics_log = run_files.open_metrics_log(run.run_dir) if run.worker.is_chief else None
    hook = hook if run.worker.is_chief else None
    try:
        for epoch in range(1, run.config.optim.max_epochs + 1):
            epoch_started = time.perf_counter()
            loss, train_seconds = train_epoch(run, epoch, progress, hook)
            stop = run.worker.is_chief and validate_epoch(run, history, epoch, loss, train_seconds, epoch_started,
                                                          metrics_log, progress)
            if hook is not None:
                hook.epoch_done(epoch_progress(run, history, stop))
            if run.worker.chief_decides(stop):
                break
    finally:
        if metrics_log is not None:
            metrics_log.close()
    return history


def evaluate_best(run: TrainingRun, history: TrainingHistory) -> run_files.FitResult:
    """The best checkpoint on the final-evaluation users: the prior's weight chosen on validation, then test."""
    config, data = run.config, run.data
    best = load_encoder_dir(run.run_dir, run.device)
    how = Evaluation.of(config.eval, device=run.device, dtype=run.amp_dtype, users=final_evaluation_users(data, config))
    if config.transitions.weights != [0.0]:
        prior, valid = fit_transition_prior(best, data, config, config.transitions.weights, run.run_dir, run.device,
                                            run.amp_dtype)
    else:
        prior, valid = None, evaluate_model(best, data, "valid", how)
    test = evaluate_model(best, data, "test", how, prior)
    return run_files.FitResult(
        test=test, valid=valid, best_epoch=history.best_epoch, epochs_run=len(history.epochs),
        seconds=time.perf_counter() - history.started,
        seconds_to_best=history.epochs[history.best_epoch - 1]["elapsed_seconds"], device=str(run.device),
        workers=1 if run.worker.shard is None else run.worker.shard.world_size,
        transition_weight=prior.weight if prior is not None else 0.0,
    )


def fit(config: TrainConfig, run_dir: str | Path, data: SequenceData | None = None, progress: bool = True,
        worker: Worker | None = None, hook: ProgressHook | None = None,
        init_from: str | Path | None = None) -> run_files.FitResult | None:
    """Train, keep the best checkpoint by validation NDCG@10, evaluate it on test; returns the chief's result.

    distributed.backend=ray hands the run to Ray Train, whose workers call back into this function with their
    `Worker`; non-chief workers return None. `hook` is told of each step, epoch and the finished run. `init_from`:
    warm start from that run directory or artifact (training/warm_start.py).
    """
    if hook is not None and config.distributed.backend == "ray":
        # The chief runs in a Ray Train worker process, maybe on another node: a hook of this process never sees it.
        raise ValueError("progress metrics need distributed.backend: local (with ray the chief is a Train worker)")
    if worker is None and config.distributed.backend == "ray":
        from seqrank.training.distributed import fit_with_ray  # imports Ray only when asked for

        return fit_with_ray(config, run_dir, data, progress, train_worker=partial(fit, init_from=init_from))
    run = prepare_run(config, Path(run_dir), data, worker or Worker(), init_from)
    history = train_until_stopped(run, progress, hook)
    if not run.worker.is_chief:
        return None
    plot_curves(history.epochs, run.run_dir / run_files.CURVES_FILE)
    result = evaluate_best(run, history)
    run_files.write_final_metrics(run.run_dir, result.valid, {**result.test, **result.summary()})
    if hook is not None:
        hook.run_done(result)
    return result


def fit_transition_prior(model: SequenceEncoder, data: SequenceData, config: TrainConfig, weights: list[float],
                         run_dir: Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[TransitionPrior, dict]:
    """The run's prior at the weight with the best validation NDCG@10 (ties: the smaller weight), saved with the
    run, and that weight's validation report (the run's final-evaluation users).

    The weight is a hyperparameter like the best epoch: chosen on validation, so the test split stays unseen.
    """
    prior = count_transitions(data)
    how = Evaluation.of(config.eval, device=device, dtype=dtype, users=final_evaluation_users(data, config))
    reports = {w: evaluate_model(model, data, "valid", how, prior.with_weight(w)) for w in sorted(set(weights))}
    weight = max(reports, key=lambda w: (reports[w][SELECTION_METRIC], -w))
    prior = prior.with_weight(weight)
    prior.save(run_dir)
    run_files.write_transition_choice(run_dir, weight, {w: r[SELECTION_METRIC] for w, r in reports.items()},
                                      SELECTION_METRIC)
    return prior, reports[weight]


def final_evaluation_users(data: SequenceData, config: TrainConfig) -> np.ndarray | None:
    """The users of the final valid/test evaluation (eval.test_users), the same for `fit` and `seqrank evaluate`."""
    return subsample_users(data, config.eval.test_users, np.random.default_rng(config.optim.seed + 1))


def subsample_users(data: SequenceData, count: int, rng: np.random.Generator) -> np.ndarray | None:
    """A fixed sorted random subset of `count` users, or None (all users) when count is 0 or covers them all."""
    if not count or count >= data.num_users:
        return None
    return np.sort(rng.choice(data.num_users, count, replace=False))
