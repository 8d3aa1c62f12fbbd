"""Warm start (training/warm_start.py through train.prepare_run): rows follow raw ids, not indices.

The newer log is built so that its item indices differ from the parent's for almost every shared item (users in
reverse order, a different item count), some parent items are absent from it and some items and attribute values
are new. Oracles: the parent's own rows and scores looked up by raw id, sha256 of the parent's weights computed
here, and the serving-time placement of new items computed from an artifact exported from the parent.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from seqrank.training import run_dir as run_files
from seqrank.training.artifact import IndexParams, load_artifact
from seqrank.training.cold_items import placed_item_vectors
from seqrank.training.config import load_config
from seqrank.training.export import export_run
from seqrank.training.model import encode_histories, load_encoder_dir
from seqrank.training.step import Worker
from seqrank.training.synthetic import generate_attributes, generate_log
from seqrank.training.train import fit, prepare_run
from seqrank.training.warm_start import WarmStartError

SMALL = ["model.hidden_size=16", "model.intermediate_size=32", "model.max_len=12", "optim.batch_size=128",
         "optim.max_epochs=1", "optim.num_threads=1", "eval.ks=[10]"]
PARENT_ITEMS, CHILD_ITEMS, ABSENT = 120, 150, 10  # the child log lacks the parent's first ABSENT items


def write_log(path, log, reverse_users: bool = False, drop_items: int = 0):
    frame = pd.DataFrame({"user_id": log.user_ids, "item_id": log.item_ids, "timestamp": log.timestamps,
                          "event_type": log.behaviors})
    if drop_items:
        frame = frame[~frame["item_id"].isin([f"sku-{n:05d}" for n in range(1, drop_items + 1)])]
    if reverse_users:  # users (and so items) indexed by first appearance: a reversed file reorders both
        order = {user: rank for rank, user in enumerate(reversed(pd.unique(frame["user_id"])))}
        frame = frame.sort_values("user_id", key=lambda users: users.map(order), kind="stable")
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("warm")
    attributes = directory / "attributes.json"
    attributes.write_text(json.dumps(generate_attributes([f"sku-{n:05d}" for n in range(1, CHILD_ITEMS + 1)])))
    parent_log = write_log(directory / "parent.csv", generate_log(300, PARENT_ITEMS, seed=0))
    child_log = write_log(directory / "child.csv", generate_log(260, CHILD_ITEMS, seed=3), reverse_users=True,
                          drop_items=ABSENT)
    return directory, parent_log, child_log, attributes


@pytest.fixture(scope="module", params=["single", "towers"])
def parent_run(request, logs):
    directory, parent_log, _, attributes = logs
    towers = ["model.towers=[gpt2, llama]"] if request.param == "towers" else []
    config = load_config(None, SMALL + towers + [f"data.path={parent_log}", f"data.attributes={attributes}"])
    run = directory / f"parent-{request.param}"
    fit(config, run, progress=False)
    return run, towers


def warm_started(parent, logs, out, extra=()):
    """The child's training run as prepare_run leaves it: warm-started, before any step."""
    directory, _, child_log, attributes = logs
    run, towers = parent
    config = load_config(None, SMALL + towers + [f"data.path={child_log}", f"data.attributes={attributes}", *extra])
    return prepare_run(config, out, None, Worker(device=torch.device("cpu")), init_from=run)


def towers_of(model):
    return list(model.towers) if hasattr(model, "towers") else [model]


def test_item_rows_are_carried_by_raw_id(parent_run, logs, tmp_path):
    child = warm_started(parent_run, logs, tmp_path / "child")
    parent = load_encoder_dir(parent_run[0])
    parent_ids = run_files.read_item_ids(parent_run[0])
    child_ids = list(child.data.item_ids)
    parent_index = {raw: i for i, raw in enumerate(parent_ids)}
    shared = [(j, parent_index[raw]) for j, raw in enumerate(child_ids) if j and raw in parent_index]
    assert len(shared) == PARENT_ITEMS
    assert sum(j != i for j, i in shared) > PARENT_ITEMS // 2  # indices differ: a positional copy would show
    for child_tower, parent_tower in zip(towers_of(child.model), towers_of(parent)):
        child_rows = child_tower.item_embedding.weight.detach()
        parent_rows = parent_tower.item_embedding.weight.detach()
        for j, i in shared:
            assert torch.equal(child_rows[j], parent_rows[i]), (child_ids[j], j, i)
        # behaviour rows by name, attribute rows by raw value
        parent_behaviors = run_files.read_data_info(parent_run[0]).behavior_names
        for b, name in enumerate(child.data.behavior_names, start=1):
            assert torch.equal(child_tower.behavior_embedding.weight[b],
                               parent_tower.behavior_embedding.weight[parent_behaviors.index(name) + 1])


def test_attribute_rows_follow_raw_values(parent_run, logs, tmp_path):
    from seqrank.training.data import attribute_vocabulary

    _, _, _, attributes = logs
    child = warm_started(parent_run, logs, tmp_path / "child")
    parent = load_encoder_dir(parent_run[0])
    parent_values = attribute_vocabulary(attributes, np.array(run_files.read_item_ids(parent_run[0]), dtype=object))
    child_values = attribute_vocabulary(attributes, child.data.item_ids)
    assert child_values != parent_values[: len(child_values)]  # the value order differs too
    for child_tower, parent_tower in zip(towers_of(child.model), towers_of(parent)):
        table, parent_table = child_tower.attribute_embedding.weight, parent_tower.attribute_embedding.weight
        assert torch.equal(table[0], parent_table[0])  # the PAD row adds to every item with an empty slot
        for a, value in enumerate(child_values[1:], start=1):
            if value in parent_values:
                assert torch.equal(table[a], parent_table[parent_values.index(value)]), value


