"""The alerts of k8s/base/prometheusrule.yaml, proven to fire, per namespace, and to reach someone.

`promtool test rules` runs tests/k8s/rules/seqrank-slo.test.yaml against the PrometheusRule's `spec` (a plain rule
file): every alert fires on a bad series, stays silent on a good one, and fires for a broken `prod` alone, with
namespace="prod", while a healthy `staging` shares the Prometheus. Mutated copies of the rules (a threshold moved,
`namespace` dropped from an aggregation, ...) must make promtool fail, so the unit tests are shown able to fail.
Statically: every aggregation keeps `namespace`, severities are what kube-prometheus-stack's Alertmanager routes on,
every runbook_url is absolute with the alert's own anchor in k8s/README.md, and the runbook base and the `release`
label the Prometheus selects by are set in one place (k8s/base/kustomization.yaml) for every kustomization.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.k8s.conftest import K8S_DIR, KUSTOMIZATIONS, only
from tests.k8s.kustomize import build

RULES = K8S_DIR / "base/prometheusrule.yaml"
UNIT_TESTS = Path(__file__).parent / "rules/seqrank-slo.test.yaml"
RULE_FILE_NAME = "seqrank-slo.rules.yaml"  # what the unit-test file's rule_files names
README = K8S_DIR / "README.md"
METRICS_DOC = K8S_DIR.parent / "docs/metrics.md"
PROMTOOL = shutil.which("promtool")
# kube-prometheus-stack's Alertmanager config routes and inhibits on these (critical inhibits warning and info).
SEVERITIES = {"critical", "warning", "info"}
EXPECTED_SEVERITY = {
    "SeqrankRankLatencyP99High": "warning",  # degraded, still answering
    "SeqrankErrorRatioHigh": "critical",  # user-visible failures
    "SeqrankNoHealthyReplicas": "critical",  # every call through the deployment fails
    "SeqrankServeMetricsAbsent": "critical",  # blind: treated as down
    "SeqrankNewModelWorse": "warning",  # worse lists, not an outage
}
AGGREGATIONS = r"sum|min|max|avg|group|count|count_values|stddev|stdvar|topk|bottomk|quantile"

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package ships it: scripts/setup.sh)")


def rule_spec() -> dict:
    """The PrometheusRule's spec, as written: a plain Prometheus rule file (`groups:`)."""
    return yaml.safe_load(RULES.read_text())["spec"]


def all_rules(spec: dict) -> list[dict]:
    return [rule for group in spec["groups"] for rule in group["rules"]]


def alerts(spec: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for rule in all_rules(spec) if "alert" in rule}


def unit_tests() -> list[dict]:
    return yaml.safe_load(UNIT_TESTS.read_text())["tests"]


