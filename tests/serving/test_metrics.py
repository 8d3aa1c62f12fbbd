"""Metric definitions: valid, unique, and each documented in docs/metrics.md under its exported name."""

import re
from pathlib import Path

from seqrank.serving.metrics import ALL_METRICS, RAY_PREFIX

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_names_are_valid_unique_and_unit_suffixed():
    names = [spec.name for spec in ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in ALL_METRICS:
        assert re.fullmatch(r"seqrank_[a-z_]+", spec.name), spec.name
        assert spec.description.endswith("."), spec.name
        assert (spec.kind == "histogram") == bool(spec.boundaries), spec.name
        assert list(spec.boundaries) == sorted(spec.boundaries) and all(b > 0 for b in spec.boundaries)
        if "latency" in spec.name:
            assert spec.name.endswith("_ms")


def test_every_metric_is_documented_with_its_exported_name_and_labels():
    text = DOCS.read_text()
    for spec in ALL_METRICS:
        row = next((line for line in text.splitlines() if f"`{spec.exported_name}`" in line), None)
        assert row is not None, f"docs/metrics.md lacks {spec.exported_name}"
        for tag in spec.tag_keys:
            assert f"`{tag}`" in row, f"docs/metrics.md: {spec.exported_name} row lacks label {tag}"


def test_documented_seqrank_names_all_exist():
    documented = set(re.findall(r"`(ray_seqrank_[a-z_]+)`", DOCS.read_text()))
    assert documented == {spec.exported_name for spec in ALL_METRICS}
    assert all(name.startswith(RAY_PREFIX) for name in documented)
