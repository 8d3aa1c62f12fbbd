"""Full-ranking leave-one-out evaluation: each target is ranked against ALL items, not sampled negatives.

Items already in the user's input history are removed from the ranking (score -inf), as the published anchors
do (Dross, gSASRec, eSASRec filter them out; the S3-Rec/BSARec code sets them to 0, which can only lower
its numbers). The most-popular baseline goes through the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqrank.training.batches import EvalBatch, eval_batches, gather_padded
from seqrank.training.config import EvalConfig
from seqrank.training.data import SequenceData, history_bounds
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


def rank_batch(scores: torch.Tensor, batch: EvalBatch, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(target ranks (B,), top-K item indices (B, K)) after masking seen items."""
    scores = mask_seen(scores, batch.histories)
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

    @classmethod
    def of(cls, settings: EvalConfig, **options) -> Evaluation:
        """From the config's eval section (ks, batch_size) plus the run's own options."""
        return cls(ks=tuple(settings.ks), batch_size=settings.batch_size, **options)


@torch.no_grad()
def evaluate_model(model: SequenceEncoder, data: SequenceData, split: str, how: Evaluation,
                   prior: TransitionPrior | None = None) -> dict[str, float]:
    """Full-ranking report of `model` on `split`; `prior` adds its item-to-item term after each newest item."""
    model.eval()
    item_vectors = model.output_item_vectors()[: data.num_items + 1].float()
    all_ranks, all_top = [], []
    for batch in eval_batches(data, split, how.batch_size, how.users):
        user_vectors = torch.from_numpy(encode_histories(model, batch.histories, batch.behaviors, how.device,
                                                         how.dtype))
        scores = user_vectors.to(item_vectors.device) @ item_vectors.T
        if prior is not None and prior.weight:
            newest = np.array([history[-1] for history in batch.histories])
            scores += torch.from_numpy(prior.dense_rows(newest)).to(scores.device)
        ranks, top = rank_batch(scores, batch, max(how.ks))
        all_ranks.append(ranks)
        all_top.append(top)
    vectors = item_vectors.cpu().numpy() if how.diversity else None
    return ranking_report(np.concatenate(all_ranks), np.concatenate(all_top), vectors, list(how.ks), data.num_items)


def item_popularity(data: SequenceData, split: str) -> np.ndarray:
    """(I+1,) event counts per item over the part of each history the split may see."""
    start, end = history_bounds(data, split)
    lengths = end - start
    steps = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    visible = data.items[np.arange(lengths.sum()) + steps]
    return np.bincount(visible, minlength=data.num_items + 1).astype(np.float64)


def evaluate_popularity(data: SequenceData, split: str, how: Evaluation) -> dict[str, float]:
    """Most-popular baseline: every user gets the same scores, seen items masked as for the model."""
    popularity = torch.from_numpy(item_popularity(data, split)).float()  # counts stay exact below 2**24
    all_ranks, all_top = [], []
    for batch in eval_batches(data, split, how.batch_size, how.users):
        scores = popularity.unsqueeze(0).repeat(len(batch.users), 1)
        ranks, top = rank_batch(scores, batch, max(how.ks))
        all_ranks.append(ranks)
        all_top.append(top)
    return ranking_report(np.concatenate(all_ranks), np.concatenate(all_top), None, list(how.ks), data.num_items)
