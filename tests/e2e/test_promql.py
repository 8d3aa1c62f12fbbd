"""Every PromQL expression of the Grafana dashboard and the PrometheusRule, evaluated by a real `prometheus`
scraping the session's live Ray cluster after real gRPC traffic: each dashboard query returns data, the latency
panels return plausible milliseconds, every rule loads and evaluates, and no alert fires on a healthy instance.

The cluster runs locally, not under the k8s PodMonitor, so the generated scrape config adds the labels the
PodMonitor's relabelings would add (`ray_io_cluster`, `ray_io_group`, `pod`) as static target labels: queries
that filter on them (`ray_io_cluster=~"$cluster"`) match exactly as they would in the cluster."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from seqrank.serving.history import Event
from tests.e2e.helpers import random_history
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "k8s/base/grafana/seqrank-dashboard.json"
RULES = REPO / "k8s/base/prometheusrule.yaml"
PROMETHEUS = shutil.which("prometheus")
CLUSTER_LABEL = "seqrank-local"  # what the PodMonitor copies from the pod label ray.io/cluster
START_TIMEOUT_S = 30.0
DATA_DEADLINE_S = 90.0  # Serve pushes replica metrics about every 10 s; rate() needs two samples of an increase
MAX_PLAUSIBLE_MS = 10_000.0

# Grafana's template variables, as the dashboard defines them ($namespace, $cluster, $pod: multi-value, "All" = their
# allValue). Locally there is no `namespace` label: `namespace=~".*"` matches the empty value, as it must.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${cluster}": ".*", "$cluster": ".*",
                     "${namespace}": ".*", "$namespace": ".*", "${pod}": ".*", "$pod": ".*"}

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed: sudo apt-get install -y prometheus (scripts/setup.sh)")


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target.get("legendFormat", target.get("refId", "")), substitute(target["expr"]))
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def is_gpu_panel(title: str) -> bool:
    return "gpu" in title.lower()


def needs_a_rollout(expr: str) -> bool:
    """Series only a canary or a second model version produces (docs/rollout.md): valid, empty on one version.
    tests/e2e/test_canary.py and the promtool cases of tests/k8s/rules cover them."""
    return "canary_percent" in expr or "previous" in expr


def is_latency_quantile(title: str, expr: str) -> bool:
    return "latency" in title.lower() and expr.startswith("histogram_quantile(")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400/422 carry the JSON error body
            return json.loads(error.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def series(self, expr: str) -> list[dict]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
        return answer["data"]["result"]


def send_traffic(client, item_ids, behaviors, round_: int) -> None:
    """One round of every kind of call: inline, stored and cold-start Rank, RecordEvents, bad requests."""
    events = random_history(item_ids, behaviors, seed=1000 + round_ % 50, length=8)
    client.record({f"u-promql-{round_ % 5}": events[:3]})
    shown = client.rank(f"u-promql-inline-{round_}", recent_events=events, k=10, diversity=0.3)
    # events after that list: a hit at position 1 and (most likely) a miss, for the online-quality series
    client.record_after_list(f"u-promql-{round_ % 5}", shown.request_id, [Event(shown.items[0].item_id, ""), events[0]])
    client.rank(f"u-promql-{round_ % 5}", k=10)  # history from the store
    client.rank(f"u-promql-cold-{round_}", k=5)  # no history: the fallback list
    client.model_info()  # the end-to-end latency panel shows every method; an idle one would be NaN (0/0)
    client.health()  # as Kubernetes probes do; earlier tests (hostile input) leave a Check series behind
    for bad in (dict(k=0), dict(k=-1)):
        try:
            client.rank("u-promql-bad", recent_events=events[:1], **bad)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


@pytest.fixture(scope="module")
def prometheus(service, client, manifest, item_ids, tmp_path_factory):
    """A real prometheus scraping the session cluster every second, with the PrometheusRule's groups loaded,
    while a background thread keeps light traffic flowing (rate() needs an increase inside its window)."""
    directory = tmp_path_factory.mktemp("prometheus")
    metrics = urllib.parse.urlparse(service.metrics_url)
    (directory / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (directory / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "rules.yml")],
        "scrape_configs": [{
            "job_name": "seqrank-ray",
            "metrics_path": metrics.path,
            "static_configs": [{
                "targets": [f"127.0.0.1:{metrics.port}"],
                # The labels k8s/base/podmonitor.yaml's relabelings add in the cluster.
                "labels": {"ray_io_cluster": CLUSTER_LABEL, "ray_io_group": "headgroup", "pod": "local-head"},
            }],
        }],
    }))
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(directory / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # also checks the rule file it names

    port = free_port()
    log = open(directory / "prometheus.log", "w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    stop = threading.Event()
    thread = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-2_000:]
            try:
                if server.get("/api/v1/query", query="up")["data"]["result"]:
                    break
            except (OSError, KeyError):
                pass
            assert time.monotonic() < deadline, f"prometheus did not scrape within {START_TIMEOUT_S:.0f} s"
            time.sleep(0.2)

        def traffic() -> None:
            round_ = 0
            while not stop.is_set():
                send_traffic(client, item_ids, manifest["behavior_names"], round_)
                round_ += 1
                stop.wait(0.5)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        deadline = time.monotonic() + DATA_DEADLINE_S
        while time.monotonic() < deadline and not all_data_present(server):
            assert thread.is_alive(), "the traffic thread died"
            time.sleep(1.0)
        yield server
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def returns_data(server: Prometheus, expr: str, finite: bool) -> bool:
    """Polling, so a failed query is a False, not an error; `finite`: every value too, not NaN or infinite."""
    result = server.query(expr).get("data", {}).get("result", [])
    return bool(result) and (not finite or all(math.isfinite(float(s["value"][1])) for s in result))


def all_data_present(server: Prometheus) -> bool:
    if not all(returns_data(server, expr, finite=is_latency_quantile(title, expr))
               for title, _, expr in dashboard_targets() if not is_gpu_panel(title) and not needs_a_rollout(expr)):
        return False
    # The recorded series too, not only their expressions: Prometheus writes a recording rule's sample when the
    # group is evaluated (every second here), so just after the expression turns finite the last recorded sample
    # can still be the NaN of a window without increase, and the alerts read the recorded series.
    return all(returns_data(server, name, finite=True) for rule in rules()
               if "record" in rule and not needs_a_rollout(rule["record"]) for name in (rule["expr"], rule["record"]))


def describe(series: list[dict]) -> str:
    return "; ".join(f"{s['metric']} = {s['value'][1]}" for s in series[:10])


@pytest.mark.parametrize(
    "title, legend, expr",
    [pytest.param(*target, id=f"{target[0]} [{target[1]}]") for target in dashboard_targets()
     if not is_gpu_panel(target[0]) and not needs_a_rollout(target[2])])
def test_dashboard_query_returns_data(prometheus, title, legend, expr):
    series = prometheus.series(expr)
    assert series, f"panel {title!r} ({legend}) is empty: {expr}\n{what_is_there(prometheus, expr)}"


def what_is_there(prometheus: Prometheus, expr: str) -> str:
    """The label sets the expression's metrics do have, to tell a wrong label from a missing metric."""
    names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
    present = sorted({s["metric"]["__name__"] for s in prometheus.series('{__name__=~"ray_seqrank_.*"}')})
    return "\n".join([f"{name}: {describe(prometheus.series(name)) or 'no series at all'}" for name in sorted(names)]
                     + [f"ray_seqrank_* names scraped: {present}"])


