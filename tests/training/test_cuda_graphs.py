"""optim.cuda_graphs: batches padded to a static shape train exactly like the unpadded ones (checked here, on any
machine), and the graphed step trains like the eager one (checked only where CUDA is: a CUDA graph cannot be
captured without a GPU; scripts/gpu_check.py runs this file on the lent card)."""

import numpy as np
import pytest
import torch

from seqrank.training.batches import causal_train_batches, pad_to_shape
from seqrank.training.config import ConfigError, load_config
from seqrank.training.sources import load_sequences
from seqrank.training.step import TrainingObjective, TrainingStep, Worker, batch_loss, build_optimizers
from seqrank.training.train import build_encoder, encoder_config_for

OVERRIDES = ["data.synthetic_users=200", "data.synthetic_items=80", "model.towers=[gpt2, llama]",
             "optim.mask_history=true", "model.max_len=20"]


def model_and_batches(config):
    data = load_sequences(config.data)
    torch.manual_seed(0)
    model = build_encoder(encoder_config_for(config, data), data.item_attributes)
    batches = list(causal_train_batches(data, model.config, config.optim.batch_size, np.random.default_rng(0)))
    return model, batches


def test_a_batch_padded_to_a_static_shape_has_the_same_loss_and_gradients():
    config = load_config(None, OVERRIDES + ["optim.batch_size=32"])
    model, batches = model_and_batches(config)
    model.eval()  # no dropout, so both passes see the same model
    batch = min(batches, key=lambda b: b.items.shape[0])  # the short last batch: rows are padded too
    padded = pad_to_shape(batch, rows=32, length_multiple=8)
    assert padded.items.shape[0] == 32 and padded.items.shape[1] % 8 == 0
    assert padded.items.shape[1] > batch.items.shape[1] or batch.items.shape[1] % 8 == 0
    loss = batch_loss(model, batch, config, None)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    padded_loss = batch_loss(model, padded, config, None)
    padded_grads = torch.autograd.grad(padded_loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(padded_loss, loss)
    for g, p in zip(grads, padded_grads):
        if g is None:
            assert p is None or p.abs().max() == 0
        else:
            torch.testing.assert_close(p, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, field", [
    (["optim.loss=sampled"], "optim.cuda_graphs"),
    (["optim.device=cpu"], "optim.cuda_graphs"),
    (["optim.graph_length=0"], "optim.graph_length"),
])
def test_cuda_graphs_are_refused_where_they_cannot_be_captured(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["optim.cuda_graphs=true", *overrides])


def test_a_graphed_step_on_a_cpu_device_says_it_needs_cuda():
    config = load_config(None, OVERRIDES + ["optim.cuda_graphs=true"])  # device auto: resolves at run time
    model, _ = model_and_batches(config)
    with pytest.raises(RuntimeError, match="optim.cuda_graphs: needs a CUDA device"):
        TrainingStep(TrainingObjective(model, config, None), model, build_optimizers(model, config.optim), [],
                     config, Worker(), torch.device("cpu"), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: needs a GPU (scripts/gpu_check.py)")
def test_graphed_steps_train_like_eager_steps_on_cuda():
    device = torch.device("cuda")
    results = {}
    for graphs in (False, True):
        config = load_config(None, OVERRIDES + ["optim.batch_size=32", "model.dropout=0.0",
                                                "model.attention_dropout=0.0", f"optim.cuda_graphs={str(graphs).lower()}"])
        model, batches = model_and_batches(config)
        model.to(device)
        optimizers = build_optimizers(model, config.optim)
        schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
        step = TrainingStep(TrainingObjective(model, config, None), model, optimizers, schedules, config, Worker(),
                            device, torch.bfloat16)
        losses = torch.stack([step(b) for b in batches[:8]]).float().cpu()
        results[graphs] = losses, torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
        if graphs:
            assert len(step.graphed.graphs) >= 2  # several batch lengths: several captured shapes, each replayed
    (eager_losses, eager_weights), (graph_losses, graph_weights) = results[False], results[True]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=2e-2, atol=1e-2)  # bf16: padding reorders sums
    torch.testing.assert_close(graph_weights, eager_weights, rtol=5e-2, atol=5e-3)


def test_graphed_loss_captures_once_per_padded_shape_and_computes_the_eager_loss(monkeypatch):
    """GraphedLoss's own plumbing on CPU: padding, one capture per shape, the argument order of the captured
    callable (behaviour types included), the loss it returns. torch.cuda.make_graphed_callables cannot run without
    a GPU, so it is replaced here by a stand-in that records each capture and runs the module eagerly; the real
    capture is tested by test_graphed_steps_train_like_eager_steps_on_cuda on a GPU."""
    from seqrank.training import cuda_graphs

    captured = []

    def capture_eagerly(module, sample_args, allow_unused_input=False):
        shapes = [tuple(a.shape) for a in sample_args]
        captured.append(shapes)

        def replay(*args):
            assert [tuple(a.shape) for a in args] == shapes  # a graph replays only the shape it captured
            return module(*args)
        return replay

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture_eagerly)
    config = load_config(None, OVERRIDES + ["optim.batch_size=32"])
    model, batches = model_and_batches(config)
    assert batches[0].behaviors is not None  # the synthetic log has behaviour types: their argument is exercised
    model.eval()
    graphed = cuda_graphs.GraphedLoss(TrainingObjective(model, config, None), rows=32, length_multiple=8,
                                      amp_dtype=None)
    for batch in batches:
        torch.testing.assert_close(graphed(graphed.pad(batch)), batch_loss(model, batch, config, None))
    shapes = {tuple(graphed.pad(b).items.shape) for b in batches}
    assert len(captured) == len(graphed.graphs) == len(shapes) >= 2
    assert all(rows == 32 and length % 8 == 0 for rows, length in shapes)
