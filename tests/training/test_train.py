"""Training end to end on the synthetic log: the model must clearly beat most-popular on the same split."""

import json

import numpy as np
import pytest
import torch

from seqrank.training.batches import causal_train_batches, masked_train_batches, next_item_masked_batches
from seqrank.training.config import load_config
from seqrank.training.data import history_bounds
from seqrank.training.evaluate import Evaluation, evaluate_popularity
from seqrank.training.model import EncoderConfig
from seqrank.training.sources import load_sequences
from seqrank.training.train import fit
from tests.conftest import TINY_OVERRIDES


def test_tiny_run_beats_most_popular(tiny_run):
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    config = load_config(tiny_run / "config.yaml")
    popular = evaluate_popularity(load_sequences(config.data), "test", Evaluation(ks=(10,)))
    assert test["NDCG@10"] > 2 * popular["NDCG@10"], (test["NDCG@10"], popular["NDCG@10"])
    assert test["HR@10"] > 1.5 * popular["HR@10"]


def test_run_directory_holds_config_metrics_and_plot(tiny_run):
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["epoch"] == 1 and "NDCG@10" in first["valid"]
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(tiny_run / "config.yaml").model.hidden_size == 32


def test_training_input_never_contains_valid_or_test_targets(synthetic_dataset):
    events, _ = synthetic_dataset
    data = load_sequences(load_config(None, [f"data.path={events}"]).data)
    config = EncoderConfig(num_items=data.num_items, max_len=5)
    _, end = history_bounds(data, "train")
    start_all, end_all = data.offsets[:-1], data.offsets[1:]
    batches = list(causal_train_batches(data, config, 64, np.random.default_rng(0)))
    seen_rows = sum(len(b.lengths) for b in batches)
    assert seen_rows == int(np.sum(end - start_all >= 2))
    # every batch window ends at the train bound, which leaves out the valid and test targets
    for batch in batches:
        assert int(batch.lengths.max()) <= config.max_len
    assert np.all(end == end_all - 2)
    masked = list(masked_train_batches(data, EncoderConfig(num_items=data.num_items, max_len=5, backbone="bert"), 64, 0.2,
                                       np.random.default_rng(0)))
    assert all(((b.targets > 0).sum(1) >= 1).all() for b in masked)


def test_causal_batches_are_shifted_by_one(synthetic_dataset):
    events, _ = synthetic_dataset
    data = load_sequences(load_config(None, [f"data.path={events}"]).data)
    config = EncoderConfig(num_items=data.num_items, max_len=50)
    batch = next(causal_train_batches(data, config, 8, np.random.default_rng(1)))
    for row in range(len(batch.lengths)):
        n = int(batch.lengths[row])
        assert torch.equal(batch.items[row, 1:n], batch.targets[row, : n - 1])
        assert (batch.items[row, n:] == 0).all() and (batch.targets[row, n:] == 0).all()


def test_next_item_masked_batches_hold_every_train_prefix_once(synthetic_dataset):
    events, _ = synthetic_dataset
    data = load_sequences(load_config(None, [f"data.path={events}"]).data)
    config = EncoderConfig(num_items=data.num_items, max_len=6, backbone="bert")
    start, end = history_bounds(data, "train")
    expected = sorted(
        (tuple(data.items[max(s, t - 5) : t]), int(data.items[t])) for s, e in zip(start, end) for t in range(s + 1, e)
    )
    samples = []
    for batch in next_item_masked_batches(data, config, 32, np.random.default_rng(0)):
        for row in range(len(batch.lengths)):
            n = int(batch.lengths[row])
            assert batch.items[row, n - 1] == config.mask_index and (batch.targets[row, : n - 1] == 0).all()
            samples.append((tuple(batch.items[row, : n - 1].tolist()), int(batch.targets[row, n - 1])))
    assert sorted(samples) == expected  # each prefix once, never past the train bound (valid and test stay unseen)


@pytest.mark.parametrize("overrides", [["model.backbone=bert"], ["model.backbone=bert", "model.bert_objective=next"],
                                       ["model.backbone=llama"], ["model.frequency_mix=0.5"], ["optim.loss=sampled", "optim.num_negatives=32"],
                                       ["optim.loss=bce"], ["model.similarity=cosine", "model.temperature=0.1", "optim.mask_history=true"],
                                       ["model.item_dropout=0.3", "optim.mask_history=true", "optim.lr_schedule=cosine"]])
def test_every_backbone_and_loss_trains_and_is_deterministic(tmp_path, synthetic_dataset, overrides):
    events, attributes = synthetic_dataset
    base = [o for o in TINY_OVERRIDES if not o.startswith(("optim.max_epochs", "optim.patience"))]
    config = load_config(None, base + overrides + ["optim.max_epochs=2", "optim.patience=2", f"data.path={events}"])
    first = fit(config, tmp_path / "a", progress=False)
    second = fit(config, tmp_path / "b", progress=False)
    assert first.test["NDCG@10"] == second.test["NDCG@10"]
    assert np.isfinite(json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])["loss"])
