"""ModelSlot: build first, swap one reference, keep the previous version, never lose the old one to a bad reload."""

import pickle
from dataclasses import dataclass

import pytest

from seqrank.serving.errors import Unavailable
from seqrank.serving.reload import ModelSlot, VersionUnavailable


@dataclass(frozen=True)
class Model:
    model_version: str
    path: str


def make_slot(events):
    return ModelSlot("test", lambda artifact: Model(artifact.model_version, str(artifact.path)),
                     lambda *event: events.append(event))


def test_nothing_loaded_is_unavailable():
    slot = make_slot([])
    assert not slot.is_loaded
    with pytest.raises(Unavailable, match="model"):
        slot.resolve(None)


def test_reloads_swap_and_keep_exactly_one_previous_version(artifacts):
    events = []
    slot = make_slot(events)
    slot.reload({"artifact_path": artifacts["v1"]})
    assert slot.loaded.versions == ("v1",)
    slot.reload({"artifact_path": artifacts["v2"]})
    assert slot.loaded.versions == ("v2", "v1")
    assert slot.resolve(None).model_version == "v2" and slot.resolve("v1").model_version == "v1"
    slot.reload({"artifact_path": artifacts["v3"]})
    assert slot.loaded.versions == ("v3", "v2")
    with pytest.raises(VersionUnavailable) as error:
        slot.resolve("v1")
    assert error.value.held == ("v3", "v2") and error.value.subject == "model_version"
    assert events == [("ok", None, "v1"), ("ok", "v1", "v2"), ("ok", "v2", "v3")]


def test_reapplying_the_current_version_keeps_the_previous_one(artifacts):
    slot = make_slot([])
    slot.reload({"artifact_path": artifacts["v1"]})
    slot.reload({"artifact_path": artifacts["v2"]})
    slot.reload({"artifact_path": artifacts["v2"]})
    assert slot.loaded.versions == ("v2", "v1")


def test_first_load_failure_raises(tmp_path):
    slot = make_slot([])
    with pytest.raises(ValueError, match="manifest"):
        slot.reload({"artifact_path": str(tmp_path / "missing")})
    assert not slot.is_loaded


@pytest.mark.parametrize("bad_user_config", [{"artifact_path": "/no/such/artifact"}, {"artifact": "x"}, None])
def test_failed_reload_keeps_serving_the_old_version_and_reports_it(artifacts, bad_user_config, caplog):
    events = []
    slot = make_slot(events)
    slot.reload({"artifact_path": artifacts["v1"]})
    slot.reload(bad_user_config)
    assert slot.current.model_version == "v1" and slot.loaded.versions == ("v1",)
    assert events[-1] == ("failed", "v1", None)
    assert "still serving v1" in caplog.text


def test_corrupted_artifact_is_refused_and_the_old_version_kept(artifacts, tmp_path):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifacts["v2"], corrupt)
    (corrupt / "item_vectors.npy").write_bytes(b"garbage")
    slot = make_slot([])
    slot.reload({"artifact_path": artifacts["v1"]})
    slot.reload({"artifact_path": str(corrupt)})
    assert slot.current.model_version == "v1"


def test_version_unavailable_survives_pickling_across_replicas():
    error = pickle.loads(pickle.dumps(VersionUnavailable("v9", ("v2", "v1"))))
    assert isinstance(error, Unavailable) and error.requested == "v9" and error.held == ("v2", "v1")
    assert str(error).startswith("model_version: 'v9' is not loaded")
