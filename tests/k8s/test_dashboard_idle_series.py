"""The dashboard's quantile and ratio panels over synthetic series, evaluated by `promtool test rules`: a method or
stage with calls in the window gets a finite value; one that had calls earlier but none in the window gets no
series at all (Grafana draws no line), never NaN, the 0/0 that histogram_quantile and a mean give over all-zero
rates. tests/e2e/test_promql.py evaluates the same queries on live Ray metrics, but
there every method and stage keeps getting traffic, so the idle case is checked here, where it is exact.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "k8s/base/grafana/seqrank-dashboard.json"
PROMTOOL = shutil.which("promtool")
# As tests/e2e/test_promql.py: every multi-value variable ($namespace, $cluster, $pod) at "All", its allValue.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${cluster}": ".*", "$cluster": ".*",
                     "${namespace}": ".*", "$namespace": ".*", "${pod}": ".*", "$pod": ".*"}
SCRAPE_INTERVAL = "15s"
STEPS = 40  # samples per series: 10 minutes at 15 s; the idle half is flat for 5 minutes, the window is 1 m
# Per scrape: 4 observations, 1 at or below 5, 2 in (5, 10], 1 above 10 (the quantiles interpolate, p99 is 10).
INCREMENTS = {"5": 1, "10": 3, "+Inf": 4}
SUM_INCREMENT = 24

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (it comes with prometheus: "
                                                         "scripts/setup.sh)")


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def nan_prone_queries() -> list[tuple[str, str]]:
    """(name, expr) of every dashboard target that divides rates: quantiles and means."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(f"{panel['title']} [{target.get('legendFormat', '')}]", substitute(target["expr"]))
               for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return [(name, expr) for name, expr in queries if "histogram_quantile(" in expr or "_count{" in expr]


def series_labels(expr: str) -> dict[str, dict[str, str]]:
    """Histogram base name -> the labels one series needs to match every selector of it in `expr`."""
    grouping = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    found: dict[str, dict[str, str]] = {}
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)_(?:bucket|count|sum)\{([^}]*)\}", expr):
        labels = found.setdefault(metric, {label: "x" for label in grouping - {"le"}})
        for label, operator, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
            labels[label] = value if operator == "=" else "any"  # the queries' regexes are `.*`
    return found


def promql_series(metric: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{label}="{value}"' for label, value in sorted(labels.items()))
    return f"{metric}{{{inner}}}"


def histogram_input(expr: str, idle: bool) -> list[dict]:
    """Every series the query reads, increasing at each scrape; with `idle`, flat over the second half."""

    def values(increment: int) -> str:
        if not idle:
            return f"0+{increment}x{STEPS}"
        half = STEPS // 2
        return f"0+{increment}x{half} {increment * half}x{STEPS - half}"

    series = []
    for metric, labels in series_labels(expr).items():
        for le, increment in INCREMENTS.items():
            series.append({"series": promql_series(f"{metric}_bucket", {**labels, "le": le}),
                           "values": values(increment)})
        series.append({"series": promql_series(f"{metric}_count", labels), "values": values(INCREMENTS["+Inf"])})
        series.append({"series": promql_series(f"{metric}_sum", labels), "values": values(SUM_INCREMENT)})
    return series


def run_promtool(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "empty-rules.yml").write_text("groups: []\n")
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": ["empty-rules.yml"], "tests": tests}))
    return subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True,
                          timeout=60)


EVAL_TIME = f"{STEPS * 15 // 60}m"


@pytest.mark.parametrize("name, expr", [pytest.param(*query, id=query[0]) for query in nan_prone_queries()])
def test_idle_series_are_absent_and_busy_ones_finite(tmp_path, name, expr):
    assert series_labels(expr), f"{name}: no histogram series recognised in {expr}"
    busy = {"interval": SCRAPE_INTERVAL, "input_series": histogram_input(expr, idle=False),
            "promql_expr_test": [{"expr": f"count(({expr}) < +Inf)", "eval_time": EVAL_TIME,  # NaN < +Inf is false
                                  "exp_samples": [{"labels": "{}", "value": 1}]}]}
    idle = {"interval": SCRAPE_INTERVAL, "input_series": histogram_input(expr, idle=True),
            "promql_expr_test": [{"expr": expr, "eval_time": EVAL_TIME, "exp_samples": []}]}
    result = run_promtool(tmp_path, [busy, idle])
    assert result.returncode == 0, f"{name}: {expr}\n{result.stdout}{result.stderr}"
