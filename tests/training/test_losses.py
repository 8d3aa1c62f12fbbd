"""Loss functions: values on hand-checkable inputs."""

import math

import torch

from seqrank.training.losses import bce_loss, full_softmax_loss, sampled_softmax_loss


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


def test_full_softmax_gradients_equal_those_of_the_recorded_mask():
    """The mask is written out of autograd's sight; the gradients must be what the plain, recorded formula gives:
    log-softmax over the logits with the excluded items and PAD at -inf, mean over the rows whose target is real."""
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(30, 8, generator=generator, requires_grad=True)
    items = torch.randn(50, 8, generator=generator, requires_grad=True)
    targets = torch.randint(1, 50, (30,), generator=generator)
    targets[::4] = 0  # padding positions of a static-shape batch
    excluded = torch.randint(0, 50, (30, 6), generator=generator)
    excluded = excluded.masked_fill(excluded == targets.unsqueeze(1), 0)  # a row's own target is never excluded
    loss = full_softmax_loss(users, items, targets, excluded)
    grads = torch.autograd.grad(loss, (users, items))

    mask = torch.zeros(30, 50, dtype=torch.bool).scatter(1, excluded, True)
    mask[:, 0] = True
    log_probabilities = (users @ items.T).masked_fill(mask, float("-inf")).log_softmax(1)
    real = targets != 0
    expected = -log_probabilities[real, targets[real]].mean()
    expected_grads = torch.autograd.grad(expected, (users, items))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


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
