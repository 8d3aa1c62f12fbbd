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
