"""SequenceData → padded tensors for training and evaluation, built without Python loops over events.

Batches are length-bucketed: users are sorted by history length (random tie-breaks that change each epoch), cut
into batches, and the batch order is shuffled. Each batch is right-padded only to its own longest history, so on
short-sequence data (Beauty averages 8.9 events) almost no padding is computed.

Data-parallel training gives each worker a `Shard`: every worker draws the same batch order (from an `order_rng`
seeded identically on all of them) and keeps every world_size-th batch, like torch's DistributedSampler over
batches instead of samples; the list is first padded by repeating its head so every worker runs as many steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from seqrank.training.data import SequenceData, history_bounds, target_positions
from seqrank.training.model import EncoderConfig
from seqrank.training.vocab import PAD_INDEX


@dataclass(frozen=True)
class Shard:
    """Worker `rank` of `world_size` data-parallel workers."""

    rank: int
    world_size: int


@dataclass(frozen=True)
class TrainBatch:
    items: torch.Tensor  # (B, T) input item indices, right-padded with PAD_INDEX
    behaviors: torch.Tensor | None  # (B, T) behaviour indices or None
    lengths: torch.Tensor  # (B,) real input length per row
    targets: torch.Tensor  # (B, T) item to predict at each position, PAD_INDEX where there is none
    # (N,) flat indices into B*T of the positions that predict something, found on the host when the batch is
    # built: selecting them on the device by a boolean mask would make it wait (nonzero) once per tower and step
    positions: torch.Tensor

    def to(self, device) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TrainBatch(move(self.items), move(self.behaviors), move(self.lengths), move(self.targets),
                          move(self.positions))


def train_batch(items: np.ndarray, behaviors: np.ndarray | None, lengths: np.ndarray, targets: np.ndarray) -> TrainBatch:
    """A TrainBatch of int64 tensors from the builders' numpy arrays, with its predicting positions."""
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return TrainBatch(as_tensor(items), as_tensor(behaviors), as_tensor(lengths), as_tensor(targets),
                      as_tensor(np.flatnonzero(targets != PAD_INDEX)))


def pad_to_shape(batch: TrainBatch, rows: int, length_multiple: int) -> TrainBatch:
    """The batch padded to `rows` rows and a length that is a multiple of `length_multiple`, every position
    predicting: padding rows and columns target PAD, which the full-softmax loss ignores, so the loss is the same.

    Static shapes are what a CUDA graph replays (training/cuda_graphs.py): with length buckets a whole epoch then
    has max_len / length_multiple shapes instead of one per batch length and size. Right padding cannot reach a
    real position of a causal model, and a padding row has length 1 so its position ids stay in range.
    """
    B, T = batch.items.shape
    extra_rows, extra_steps = max(rows, B) - B, -(-T // length_multiple) * length_multiple - T

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, extra_steps, 0, extra_rows), value=value)

    lengths = torch.nn.functional.pad(batch.lengths, (0, extra_rows), value=1)
    items, targets = pad(batch.items, PAD_INDEX), pad(batch.targets, PAD_INDEX)
    behaviors = None if batch.behaviors is None else pad(batch.behaviors, 0)
    return TrainBatch(items, behaviors, lengths, targets, torch.arange(items.numel(), device=items.device))


def gather_padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad: int = PAD_INDEX) -> np.ndarray:
    """CSR slices values[starts[b] : starts[b] + lengths[b]] → (B, max length) right-padded matrix."""
    T = int(lengths.max()) if len(lengths) else 0
    steps = np.arange(T)
    valid = steps[None, :] < lengths[:, None]
    index = np.where(valid, starts[:, None] + steps[None, :], 0)
    out = values[index]
    out[~valid] = pad
    return out