@pytest.mark.parametrize(
    "title, legend, expr",
    [pytest.param(*target, id=f"{target[0]} [{target[1]}]") for target in dashboard_targets()
     if is_latency_quantile(target[0], target[2])])
def test_latency_panel_is_plausible_milliseconds(prometheus, title, legend, expr):
    series = prometheus.series(expr)
    assert series, f"panel {title!r} ({legend}) is empty: {expr}"
    values = [float(s["value"][1]) for s in series]
    assert all(math.isfinite(v) and 0.0 < v < MAX_PLAUSIBLE_MS for v in values), \
        f"panel {title!r} ({legend}): {describe(series)}"


@pytest.mark.parametrize(
    "title, legend, expr",
    [pytest.param(*target, id=f"{target[0]} [{target[1]}]") for target in dashboard_targets()
     if is_gpu_panel(target[0])])
def test_gpu_panel_query_is_valid_but_expected_empty_without_a_gpu(prometheus, title, legend, expr):
    # Expected-empty: Ray exports ray_node_gpus_utilization only on nodes with a GPU, and this test cluster has
    # none (nor can one be faked without mocking Ray's metrics agent). What can be checked for real here is that
    # Prometheus accepts the query and that the metric name is one Ray exports (tests/k8s checks the name list).
    series = prometheus.series(expr)  # asserts status "success"
    assert all(s["metric"].get("ray_io_cluster") == CLUSTER_LABEL for s in series)


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.get("record") or r["alert"]) for r in rules()])
def test_rule_expression_is_valid(prometheus, rule):
    prometheus.series(rule["expr"])  # asserts status "success"


@pytest.mark.parametrize("rule", [pytest.param(r, id=r["record"]) for r in rules()
                                  if "record" in r and not needs_a_rollout(r["record"])])
def test_recording_rule_returns_data(prometheus, rule):
    series = prometheus.series(rule["expr"])
    assert series, f"recording rule {rule['record']} is empty on a healthy instance: {rule['expr']}"
    assert all(math.isfinite(float(s["value"][1])) for s in series), describe(series)
    recorded = prometheus.series(rule["record"])  # Prometheus evaluated the loaded rule itself (every 1 s)
    assert recorded, f"{rule['record']} was not recorded by the loaded rule group"


def is_latency_alert(rule: dict) -> bool:
    """Latency SLO alerts compare a measured p99 with a threshold: whether they fire depends on how busy the test
    machine is, and timing targets belong in benchmarks, not tests. Their measured side is checked instead."""
    return "Latency" in rule.get("alert", "")


@pytest.mark.parametrize("rule", [pytest.param(r, id=r["alert"]) for r in rules() if "alert" in r and not is_latency_alert(r)])
def test_alert_does_not_fire_on_a_healthy_instance(prometheus, rule):
    series = prometheus.series(rule["expr"])
    assert not series, f"{rule['alert']} would fire on a healthy instance: {describe(series)}"


@pytest.mark.parametrize("rule", [pytest.param(r, id=r["alert"]) for r in rules() if is_latency_alert(r)])
def test_latency_alert_measures_a_plausible_latency(prometheus, rule):
    measured, threshold = rule["expr"].rsplit(">", 1)
    series = prometheus.series(measured)
    assert series, f"{rule['alert']}: {measured} returns nothing, so the alert could never fire"
    values = [float(s["value"][1]) for s in series]
    assert all(math.isfinite(v) and 0 < v < 10_000 for v in values), describe(series)
    assert float(threshold) > 0


def test_rules_loaded_healthy_and_no_alert_pending(prometheus):
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule.get("record") or rule["alert"] for rule in rules()}
    assert expected <= set(loaded), sorted(expected - set(loaded))
    assert all(rule["health"] == "ok" for rule in loaded.values()), \
        {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    latency_alerts = {rule["alert"] for rule in rules() if is_latency_alert(rule)}
    alerts = [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"] if a["labels"]["alertname"] not in latency_alerts]
    assert not alerts, alerts
