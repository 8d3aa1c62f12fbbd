"""Session-wide fixtures: one tiny trained run and its exported artifact, shared by training and serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_OVERRIDES = [
    "data.synthetic_users=800", "data.synthetic_items=200", "model.hidden_size=32", "model.intermediate_size=64",
    "model.dropout=0.2", "model.attention_dropout=0.2", "optim.max_epochs=12", "optim.patience=4",
    "optim.lr=0.005", "optim.batch_size=128", "optim.num_threads=1",
]


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or a clean skip on machines without it (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is only on the project's machines)")
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> tuple[Path, Path]:
    from seqrank.training.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_users=800, num_items=200, seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_dataset) -> Path:
    """A small model trained on the synthetic log with attributes, behaviour types and the default causal encoder."""
    from seqrank.training.config import load_config
    from seqrank.training.train import fit

    events, attributes = synthetic_dataset
    config = load_config(None, TINY_OVERRIDES + [f"data.path={events}", f"data.attributes={attributes}"])
    run_dir = tmp_path_factory.mktemp("tiny_run")
    fit(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_run) -> Path:
    from seqrank.training.artifact import IndexParams
    from seqrank.training.export import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "v1", IndexParams(M=16, ef_construction=200, ef_search=400))
