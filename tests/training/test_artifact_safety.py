"""Artifacts are loaded only from safetensors, .npy (never unpickled), JSON and the hnswlib index, and only after
every checksum matched: a pickle smuggled in with a valid checksum is still refused, and nothing runs."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from seqrank.training.artifact import (
    ATTRIBUTE_VALUES_FILE,
    ATTRIBUTE_VECTORS_FILE,
    ENCODER_FILE,
    INDEX_FILE,
    ITEM_ATTRIBUTES_FILE,
    ITEM_IDS_FILE,
    ITEM_POPULARITY_FILE,
    ITEM_VECTORS_FILE,
    MANIFEST_FILE,
    ArtifactError,
    IndexParams,
    load_artifact,
    sha256_file,
    write_artifact,
)
from seqrank.training.transitions import FILES as TRANSITION_FILES
from seqrank.training.transitions import TransitionPrior

REPO = Path(__file__).resolve().parents[2]
ALLOWED_FORMATS = {ENCODER_FILE: "safetensors", ITEM_VECTORS_FILE: "npy", ITEM_ATTRIBUTES_FILE: "npy",
                   ITEM_POPULARITY_FILE: "npy", ITEM_IDS_FILE: "json", INDEX_FILE: "hnswlib", MANIFEST_FILE: "json",
                   ATTRIBUTE_VALUES_FILE: "json", ATTRIBUTE_VECTORS_FILE: "npy"}
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # every pickle protocol >= 2 starts with PROTO 0x80
RAN = []


def mark_run(tag: str) -> None:
    RAN.append(tag)


class Payload:
    """Unpickling this calls mark_run: a load that unpickles would show it."""

    def __reduce__(self):
        return mark_run, ("unpickled",)


def smuggle(artifact: Path, name: str, array: np.ndarray) -> None:
    """Replace `name` by `array` saved with pickling allowed, and re-sign the manifest so checksums pass."""
    np.save(artifact / name, array, allow_pickle=True)
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["files"][name] = sha256_file(artifact / name)
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_every_exported_file_has_an_allowed_format_and_no_pickle(tiny_artifact):
    files = sorted(path.name for path in Path(tiny_artifact).iterdir())
    assert set(files) <= set(ALLOWED_FORMATS), files
    for name in files:
        data = (Path(tiny_artifact) / name).read_bytes()
        if ALLOWED_FORMATS[name] == "npy":
            assert data.startswith(b"\x93NUMPY")
            assert np.load(Path(tiny_artifact) / name, allow_pickle=False).dtype != object
        assert not data.startswith(PICKLE_PROTOCOL_2_PLUS), name


@pytest.mark.parametrize("name", [ITEM_VECTORS_FILE, ITEM_POPULARITY_FILE])
def test_a_pickle_inside_npy_with_a_valid_checksum_is_refused_without_running_it(tmp_path, tiny_artifact, name):
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    smuggle(artifact, name, np.array([Payload()], dtype=object))
    RAN.clear()
    with pytest.raises(ArtifactError, match=re.escape(f"{name}: not a plain numeric .npy array")):
        load_artifact(artifact)
    assert RAN == []
    pickle.loads(pickle.dumps(Payload()))  # the payload does run when unpickled: the check above can fail
    assert RAN == ["unpickled"]


def test_every_np_load_in_the_code_refuses_pickles():
    sources = [path for folder in ("training", "serving") for path in (REPO / folder).rglob("*.py")]
    calls = [(path.relative_to(REPO), line) for path in sources for line in path.read_text().splitlines()
             if "np.load(" in line]
    assert calls, "no np.load found: the scan is broken"
    assert [call for call in calls if "allow_pickle=False" not in call[1]] == []


def test_no_loader_uses_pickle_torch_load_or_joblib():
    pattern = re.compile(r"^\s*(import pickle|from pickle|import joblib|import cloudpickle)"
                         r"|torch\.load\(|pickle\.loads?\(")
    offenders = [f"{path.relative_to(REPO)}: {line.strip()}" for folder in ("training", "serving")
                 for path in (REPO / folder).rglob("*.py") if "generated" not in path.parts
                 for line in path.read_text().splitlines() if pattern.search(line)]
    assert offenders == []


# ---- confinement and shapes: the manifest is not signed, so every name and size in it is checked ----------------

NUM_ITEMS, DIM, NUM_ATTRIBUTES, ATTRIBUTE_WIDTH = 20, 4, 5, 3


def write_checked_artifact(out: Path) -> Path:
    """A hand-made artifact with every optional part (attributes, a transition prior) that loads cleanly."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((NUM_ITEMS + 1, DIM)).astype(np.float32)
    vectors[0] = 0.0
    attributes = rng.integers(0, NUM_ATTRIBUTES + 1, (NUM_ITEMS + 1, ATTRIBUTE_WIDTH)).astype(np.int32)
    attributes[0] = 0
    rows = {1: [(2, 3.0), (5, 1.0)], 7: [(20, 2.0)]}  # 1 -> 2, 1 -> 5, 7 -> 20 (the last item)
    indptr = np.concatenate([[0], np.cumsum([len(rows.get(i, [])) for i in range(NUM_ITEMS + 1)])]).astype(np.int64)
    pairs = [pair for i in range(NUM_ITEMS + 1) for pair in rows.get(i, [])]
    successors, counts = np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.float32)
    prior = TransitionPrior(indptr, successors, counts, 0.5)
    weights = out.parent / "weights.safetensors"
    weights.write_bytes(b"not a real encoder")
    return write_artifact(
        out, encoder_weights=weights, item_vectors=vectors,
        item_ids=[""] + [f"sku-{i}" for i in range(1, NUM_ITEMS + 1)], item_attributes=attributes,
        item_popularity=np.arange(NUM_ITEMS + 1, dtype=np.float32),
        index_params=IndexParams(M=8, ef_construction=50, ef_search=50),
        manifest_fields={"model_version": "checked-v1", "data_fingerprint": "f" * 64, "metrics": {},
                         "encoder_config": {"num_items": NUM_ITEMS, "max_len": 7, "num_attributes": NUM_ATTRIBUTES,
                                            "max_attributes_per_item": ATTRIBUTE_WIDTH},
                         "behavior_names": []},
        transitions=prior,
    )


