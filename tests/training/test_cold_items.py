"""New items placed from their raw attributes alone (training/cold_items.py) give exactly the vector the model
itself computes for an item whose id embedding is zero; the two artifact files this needs are checked at load.

The oracle is the torch model: a tiny real encoder (and two-tower ensembles) with attributes, the id rows of some
trained items zeroed, then `output_item_vectors` for those items, compared with `cold_item_vectors` on an artifact
exported from the same run, given the items' raw attribute values."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seqrank.training import run_dir as run_files
from seqrank.training.artifact import (
    ATTRIBUTE_VALUES_FILE,
    ATTRIBUTE_VECTORS_FILE,
    COLD_ITEMS_KEY,
    MANIFEST_FILE,
    ArtifactError,
    IndexParams,
    load_artifact,
    sha256_file,
)
from seqrank.training.cold_items import (
    ColdItemError,
    attributes_of_items,
    average_item_vector,
    cold_item_vectors,
)
from seqrank.training.config import load_config
from seqrank.training.data import DataError, attribute_vocabulary, load_attributes
from seqrank.training.export import export_run
from seqrank.training.model import EncoderConfig, EncoderEnsemble, build_encoder, save_encoder

TOLERANCE = 1e-5
NUM_ITEMS = 12
# Raw side information as a catalogue would send it: repeats, an integer, items with none (i4, i7, i12).
ATTRIBUTES = {
    "i1": ["red", "nike"],
    "i2": ["blue"],
    "i3": ["red", "adidas", "xl"],
    "i5": ["blue", "blue", "nike"],
    "i6": [7, "xl"],
    "i8": ["green", "puma", "s"],
    "i9": ["nike"],
    "i10": ["red", "red"],
    "i11": ["s", "adidas"],
    "unknown-item": ["only-here"],
}
ZEROED = [1, 2, 3, 5, 6, 8, 10]  # trained items whose id embedding is zeroed: 1, 2 and 3 real attributes
SLOTS = 3  # the widest item above
MODELS = {
    "gpt2-dot": {"backbone": "gpt2", "similarity": "dot"},
    "gpt2-cosine": {"backbone": "gpt2", "similarity": "cosine", "temperature": 0.1},
    "ensemble-cosine": {"towers": ("gpt2", "llama"), "similarity": "cosine", "temperature": 0.1},
    "ensemble-dot": {"towers": ("gpt2", "gpt2"), "similarity": "dot"},
}
INDEX = IndexParams(M=8, ef_construction=50, ef_search=50)


def item_ids() -> list[str]:
    return [""] + [f"i{n}" for n in range(1, NUM_ITEMS + 1)]


def write_run(run_dir: Path, attributes: dict | None, **architecture) -> tuple[Path, torch.nn.Module]:
    """A run directory as training writes it, around a freshly initialised encoder (no training needed: the
    formula under test does not depend on what the weights are). Returns (run_dir, the model, in eval mode)."""
    run_dir.mkdir(parents=True)
    ids = np.array(item_ids(), dtype=object)
    matrix, num_attributes = None, 0
    overrides = []
    if attributes is not None:
        attributes_path = run_dir.parent / f"{run_dir.name}-attributes.json"
        attributes_path.write_text(json.dumps(attributes))
        matrix, num_attributes = load_attributes(attributes_path, ids)
        overrides.append(f"data.attributes={attributes_path}")
    torch.manual_seed(0)
    config = EncoderConfig(num_items=NUM_ITEMS, max_len=8, hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=32, dropout=0.0, attention_dropout=0.0, num_attributes=num_attributes,
                           max_attributes_per_item=matrix.shape[1] if matrix is not None else 0, **architecture)
    model = build_encoder(config, matrix).eval()
    towers = model.towers if isinstance(model, EncoderEnsemble) else [model]
    with torch.no_grad():
        for tower in towers:
            tower.item_embedding.weight[ZEROED] = 0.0  # what a new item has: no trained id row
    save_encoder(model, run_dir)
    (run_dir / run_files.CONFIG_FILE).write_text(yaml.safe_dump(load_config(None, overrides).to_dict()))
    (run_dir / run_files.ITEM_IDS_FILE).write_text(json.dumps(item_ids()))
    np.save(run_dir / run_files.ITEM_POPULARITY_FILE, np.arange(NUM_ITEMS + 1, dtype=np.float32))
    info = run_files.DataInfo(fingerprint="f" * 64, num_users=5, num_items=NUM_ITEMS, num_events=40,
                              behavior_names=[], num_attributes=num_attributes, source="hand-made")
    (run_dir / run_files.DATA_FILE).write_text(json.dumps(asdict(info)))
    return run_dir, model


@pytest.fixture(params=list(MODELS), scope="module")
def exported(request, tmp_path_factory):
    """(model, loaded artifact) for each architecture: single models and ensembles, dot and cosine."""
    root = tmp_path_factory.mktemp(request.param)
    run, model = write_run(root / "run", ATTRIBUTES, **MODELS[request.param])
    return model, load_artifact(export_run(run, root / "artifact", INDEX))


@pytest.fixture
def artifact_copy(exported, tmp_path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(exported[1].path, copy)
    return copy


def oracle(model, item: int, attribute_indices: list[int] | None = None) -> np.ndarray:
    """The model's own output vector of trained item `item` (id row zeroed), optionally with its attribute slots
    set to `attribute_indices` first: what the model would compute for an item with those attributes."""
    towers = model.towers if isinstance(model, EncoderEnsemble) else [model]
    saved = [tower.item_attributes[item].clone() for tower in towers]
    try:
        if attribute_indices is not None:
            for tower in towers:
                tower.item_attributes[item] = 0
                tower.item_attributes[item, : len(attribute_indices)] = torch.tensor(attribute_indices)
        with torch.no_grad():
            return model.output_item_vectors(torch.tensor([item]))[0].numpy()
    finally:
        for tower, row in zip(towers, saved):
            tower.item_attributes[item] = row


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- the formula against the model ------------------------------------------------------------------------------


def test_a_new_items_vector_is_the_models_vector_with_a_zero_id_embedding(exported):
    model, artifact = exported
    raw = [ATTRIBUTES[item_ids()[item]] for item in ZEROED]
    cold = cold_item_vectors(artifact, raw)
    assert cold.vectors.dtype == np.float32 and cold.vectors.shape == (len(ZEROED), artifact.dim)
    assert not cold.average.any() and cold.unknown == [[] for _ in ZEROED]
    for row, item in enumerate(ZEROED):
        expected = oracle(model, item)
        assert max_diff(cold.vectors[row], expected) <= TOLERANCE, (item, raw[row])
        assert max_diff(cold.vectors[row], artifact.item_vectors[item]) <= TOLERANCE  # the exported row agrees


def test_unknown_repeated_and_surplus_values(exported):
    model, artifact = exported
    index = {value: i for i, value in enumerate(artifact.attribute_values)}
    request = [
        ["red", "brand-new", "red", "", "nike", "brand-new"],  # unknowns reported once, repeats dropped
        ["xl", "7", "blue", "green", "s"],  # five known values: the first SLOTS are used
        [7, "puma"],  # an integer names the same value as in the attributes file
    ]
    cold = cold_item_vectors(artifact, request)
    assert cold.unknown == [["brand-new", ""], [], []]
    assert cold.used == [["red", "nike"], ["xl", "7", "blue"], ["7", "puma"]]
    assert cold.dropped == [[], ["green", "s"], []]
    assert not cold.average.any()
    for row, used in enumerate(cold.used):
        expected = oracle(model, ZEROED[0], [index[value] for value in used])
        assert max_diff(cold.vectors[row], expected) <= TOLERANCE, used


def test_an_item_with_no_known_value_gets_the_average_item(exported):
    _, artifact = exported
    cold = cold_item_vectors(artifact, [["nothing-known", "at-all"], [], ["red"]])
    assert cold.average.tolist() == [True, True, False]
    assert cold.unknown[0] == ["nothing-known", "at-all"] and cold.used[0] == []
    mean = torch.from_numpy(artifact.item_vectors[1:].astype(np.float64)).mean(0)
    if artifact.cold_item_settings["similarity"] == "cosine":  # a unit vector per tower, like every item's
        towers = artifact.cold_item_settings["num_towers"]
        mean = torch.nn.functional.normalize(mean.reshape(towers, -1), dim=-1).reshape(-1)
    np.testing.assert_allclose(cold.vectors[0], mean.numpy(), atol=1e-6)
    np.testing.assert_array_equal(cold.vectors[0], cold.vectors[1])
    np.testing.assert_array_equal(cold.vectors[0], average_item_vector(artifact))
    given = np.full(artifact.dim, 0.5, dtype=np.float32)  # a caller's precomputed average is used as given
    np.testing.assert_array_equal(cold_item_vectors(artifact, [[]], average_vector=given).vectors[0], given)


def test_malformed_requests_are_refused(exported):
    _, artifact = exported
    with pytest.raises(ColdItemError, match="item 0: attributes must be a list"):
        cold_item_vectors(artifact, ["red"])  # a bare string would otherwise read as the values r, e, d
    with pytest.raises(ColdItemError, match="item 1: attribute value None"):
        cold_item_vectors(artifact, [["red"], [None]])
    assert cold_item_vectors(artifact, []).vectors.shape == (0, artifact.dim)


def test_attributes_of_trained_items_are_their_raw_values(exported):
    _, artifact = exported
    assert attributes_of_items(artifact, [1, 5, 6, 4, 0]) == [["red", "nike"], ["blue", "nike"], ["7", "xl"], [], []]
    with pytest.raises(ColdItemError, match=f"outside 0..{NUM_ITEMS}"):
        attributes_of_items(artifact, [NUM_ITEMS + 1])


# ---- export, the vocabulary and the round trip --------------------------------------------------------------------


def test_export_writes_the_vocabulary_and_every_towers_attribute_table(exported):
    model, artifact = exported
    towers = model.towers if isinstance(model, EncoderEnsemble) else [model]
    run = artifact.path.parent / "run"
    attributes_path = run_files.read_config(run).data.attributes
    assert artifact.attribute_values == attribute_vocabulary(attributes_path, np.array(item_ids(), dtype=object))
    assert artifact.attribute_values[:4] == ["", "red", "nike", "blue"]  # first appearance over the items
    expected = np.stack([tower.attribute_embedding.weight.detach().numpy() for tower in towers])
    np.testing.assert_array_equal(artifact.attribute_vectors, expected)
    assert artifact.attribute_vectors.dtype == np.float32
    settings = artifact.manifest[COLD_ITEMS_KEY]
    assert settings == {"similarity": model.config.similarity, "max_attributes_per_item": SLOTS,
                        "num_attributes": len(artifact.attribute_values) - 1, "num_towers": len(towers),
                        "tower_dim": 16}
    assert artifact.cold_item_settings == settings
    assert {ATTRIBUTE_VALUES_FILE, ATTRIBUTE_VECTORS_FILE} <= set(artifact.manifest["files"])
    assert artifact.attribute_index_of["nike"] == 2 and "" not in artifact.attribute_index_of


def test_the_vocabulary_names_load_attributes_indices(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"a": [7, "", "8"], "b": ["8", 9, 9, ""], "zzz": [100]}))
    ids = np.array(["", "a", "b", "c"], dtype=object)
    matrix, num_attributes = load_attributes(path, ids)
    values = attribute_vocabulary(path, ids)
    assert values == ["", "7", "8", "9"] and num_attributes == 3  # "" is never a value: it names the PAD
    assert [[values[a] for a in row if a] for row in matrix.tolist()] == [[], ["7", "8"], ["8", "9"], []]
    assert attribute_vocabulary(path, list(ids)) == values  # a list of ids reads the same


def test_a_model_without_attributes_exports_no_cold_item_files(tmp_path):
    run, _ = write_run(tmp_path / "run", None, backbone="gpt2", similarity="cosine")
    artifact = load_artifact(export_run(run, tmp_path / "artifact", INDEX))
    assert artifact.attribute_values is None and artifact.attribute_vectors is None
    assert COLD_ITEMS_KEY not in artifact.manifest and not (artifact.path / ATTRIBUTE_VALUES_FILE).exists()
    cold = cold_item_vectors(artifact, [["red"], []])  # nothing is known: every new item is the average item
    assert cold.average.all() and cold.unknown == [["red"], []]
    np.testing.assert_array_equal(cold.vectors[0], average_item_vector(artifact))
    assert attributes_of_items(artifact, [1, 2]) == [[], []]


def test_export_refuses_an_attributes_file_that_changed_since_training(tmp_path):
    run, _ = write_run(tmp_path / "run", ATTRIBUTES, backbone="gpt2")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**ATTRIBUTES, "i2": ["blue", "nike"]}))
    with pytest.raises(DataError, match=re.escape(f"{changed}: does not give the attribute indices")):
        export_run(run, tmp_path / "artifact", INDEX, attributes_path=changed)
    assert not (tmp_path / "artifact").exists()
    moved = tmp_path / "moved.json"  # the same file elsewhere is fine
    moved.write_text(json.dumps(ATTRIBUTES))
    assert load_artifact(export_run(run, tmp_path / "artifact", INDEX, attributes_path=moved)).attribute_values


def test_an_artifact_from_before_the_files_still_loads(artifact_copy):
    for name in (ATTRIBUTE_VALUES_FILE, ATTRIBUTE_VECTORS_FILE):
        (artifact_copy / name).unlink()
    resign(artifact_copy, lambda manifest: [manifest["files"].pop(name) for name in
                                            (ATTRIBUTE_VALUES_FILE, ATTRIBUTE_VECTORS_FILE)]
           + [manifest.pop(COLD_ITEMS_KEY)])
    artifact = load_artifact(artifact_copy)
    assert artifact.attribute_values is None and artifact.item_attributes is not None
    with pytest.raises(ColdItemError, match="export the run again"):
        cold_item_vectors(artifact, [["red"]])
    with pytest.raises(ColdItemError, match="export the run again"):
        attributes_of_items(artifact, [1])


def test_cold_items_imports_no_torch():
    code = ("import sys; import seqrank.training.cold_items, seqrank.training.artifact; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the loader's checks of the two files (re-signed, so the checksums pass) ---------------------------------------


def resign(artifact: Path, edit=None) -> None:
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {name: sha256_file(artifact / name) for name in manifest["files"]}
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_values(edit):
    def apply(artifact: Path) -> None:
        values = json.loads((artifact / ATTRIBUTE_VALUES_FILE).read_text())
        (artifact / ATTRIBUTE_VALUES_FILE).write_text(json.dumps(edit(values)))
    return apply


def edit_vectors(edit):
    def apply(artifact: Path) -> None:
        vectors = np.load(artifact / ATTRIBUTE_VECTORS_FILE, allow_pickle=False)
        np.save(artifact / ATTRIBUTE_VECTORS_FILE, edit(vectors), allow_pickle=True)
    return apply


def nan_row(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.copy()
    vectors[0, 2, 1] = np.nan
    return vectors


def write_text(name: str, text: str):
    def apply(artifact: Path) -> None:
        (artifact / name).write_text(text)
    return apply


TAMPERS = {
    "values-short": (edit_values(lambda v: v[:-1]), ATTRIBUTE_VALUES_FILE, "values, expected num_attributes + 1"),
    "values-pad": (edit_values(lambda v: ["pad"] + v[1:]), ATTRIBUTE_VALUES_FILE, "value 'pad' at the PAD index 0"),
    "values-duplicate": (edit_values(lambda v: v[:-1] + [v[1]]), ATTRIBUTE_VALUES_FILE, "appears more than once"),
    "values-empty": (edit_values(lambda v: v[:-1] + [""]), ATTRIBUTE_VALUES_FILE, "empty value at attribute index"),
    "values-not-strings": (edit_values(lambda v: [""] + list(range(1, len(v)))), ATTRIBUTE_VALUES_FILE,
                           "expected a JSON list of strings"),
    "values-not-json": (write_text(ATTRIBUTE_VALUES_FILE, "[\"\", "), ATTRIBUTE_VALUES_FILE, "not valid JSON"),
    "vectors-float64": (edit_vectors(lambda v: v.astype(np.float64)), ATTRIBUTE_VECTORS_FILE,
                        "dtype float64, expected float32"),
    "vectors-nan": (edit_vectors(nan_row), ATTRIBUTE_VECTORS_FILE, "contains NaN or infinite values"),
    "vectors-row-short": (edit_vectors(lambda v: v[:, :-1]), ATTRIBUTE_VECTORS_FILE, "expected ("),
    "vectors-one-tower-short": (edit_vectors(lambda v: v[..., :-1]), ATTRIBUTE_VECTORS_FILE, "expected ("),
    "vectors-2d": (edit_vectors(lambda v: v[0]), ATTRIBUTE_VECTORS_FILE, "expected ("),
    "vectors-integer": (edit_vectors(lambda v: v.astype(np.int32)), ATTRIBUTE_VECTORS_FILE, "expected floating"),
    "vectors-pickle": (edit_vectors(lambda v: np.array([object()], dtype=object)), ATTRIBUTE_VECTORS_FILE,
                       "not a plain numeric .npy array"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_cold_item_file_is_refused_naming_it(artifact_copy, tamper):
    damage, name, message = TAMPERS[tamper]
    damage(artifact_copy)
    resign(artifact_copy)
    with pytest.raises(ArtifactError, match=re.escape(f"{name}: ") + ".*" + re.escape(message)):
        load_artifact(artifact_copy)


MANIFEST_TAMPERS = {
    "similarity": (lambda m: m[COLD_ITEMS_KEY].update(similarity="euclid"), "similarity 'euclid' is not one of"),
    "disagrees-with-encoder": (
        lambda m: m[COLD_ITEMS_KEY].update(similarity="cosine" if m[COLD_ITEMS_KEY]["similarity"] == "dot" else "dot"),
        "encoder_config says"),
    "slots": (lambda m: m[COLD_ITEMS_KEY].update(max_attributes_per_item=SLOTS + 1),
              "max_attributes_per_item 4, encoder_config says 3"),
    "towers": (lambda m: m[COLD_ITEMS_KEY].update(num_towers=m[COLD_ITEMS_KEY]["num_towers"] + 1),
               "is not the manifest's dim"),
    "not-an-object": (lambda m: m.update({COLD_ITEMS_KEY: [1]}), "cold_items is not a JSON object"),
    "missing": (lambda m: m.pop(COLD_ITEMS_KEY), "cold_items missing beside attribute_values.json"),
    "file-unlisted": (lambda m: m["files"].pop(ATTRIBUTE_VECTORS_FILE), "attribute_vectors.npy: not listed"),
    "vocabulary-size": (lambda m: (m[COLD_ITEMS_KEY].update(num_attributes=m[COLD_ITEMS_KEY]["num_attributes"] + 1),
                                   m["encoder_config"].update(num_attributes=m[COLD_ITEMS_KEY]["num_attributes"])),
                        "attribute_values.json: "),
}


@pytest.mark.parametrize("tamper", list(MANIFEST_TAMPERS))
def test_a_cold_items_entry_that_disagrees_is_refused(artifact_copy, tamper):
    edit, message = MANIFEST_TAMPERS[tamper]
    resign(artifact_copy, edit)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_artifact(artifact_copy)


def test_placed_vectors_keep_the_direction_and_borrow_the_carriers_length(tiny_artifact):
    """Dot-product similarity: the cold vector's direction, the mean length of the trained items carrying its
    values (each (value, item) pair once), counted here with plain loops over the artifact's files."""
    from seqrank.training.artifact import load_artifact
    from seqrank.training.cold_items import cold_item_vectors, placed_item_vectors

    artifact = load_artifact(tiny_artifact)
    assert artifact.encoder_config.get("similarity", "dot") == "dot"
    values = ["cat-002", "brand-0007", "never-seen"]
    lengths = []
    for index in range(1, artifact.num_items + 1):
        for code in artifact.item_attributes[index]:
            if code and artifact.attribute_values[code] in values:
                lengths.append(float(np.linalg.norm(artifact.item_vectors[index].astype(np.float64))))
    placed = placed_item_vectors(artifact, [values]).vectors[0].astype(np.float64)
    cold = cold_item_vectors(artifact, [values]).vectors[0].astype(np.float64)
    assert np.linalg.norm(placed) == pytest.approx(np.mean(lengths), rel=1e-5)
    assert placed @ cold / (np.linalg.norm(placed) * np.linalg.norm(cold)) == pytest.approx(1.0, abs=1e-6)
    average = placed_item_vectors(artifact, [["never-seen"]])  # no known value: the average item, as before
    np.testing.assert_allclose(average.vectors[0], cold_item_vectors(artifact, [["never-seen"]]).vectors[0])
