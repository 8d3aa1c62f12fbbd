"""What one training step asks of the device: operator calls, kernel-launching ones, and host-device waits.

On a GPU a step of the committed recipe is launch-bound (docs/benchmarks/training-speed.md, "Training on the H200": the card sits mostly idle while the
host dispatches kernels one by one), so the number of kernels a step launches and the number of times it makes the
host wait for the device are the quantities that set its time there. Both can be counted on any machine: a
TorchDispatchMode sees every operator call that reaches a backend, after autograd and after composite operators
are decomposed, which on CUDA is about one kernel launch each (views launch none; a fused optimiser is one call).
Waits are the calls whose result the host must read: `.item()`, nonzero (behind boolean-mask indexing), unique.

    .venv/bin/python scripts/train_step_launches.py --data ../shared/data/amazon-beauty/Beauty.txt \\
        --attributes ../shared/data/amazon-beauty/Beauty_item2attributes.json \\
        --config training/configs/amazon-towers.yaml

Without --data it runs on the default synthetic log; --device cuda runs it as training does on a GPU (bf16
autocast). The whole step is the production `TrainingStep`; its phases are the same production pieces called one
after another. On CPU no autocast runs, so a CUDA step launches a cast per weight and forward more than CPU counts,
and CPU attention under dropout takes the unfused math path where CUDA runs one fused kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqrank.training.batches import causal_train_batches
from seqrank.training.config import load_config
from seqrank.training.sources import load_sequences
from seqrank.training.step import TrainingObjective, TrainingStep, Worker, build_optimizers, clip_gradients, lr_factor
from seqrank.training.train import build_encoder, encoder_config_for, seed_everything

WAITING_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
               "aten.masked_select"}


class OperatorCount(TorchDispatchMode):
    """Counts backend operator calls: all, kernel-launching (not views), and those that make the host wait."""

    def __init__(self):
        super().__init__()
        self.calls, self.kernels, self.waits, self.by_name = 0, 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.calls += 1
        if not func.is_view:
            self.kernels += 1
            self.by_name[name] += 1
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if name in WAITING_OPS or boolean_index:
            self.waits += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="")
    parser.add_argument("--attributes", default="")
    parser.add_argument("--config", default="training/configs/amazon-towers.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps after 3 warm-up steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--top", type=int, default=0, help="also list the N most launched operators")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    overrides = [f"optim.device={args.device}", "optim.num_threads=1"]
    if args.data:
        overrides += [f"data.path={args.data}", f"data.attributes={args.attributes}"]
    config = load_config(args.config, overrides + args.set)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and config.optim.bf16 else None  # as fit runs it
    data = load_sequences(config.data)
    seed_everything(config.optim.seed)
    model = build_encoder(encoder_config_for(config, data), data.item_attributes).to(device)
    optimizers = build_optimizers(model, config.optim)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, 10_000, config.optim)) for o in optimizers]
    objective = TrainingObjective(model, config, None)
    step = TrainingStep(objective, model, optimizers, schedules, config, Worker(), device, amp_dtype)
    batches = list(causal_train_batches(data, model.config, config.optim.batch_size, np.random.default_rng(0)))
    measured = batches[3: 3 + args.steps]
    for batch in batches[:3] + measured:  # warm-up, and under optim.cuda_graphs the capture of every shape measured
        step(batch)
    measured = [b.to(device) for b in measured]
    finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def phases_of(batch):
        """The step's pieces in its order, each a thunk; the forward's loss is kept for the backward."""
        held = {}

        def forward():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                held["loss"] = objective(batch)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        return (("forward", forward), ("backward", lambda: held["loss"].backward()),
                ("clip", lambda: clip_gradients(model.parameters(), config.optim.grad_clip)),
                ("optimizer", lambda: [o.step() for o in optimizers]))

    names = ("forward", "backward", "clip", "optimizer")
    seconds, counts = dict.fromkeys(names, 0.0), {name: OperatorCount() for name in names}
    for batch in measured:  # timed alone: counting adds Python work per operator
        for name, run in phases_of(batch):
            finish()
            start = time.perf_counter()
            run()
            finish()
            seconds[name] += time.perf_counter() - start
    for batch in measured:
        for name, run in phases_of(batch):
            with counts[name]:
                run()
    finish()
    start = time.perf_counter()
    for batch in measured:  # the whole step as fit runs it: one read of the loss at the end, no wait in between
        total = step(batch)
    float(total)
    whole_seconds = time.perf_counter() - start
    whole = OperatorCount()
    with whole:
        for batch in measured:
            step(batch)

    n = len(measured)
    positions = np.mean([b.positions.shape[0] for b in measured])
    precision = "bf16 autocast" if amp_dtype else "fp32"
    print(f"{list(config.model.towers) or config.model.backbone} x {config.model.num_layers} layers, batch "
          f"{config.optim.batch_size}, {positions:.0f} predicted positions per step, {n} steps, {device.type}, {precision}")
    rows = [dict(phase=name, calls=counts[name].calls / n, launches=counts[name].kernels / n,
                 waits=counts[name].waits / n, ms=seconds[name] * 1e3 / n) for name in names]
    rows.append(dict(phase="TrainingStep (all)", calls=whole.calls / n, launches=whole.kernels / n,
                     waits=whole.waits / n, ms=whole_seconds * 1e3 / n))
    print("| phase | operator calls / step | kernel launches / step | host waits / step | ms / step |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['phase']} | {row['calls']:.0f} | {row['launches']:.0f} | {row['waits']:.1f} | {row['ms']:.1f} |")
    print("(each phase timed alone, waiting for the device at its end, always eager; the whole step as fit runs it"
          + (", forward and backward replayed as CUDA graphs" if config.optim.cuda_graphs else "") + ")")
    if args.top:
        for name, count in whole.by_name.most_common(args.top):
            print(f"{name:40s} {count / n:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device.type, "precision": precision, "steps": n,
                                         "positions_per_step": positions, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
