"""Export → load round trip, index exactness on the small catalogue, and refusal of damaged artifacts."""

import json
import shutil

import numpy as np
import pytest

from seqrank.training.artifact import ArtifactError, load_artifact
from seqrank.training.export import exact_top_k
from seqrank.training.model import encode_histories, load_encoder, load_encoder_dir


def test_round_trip_preserves_vectors_ids_and_metrics(tiny_run, tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    model = load_encoder_dir(tiny_run)
    expected = model.output_item_vectors()[: model.config.num_items + 1].detach().numpy()
    np.testing.assert_allclose(artifact.item_vectors[1:], expected[1:], rtol=1e-6)
    assert not artifact.item_vectors[0].any()
    assert artifact.item_ids == json.loads((tiny_run / "item_ids.json").read_text())
    test_metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    assert artifact.manifest["metrics"]["NDCG@10"] == pytest.approx(test_metrics["NDCG@10"])
    assert artifact.item_index_of[artifact.item_ids[5]] == 5


def test_loaded_encoder_gives_the_trained_user_vectors(tiny_run, tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    served = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
    trained = load_encoder_dir(tiny_run)
    histories = [np.array([1, 2, 3]), np.array([7, 9])]
    behaviors = [np.array([1, 1, 2]), np.array([1, 1])]
    np.testing.assert_allclose(encode_histories(served, histories, behaviors), encode_histories(trained, histories, behaviors))


def test_index_matches_exact_search_on_small_catalogue(tiny_artifact):
    artifact = load_artifact(tiny_artifact)
    index = artifact.load_index()
    queries = np.random.default_rng(0).normal(size=(20, artifact.dim)).astype(np.float32)
    labels, _ = index.knn_query(queries, k=10)
    np.testing.assert_array_equal(labels, exact_top_k(queries, artifact.item_vectors, 10))


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file", "drop_from_manifest"])
def test_damaged_artifact_is_refused_naming_the_file(tmp_path, tiny_artifact, damage):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    if damage == "flip_byte":
        data = bytearray((copy / "item_vectors.npy").read_bytes())
        data[-1] ^= 0xFF
        (copy / "item_vectors.npy").write_bytes(bytes(data))
        fragment = "item_vectors.npy: sha256 mismatch"
    elif damage == "delete_file":
        (copy / "index.hnsw").unlink()
        fragment = "index.hnsw: missing"
    else:
        manifest = json.loads((copy / "manifest.json").read_text())
        del manifest["files"]["encoder.safetensors"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
        fragment = "encoder.safetensors: not listed"
    with pytest.raises(ArtifactError, match=fragment):
        load_artifact(copy)


def test_export_carries_what_places_a_new_item(tiny_run, tiny_artifact, synthetic_dataset):
    """The trained run's attribute vocabulary and table travel with the artifact, and a new item with a trained
    item's attributes gets that item's vector less its id embedding (training/cold_items.py)."""
    import torch

    from seqrank.training.cold_items import attributes_of_items, cold_item_vectors
    from seqrank.training.data import attribute_vocabulary

    artifact = load_artifact(tiny_artifact)
    model = load_encoder_dir(tiny_run)
    _, attributes_path = synthetic_dataset
    ids = np.array(artifact.item_ids, dtype=object)
    assert artifact.attribute_values == attribute_vocabulary(attributes_path, ids)
    assert len(artifact.attribute_values) == model.config.num_attributes + 1
    np.testing.assert_array_equal(artifact.attribute_vectors[0], model.attribute_embedding.weight.detach().numpy())
    assert artifact.manifest["cold_items"] == {
        "similarity": model.config.similarity, "max_attributes_per_item": model.config.max_attributes_per_item,
        "num_attributes": model.config.num_attributes, "num_towers": 1, "tower_dim": model.config.hidden_size}
    items = [1, 7, artifact.num_items]
    raw = attributes_of_items(artifact, items)
    raw_file = json.loads(attributes_path.read_text())
    assert raw == [raw_file[artifact.item_ids[item]] for item in items]
    cold = cold_item_vectors(artifact, raw)
    with torch.no_grad():
        index = torch.tensor(items)
        expected = (model.item_vectors(index) - model.item_embedding(index)).numpy()
    assert np.abs(cold.vectors - expected).max() <= 1e-5
    assert not cold.average.any() and cold.unknown == [[], [], []]
