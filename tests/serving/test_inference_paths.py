"""Every encoder inference path (serving/inference.py) gives the model's own user vectors.

The oracle is the model's eager forward run on each history alone (no padding, no batch), so a path that mixes up
rows, padding, positions, towers or the behaviour embedding differs from it; checked on a model built from the
synthetic data and on the committed recipe's architecture (training/configs/amazon-towers.yaml), random-initialised.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from seqrank.serving import inference
from seqrank.serving.cli import main
from seqrank.serving.config import EncoderArgs
from seqrank.serving.inference import build_inference, build_path, encode_with
from seqrank.training.config import load_config
from seqrank.training.data import build_sequences
from seqrank.training.model import EncoderConfig, build_encoder, pad_histories
from seqrank.training.synthetic import generate_attributes, generate_log

RECIPE = Path(__file__).resolve().parents[2] / "training" / "configs" / "amazon-towers.yaml"
TOLERANCE = 1e-4
# fused on every model; onnx (an export of the fused pass, ~5 s each) where behaviours and multi-head attention are
# (synthetic-gpt2) and on the recipe; eager once, as the reference the serving default falls back to
CASES = [*(("fused", m) for m in ("synthetic-gpt2", "synthetic-llama-cosine-1-layer", "synthetic-towers", "recipe")),
         ("onnx", "synthetic-gpt2"), ("onnx", "recipe"), ("eager", "recipe")]


def _synthetic_model(tmp_path_factory, **architecture):
    """A random-initialised encoder over the synthetic log's items, behaviours and attributes (category, brand)."""
    log = generate_log(num_users=150, num_items=60, seed=3)
    attributes = tmp_path_factory.mktemp("synthetic") / "attributes.json"
    attributes.write_text(json.dumps(generate_attributes(sorted(set(log.item_ids)))))
    data = build_sequences(log, attributes_path=str(attributes))
    config = EncoderConfig(num_items=data.num_items, num_behaviors=data.num_behaviors,
                           num_attributes=data.num_attributes, max_attributes_per_item=data.item_attributes.shape[1],
                           dropout=0.0, attention_dropout=0.0, **architecture)
    torch.manual_seed(0)
    return build_encoder(config, data.item_attributes).eval()


def _recipe_model(num_items: int = 300, num_attributes: int = 40, per_item: int = 6):
    """The committed recipe's architecture (four towers gpt2, llama, gpt2, llama) over a small random catalogue."""
    architecture = load_config(str(RECIPE), []).model.architecture()
    rng = np.random.default_rng(1)
    item_attributes = rng.integers(0, num_attributes + 1, (num_items + 1, per_item))  # 0: an empty slot
    config = EncoderConfig(**architecture, num_items=num_items, num_attributes=num_attributes,
                           max_attributes_per_item=per_item)
    torch.manual_seed(0)
    model = build_encoder(config, item_attributes).eval()
    with torch.no_grad():  # trained-looking scales: random init at std 0.02 would make every tower near-constant
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


MODELS = {
    "synthetic-gpt2": dict(backbone="gpt2", max_len=12, hidden_size=16, num_heads=2, num_layers=2,
                           intermediate_size=32),
    "synthetic-llama-cosine-1-layer": dict(backbone="llama", max_len=12, hidden_size=16, num_heads=2, num_layers=1,
                                           intermediate_size=32, similarity="cosine", temperature=0.1),
    "synthetic-towers": dict(towers=["llama", "gpt2", "llama"], max_len=12, hidden_size=16, num_heads=2,
                             num_layers=2, intermediate_size=32),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model, [(histories, behaviours, oracle vectors)]), each built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _recipe_model() if name == "recipe" else _synthetic_model(tmp_path_factory, **MODELS[name])
            cache[name] = model, [(h, b, _one_by_one(model, h, b)) for h, b in _histories(model)]
        return cache[name]

    return get


def _histories(model, batch_sizes=(1, 1, 3, 12), seed=0):
    """Batches of histories: a single event alone, a too-long history alone, then batches mixing longer than
    max_len (truncated), exactly max_len, a single event and random lengths."""
    config = model.config
    rng = np.random.default_rng(seed)
    batches = []
    for number, batch_size in enumerate(batch_sizes):
        lengths = list(rng.integers(1, config.max_len + 8, batch_size))
        lengths[:3] = [config.max_len + 7, config.max_len, 1][:batch_size] if batch_size > 1 else [1 + 6 * number]
        histories = [rng.integers(1, config.num_items + 1, n) for n in lengths]
        behaviors = [rng.integers(1, config.num_behaviors + 1, n) for n in lengths] if config.num_behaviors else None
        batches.append((histories, behaviors))
    return batches


@torch.no_grad()
def _one_by_one(model, histories, behaviors) -> np.ndarray:
    """The oracle: the model's own forward on each history alone, truncated to its newest max_len events."""
    rows = []
    for row, history in enumerate(histories):
        keep = slice(-model.config.max_len, None)
        items = torch.as_tensor(history[keep], dtype=torch.long).unsqueeze(0)
        kinds = None
        if behaviors is not None and model.behavior_embedding is not None:
            kinds = torch.as_tensor(behaviors[row][keep], dtype=torch.long).unsqueeze(0)
        rows.append(model.user_vectors(items, kinds, torch.tensor([items.shape[1]])).numpy()[0])
    return np.stack(rows)


