"""The training loss replayed as CUDA graphs: one captured forward and backward per padded batch shape.

A step of the committed recipe on a GPU is launch-bound: about a thousand small kernels per step, each queued by
Python (docs/benchmarks/training-speed.md, "Training on the H200", and `scripts/train_step_launches.py`). A CUDA graph records those launches once and
replays them with one call. `torch.cuda.make_graphed_callables` does the capture and joins the replay to autograd:
the graphed forward returns the loss, its backward replays the captured backward and hands the parameter gradients
to autograd, so clipping and the fused optimiser step stay as they are.

A graph replays fixed shapes, so every batch is padded (`pad_to_shape`) to optim.batch_size rows and a multiple of
optim.graph_length positions: with length buckets that is max_len / graph_length shapes per run, each captured the
first time it is seen. Captures are made under autocast with its weight cache off, as the capture API requires.
"""

from __future__ import annotations

import torch

from seqrank.training.batches import TrainBatch, pad_to_shape


class _TensorObjective(torch.nn.Module):
    """The objective with tensor arguments (what a graph capture takes); one instance per captured shape, because
    make_graphed_callables replaces the forward of the module it is given."""

    def __init__(self, objective: torch.nn.Module, amp_dtype: torch.dtype | None):
        super().__init__()
        self.objective, self.amp_dtype = objective, amp_dtype

    def forward(self, items, lengths, targets, positions, behaviors=None):
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            return self.objective(TrainBatch(items, behaviors, lengths, targets, positions))


class GraphedLoss:
    """batch → loss, replaying the graph captured for the batch's padded shape (capturing it on first sight)."""

    def __init__(self, objective: torch.nn.Module, rows: int, length_multiple: int, amp_dtype: torch.dtype | None):
        self.objective, self.rows, self.length_multiple, self.amp_dtype = objective, rows, length_multiple, amp_dtype
        self.graphs: dict[tuple, torch.nn.Module] = {}

    def pad(self, batch: TrainBatch) -> TrainBatch:
        """The batch at its static shape; done on the host, before the copy to the device, so it costs no launch."""
        return pad_to_shape(batch, self.rows, self.length_multiple)

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        """The loss of a padded batch already on the device, as a copy: the graph's output tensor is static, so the
        next replay would overwrite a loss the caller still holds (a list of a run's losses would all read the last)."""
        inputs = (batch.items, batch.lengths, batch.targets, batch.positions) + \
            (() if batch.behaviors is None else (batch.behaviors,))
        key = tuple(batch.items.shape) + (batch.behaviors is not None,)
        graphed = self.graphs.get(key)
        if graphed is None:
            # sample inputs are this batch itself; unused inputs: the backbones' own word embeddings, which a
            # model fed through inputs_embeds never reads
            graphed = torch.cuda.make_graphed_callables(_TensorObjective(self.objective, self.amp_dtype), inputs,
                                                        allow_unused_input=True)
            self.graphs[key] = graphed
        return graphed(*inputs).clone()  # clone keeps the autograd link to the graphed backward
