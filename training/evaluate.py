"""Full-ranking evaluation: each target is ranked against ALL items, not sampled negatives.

Items already in the user's input history are removed from the ranking (score -inf), as the published anchors
do (Dross, gSASRec, eSASRec filter them out; the S3-Rec/BSARec code sets them to 0, which can only lower
its numbers). The most-popular baseline goes through the same code path. Which events are inputs and targets is
the data's protocol (leave-one-out or temporal, training/data.py). `rank_model` / `rank_popularity` keep each
user's target rank, so `per_user_metrics` gives the per-user values that training/bootstrap.py resamples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from seqrank.training.batches import EvalBatch, eval_batches, gather_padded
from seqrank.training.config import EvalConfig
from seqrank.training.data import SequenceData, history_bounds, target_positions
from seqrank.training.metrics import ranking_report
from seqrank.training.model import SequenceEncoder, encode_histories
from seqrank.training.transitions import TransitionPrior
from seqrank.training.vocab import PAD_INDEX


def mask_seen(scores: torch.Tensor, histories: list[np.ndarray]) -> torch.Tensor:
    """Set every item of each full (untruncated) history to -inf in place; scores (B, I+1)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    seen = gather_padded(np.concatenate(histories).astype(np.int64), starts, lengths)  # (B, longest), PAD-filled
    scores.scatter_(1, torch.from_numpy(seen).to(scores.device), float("-inf"))
    scores[:, PAD_INDEX] = float("-inf")
    return scores


def rank_batch(scores: torch.Tensor, batch: EvalBatch, top_k: int,
               seen_masked: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(target ranks (B,), top-K item indices (B, K)) after masking seen items (seen_masked=False: PAD only)."""
    if seen_masked:
        scores = mask_seen(scores, batch.histories)
    else:
        scores[:, PAD_INDEX] = float("-inf")
    targets = torch.from_numpy(batch.targets).to(scores.device)
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # ties are broken by item index, so an integer-valued baseline (popularity) is not credited with every tie
    earlier = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < targets.unsqueeze(1)
    ranks = ((scores > target_scores) | ((scores == target_scores) & earlier)).sum(1)  # one pass over (B, I+1)
    top = scores.topk(top_k, dim=1).indices
    return ranks.cpu().numpy(), top.cpu().numpy()


@dataclass(frozen=True)
class Evaluation:
    """How a full-ranking evaluation runs: its cut-offs, batch, device and users, passed as one object.

    diversity=False leaves out ILD@K, the one metric that costs more than the ranking itself (a (K, K) product of
    item vectors per user): what the per-epoch validation of training does, which only selects on NDCG@10.
    """

    ks: tuple[int, ...]
    batch_size: int = 1024
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None  # the encoder's autocast dtype; None = float32
    users: np.ndarray | None = None  # user indices to evaluate; None = all
    diversity: bool = True
    seen_masked: bool = True  # False: items of the input history stay candidates (Rank's include_seen)

    @classmethod
    def of(cls, settings: EvalConfig, **options) -> Evaluation:
        """From the config's eval section (ks, batch_size) plus the run's own options."""
        return cls(ks=tuple(settings.ks), batch_size=settings.batch_size, **options)


@dataclass(frozen=True)
class UserRanks:
    """Each evaluated user's outcome, users in ascending internal index (the same order for any model on the same
    data, split and users, so two runs' per-user values pair up)."""

    users: np.ndarray  # (U,) internal user indices, ascending
    target_ranks: np.ndarray  # (U,) 0-based rank of the target among all unseen items
    top_items: np.ndarray  # (U, max K) item indices

    @classmethod
    def collect(cls, users: list[np.ndarray], ranks: list[np.ndarray], top: list[np.ndarray]) -> UserRanks:
        if not users:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int64))
        users_, ranks_, top_ = np.concatenate(users), np.concatenate(ranks), np.concatenate(top)
        order = np.argsort(users_, kind="stable")
        return cls(users_[order], ranks_[order], top_[order])