def promtool(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def run_unit_tests(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    """`promtool test rules` of the unit-test file against `spec`, both written to tmp_path."""
    (tmp_path / RULE_FILE_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return promtool(tmp_path, "test", "rules", UNIT_TESTS.name)


# ---------------------------------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_check_rules_accepts_the_extracted_rule_file(tmp_path):
    (tmp_path / RULE_FILE_NAME).write_text(yaml.safe_dump(rule_spec()))
    result = promtool(tmp_path, "check", "rules", RULE_FILE_NAME)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules(rule_spec()))} rules found" in result.stdout


@needs_promtool
def test_every_alert_fires_on_bad_series_and_stays_silent_on_good_ones(tmp_path):
    result = run_unit_tests(tmp_path, rule_spec())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_cover_every_alert_firing_silent_and_two_namespaces():
    tests = unit_tests()
    for name in alerts(rule_spec()):
        cases = [(test, case) for test in tests for case in test.get("alert_rule_test", [])
                 if case["alertname"] == name]
        assert any(case["exp_alerts"] for _, case in cases), f"{name}: no unit test where it fires"
        assert any(not case["exp_alerts"] for _, case in cases), f"{name}: no unit test where it stays silent"
        two_namespaces = [
            (test, case) for test, case in cases
            if {'namespace="prod"', 'namespace="staging"'} <= {
                match for series in test["input_series"] for match in re.findall(r'namespace="\w+"', series["series"])}
            and case["exp_alerts"]]
        assert two_namespaces, f"{name}: no unit test with a broken prod and a healthy staging"
        for test, case in two_namespaces:
            assert [alert["exp_labels"].get("namespace") for alert in case["exp_alerts"]] == ["prod"], test["name"]
            assert all(alert["exp_labels"]["severity"] == EXPECTED_SEVERITY[name] for alert in case["exp_alerts"])
    for rule in all_rules(rule_spec()):
        if "record" in rule:
            assert any(rule["record"] in case["expr"] and {'{namespace="prod"}', '{namespace="staging"}'} <= {
                       sample["labels"] for sample in case["exp_samples"]}
                       for test in tests for case in test.get("promql_expr_test", [])), \
                f"{rule['record']}: no unit test of its per-namespace output"


def _edit(name: str, old: str, new: str, field: str = "expr") -> Callable[[dict], None]:
    """A mutation of the rule `name` (alert or record): `old` replaced by `new` in `field`, which must contain it."""

    def mutate(spec: dict) -> None:
        (rule,) = [rule for rule in all_rules(spec) if name in (rule.get("alert"), rule.get("record"))]
        holder, key = (rule["labels"], "severity") if field == "severity" else (rule, field)
        assert old in str(holder[key]), f"mutation no longer applies: {old!r} not in {name}.{field}"
        holder[key] = type(holder[key])(str(holder[key]).replace(old, new))

    return mutate


def _all_severities_page(spec: dict) -> None:
    for rule in alerts(spec).values():
        rule["labels"]["severity"] = "page"


MUTATIONS = {
    "error-ratio threshold 1% -> 5%": (
        _edit("SeqrankErrorRatioHigh", "> 0.01", "> 0.05"), "error ratio - 2% INTERNAL in prod"),
    "error ratio summed without namespace": (
        _edit("seqrank:grpc_server_error_ratio:rate5m", "sum by (namespace) (", "sum("),
        "error ratio - 2% INTERNAL in prod next to a healthy, busier staging fires for prod only"),
    "latency p99 threshold 250 -> 500 ms": (
        _edit("SeqrankRankLatencyP99High", "> 250", "> 500"), "latency - slow prod"),
    "latency quantile without namespace": (
        _edit("seqrank:rank_latency_ms:p99_5m", "sum by (namespace, le)", "sum by (le)"),
        "latency - slow prod next to a fast and busier staging fires for prod only"),
    "replica health summed without namespace": (
        _edit("SeqrankNoHealthyReplicas", "sum by (namespace, application, deployment)",
              "sum by (application, deployment)"),
        "no healthy replicas - prod Encoder down next to a healthy staging Encoder fires for prod only"),
    "no-healthy-replicas waits 10 min instead of 2": (
        _edit("SeqrankNoHealthyReplicas", "2m", "10m", field="for"), "no healthy replicas - prod Encoder down"),
    "metrics absence by absent() over every namespace": (
        _edit("SeqrankServeMetricsAbsent", "group by (namespace) (present_over_time(", "absent(absent_over_time("),
        "metrics absent - prod stops reporting while staging still does fires for prod only"),
    "severity page instead of critical/warning": (_all_severities_page, "SeqrankErrorRatioHigh"),
    "new-model margin 5% -> 60%": (
        _edit("SeqrankNewModelWorse", "0.95 *", "0.4 *"), "online quality - a worse canary in prod"),
    "new-model minimum sample dropped": (
        _edit("SeqrankNewModelWorse", ">= 200", ">= 0"), "online quality - a worse canary with too few events"),
    "hit rate pooled over namespaces": (
        _edit("seqrank:online_hit_rate_at_10:ratio_rate30m", "sum by (namespace, model_version)",
              "sum by (model_version)"), "online quality - a worse canary in prod"),
    "newest version ignores the canary": (
        _edit("seqrank:model_version:newest", "(ray_seqrank_canary_percent > 0) or", "(ray_seqrank_canary_percent < 0) or"),
        "online quality - a worse canary in prod"),
}


@needs_promtool
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_rule_makes_the_unit_tests_fail(tmp_path, mutation):
    mutate, failing_test = MUTATIONS[mutation]
    spec = copy.deepcopy(rule_spec())
    mutate(spec)
    assert spec != rule_spec()
    result = run_unit_tests(tmp_path, spec)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"promtool passed the rules with {mutation}:\n{output}"
    assert "FAILED" in output and failing_test in output, output


# ---------------------------------------------------------------------------------------------------- static


def test_every_aggregation_keeps_namespace():
    """`sum by (namespace, ...)` everywhere: an aggregation without it pools every namespace of the Prometheus."""
    for rule in all_rules(rule_spec()):
        expr = " ".join(rule["expr"].split())
        name = rule.get("record") or rule["alert"]
        aggregations = re.findall(rf"\b({AGGREGATIONS})\b\s*(?:(by|without)\s*\(([^)]*)\))?\s*\(", expr)
        for operator, modifier, labels in aggregations:
            assert modifier == "by" and "namespace" in [label.strip() for label in labels.split(",")], \
                f"{name}: `{operator}` must aggregate `by (namespace, ...)`: {expr}"
        for clause, labels in re.findall(r"\b(on|ignoring)\s*\(([^)]*)\)", expr):
            assert (clause == "on") == ("namespace" in labels), f"{name}: `{clause}` matches across namespaces: {expr}"
        assert "vector(" not in expr, f"{name}: vector() has no namespace and matches none: {expr}"
    record_names = [rule["record"] for rule in all_rules(rule_spec()) if "record" in rule]
    assert record_names and all(name.startswith("seqrank:") for name in record_names)


def test_alerts_use_kube_prometheus_stack_severities():
    found = {name: rule["labels"]["severity"] for name, rule in alerts(rule_spec()).items()}
    assert found == EXPECTED_SEVERITY
    assert set(found.values()) <= SEVERITIES


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to dashes."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE)}


def split_runbook_url(url: str) -> tuple[str, str]:
    base, separator, anchor = url.partition("#")
    assert separator and "#" not in anchor, url
    return base, anchor


def test_every_alert_links_its_own_absolute_runbook_anchor():
    anchors = github_anchors(README.read_text())
    bases = set()
    for name, rule in alerts(rule_spec()).items():
        base, anchor = split_runbook_url(rule["annotations"]["runbook_url"])
        assert re.fullmatch(r"https://[^\s#]+/k8s/README\.md", base), base
        assert anchor == name.lower() and anchor in anchors, f"{name}: no heading for #{anchor} in k8s/README.md"
        bases.add(base)
        assert {"summary", "description"} <= set(rule["annotations"]), name
    assert len(bases) == 1, bases


def monitoring_settings(kustomization_dir: Path = K8S_DIR / "base") -> dict[str, str]:
    kustomization = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "seqrank-monitoring-settings"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_rules_carry_the_configured_runbook_base_and_release_label(rendered, kustomization):
    settings = monitoring_settings()
    objects = rendered[kustomization]
    assert not [obj for obj in objects if obj["metadata"]["name"] == "seqrank-monitoring-settings"]  # local-config
    for kind in ("PodMonitor", "PrometheusRule"):
        assert only(objects, kind)["metadata"]["labels"]["release"] == settings["prometheusRelease"], kind
    for obj in objects:
        if obj["kind"] not in ("PodMonitor", "PrometheusRule"):
            assert "release" not in obj["metadata"].get("labels", {}), obj["metadata"]["name"]
    rendered_alerts = alerts(only(objects, "PrometheusRule")["spec"])
    assert rendered_alerts.keys() == alerts(rule_spec()).keys()
    for name, rule in rendered_alerts.items():
        assert rule["annotations"]["runbook_url"] == f"{settings['runbookBase']}#{name.lower()}"


def test_runbook_base_and_release_label_change_in_one_place(tmp_path):
    """Editing the two literals in base/kustomization.yaml changes every overlay's output, and nothing else does."""
    copied = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copied, ignore=shutil.ignore_patterns("Dockerfile*"))
    original = monitoring_settings()
    kustomization = copied / "base/kustomization.yaml"
    text = kustomization.read_text()
    new_base, new_release = "https://docs.example.com/ops/seqrank.md", "monitoring"
    for old, new in ((original["runbookBase"], new_base), (original["prometheusRelease"], new_release)):
        assert text.count(f"={old}\n") == 1
        text = text.replace(f"={old}\n", f"={new}\n")
    kustomization.write_text(text)
    kubectl = shutil.which("kubectl")
    for name in KUSTOMIZATIONS:
        outputs = [build(copied / name)]
        if kubectl is not None:
            result = subprocess.run([kubectl, "kustomize", str(copied / name)], check=False, capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            outputs.append([obj for obj in yaml.safe_load_all(result.stdout) if obj])
        for objects in outputs:
            rule = only(objects, "PrometheusRule")
            urls = [alert["annotations"]["runbook_url"] for alert in alerts(rule["spec"]).values()]
            assert urls and all(url.startswith(f"{new_base}#") for url in urls), urls
            assert original["runbookBase"] not in yaml.safe_dump(objects)
            assert rule["metadata"]["labels"]["release"] == new_release
            assert only(objects, "PodMonitor")["metadata"]["labels"]["release"] == new_release


def test_podmonitor_gives_every_series_its_namespace(rendered):
    monitor = only(rendered["base"], "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"} in endpoint["relabelings"]
    assert not endpoint.get("honorLabels")  # a scraped `namespace` label must not override the pod's namespace


def test_readme_alert_table_lists_every_alert_with_its_severity():
    table = re.findall(r"^\| (Seqrank\w+) \| (\w+) \|", README.read_text(), flags=re.MULTILINE)
    assert dict(table) == EXPECTED_SEVERITY


def test_docs_metrics_alert_table_lists_every_alert_with_its_severity():
    table = re.findall(r"^\| `(Seqrank\w+)` \| (\w+) \|", METRICS_DOC.read_text(), flags=re.MULTILINE)
    assert dict(table) == EXPECTED_SEVERITY
