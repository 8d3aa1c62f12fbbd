"""Loss functions: values on hand-checkable inputs."""

import math

import torch

from training.losses import bce_loss, full_softmax_loss, sampled_softmax_loss


def test_full_softmax_matches_manual_cross_entropy_and_ignores_pad():
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[100.0, 100.0], [1.0, 0.0], [0.0, 1.0]])  # row 0 is PAD: must not count
    loss = full_softmax_loss(users, items, torch.tensor([1]))
    assert math.isclose(loss.item(), -math.log(math.e / (math.e + 1)), rel_tol=1e-5)


def test_full_softmax_excluded_items_leave_the_denominator():
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    with_all = full_softmax_loss(users, items, torch.tensor([1]))
    without_3 = full_softmax_loss(users, items, torch.tensor([1]), excluded=torch.tensor([[3, 0]]))
    assert without_3 < with_all
    assert math.isclose(without_3.item(), -math.log(math.e / (math.e + 1)), rel_tol=1e-5)


def test_sampled_softmax_log_q_correction_and_accidental_hits():
    users = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    zero = torch.zeros(1)
    hits = torch.tensor([[False, True]])  # the second negative is the positive itself: removed
    loss = sampled_softmax_loss(users, positive, negatives, zero, torch.zeros(2), hits)
    assert math.isclose(loss.item(), -math.log(math.e / (math.e + 1)), rel_tol=1e-5)
    # a frequently sampled negative (high log q) is discounted
    discounted = sampled_softmax_loss(users, positive, negatives[:1], zero, torch.tensor([2.0]), hits[:, :1])
    assert discounted < loss


def test_bce_is_minimal_when_positive_high_and_negative_low():
    users = torch.tensor([[1.0, 0.0]])
    good = bce_loss(users, torch.tensor([[10.0, 0.0]]), torch.tensor([[-10.0, 0.0]]))
    bad = bce_loss(users, torch.tensor([[-10.0, 0.0]]), torch.tensor([[10.0, 0.0]]))
    assert good.item() < 1e-3 < 10 < bad.item()