def per_user_metrics(target_ranks: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-user values whose means are ranking_report's: "HR@k" and "NDCG@k" for each k, and "MRR"; each (U,)
    float64 in the order of `target_ranks` (0-based ranks, as `UserRanks.target_ranks`)."""
    ranks = np.asarray(target_ranks, dtype=np.float64)
    values = {}
    for k in ks:
        values[f"HR@{k}"] = (ranks < k).astype(np.float64)
        values[f"NDCG@{k}"] = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    values["MRR"] = 1.0 / (ranks + 1.0)
    return values


def split_summary(data: SequenceData, split: str, users: np.ndarray | None = None) -> dict[str, int]:
    """Who and what a split evaluates: users evaluated; users left out for having a target but no earlier event
    (temporal only); targets whose item has no training event (never learned, and most-popular counts it 0);
    targets already in the user's input history (unreachable: seen items are masked, as Rank excludes them)."""
    position, evaluated = target_positions(data, split)
    start, end = history_bounds(data, split)
    chosen = np.zeros(data.num_users, dtype=bool)
    chosen[np.arange(data.num_users) if users is None else users] = True
    trained_items = item_popularity(data, "train") > 0
    if data.temporal is None:
        has_target = np.ones(data.num_users, dtype=bool)
    else:
        has_target = data.temporal.has_valid if split == "valid" else data.temporal.has_test
    users = np.flatnonzero(evaluated & chosen)
    target_items = data.items[position[users]]
    seen = sum(bool((data.items[start[u]:end[u]] == item).any()) for u, item in zip(users, target_items))
    return {
        "users": len(users),
        "users_without_history": int((has_target & (end <= start) & chosen).sum()),
        "cold_targets": int((~trained_items[target_items]).sum()),
        "seen_targets": seen,
    }


@torch.no_grad()
def rank_model(model: SequenceEncoder, data: SequenceData, split: str, how: Evaluation,
               prior: TransitionPrior | None = None) -> UserRanks:
    """Every evaluated user's target rank and top-K under `model` (and `prior`'s item-to-item term)."""
    model.eval()
    item_vectors = model.output_item_vectors()[: data.num_items + 1].float()
    all_users, all_ranks, all_top = [], [], []
    for batch in eval_batches(data, split, how.batch_size, how.users):
        user_vectors = torch.from_numpy(encode_histories(model, batch.histories, batch.behaviors, how.device,
                                                         how.dtype))
        scores = user_vectors.to(item_vectors.device) @ item_vectors.T
        if prior is not None and prior.weight:
            newest = np.array([history[-1] for history in batch.histories])
            scores += torch.from_numpy(prior.dense_rows(newest)).to(scores.device)
        ranks, top = rank_batch(scores, batch, max(how.ks), how.seen_masked)
        all_users.append(batch.users)
        all_ranks.append(ranks)
        all_top.append(top)
    return UserRanks.collect(all_users, all_ranks, all_top)


def evaluate_model(model: SequenceEncoder, data: SequenceData, split: str, how: Evaluation,
                   prior: TransitionPrior | None = None) -> dict[str, float]:
    """Full-ranking report of `model` on `split`; `prior` adds its item-to-item term after each newest item."""
    ranked = rank_model(model, data, split, how, prior)
    vectors = None
    if how.diversity:
        with torch.no_grad():
            vectors = model.output_item_vectors()[: data.num_items + 1].float().cpu().numpy()
    return ranking_report(ranked.target_ranks, ranked.top_items, vectors, list(how.ks), data.num_items)


def item_popularity(data: SequenceData, split: str) -> np.ndarray:
    """(I+1,) event counts per item over the part of each history the split may see."""
    start, end = history_bounds(data, split)
    lengths = end - start
    steps = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    visible = data.items[np.arange(lengths.sum()) + steps]
    return np.bincount(visible, minlength=data.num_items + 1).astype(np.float64)


def rank_popularity(data: SequenceData, split: str, how: Evaluation) -> UserRanks:
    """Most-popular baseline: every user gets the same scores, seen items masked as for the model."""
    popularity = torch.from_numpy(item_popularity(data, split)).float()  # counts stay exact below 2**24
    all_users, all_ranks, all_top = [], [], []
    for batch in eval_batches(data, split, how.batch_size, how.users):
        scores = popularity.unsqueeze(0).repeat(len(batch.users), 1)
        ranks, top = rank_batch(scores, batch, max(how.ks), how.seen_masked)
        all_users.append(batch.users)
        all_ranks.append(ranks)
        all_top.append(top)
    return UserRanks.collect(all_users, all_ranks, all_top)


def evaluate_popularity(data: SequenceData, split: str, how: Evaluation) -> dict[str, float]:
    """ranking_report of the most-popular baseline (`rank_popularity`)."""
    ranked = rank_popularity(data, split, how)
    return ranking_report(ranked.target_ranks, ranked.top_items, None, list(how.ks), data.num_items)
