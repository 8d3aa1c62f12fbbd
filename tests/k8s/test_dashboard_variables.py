"""The Grafana dashboard's `namespace`, `cluster` and `pod` variables, and every panel query filtering on them.

One Prometheus may scrape several seqrank namespaces: every selector filters `namespace=~"$namespace"` and every
aggregation keeps `namespace`, so "All" shows prod and staging side by side instead of summed. Queries are checked
against real series elsewhere: tests/k8s/test_dashboard_idle_series.py (promtool) and tests/e2e/test_promql.py.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.k8s.conftest import K8S_DIR

DASHBOARD = K8S_DIR / "base/grafana/seqrank-dashboard.json"
# Reported by the Serve controller on the head pod: a worker pod filter would empty it.
NOT_POD_SCOPED = {"Healthy replicas per deployment"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def variables() -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


def targets() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in dashboard()["panels"] for target in panel["targets"]]


def test_namespace_cluster_and_pod_variables_chain_label_values_queries():
    found = variables()
    assert list(found) == ["datasource", "namespace", "cluster", "pod"]  # each may use the ones before it
    expected = {
        "namespace": (r'label_values\(ray_serve_deployment_replica_healthy\{application="seqrank"\}, namespace\)'),
        "cluster": (r'label_values\(ray_serve_deployment_replica_healthy\{application="seqrank", '
                    r'namespace=~"\$namespace"\}, ray_io_cluster\)'),
        "pod": (r'label_values\(ray_seqrank_model_info\{application="seqrank", namespace=~"\$namespace", '
                r'ray_io_cluster=~"\$cluster"\}, pod\)'),
    }
    for name, pattern in expected.items():
        variable = found[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${datasource}", name
        assert re.fullmatch(pattern, variable["definition"]), variable["definition"]
        assert variable["query"]["query"] == variable["definition"], name
        # Multi-value with "All" as `.*`: it also matches the empty namespace of a local (non-Kubernetes) run.
        assert (variable["multi"], variable["includeAll"], variable["allValue"]) == (True, True, ".*"), name


@pytest.mark.parametrize("title, target", [pytest.param(*t, id=f"{t[0]} [{t[1]['refId']}]") for t in targets()])
def test_every_panel_query_filters_and_groups_by_namespace(title, target):
    expr = target["expr"]
    selectors = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{([^}]*)\}", expr)
    assert selectors, expr
    for selector in selectors:
        assert 'namespace=~"$namespace"' in selector and 'ray_io_cluster=~"$cluster"' in selector, expr
        assert ('pod=~"$pod"' in selector) == (title not in NOT_POD_SCOPED), expr
    for clause, labels in re.findall(r"\b(by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        assert clause in ("by", "on") and "namespace" in [label.strip() for label in labels.split(",")], \
            f"`{clause} ({labels})` pools namespaces: {expr}"
    assert re.search(r"\b(sum|max|min|avg|count|group)\s*\(", expr) is None, f"aggregation without by: {expr}"
    assert "{{namespace}}" in target["legendFormat"]