def length_bucketed_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """User indices grouped into batches of similar length, batch order shuffled."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def shard_batches(batches: list[np.ndarray], shard: Shard | None) -> list[np.ndarray]:
    """This worker's batches: every world_size-th one, after padding the list with its own head to a multiple of
    world_size (DistributedSampler's rule), so all workers take the same number of steps."""
    if shard is None or shard.world_size == 1:
        return batches
    padded = batches + batches[: -len(batches) % shard.world_size]
    return padded[shard.rank :: shard.world_size]


def sharded_batch_size(batch_size: int, shard: Shard | None) -> int:
    """Users per worker batch, so that one data-parallel step still covers about `batch_size` users."""
    return batch_size if shard is None else -(-batch_size // shard.world_size)


def _epoch_order(lengths, batch_size, rng, order_rng, shard) -> list[np.ndarray]:
    batches = length_bucketed_order(lengths, sharded_batch_size(batch_size, shard), rng if order_rng is None else order_rng)
    return shard_batches(batches, shard)


def causal_train_batches(
    data: SequenceData, config: EncoderConfig, batch_size: int, rng: np.random.Generator, item_dropout: float = 0.0,
    shard: Shard | None = None, order_rng: np.random.Generator | None = None,
) -> Iterator[TrainBatch]:
    """Next-item batches: input events [0, n-1) of each train history, target events [1, n); newest max_len kept.

    item_dropout: share of input items replaced by [MASK] (targets unchanged), a regulariser for sparse logs:
    the model cannot lean on any single past item. shard/order_rng: see the module docstring (order_rng defaults
    to rng, which also draws the dropout).
    """
    start, end = history_bounds(data, "train")
    usable = np.flatnonzero(end - start >= 2)
    total = end[usable] - start[usable]
    window = np.minimum(total, config.max_len + 1)  # inputs + the one extra target
    first = end[usable] - window
    for batch in _epoch_order(window, batch_size, rng, order_rng, shard):
        lengths = window[batch] - 1
        items = gather_padded(data.items, first[batch], lengths)
        targets = gather_padded(data.items, first[batch] + 1, lengths)
        if item_dropout:
            items = np.where((rng.random(items.shape) < item_dropout) & (items != PAD_INDEX), config.mask_index, items)
        behaviors = None if data.behaviors is None else gather_padded(data.behaviors, first[batch], lengths, 0)
        yield train_batch(items, behaviors, lengths, targets)


def masked_train_batches(
    data: SequenceData, config: EncoderConfig, batch_size: int, mask_probability: float, rng: np.random.Generator,
    shard: Shard | None = None, order_rng: np.random.Generator | None = None,
) -> Iterator[TrainBatch]:
    """BERT4Rec batches: random positions replaced by [MASK] and predicted; the newest one is masked half the time."""
    start, end = history_bounds(data, "train")
    usable = np.flatnonzero(end - start >= 2)
    window = np.minimum(end[usable] - start[usable], config.max_len)
    first = end[usable] - window
    for batch in _epoch_order(window, batch_size, rng, order_rng, shard):
        lengths = window[batch]
        items = gather_padded(data.items, first[batch], lengths).astype(np.int64)
        real = items != PAD_INDEX
        masked = (rng.random(items.shape) < mask_probability) & real
        newest = lengths - 1
        rows = np.arange(len(batch))
        masked[rows, newest] |= rng.random(len(batch)) < 0.5  # train the inference case: [MASK] at the end
        masked[rows, newest] |= ~masked.any(1)  # every row predicts something
        targets = np.where(masked, items, PAD_INDEX)
        items = np.where(masked, config.mask_index, items)
        behaviors = None if data.behaviors is None else gather_padded(data.behaviors, first[batch], lengths, 0)
        yield train_batch(items, behaviors, lengths, targets)


@dataclass(frozen=True)
class EvalBatch:
    users: np.ndarray  # (B,) internal user indices
    histories: list[np.ndarray]  # full input histories (the model truncates; masking uses all of it)
    behaviors: list[np.ndarray] | None
    targets: np.ndarray  # (B,) item index to rank


def eval_batches(data: SequenceData, split: str, batch_size: int, users: np.ndarray | None = None) -> Iterator[EvalBatch]:
    """Evaluation inputs for `split` ("valid" or "test") of the users that have a target and an input (data.py
    `target_positions`), grouped by history length."""
    start, end = history_bounds(data, split)
    position, evaluated = target_positions(data, split)
    if users is None:
        users = np.arange(data.num_users)
    users = users[evaluated[users]]
    users = users[np.argsort(end[users] - start[users], kind="stable")]
    for i in range(0, len(users), batch_size):
        batch = users[i : i + batch_size]
        histories = [data.items[start[u] : end[u]] for u in batch]
        behaviors = None
        if data.behaviors is not None:
            behaviors = [data.behaviors[start[u] : end[u]] for u in batch]
        yield EvalBatch(batch, histories, behaviors, data.items[position[batch]].astype(np.int64))


def next_item_masked_batches(
    data: SequenceData, config: EncoderConfig, batch_size: int, rng: np.random.Generator,
    shard: Shard | None = None, order_rng: np.random.Generator | None = None,
) -> Iterator[TrainBatch]:
    """Bidirectional next-item batches: every prefix of each train history, with [MASK] appended, predicts the item
    that follows it, which is exactly how a bidirectional model is queried at inference.

    Unlike causal training, one pass cannot serve all positions (each prefix sees itself both ways), so a history
    of n events becomes n - 1 samples (BSARec's training set); batch_size counts samples.
    """
    start, end = history_bounds(data, "train")
    usable = np.flatnonzero(end - start >= 2)
    counts = end[usable] - start[usable] - 1  # predictable positions per user
    user_start = np.repeat(start[usable], counts)
    step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0..count-1 within each user
    target_at = user_start + step + 1
    first = np.maximum(target_at - (config.max_len - 1), user_start)
    window = target_at - first  # inputs before the [MASK]
    for batch in _epoch_order(window + 1, batch_size, rng, order_rng, shard):
        lengths = window[batch] + 1
        items = gather_padded(data.items, first[batch], lengths).astype(np.int64)
        rows = np.arange(len(batch))
        items[rows, lengths - 1] = config.mask_index
        targets = np.full_like(items, PAD_INDEX)
        targets[rows, lengths - 1] = data.items[target_at[batch]]
        behaviors = None
        if data.behaviors is not None:
            behaviors = gather_padded(data.behaviors, first[batch], lengths, 0).astype(np.int64)
            behaviors[rows, lengths - 1] = 0
        yield train_batch(items, behaviors, lengths, targets)
