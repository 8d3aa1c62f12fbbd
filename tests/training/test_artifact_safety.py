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
    ENCODER_FILE,
    INDEX_FILE,
    ITEM_ATTRIBUTES_FILE,
    ITEM_IDS_FILE,
    ITEM_POPULARITY_FILE,
    ITEM_VECTORS_FILE,
    MANIFEST_FILE,
    ArtifactError,
    load_artifact,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[2]
ALLOWED_FORMATS = {ENCODER_FILE: "safetensors", ITEM_VECTORS_FILE: "npy", ITEM_ATTRIBUTES_FILE: "npy",
                   ITEM_POPULARITY_FILE: "npy", ITEM_IDS_FILE: "json", INDEX_FILE: "hnswlib", MANIFEST_FILE: "json"}
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
