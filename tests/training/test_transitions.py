"""The item-to-item transition prior: counts from training events only, its three read forms agreeing, the weight
chosen on validation inside `fit`, and the run → evaluate → artifact path."""

import json

import numpy as np
import pytest

from seqrank.serving.cli import main
from seqrank.training.artifact import ArtifactError, load_artifact
from seqrank.training.config import DataConfig, load_config
from seqrank.training.export import export_run
from seqrank.training.run_dir import load_run_transitions
from seqrank.training.sources import load_sequences
from seqrank.training.train import fit
from seqrank.training.transitions import FILES, count_transitions
from tests.conftest import TINY_OVERRIDES

# user: items oldest first; the last two of each are its validation and test targets
LOG = {"u1": "a b c d e", "u2": "a b x y", "u3": "b c a b z"}


@pytest.fixture
def hand_data(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("".join(f"{user} {items}\n" for user, items in LOG.items()))
    data = load_sequences(DataConfig(path=str(path), format="s3rec"))
    index = {raw: i for i, raw in enumerate(data.item_ids) if i}
    return data, index


def test_counts_only_successions_inside_training_events(hand_data):
    data, index = hand_data
    prior = count_transitions(data).with_weight(1.0)
    counted = {(data.item_ids[a], data.item_ids[b]): float(prior.counts[p])
               for a in range(1, data.num_items + 1)
               for p, b in zip(range(prior.indptr[a], prior.indptr[a + 1]), prior.successors[prior.indptr[a]:prior.indptr[a + 1]])}
    # training parts: u1 a b c, u2 a b, u3 b c a. u3's a -> b leads into its validation item and is not counted,
    # nor is anything into d, e, x, y or z
    assert counted == {("a", "b"): 2.0, ("b", "c"): 2.0, ("c", "a"): 1.0}
    assert prior.indptr[0] == prior.indptr[1] and prior.num_items == data.num_items  # row 0 (PAD) is empty


def test_sparse_boost_and_dense_rows_agree(synthetic_dataset):
    events, _ = synthetic_dataset
    data = load_sequences(load_config(None, [f"data.path={events}"]).data)
    prior = count_transitions(data).with_weight(0.7)
    rng = np.random.default_rng(0)
    items = rng.integers(1, data.num_items + 1, 20)
    dense = prior.dense_rows(items)
    assert dense.shape == (20, data.num_items + 1) and dense[:, 0].max() == 0
    candidates = np.arange(data.num_items + 1)
    for row, item in enumerate(items):
        np.testing.assert_allclose(prior.boost(int(item), candidates), dense[row], rtol=1e-6)
        successors, terms = prior.successors_of(int(item), 3)
        assert len(successors) <= 3 and np.all(np.diff(terms) <= 0)  # most frequent first
        np.testing.assert_allclose(terms, 0.7 * np.log1p(prior.counts[prior.indptr[item]:][: len(terms)]))
    assert prior.with_weight(0.0).dense_rows(items).max() == 0


def test_fit_chooses_the_weight_on_validation_and_evaluate_and_export_use_it(tmp_path, synthetic_dataset, capsys):
    events, attributes = synthetic_dataset
    overrides = TINY_OVERRIDES + [f"data.path={events}", f"data.attributes={attributes}", "optim.max_epochs=2",
                                  "transitions.weights=[0, 0.5, 2]"]
    run = tmp_path / "run"
    result = fit(load_config(None, overrides), run, progress=False)
    chosen = json.loads((run / "transitions.json").read_text())
    scores = chosen["valid NDCG@10 by weight"]
    assert set(scores) == {"0.0", "0.5", "2.0"} and chosen["weight"] == float(max(scores, key=scores.get))
    assert result.transition_weight == chosen["weight"] > 0  # the synthetic log is strongly sequential
    # the run's valid metrics are the chosen weight's validation score
    assert json.loads((run / "valid_metrics.json").read_text())["NDCG@10"] == pytest.approx(max(scores.values()))

    assert main(["evaluate", "--run", str(run), "--json"]) == 0
    with_prior = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--run", str(run), "--json", "--no-transitions"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert with_prior["NDCG@10"] == pytest.approx(result.test["NDCG@10"]) and with_prior["NDCG@10"] > without["NDCG@10"]

    artifact = load_artifact(export_run(run, tmp_path / "artifact"))
    prior = load_run_transitions(run)
    assert artifact.transitions.weight == prior.weight == chosen["weight"]
    np.testing.assert_array_equal(artifact.transitions.successors, prior.successors)
    assert artifact.manifest["transitions"]["pairs"] == len(prior.successors)


def test_default_config_trains_no_prior_and_exports_none(tiny_run, tmp_path):
    assert not (tiny_run / "transitions.json").exists() and load_run_transitions(tiny_run) is None
    assert load_artifact(export_run(tiny_run, tmp_path / "artifact")).transitions is None


def test_an_artifact_missing_a_listed_prior_file_is_refused(tmp_path, synthetic_dataset):
    events, attributes = synthetic_dataset
    run = tmp_path / "run"
    fit(load_config(None, TINY_OVERRIDES + [f"data.path={events}", "optim.max_epochs=1",
                                            "transitions.weights=[1.0]"]), run, progress=False)
    artifact = export_run(run, tmp_path / "artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest["files"][FILES[1]]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=FILES[1]):
        load_artifact(artifact)


def test_prior_command_fits_an_existing_run_on_validation(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["evaluate", "--run", str(run), "--json", "--split", "valid"]) == 0
    encoder_alone = json.loads(capsys.readouterr().out)["NDCG@10"]
    assert main(["prior", "--run", str(run), "--weights", "0", "1", "3"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[0])["valid NDCG@10 by weight"]
    assert scores["0.0"] == pytest.approx(encoder_alone)  # weight 0 is the encoder alone
    weight = load_run_transitions(run).weight
    assert scores[str(weight)] == max(scores.values()) > encoder_alone
    assert main(["evaluate", "--run", str(run), "--json", "--split", "valid"]) == 0
    assert json.loads(capsys.readouterr().out)["NDCG@10"] == pytest.approx(max(scores.values()))
