"""Training objectives over user vectors and item vectors: pure functions, no model state.

- full softmax cross-entropy over the whole catalogue: the strongest objective when the catalogue fits
  (Klenitskiy & Vasilev, RecSys'23: SASRec+ beats BERT4Rec once trained with it);
- sampled softmax with logQ correction (Yi et al., RecSys'19): negatives drawn from item popularity, each logit
  corrected by -log(expected count), for catalogues where full softmax does not fit;
- binary cross-entropy with one sampled negative per position: the original SASRec objective, kept as a baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_loss(
    user_vectors: torch.Tensor, item_vectors: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """user_vectors (N, D), item_vectors (I+1, D) with row 0 = PAD, targets (N,) → mean CE over targets in 1..I.

    excluded (N, X): item indices removed from each row's softmax (0 = nothing), e.g. items already seen.
    A target of 0 (PAD) is a padding position of a static-shape batch: it is left out of the loss and its mean.
    """
    # fp32 logits even under bf16 autocast: a bf16 logit carries ~3 significant digits, too coarse for a softmax
    # over the whole catalogue, and at (N, D) x (D, I) this product is a small part of the step
    with torch.autocast(user_vectors.device.type, enabled=False):
        logits = user_vectors.float() @ item_vectors.float().T  # (N, I+1)
    # Masked in place and out of autograd's sight: a removed logit's gradient is exactly zero anyway (its softmax
    # probability is 0 and it is never a row's target; an ignored row has none), and the product's backward needs
    # its inputs, not its output. Recorded, each in-place write would cost backward a copy of the whole (N, I+1)
    # gradient; unrecorded, the gradients are the same to the bit (tests/training/test_losses.py).
    with torch.no_grad():
        if excluded is not None:
            logits.scatter_(1, excluded, float("-inf"))
        logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets, ignore_index=0)


def sampled_softmax_loss(
    user_vectors: torch.Tensor,
    positive_vectors: torch.Tensor,
    negative_vectors: torch.Tensor,
    positive_log_q: torch.Tensor,
    negative_log_q: torch.Tensor,
    accidental_hits: torch.Tensor,
) -> torch.Tensor:
    """Sampled softmax with shared negatives and logQ correction.

    user_vectors (N, D); positive_vectors (N, D); negative_vectors (M, D) shared by every row;
    *_log_q: log of each item's expected count in the sample (positives (N,), negatives (M,));
    accidental_hits (N, M) bool: a negative equal to the row's positive, removed from the denominator.
    """
    positive_logits = (user_vectors * positive_vectors).sum(-1, keepdim=True) - positive_log_q.unsqueeze(1)
    negative_logits = user_vectors @ negative_vectors.T - negative_log_q.unsqueeze(0)  # (N, M)
    negative_logits = negative_logits.masked_fill(accidental_hits, float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def bce_loss(user_vectors: torch.Tensor, positive_vectors: torch.Tensor, negative_vectors: torch.Tensor) -> torch.Tensor:
    """SASRec's objective: -log σ(u·p) - log(1 - σ(u·n)), one negative n per positive p; all (N, D)."""
    positive_logits = (user_vectors * positive_vectors).sum(-1).float()
    negative_logits = (user_vectors * negative_vectors).sum(-1).float()
    return F.binary_cross_entropy_with_logits(
        positive_logits, torch.ones_like(positive_logits)
    ) + F.binary_cross_entropy_with_logits(negative_logits, torch.zeros_like(negative_logits))
