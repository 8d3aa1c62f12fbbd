"""What one training step asks of the device: operator calls, kernel-launching ones, and host-device waits.

On a GPU a step of the committed recipe is launch-bound (BENCHMARKS.md 5b: the card sits mostly idle while the
host dispatches kernels one by one), so the number of kernels a step launches and the number of times it makes the
host wait for the device are the quantities that set its time there. Both can be counted on any machine: a
TorchDispatchMode sees every operator call that reaches a backend, after autograd and after composite operators
are decomposed, which on CUDA is about one kernel launch each (views launch none; a fused optimiser is one call).
Waits are the calls whose result the host must read: `.item()`, nonzero (behind boolean-mask indexing), unique.

    .venv/bin/python scripts/train_step_launches.py --data ../shared/data/amazon-beauty/Beauty.txt \\
        --attributes ../shared/data/amazon-beauty/Beauty_item2attributes.json \\
        --config training/configs/amazon-towers.yaml

Without --data it runs on the default synthetic log. The step is the production `TrainingStep`; its phases are
the same production pieces called one after another. Caveat, said in the table: on CPU no bf16 autocast runs, so a
CUDA step launches one cast per weight and forward more than the counts here.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from training.batches import causal_train_batches
from training.config import load_config
from training.data import load_sequences
from training.train import (
    TrainingStep, TrainingObjective, Worker, build_encoder, build_optimizers, clip_gradients, encoder_config_for,
    lr_factor, seed_everything,
)

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
    parser.add_argument("--steps", type=int, default=10, help="counted steps after 3 warm-up steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--top", type=int, default=0, help="also list the N most launched operators")
    args = parser.parse_args()
    overrides = ["optim.device=cpu", "optim.num_threads=1"]
    if args.data:
        overrides += [f"data.path={args.data}", f"data.attributes={args.attributes}"]
    config = load_config(args.config, overrides + args.set)
    torch.set_num_threads(1)
    data = load_sequences(config.data)
    seed_everything(config.optim.seed)
    model = build_encoder(encoder_config_for(config, data), data.item_attributes)
    optimizers = build_optimizers(model, config.optim)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, 10_000, config.optim)) for o in optimizers]
    objective = TrainingObjective(model, config, None)
    step = TrainingStep(objective, model, optimizers, schedules, config, Worker(), torch.device("cpu"), None)
    batches = list(causal_train_batches(data, model.config, config.optim.batch_size, np.random.default_rng(0)))
    for batch in batches[:3]:
        step(batch)
    counted = batches[3: 3 + args.steps]

    phases = {name: OperatorCount() for name in ("forward", "backward", "clip", "optimizer")}
    seconds = dict.fromkeys(phases, 0.0)
    for batch in counted:
        for name, run in (("forward", lambda: objective(batch)), ("backward", lambda: loss.backward()),
                          ("clip", lambda: clip_gradients(model.parameters(), config.optim.grad_clip)),
                          ("optimizer", lambda: [o.step() for o in optimizers])):
            start = time.perf_counter()
            with phases[name]:
                out = run()
            seconds[name] += time.perf_counter() - start
            if name == "forward":
                loss = out
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
    whole = OperatorCount()
    start = time.perf_counter()
    with whole:
        for batch in counted:
            total = step(batch)
        float(total)  # the epoch's one read of the loss, charged to these steps
    whole_seconds = time.perf_counter() - start

    n = len(counted)
    positions = np.mean([b.positions.shape[0] for b in counted])
    print(f"{config.model.towers or config.model.backbone} x {config.model.num_layers} layers, batch "
          f"{config.optim.batch_size}, {positions:.0f} predicted positions per step, {n} steps, CPU, fp32 (no autocast)")
    print(f"| phase | operator calls / step | kernel launches / step | host waits / step | ms / step (this CPU) |")
    print("|---|---|---|---|---|")
    for name, count in phases.items():
        print(f"| {name} | {count.calls / n:.0f} | {count.kernels / n:.0f} | {count.waits / n:.1f} | "
              f"{seconds[name] * 1e3 / n:.1f} |")
    print(f"| **TrainingStep (all)** | {whole.calls / n:.0f} | {whole.kernels / n:.0f} | {whole.waits / n:.1f} | "
          f"{whole_seconds * 1e3 / n:.1f} |")
    if args.top:
        for name, count in whole.by_name.most_common(args.top):
            print(f"{name:40s} {count / n:8.1f}")


if __name__ == "__main__":
    main()