@pytest.fixture
def checked(tmp_path) -> Path:
    return write_checked_artifact(tmp_path / "artifact")


def edit_manifest(artifact: Path, edit=None) -> None:
    """Apply `edit` to the manifest, then re-sign every listed file so the load reaches the check under test."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    if edit is not None:
        edit(manifest)
    manifest["files"] = {name: sha256_file(artifact / name) for name in manifest["files"]}
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))


def replace_array(artifact: Path, name: str, array: np.ndarray) -> None:
    np.save(artifact / name, array, allow_pickle=False)
    edit_manifest(artifact)


def test_the_hand_made_artifact_loads_with_every_part(checked):
    artifact = load_artifact(checked)
    assert artifact.num_items == NUM_ITEMS and artifact.item_attributes.shape == (NUM_ITEMS + 1, ATTRIBUTE_WIDTH)
    assert artifact.transitions.num_items == NUM_ITEMS and len(artifact.item_popularity) == NUM_ITEMS + 1


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subfolder"])
def test_a_manifest_name_that_is_not_a_plain_file_name_is_refused_before_it_is_read(tmp_path, checked, kind):
    outside = tmp_path / "hostname"
    outside.write_text("not part of the artifact")  # hashes fine: without the check the load succeeds
    (checked / "sub").mkdir()
    (checked / "sub" / "extra.json").write_text("{}")
    name = {"dotdot": "../hostname", "absolute": str(outside), "subfolder": "sub/extra.json"}[kind]
    edit_manifest(checked, lambda manifest: manifest["files"].update({name: ""}))
    with pytest.raises(ArtifactError, match=re.escape(f"files entry {name!r} is not a plain file name")):
        load_artifact(checked)


@pytest.mark.parametrize("name", [ITEM_POPULARITY_FILE, "extra.json"])
def test_a_symlink_leaving_the_artifact_directory_is_refused(tmp_path, checked, name):
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (checked / name).exists():
        shutil.move(checked / name, outside)  # same bytes: the checksum still matches
    else:
        outside.write_text("{}")
    (checked / name).symlink_to(outside)
    edit_manifest(checked, lambda manifest: manifest["files"].update({name: ""}))
    with pytest.raises(ArtifactError, match=re.escape(f"files entry {name!r} resolves to {outside}, outside")):
        load_artifact(checked)


def test_a_symlink_inside_the_artifact_directory_is_allowed(checked):
    (checked / "alias.npy").symlink_to(checked / ITEM_POPULARITY_FILE)
    edit_manifest(checked, lambda manifest: manifest["files"].update({"alias.npy": ""}))
    assert load_artifact(checked).num_items == NUM_ITEMS


def test_a_manifest_symlinked_from_outside_is_refused(tmp_path, checked):
    shutil.move(checked / MANIFEST_FILE, tmp_path / MANIFEST_FILE)
    (checked / MANIFEST_FILE).symlink_to(tmp_path / MANIFEST_FILE)
    with pytest.raises(ArtifactError, match=re.escape(f"manifest entry {MANIFEST_FILE!r} resolves to")):
        load_artifact(checked)


@pytest.mark.parametrize("length", [NUM_ITEMS, NUM_ITEMS + 2])
def test_item_popularity_must_cover_exactly_the_catalogue(checked, length):
    replace_array(checked, ITEM_POPULARITY_FILE, np.ones(length, dtype=np.float32))
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_POPULARITY_FILE}: shape ({length},), expected "
                                                      f"({NUM_ITEMS + 1},)")):
        load_artifact(checked)


@pytest.mark.parametrize("value", [-1.0, np.nan, np.inf])
def test_item_popularity_must_be_finite_and_non_negative(checked, value):
    popularity = np.ones(NUM_ITEMS + 1, dtype=np.float32)
    popularity[3] = value
    replace_array(checked, ITEM_POPULARITY_FILE, popularity)
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_POPULARITY_FILE}: counts must be finite and >= 0")):
        load_artifact(checked)


@pytest.mark.parametrize("shape", [(NUM_ITEMS, ATTRIBUTE_WIDTH), (NUM_ITEMS + 2, ATTRIBUTE_WIDTH),
                                   (NUM_ITEMS + 1, ATTRIBUTE_WIDTH + 1), (NUM_ITEMS + 1,)])
def test_item_attributes_must_have_a_row_per_item_and_the_encoders_width(checked, shape):
    replace_array(checked, ITEM_ATTRIBUTES_FILE, np.ones(shape, dtype=np.int32))
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_ATTRIBUTES_FILE}: shape {shape}, expected "
                                                      f"({NUM_ITEMS + 1}, {ATTRIBUTE_WIDTH})")):
        load_artifact(checked)


def test_item_attributes_must_be_integers(checked):
    replace_array(checked, ITEM_ATTRIBUTES_FILE, np.ones((NUM_ITEMS + 1, ATTRIBUTE_WIDTH), dtype=np.float32))
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_ATTRIBUTES_FILE}: dtype float32, expected integer")):
        load_artifact(checked)


@pytest.mark.parametrize("value", [NUM_ATTRIBUTES + 1, -1])
def test_item_attributes_must_stay_within_the_attribute_vocabulary(checked, value):
    attributes = np.ones((NUM_ITEMS + 1, ATTRIBUTE_WIDTH), dtype=np.int32)
    attributes[4, 1] = value
    replace_array(checked, ITEM_ATTRIBUTES_FILE, attributes)
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_ATTRIBUTES_FILE}: values in")):
        load_artifact(checked)


@pytest.mark.parametrize("array, message", [
    (np.zeros((NUM_ITEMS + 1, DIM), dtype=np.float64), "dtype float64, expected float32"),
    (np.full((NUM_ITEMS + 1, DIM), np.nan, dtype=np.float32), "contains NaN or infinite values"),
    (np.zeros((NUM_ITEMS, DIM), dtype=np.float32), f"shape ({NUM_ITEMS}, {DIM}), expected ({NUM_ITEMS + 1}, {DIM})"),
], ids=["float64", "nan", "short"])
def test_item_vectors_must_be_finite_float32_of_the_manifests_shape(checked, array, message):
    replace_array(checked, ITEM_VECTORS_FILE, array)
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_VECTORS_FILE}: {message}")):
        load_artifact(checked)


@pytest.mark.parametrize("ids, message", [
    ([""] + [f"sku-{i}" for i in range(1, NUM_ITEMS)], f"{NUM_ITEMS} ids, expected num_items + 1"),
    (["sku-0"] + [f"sku-{i}" for i in range(1, NUM_ITEMS + 1)], "id 'sku-0' at the PAD index 0, expected ''"),
    ([""] + [f"sku-{i}" for i in range(1, NUM_ITEMS)] + [""], f"empty id at item index {NUM_ITEMS}"),
    ([""] + [f"sku-{i}" for i in range(1, NUM_ITEMS)] + ["sku-3"], "id 'sku-3' appears more than once"),
    ([""] + list(range(1, NUM_ITEMS + 1)), "expected a JSON list of strings"),
], ids=["short", "pad", "empty", "duplicate", "not-strings"])
def test_item_ids_must_be_unique_non_empty_strings_after_the_pad(checked, ids, message):
    (checked / ITEM_IDS_FILE).write_text(json.dumps(ids))
    edit_manifest(checked)
    with pytest.raises(ArtifactError, match=re.escape(f"{ITEM_IDS_FILE}: {message}")):
        load_artifact(checked)


def tamper_prior(checked: Path, file: str, array: np.ndarray, pairs: int | None = None) -> None:
    np.save(checked / file, array, allow_pickle=False)
    if pairs is not None:  # keep the manifest's pair count in step, so the test reaches the array check
        edit_manifest(checked, lambda manifest: manifest["transitions"].update({"pairs": pairs}))
    edit_manifest(checked)


def test_transition_row_pointer_must_have_a_row_per_item(checked):
    indptr = np.load(checked / TRANSITION_FILES[0])
    tamper_prior(checked, TRANSITION_FILES[0], indptr[:-1])  # one item short; the last entry still counts the pairs
    with pytest.raises(ArtifactError, match=re.escape(f"{TRANSITION_FILES[0]}: shape ({NUM_ITEMS + 1},), expected "
                                                      f"({NUM_ITEMS + 2},)")):
        load_artifact(checked)


@pytest.mark.parametrize("successor", [NUM_ITEMS + 1, 0])
def test_transition_successors_must_be_items_of_the_catalogue(checked, successor):
    successors = np.load(checked / TRANSITION_FILES[1])
    successors[-1] = successor  # NUM_ITEMS + 1 would index past the (num_items + 1)-wide dense rows
    tamper_prior(checked, TRANSITION_FILES[1], successors)
    with pytest.raises(ArtifactError, match=re.escape(f"{TRANSITION_FILES[1]}: item indices")):
        load_artifact(checked)


def test_transition_arrays_must_be_integers_where_they_index(checked):
    successors = np.load(checked / TRANSITION_FILES[1]).astype(np.float64) + 0.5  # a cast would truncate silently
    tamper_prior(checked, TRANSITION_FILES[1], successors)
    with pytest.raises(ArtifactError, match=re.escape(f"{TRANSITION_FILES[1]}: shape (3,) dtype float64, expected a "
                                                      f"1-d integer array")):
        load_artifact(checked)


@pytest.mark.parametrize("count", [-1.0, 0.0, np.nan])
def test_transition_counts_must_be_positive_and_finite(checked, count):
    counts = np.load(checked / TRANSITION_FILES[2])
    counts[0] = count
    tamper_prior(checked, TRANSITION_FILES[2], counts)
    with pytest.raises(ArtifactError, match=re.escape(f"{TRANSITION_FILES[2]}: counts must be finite and > 0")):
        load_artifact(checked)


def test_transition_row_pointer_must_be_non_decreasing(checked):
    indptr = np.load(checked / TRANSITION_FILES[0])
    indptr[1], indptr[2] = 3, 1  # still 0 first and the pair count last
    tamper_prior(checked, TRANSITION_FILES[0], indptr)
    with pytest.raises(ArtifactError, match=re.escape(f"{TRANSITION_FILES[0]}: not a CSR row pointer")):
        load_artifact(checked)


@pytest.mark.parametrize("key, value, message", [
    ("num_items", "20", "num_items '20' is not an integer >= 0"),
    ("dim", True, "dim True is not an integer >= 1"),
    ("encoder_config", {"num_items": NUM_ITEMS + 1},
     f"encoder_config num_items {NUM_ITEMS + 1}, the manifest's num_items {NUM_ITEMS}"),
], ids=["num_items-string", "dim-bool", "encoder-num-items"])
def test_the_manifests_sizes_must_be_integers_that_agree(checked, key, value, message):
    edit_manifest(checked, lambda manifest: manifest.update({key: value}))
    with pytest.raises(ArtifactError, match=re.escape(f"{MANIFEST_FILE}: {message}")):
        load_artifact(checked)