def _top10(model, vectors: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.topk(model.score_all(torch.from_numpy(vectors)), 10, dim=1).indices.numpy()


@pytest.mark.parametrize("path, name", CASES)
def test_each_path_gives_the_models_own_vectors_and_top10(models, path, name):
    model, batches = models(name)
    if path == "onnx":
        pytest.importorskip("onnxruntime")
    fn = build_path(model, path)
    for histories, behaviors, expected in batches:
        vectors = encode_with(fn, model, histories, behaviors)
        assert vectors.dtype == np.float32 and vectors.shape == expected.shape
        assert np.abs(vectors - expected).max() <= TOLERANCE, f"{path}: batch of {len(histories)}"
        np.testing.assert_array_equal(_top10(model, vectors), _top10(model, expected))


def test_the_behaviour_embedding_counts(tmp_path_factory):
    """Guards the oracle itself: on the synthetic model the behaviours change the vectors, so a path that drops
    them cannot pass the parity test."""
    model = _synthetic_model(tmp_path_factory, **MODELS["synthetic-gpt2"])
    histories, behaviors = _histories(model, (3,))[0]
    assert model.behavior_embedding is not None
    assert np.abs(_one_by_one(model, histories, behaviors) - _one_by_one(model, histories, None)).max() > 10 * TOLERANCE


def test_compiled_path_gives_the_models_own_vectors(tmp_path_factory, monkeypatch):
    """One warm-up shape keeps the compile cheap; a new shape afterwards must still be right."""
    monkeypatch.setattr(inference, "COMPILE_WARMUP_SHAPES", ((2, 3),))
    model = _synthetic_model(tmp_path_factory, **MODELS["synthetic-gpt2"])
    fn = build_path(model, "compile")
    for histories, behaviors in _histories(model, (3,)):
        expected = _one_by_one(model, histories, behaviors)
        assert np.abs(encode_with(fn, model, histories, behaviors) - expected).max() <= TOLERANCE


def test_a_path_that_cannot_be_built_serves_eager_loudly(tmp_path_factory, monkeypatch, caplog):
    model = _synthetic_model(tmp_path_factory, **MODELS["synthetic-gpt2"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on an install without onnxruntime: ImportError
    with caplog.at_level(logging.ERROR):
        chosen = build_inference(model, "onnx")
    assert chosen.name == "eager" and "onnxruntime" in chosen.fallback_reason
    assert any(r.levelno == logging.ERROR and "onnx" in r.getMessage() for r in caplog.records)
    items, behaviors, lengths = pad_histories(*_histories(model, (3,))[0], model.config)
    with torch.no_grad():
        torch.testing.assert_close(chosen.user_vectors(items, behaviors, lengths),
                                   model.user_vectors(items, behaviors, lengths), rtol=0, atol=0)
    auto = build_inference(model, "auto")  # auto: the next fastest path that builds
    assert auto.name == "fused" and "onnx" in auto.fallback_reason


def test_a_model_the_fused_pass_does_not_cover_serves_eager(tmp_path_factory):
    model = _synthetic_model(tmp_path_factory, **MODELS["synthetic-gpt2"], frequency_mix=0.5)
    chosen = build_inference(model, "fused")
    assert chosen.name == "eager" and "frequency_mix" in chosen.fallback_reason


def test_paths_are_checked_against_eager_when_built(tmp_path_factory, monkeypatch):
    """A path whose vectors drift from the model's (here: the fused pass handed a corrupted input table) is
    refused at build time, not served."""
    model = _synthetic_model(tmp_path_factory, **MODELS["synthetic-gpt2"])
    original = inference.FusedEncoder.__init__

    def corrupted(self, model):
        original(self, model)
        self.item_table.mul_(1.01)

    monkeypatch.setattr(inference.FusedEncoder, "__init__", corrupted)
    chosen = build_inference(model, "fused")
    assert chosen.name == "eager" and "differ from eager" in chosen.fallback_reason


def test_the_setting_is_validated_and_defaults_to_auto():
    assert EncoderArgs().inference == "auto"
    assert EncoderArgs.model_validate_json('{"inference": "onnx"}').inference == "onnx"
    with pytest.raises(pydantic.ValidationError, match="inference"):
        EncoderArgs.model_validate_json('{"inference": "tensorrt"}')
    assert inference.candidate_paths("auto", "cuda") == ("eager",)  # a GPU replica keeps its eager forward
    assert inference.candidate_paths("auto", "cpu")[0] == "onnx"


def test_bench_encoder_paths_prints_every_path_side_by_side(tmp_path, capsys):
    out = tmp_path / "paths.json"
    assert main(["bench", "encoder", "--paths", "eager", "fused", "--seconds", "0.05", "--batch-sizes", "1", "3",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| fused | 1 | 3 |" in table and "| eager | 1 | 1 |" in table
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["batch_size"]) for r in rows] == [("eager", 1), ("fused", 1), ("eager", 3), ("fused", 3)]
    for row in rows:
        assert row["p50_ms"] > 0 and row["requests_per_s_per_core"] == pytest.approx(
            row["batch_size"] / row["p50_ms"] * 1e3)
        assert row["max_diff"] <= TOLERANCE and (row["path"] != "eager" or row["max_diff"] == 0)