def test_vocabulary_keeps_absent_items_and_adds_new_ones(parent_run, logs, tmp_path):
    child = warm_started(parent_run, logs, tmp_path / "child")
    parent_ids = set(run_files.read_item_ids(parent_run[0])[1:])
    child_ids = list(child.data.item_ids[1:])
    expected = {f"sku-{n:05d}" for n in range(1, CHILD_ITEMS + 1)}
    assert set(child_ids) == expected and len(child_ids) == len(expected)  # the union, once each
    assert child.model.config.num_items == CHILD_ITEMS
    absent = [f"sku-{n:05d}" for n in range(1, ABSENT + 1)]
    assert child_ids[-ABSENT:] == [raw for raw in run_files.read_item_ids(parent_run[0]) if raw in absent]
    assert parent_ids - set(child_ids) == set()


def test_new_items_start_where_serving_places_them(parent_run, logs, tmp_path):
    """Oracle: the parent exported as an artifact and training/cold_items.py's serving-time placement."""
    _, _, _, attributes = logs
    child = warm_started(parent_run, logs, tmp_path / "child")
    artifact = load_artifact(export_run(parent_run[0], tmp_path / "parent-artifact", IndexParams(M=8)))
    values = json.loads(attributes.read_text())
    new = [(j, raw) for j, raw in enumerate(child.data.item_ids) if j and raw not in artifact.item_index_of]
    assert len(new) == CHILD_ITEMS - PARENT_ITEMS
    expected = placed_item_vectors(artifact, [values[raw] for _, raw in new]).vectors
    with torch.no_grad():
        vectors = child.model.output_item_vectors(torch.tensor([j for j, _ in new])).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(vectors, axis=1).min() > 0


def test_before_any_step_shared_items_score_exactly_as_in_the_parent(parent_run, logs, tmp_path):
    child = warm_started(parent_run, logs, tmp_path / "child")
    parent = load_encoder_dir(parent_run[0])
    parent_ids = run_files.read_item_ids(parent_run[0])
    child_index = {raw: j for j, raw in enumerate(child.data.item_ids)}
    parent_behaviors = run_files.read_data_info(parent_run[0]).behavior_names
    rng = np.random.default_rng(0)
    shared = np.array(parent_ids[1:], dtype=object)
    histories = [rng.choice(shared, size=int(rng.integers(1, 15)), replace=False) for _ in range(16)]
    names = [rng.choice(parent_behaviors, size=len(h)) for h in histories]
    parent_users = encode_histories(parent, [np.array([parent_ids.index(raw) for raw in h]) for h in histories],
                                    [np.array([parent_behaviors.index(b) + 1 for b in n]) for n in names])
    child_names = list(child.data.behavior_names)
    child_users = encode_histories(child.model.eval(), [np.array([child_index[raw] for raw in h]) for h in histories],
                                   [np.array([child_names.index(b) + 1 for b in n]) for n in names])
    with torch.no_grad():
        parent_items = parent.output_item_vectors().numpy()[1: len(parent_ids)]  # (I, D) in the parent's order
        child_items = child.model.output_item_vectors().numpy()[[child_index[raw] for raw in parent_ids[1:]]]
    np.testing.assert_allclose(child_users @ child_items.T, parent_users @ parent_items.T, rtol=1e-5, atol=1e-5)


def test_the_run_records_its_parent_and_evaluates_again(parent_run, logs, tmp_path, capsys):
    from seqrank.serving.cli import main

    _, _, child_log, attributes = logs
    run, towers = parent_run
    out = tmp_path / "child"
    sets = [arg for item in SMALL + towers for arg in ("--set", item)]
    assert main(["train", "--init-from", str(run), "--data", str(child_log), "--attributes", str(attributes),
                 "--out", str(out), "--quiet", *sets]) == 0
    record = run_files.read_parent(out)
    assert record["path"] == str(run.resolve()) and record["kind"] == "run"
    assert record["weights_sha256"] == hashlib.sha256((run / "encoder.safetensors").read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--json"]) == 0  # the log rebuilt over the recorded vocabulary
    assert json.loads(capsys.readouterr().out)["users"] > 0


def test_an_artifact_parent_records_its_model_version(parent_run, logs, tmp_path):
    artifact = export_run(parent_run[0], tmp_path / "artifact", IndexParams(M=8), name="parent")
    child = warm_started((artifact, parent_run[1]), logs, tmp_path / "child")
    record = run_files.read_parent(tmp_path / "child")
    assert record["kind"] == "artifact"
    assert record["model_version"] == json.loads((artifact / "manifest.json").read_text())["model_version"]
    assert child.model.config.num_items == CHILD_ITEMS


def test_another_architecture_is_refused(parent_run, logs, tmp_path):
    with pytest.raises(WarmStartError, match="model.hidden_size"):
        warm_started(parent_run, logs, tmp_path / "child", ["model.hidden_size=8", "model.num_heads=1"])
