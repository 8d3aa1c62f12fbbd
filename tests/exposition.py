"""Prometheus exposition text read with prometheus_client's own parser (never regexes): what the tests that scrape
a metrics endpoint or read a node-exporter textfile share.

Parser facts (/work/shared/PLATFORM-NOTES.md, prometheus_client): a counter's family name lacks `_total` but its
samples keep it; histogram samples are `<name>_bucket` (with `le` as a string, "+Inf" included), `_sum`, `_count`.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def samples(text: str) -> list[Sample]:
    """Every sample of every family, in order."""
    return [Sample(sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def types(text: str) -> dict[str, str]:
    """Family name -> its `# TYPE` ("counter", "histogram", "gauge", ...)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def values(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples called `name`, keyed by their label set."""
    return {frozenset(sample.labels.items()): sample.value for sample in samples(text) if sample.name == name}


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample called `name` with exactly these labels, or None when there is none."""
    return values(text, name).get(frozenset(labels.items()))


def totals(text: str) -> dict[str, float]:
    """Each sample name's values summed over its label sets, e.g. {"ray_seqrank_requests_total": 42.0}."""
    summed: dict[str, float] = {}
    for sample in samples(text):
        summed[sample.name] = summed.get(sample.name, 0.0) + sample.value
    return summed


def documented_rows(text: str, docs: str) -> dict[str, str]:
    """Each family of `text` (`_created` ones aside) -> the line of `docs` naming it as queried (`<name>_total` for a
    counter, `<name>_count` for a histogram, the name for a gauge) in backticks; "" when no line does."""
    rows = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        exported = family.name + {"counter": "_total", "histogram": "_count"}.get(family.type, "")
        rows[exported] = next((line for line in docs.splitlines() if f"`{exported}`" in line), "")
    return rows


def label_names(text: str, name_prefix: str) -> set[str]:
    """The label names of the samples whose name starts with `name_prefix` (`le` aside)."""
    return {key for sample in samples(text) if sample.name.startswith(name_prefix) for key in sample.labels} - {"le"}


def scrape(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def promtool_problems(text: str) -> str | None:
    """What `promtool check metrics` says about the exposition ("" when it passes: names, units, HELP); None without
    promtool (Debian's prometheus package ships it: scripts/setup.sh)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return "" if checked.returncode == 0 else (checked.stdout + checked.stderr).strip() or f"exit {checked.returncode}"
