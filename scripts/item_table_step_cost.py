"""Milliseconds per phase of one sampled-softmax training step, dense AdamW vs SparseAdam on the item table.

Usage: .venv/bin/python scripts/item_table_step_cost.py 50000 1000000
The batches come from a small synthetic log; the catalogue is padded with never-seen items to the size asked for,
because the table size alone is what the optimiser and the embedding backward pay for. One torch thread; the mean
of steps 3-12 (the first two warm up and create the optimizer state). Results: docs/benchmarks/retrieval.md, "A million-item catalogue".
"""

import sys
import time
from dataclasses import replace

import numpy as np
import torch

from seqrank.training.batches import causal_train_batches
from seqrank.training.config import load_config
from seqrank.training.data import build_sequences
from seqrank.training.evaluate import item_popularity
from seqrank.training.model import SequenceEncoder
from seqrank.training.step import NegativeSampler, TrainingObjective, build_optimizers, clip_gradients
from seqrank.training.synthetic import generate_log
from seqrank.training.train import encoder_config_for

STEPS, WARM_UP = 12, 2


def step_phases(num_items: int, sparse: bool) -> dict[str, float]:
    data = build_sequences(generate_log(3000, 2000, 0))
    padding = np.array([f"unseen-{i}" for i in range(num_items - data.num_items)], dtype=object)
    data = replace(data, item_ids=np.concatenate([data.item_ids, padding]))
    config = load_config(None, ["optim.loss=sampled", f"optim.sparse_item_embeddings={str(sparse).lower()}"])
    torch.manual_seed(0)
    model = SequenceEncoder(encoder_config_for(config, data))
    optimizers = build_optimizers(model, config.optim)
    popularity = item_popularity(data, "train") + 1e-3  # every item can be drawn as a negative
    objective = TrainingObjective(model, config, NegativeSampler(popularity, torch.device("cpu")))
    batches = list(causal_train_batches(data, model.config, config.optim.batch_size, np.random.default_rng(0)))
    phases = dict.fromkeys(("forward", "backward", "clip", "optimizer"), 0.0)
    for i, batch in enumerate(batches[:STEPS]):
        t0 = time.perf_counter()
        loss = objective(batch)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        clip_gradients(model.parameters(), config.optim.grad_clip)
        t3 = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
        t4 = time.perf_counter()
        if i >= WARM_UP:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name] += seconds * 1e3 / (STEPS - WARM_UP)
    return phases


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"{'items':>9}  {'item table':<18} {'forward':>8} {'backward':>9} {'clip':>6} {'optimizer':>10} {'total ms':>9}")
    for num_items in map(int, sys.argv[1:] or ["50000", "1000000"]):
        for sparse in (False, True):
            p = step_phases(num_items, sparse)
            name = "SparseAdam, sparse" if sparse else "AdamW, dense"
            print(f"{num_items:>9}  {name:<18} {p['forward']:8.1f} {p['backward']:9.1f} {p['clip']:6.1f} "
                  f"{p['optimizer']:10.1f} {sum(p.values()):9.1f}", flush=True)
