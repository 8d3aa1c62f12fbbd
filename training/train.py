"""fit(config) → run directory: the training loop, early stopping on validation NDCG@10, best checkpoint.

Run directory layout (everything evaluation and export need, nothing pickled):
    config.yaml          the resolved TrainConfig
    data.json            data fingerprint, counts, behaviour names, source
    item_ids.json        raw item id per internal index (0 = PAD)
    encoder_config.json  + encoder.safetensors: the best checkpoint by validation NDCG@10
    metrics.jsonl        one line per epoch: loss, validation metrics, seconds
    valid_metrics.json, test_metrics.json   of the best checkpoint
    curves.png           loss and validation NDCG@10 / HR@10 per epoch

The same `fit` runs data-parallel under Ray Train (`distributed.backend: ray`, training/distributed.py): there it is
given a `Worker` that shards the batches, wraps the objective in DDP and averages the logged loss; evaluation,
early stopping and every file of the run directory stay on rank 0, which tells the others when to stop.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from training.artifact import PAD_INDEX
from training.batches import (
    Shard, TrainBatch, causal_train_batches, masked_train_batches, next_item_masked_batches, sharded_batch_size,
)
from training.config import TrainConfig
from training.data import SequenceData, history_bounds, load_sequences
from training.evaluate import evaluate_model, item_popularity
from training.losses import bce_loss, full_softmax_loss, sampled_softmax_loss
from training.model import EncoderConfig, EncoderEnsemble, SequenceEncoder, build_encoder, load_encoder_dir, save_encoder
from training.transitions import TransitionPrior, count_transitions, load_transitions

log = logging.getLogger(__name__)
SELECTION_METRIC = "NDCG@10"
TRANSITIONS_RUN_FILE = "transitions.json"  # the chosen prior weight and the validation score of each one tried


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
    model = config.model
    use_attributes = model.use_attributes and data.item_attributes is not None
    return EncoderConfig(
        num_items=data.num_items,
        num_behaviors=data.num_behaviors if model.use_behaviors else 0,
        num_attributes=data.num_attributes if use_attributes else 0,
        max_attributes_per_item=data.item_attributes.shape[1] if use_attributes else 0,
        max_len=model.max_len, hidden_size=model.hidden_size, num_layers=model.num_layers,
        num_heads=model.num_heads, intermediate_size=model.intermediate_size, dropout=model.dropout,
        attention_dropout=model.attention_dropout, backbone=model.backbone, similarity=model.similarity,
        temperature=model.temperature, frequency_mix=model.frequency_mix, frequency_cutoff=model.frequency_cutoff,
        towers=tuple(model.towers),
    )


@dataclass
class Worker:
    """This process's part in training. The default is single-process training; training/distributed.py provides
    the data-parallel one (rank, DDP wrapping, all-reduce), so `fit` has a single loop for both."""

    shard: Shard | None = None
    device: torch.device | None = None  # None: resolve optim.device

    @property
    def is_chief(self) -> bool:
        """Rank 0: evaluates, decides when to stop and writes the run directory."""
        return self.shard is None or self.shard.rank == 0

    def wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        return objective

    def mean(self, value: float) -> float:
        """Average of `value` over the workers."""
        return value

    def loss_weight(self, positions: int) -> float:
        """Factor on this worker's mean loss over `positions` predicted positions such that DDP's gradient average
        equals the gradient of the mean over every worker's positions, as one process would compute it."""
        return 1.0

    def chief_decides(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every worker."""
        return flag


class NegativeSampler:
    """Draws negatives from the training item distribution and knows each one's log expected count (logQ).

    Sampling inverts a precomputed float64 CDF (O(M log I) per draw of M), where torch.multinomial would rebuild
    it over the whole catalogue every step.
    """

    def __init__(self, popularity: np.ndarray, device: torch.device):
        counts = torch.as_tensor(popularity, dtype=torch.float64)
        counts[PAD_INDEX] = 0
        probabilities = counts / counts.sum()
        self.cumulative = probabilities.cumsum(0).to(device)  # (I+1,)
        self.log_probabilities = torch.log(probabilities.float().clamp(min=1e-12)).to(device)  # (I+1,)

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        uniform = torch.rand(count, dtype=torch.float64, generator=generator, device=self.cumulative.device)
        drawn = torch.searchsorted(self.cumulative, uniform * self.cumulative[-1], right=True)
        return drawn.clamp(max=len(self.cumulative) - 1)


@dataclass(frozen=True)
class StepTargets:
    """What every tower's loss on one batch shares: the predicted items and, under mask_history, what each
    predicting position has already seen. Computed once per batch, not once per tower."""

    items: torch.Tensor  # (N,) the item to predict at each predicting position
    excluded: torch.Tensor | None  # (N, T) item indices removed from each row's softmax, PAD elsewhere


def step_targets(batch: TrainBatch, config: TrainConfig, num_items: int) -> StepTargets:
    targets = batch.targets.flatten()[batch.positions]  # (N,)
    excluded = None
    if config.optim.loss == "ce" and config.optim.mask_history:
        excluded = seen_before(batch.items, batch.positions, targets, num_items)
    return StepTargets(targets, excluded)


def batch_loss(model: SequenceEncoder, batch: TrainBatch, config: TrainConfig, sampler: NegativeSampler | None):
    """The batch's training loss; an ensemble's is the sum of its towers' own losses (an ensemble of models, not
    one wide model). Nothing here waits for the device: every shape is known on the host."""
    towers = model.towers if isinstance(model, EncoderEnsemble) else (model,)
    shared = step_targets(batch, config, model.config.num_items)
    losses = [tower_loss(tower, batch, shared, config, sampler) for tower in towers]
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


def tower_loss(model: SequenceEncoder, batch: TrainBatch, shared: StepTargets, config: TrainConfig,
               sampler: NegativeSampler | None) -> torch.Tensor:
    hidden = model(batch.items, batch.behaviors, batch.lengths)  # (B, T, D)
    user_vectors = model.project_users(hidden.flatten(0, 1)[batch.positions])  # (N, D): only real positions
    targets = shared.items
    loss_name = config.optim.loss
    if loss_name == "ce":
        item_vectors = model.output_item_vectors()[: model.config.num_items + 1]
        return full_softmax_loss(user_vectors, item_vectors, targets, shared.excluded)
    if loss_name == "sampled":
        negatives = sampler.sample(config.optim.num_negatives)  # (M,) shared by the batch
        unique, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)
        vectors = model.output_item_vectors(unique)[inverse]  # only the sampled rows: O(batch), not O(catalogue)
        log_count = np.log(config.optim.num_negatives)  # log expected count = log q + log M, gathered per row only
        return sampled_softmax_loss(
            user_vectors, vectors[: len(targets)], vectors[len(targets):], sampler.log_probabilities[targets] + log_count,
            sampler.log_probabilities[negatives] + log_count, targets.unsqueeze(1) == negatives.unsqueeze(0),
        )
    negatives = torch.randint(1, model.config.num_items + 1, targets.shape, device=targets.device)
    return bce_loss(user_vectors, model.output_item_vectors(targets), model.output_item_vectors(negatives))


class TrainingObjective(torch.nn.Module):
    """The model and its loss as one module, so a DDP wrapper sees the whole step inside its forward."""

    def __init__(self, model: SequenceEncoder, config: TrainConfig, sampler: NegativeSampler | None):
        super().__init__()
        self.model, self.config, self.sampler = model, config, sampler

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        return batch_loss(self.model, batch, self.config, self.sampler)


def seen_before(items: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """(N, T) item indices each predicting position has already seen (its causal prefix), PAD elsewhere.

    items (B, T) inputs, positions (N,) flat indices into B*T, targets (N,). Evaluation never ranks seen items,
    so excluding them from the softmax denominator trains what is evaluated; a prefix item equal to the target is
    kept (repeat purchases stay learnable).
    """
    T = items.shape[1]
    rows, steps = positions // T, positions % T
    prefix = torch.arange(T, device=items.device).unsqueeze(0) <= steps.unsqueeze(1)  # (N, T): inputs 0..t
    seen = items[rows]  # (N, T)
    keep = prefix & (seen != targets.unsqueeze(1)) & (seen <= num_items)  # [MASK] inputs are not items
    return seen.masked_fill(~keep, PAD_INDEX)


def build_optimizers(model: SequenceEncoder, optim) -> list[torch.optim.Optimizer]:
    """AdamW over every parameter; with optim.sparse_item_embeddings the item table goes to SparseAdam instead.

    AdamW is the fused kernel: one launch for all parameters instead of a few per tensor, which is most of the
    optimiser's cost for a small model on a GPU. Dense AdamW reads and writes the whole (I+2, D) table and its two
    moment buffers every step, and backward materialises a dense (I+2, D) gradient: O(catalogue) per step, which
    dominates a sampled-softmax step on a million items (BENCHMARKS.md, issue 6). SparseAdam updates only the rows
    a step touched (lazy Adam: a row's moments age only when it is seen); it has no weight decay, so the table
    gets none in that mode.
    """
    adamw = dict(lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    if not optim.sparse_item_embeddings:
        return [torch.optim.AdamW(model.parameters(), **adamw)]
    model.item_embedding.sparse = True  # a training-time switch of nn.Embedding: backward returns a sparse gradient
    table = model.item_embedding.weight
    dense = [p for p in model.parameters() if p is not table]
    return [torch.optim.AdamW(dense, **adamw), torch.optim.SparseAdam([table], lr=optim.lr)]


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that also takes sparse gradients (coalesced first, so repeated rows count once); returns
    the total norm as a device tensor, so clipping never waits for the device."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # foreach kernels where the device has them
    grads = []
    for p in parameters:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        grads.append(p.grad)
    norms = [(g._values() if g.is_sparse else g).detach().float().norm() for g in grads]
    total = torch.stack(norms).norm()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    return total


class TrainingStep:
    """One optimiser step on one batch, with no host-device synchronisation: the loss comes back as a device
    tensor, summed over the epoch and read once at its end. On a GPU a step of this small model is launch-bound
    (BENCHMARKS.md 5b), so a step that never waits lets the host queue the next one while the card works."""

    def __init__(self, objective: torch.nn.Module, model: SequenceEncoder, optimizers, schedules, config: TrainConfig,
                 worker: Worker, device: torch.device, amp_dtype: torch.dtype | None):
        self.objective, self.parameters, self.optimizers, self.schedules = objective, list(model.parameters()), \
            optimizers, schedules
        self.config, self.worker, self.device, self.amp_dtype = config, worker, device, amp_dtype
        self.graphed = None
        if config.optim.cuda_graphs:
            if device.type != "cuda":
                raise RuntimeError(f"optim.cuda_graphs: needs a CUDA device, training runs on {device}")
            from training.cuda_graphs import GraphedLoss

            self.graphed = GraphedLoss(objective, config.optim.batch_size, config.optim.graph_length, amp_dtype)

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        if self.graphed is not None:
            batch = self.graphed.pad(batch).to(self.device)
            loss = self.graphed(batch)
        else:
            batch = batch.to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.objective(batch)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        weight = self.worker.loss_weight(batch.positions.shape[0]) if self.worker.shard else 1.0
        (loss * weight if weight != 1.0 else loss).backward()
        if self.config.optim.grad_clip:
            clip_gradients(self.parameters, self.config.optim.grad_clip)
        for optimizer, schedule in zip(self.optimizers, self.schedules):
            optimizer.step()
            schedule.step()
        return loss.detach()


def steps_per_epoch(samples: int, batch_size: int, shard: Shard | None) -> int:
    """Optimizer steps in one epoch (per worker under a shard): the epoch's training samples over the batch."""
    batches = -(-samples // sharded_batch_size(batch_size, shard))
    return batches if shard is None else -(-batches // shard.world_size)


def training_samples(data: SequenceData, config: TrainConfig) -> int:
    """Sequences one epoch trains on: each trainable history, or each of its prefixes under bert's next objective."""
    start, end = history_bounds(data, "train")
    lengths = end - start
    if config.model.backbone == "bert" and config.model.bert_objective == "next":
        return int(np.sum(np.maximum(lengths - 1, 0)))
    return int(np.sum(lengths >= 2))


def lr_factor(step: int, total_steps: int, optim) -> float:
    """Multiplier of optim.lr: linear warm-up over warmup_steps, then constant or cosine decay to 0 at total_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "cosine":
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


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


def write_run_metadata(run_dir: Path, config: TrainConfig, data: SequenceData) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run_dir / "item_ids.json").write_text(json.dumps([str(x) for x in data.item_ids]))
    np.save(run_dir / "item_popularity.npy", item_popularity(data, "test").astype(np.float32))  # cold-start fallback
    info = {
        "fingerprint": data.fingerprint, "num_users": data.num_users, "num_items": data.num_items,
        "num_events": int(len(data.items)), "behavior_names": list(data.behavior_names),
        "num_attributes": data.num_attributes, "source": config.data.path or "synthetic",
    }
    (run_dir / "data.json").write_text(json.dumps(info, indent=2))


def fit(config: TrainConfig, run_dir: str | Path, data: SequenceData | None = None, progress: bool = True,
        worker: Worker | None = None) -> dict:
    """Train, keep the best checkpoint by validation NDCG@10, evaluate it on test; returns the test metrics.

    distributed.backend=ray hands the run to Ray Train, whose workers call back into this function with their
    `Worker`; non-chief workers return {}.
    """
    if worker is None and config.distributed.backend == "ray":
        from training.distributed import fit_with_ray  # imports Ray only when asked for

        return fit_with_ray(config, run_dir, data, progress)
    worker = worker or Worker()
    chief, shard = worker.is_chief, worker.shard
    run_dir = Path(run_dir)
    seed_everything(config.optim.seed)
    if config.optim.num_threads:
        torch.set_num_threads(config.optim.num_threads)
    device = worker.device or resolve_device(config.optim.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and config.optim.bf16 else None
    data = data if data is not None else load_sequences(config.data)
    if chief:
        write_run_metadata(run_dir, config, data)

    model = build_encoder(encoder_config_for(config, data), data.item_attributes).to(device)
    optimizers = build_optimizers(model, config.optim)
    total_steps = steps_per_epoch(training_samples(data, config), config.optim.batch_size, shard) * config.optim.max_epochs
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, total_steps, config.optim))
                 for o in optimizers]
    sampler = NegativeSampler(item_popularity(data, "train"), device) if config.optim.loss == "sampled" else None
    objective = worker.wrap(TrainingObjective(model, config, sampler))
    step = TrainingStep(objective, model, optimizers, schedules, config, worker, device, amp_dtype)
    rng = np.random.default_rng(config.optim.seed)
    valid_users = subsample_users(data, config.eval.valid_users, rng)
    if shard is not None:  # dropout and negatives differ per worker; the batch order comes from a shared rng below
        torch.manual_seed(config.optim.seed + 7919 * shard.rank)
        rng = np.random.default_rng([config.optim.seed, shard.rank])

    history: list[dict] = []
    best_score, best_epoch, started = -1.0, 0, time.perf_counter()
    metrics_file = open(run_dir / "metrics.jsonl", "w") if chief else None
    for epoch in range(1, config.optim.max_epochs + 1):
        objective.train()
        epoch_start, total_loss, steps = time.perf_counter(), 0.0, 0
        order_rng = None if shard is None else np.random.default_rng([config.optim.seed, epoch])  # same on every rank
        if model.config.causal:
            batches = causal_train_batches(data, model.config, config.optim.batch_size, rng, config.model.item_dropout,
                                           shard, order_rng)
        elif config.model.bert_objective == "next":
            batches = next_item_masked_batches(data, model.config, config.optim.batch_size, rng, shard, order_rng)
        else:
            batches = masked_train_batches(data, model.config, config.optim.batch_size, config.model.mask_probability,
                                           rng, shard, order_rng)
        for batch in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not (progress and chief)):
            total_loss = total_loss + step(batch)
            steps += 1
        train_seconds = time.perf_counter() - epoch_start
        mean_loss = worker.mean(float(total_loss) / max(steps, 1))  # the epoch's one wait for the device
        stop = False
        if chief:
            valid = evaluate_model(model, data, "valid", config.eval.ks, config.eval.batch_size, device, valid_users,
                                   amp_dtype, diversity=False)
            record = {
                "epoch": epoch, "loss": mean_loss, "valid": valid, "train_seconds": train_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start, "elapsed_seconds": time.perf_counter() - started,
            }
            history.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            improved = valid[SELECTION_METRIC] > best_score
            if improved:
                best_score, best_epoch = valid[SELECTION_METRIC], epoch
                save_encoder(model, run_dir)
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d}  loss {record['loss']:.4f}  valid NDCG@10 {valid['NDCG@10']:.4f}  "
                    f"HR@10 {valid['HR@10']:.4f}  {record['epoch_seconds']:.1f}s{'  *' if improved else ''}"
                )
            stop = epoch - best_epoch >= config.optim.patience
        if worker.chief_decides(stop):
            break
    if not chief:
        return {}
    metrics_file.close()
    plot_curves(history, run_dir / "curves.png")

    best = load_encoder_dir(run_dir, device)
    final_users = final_evaluation_users(data, config)
    if config.transitions.weights != [0.0]:
        prior, valid = fit_transition_prior(best, data, config, config.transitions.weights, run_dir, device, amp_dtype)
    else:
        prior = None
        valid = evaluate_model(best, data, "valid", config.eval.ks, config.eval.batch_size, device, final_users,
                               amp_dtype)
    test = evaluate_model(best, data, "test", config.eval.ks, config.eval.batch_size, device, final_users, amp_dtype,
                          prior)
    summary = {"best_epoch": best_epoch, "epochs_run": len(history), "seconds": time.perf_counter() - started,
               "seconds_to_best": history[best_epoch - 1]["elapsed_seconds"], "device": str(device),
               "workers": 1 if shard is None else shard.world_size,
               "transition_weight": prior.weight if prior is not None else 0.0}
    (run_dir / "valid_metrics.json").write_text(json.dumps(valid, indent=2))
    (run_dir / "test_metrics.json").write_text(json.dumps({**test, **summary}, indent=2))
    return {**test, **summary}


def fit_transition_prior(model: SequenceEncoder, data: SequenceData, config: TrainConfig, weights: list[float],
                         run_dir: Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[TransitionPrior, dict]:
    """The run's prior at the weight with the best validation NDCG@10 (ties: the smaller weight), saved with the
    run, and that weight's validation report (the run's final-evaluation users).

    The weight is a hyperparameter like the best epoch: chosen on validation, so the test split stays unseen.
    """
    prior, users = count_transitions(data), final_evaluation_users(data, config)
    reports = {w: evaluate_model(model, data, "valid", config.eval.ks, config.eval.batch_size, device, users, dtype,
                                 prior.with_weight(w))
               for w in sorted(set(weights))}
    weight = max(reports, key=lambda w: (reports[w][SELECTION_METRIC], -w))
    prior = prior.with_weight(weight)
    prior.save(run_dir)
    (run_dir / TRANSITIONS_RUN_FILE).write_text(json.dumps({"weight": weight, f"valid {SELECTION_METRIC} by weight": {
        str(w): report[SELECTION_METRIC] for w, report in reports.items()}}, indent=2))
    return prior, reports[weight]


def load_run_transitions(run_dir: str | Path) -> TransitionPrior | None:
    """The prior a run chose (None when it has none or chose weight 0)."""
    path = Path(run_dir) / TRANSITIONS_RUN_FILE
    if not path.exists():
        return None
    weight = json.loads(path.read_text())["weight"]
    return load_transitions(run_dir, weight) if weight else None


def final_evaluation_users(data: SequenceData, config: TrainConfig) -> np.ndarray | None:
    """The users of the final valid/test evaluation (eval.test_users), the same for `fit` and `seqrank evaluate`."""
    return subsample_users(data, config.eval.test_users, np.random.default_rng(config.optim.seed + 1))


def subsample_users(data: SequenceData, count: int, rng: np.random.Generator) -> np.ndarray | None:
    """A fixed sorted random subset of `count` users, or None (all users) when count is 0 or covers them all."""
    if not count or count >= data.num_users:
        return None
    return np.sort(rng.choice(data.num_users, count, replace=False))
