"""Large catalogues: a sampled-softmax step with the sparse item table allocates nothing of catalogue size.

A TorchDispatchMode (PyTorch's documented hook under every aten op) records every dense tensor an op returns
(views included, in-place updates of existing tensors excluded) during forward, backward, gradient clipping and
the optimizer step of one training step on a 50,000-item catalogue. Full-catalogue logits would show up as an
(N, I+1) output, a dense gradient of the item table as (I+2, D), even a view of the whole table as (I+2, D). The
two controls prove the check can fail: full softmax (ce) and the dense AdamW table both trip it.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqrank.training.batches import causal_train_batches
from seqrank.training.config import load_config
from seqrank.training.data import build_sequences
from seqrank.training.model import EncoderConfig, SequenceEncoder
from seqrank.training.step import NegativeSampler, TrainingObjective, build_optimizers, clip_gradients
from seqrank.training.synthetic import generate_log

NUM_ITEMS = 50_000


class CatalogueSizedOutputs(TorchDispatchMode):
    """Op names and shapes of the dense tensors with a dimension of at least `size` returned under this mode."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.found = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        in_place = func._schema.name.endswith("_") or any(a.is_write for a in func._schema.arguments if a.alias_info)
        if not in_place:
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and \
                        any(d >= self.size for d in tensor.shape):
                    self.found.append((str(func), tuple(tensor.shape)))
        return out


def one_training_step(loss: str, sparse: bool) -> list:
    data = build_sequences(generate_log(200, 300, seed=1))  # item indices < 300: a small log over a big catalogue
    config = load_config(None, [f"optim.loss={loss}", "optim.num_negatives=64",
                                f"optim.sparse_item_embeddings={str(sparse).lower()}"])
    torch.manual_seed(0)
    model = SequenceEncoder(EncoderConfig(num_items=NUM_ITEMS, hidden_size=16, intermediate_size=32, num_layers=1))
    optimizers = build_optimizers(model, config.optim)
    popularity = np.ones(NUM_ITEMS + 1)
    objective = TrainingObjective(model, config, NegativeSampler(popularity, torch.device("cpu")))
    batches = causal_train_batches(data, model.config, 32, np.random.default_rng(0))

    def step(batch):
        loss_value = objective(batch)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        clip_gradients(model.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()

    step(next(batches))  # the first step creates the optimizer state (O(catalogue) once, like the table itself)
    recorder = CatalogueSizedOutputs(NUM_ITEMS)
    with recorder:
        step(next(batches))
    return recorder.found


def test_sampled_softmax_step_with_sparse_table_allocates_nothing_of_catalogue_size():
    assert one_training_step("sampled", sparse=True) == []


@pytest.mark.parametrize("loss, sparse", [("ce", True), ("sampled", False)])
def test_the_check_catches_full_logits_and_dense_table_gradients(loss, sparse):
    found = one_training_step(loss, sparse)
    assert found, "expected a catalogue-sized allocation"
    if loss == "ce":
        assert any(shape[-1] >= NUM_ITEMS + 1 and len(shape) == 2 and shape[0] < NUM_ITEMS for _, shape in found)
    else:
        assert any(shape == (NUM_ITEMS + 2, 16) for _, shape in found)  # the dense gradient of the item table
