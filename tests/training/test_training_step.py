"""The training step: it never makes the host wait for the device, and its shortcuts compute what the plain
formulas compute (the seen-item mask, the item table with attributes)."""

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqrank.training.batches import causal_train_batches
from seqrank.training.config import load_config
from seqrank.training.model import EncoderConfig, SequenceEncoder
from seqrank.training.sources import load_sequences
from seqrank.training.step import TrainingObjective, TrainingStep, Worker, build_optimizers, seen_before
from seqrank.training.train import build_encoder, encoder_config_for
from seqrank.training.vocab import PAD_INDEX

# Operators whose result the host must read before it can go on: on a GPU each one drains the launch queue.
WAITING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2"}


class HostWaits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in WAITING or boolean_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def training_step_for(overrides: list[str]):
    config = load_config(None, ["data.synthetic_users=200", "data.synthetic_items=80", *overrides])
    data = load_sequences(config.data)
    torch.manual_seed(0)
    model = build_encoder(encoder_config_for(config, data), data.item_attributes)
    optimizers = build_optimizers(model, config.optim)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in optimizers]
    step = TrainingStep(TrainingObjective(model, config, None), model, optimizers, schedules, config, Worker(),
                        torch.device("cpu"), None)
    return step, list(causal_train_batches(data, model.config, 32, np.random.default_rng(0)))


def test_a_full_softmax_step_of_a_tower_ensemble_never_waits_for_the_device():
    step, batches = training_step_for(["model.towers=[gpt2, llama]", "optim.mask_history=true", "optim.grad_clip=1.0"])
    step(batches[0])  # optimizer state is created on the first step
    waits = HostWaits()
    with waits:
        losses = [step(batch) for batch in batches[1:4]]
    assert waits.found == []
    assert all(loss.requires_grad is False and loss.dim() == 0 for loss in losses)
    assert torch.isfinite(torch.stack(losses)).all()


def test_the_check_sees_a_wait_when_there_is_one():
    waits = HostWaits()
    with waits:
        x = torch.arange(6.0)
        x[x > 2].sum().item()
    assert "aten.index" in waits.found and "aten._local_scalar_dense" in waits.found


def test_seen_before_is_each_positions_causal_prefix():
    items = torch.tensor([[5, 6, 5, 7], [8, 9, 0, 0]])  # second row: two real inputs, right-padded
    targets = torch.tensor([[6, 5, 7, 9], [9, 8, 0, 0]])
    positions = torch.from_numpy(np.flatnonzero(targets.numpy() != PAD_INDEX))
    num_items = 9
    excluded = seen_before(items, positions, targets.flatten()[positions], num_items)
    expected = []  # by hand: inputs 0..t of the row, minus the target itself and anything past num_items
    for flat in positions.tolist():
        row, t = divmod(flat, items.shape[1])
        prefix = [int(i) if (s <= t and i != targets[row, t] and i <= num_items) else PAD_INDEX
                  for s, i in enumerate(items[row].tolist())]
        expected.append(prefix)
    assert excluded.tolist() == expected
    assert excluded.tolist()[1] == [0, 6, 0, 0]  # predicting 5 after 5, 6: the repeat stays learnable
    assert excluded.tolist()[2] == [5, 6, 5, 0]


def test_item_table_equals_the_per_slot_attribute_mean_it_replaces():
    attributes = np.array([[0, 0, 0], [1, 2, 0], [3, 0, 0], [1, 2, 3], [0, 0, 0]])  # item 0 = PAD, item 4 has none
    torch.manual_seed(0)
    model = SequenceEncoder(EncoderConfig(num_items=4, num_attributes=3, max_attributes_per_item=3, hidden_size=8,
                                          intermediate_size=16), attributes)
    table = model.attribute_embedding.weight
    assert table[0].abs().sum() > 0  # the PAD row is drawn at init, so the comparison below is not trivial
    slots = model.item_attributes
    count = (slots > 0).sum(-1, keepdim=True).clamp(min=1)
    reference = model.item_embedding.weight + table[slots].sum(-2) / count  # what every trained model was fed
    torch.testing.assert_close(model.item_vectors(), reference)
    index = torch.tensor([[3, 1], [4, 0]])
    torch.testing.assert_close(model.item_vectors(index), reference[index])
    model.item_vectors().sum().backward()
    assert table.grad[0].abs().sum() == 0  # the PAD row is never trained
