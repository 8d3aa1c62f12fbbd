"""The training step machinery: the objective, its losses per tower, the optimisers, the schedule and one step.

`train.fit` builds these once per run and calls a `TrainingStep` per batch; scripts that count or time a step use
the same pieces. A `Worker` is this process's part in training: single-process here, data-parallel in
`distributed.py`, so one loop serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqrank.training.batches import Shard, TrainBatch, sharded_batch_size
from seqrank.training.config import TrainConfig
from seqrank.training.data import SequenceData, history_bounds
from seqrank.training.losses import bce_loss, full_softmax_loss, sampled_softmax_loss
from seqrank.training.model import EncoderEnsemble, SequenceEncoder
from seqrank.training.vocab import PAD_INDEX


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
    dominates a sampled-softmax step on a million items (docs/benchmarks/retrieval.md, "A million-item catalogue"). SparseAdam updates only the rows
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
    (docs/benchmarks/training-speed.md, "Training on the H200"), so a step that never waits lets the host queue the next one while the card works."""

    def __init__(self, objective: torch.nn.Module, model: SequenceEncoder, optimizers, schedules, config: TrainConfig,
                 worker: Worker, device: torch.device, amp_dtype: torch.dtype | None):
        self.objective, self.parameters, self.optimizers, self.schedules = objective, list(model.parameters()), \
            optimizers, schedules
        self.config, self.worker, self.device, self.amp_dtype = config, worker, device, amp_dtype
        self.graphed = None
        if config.optim.cuda_graphs:
            if device.type != "cuda":
                raise RuntimeError(f"optim.cuda_graphs: needs a CUDA device, training runs on {device}")
            from seqrank.training.cuda_graphs import GraphedLoss

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
