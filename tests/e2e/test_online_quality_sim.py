"""A short simulation a real Prometheus judges: synthetic users act on the lists they are shown, two models of
clearly different quality are canaried 50/50, and the online-quality rules rank them the right way round.

Users follow the synthetic generator's own process (training/synthetic.py: the same catalogue, clusters,
successors and popularity as the session's training log): each walks a history, is ranked on it, and then takes the
next step of the same walk; that step's item, recorded with the list's request id, is a hit where the list holds it.
The good model is the session's trained one; the bad one the same recipe stopped after one epoch at a learning rate
too small to learn. The test computes every count from what it sent and received; a real `prometheus` scrapes the
service with the PrometheusRule loaded. The alert needs 30 minutes to fire, so `promtool` judges it on series
whose per-minute increments are the counts the real service exported: it fires when the worse version is promoted
and stays silent when the better one is.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from seqrank.serving.canary import in_canary
from seqrank.serving.history import Event
from seqrank.serving.ops.serve_config_check import is_model_deployment
from seqrank.training import synthetic
from tests.conftest import TINY_OVERRIDES
from tests.e2e.test_promql import Prometheus, rule_groups
from tests.support import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SEED, NUM_ITEMS = 0, 200  # the session's synthetic log (tests/conftest.py synthetic_dataset)
USERS = 500
WARM_USERS = 60  # ranked first; the rest once Prometheus has seen their counters
TOTALS = "sum by (model_version) (ray_seqrank_attributed_events_total)"
HISTORY_LENGTH = 8
K = 10
DEADLINE_S = 90.0

pytestmark = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="prometheus/promtool not installed")


def walk(catalog, rng: np.random.Generator, length: int) -> list[int]:
    """`length` views of one synthetic user, as training/synthetic.py draws them (0-based item numbers)."""
    num_clusters = len(catalog.cluster_weight)
    favourites = rng.choice(num_clusters, synthetic.NUM_FAVOURITE_CLUSTERS, p=catalog.cluster_weight)
    cluster, views = favourites[0], []
    for step in range(length):
        if step and rng.random() >= synthetic.STAY_PROBABILITY:
            if rng.random() < synthetic.FAVOURITE_JUMP_PROBABILITY:
                cluster = favourites[rng.integers(synthetic.NUM_FAVOURITE_CLUSTERS)]
            else:
                cluster = catalog.companions[cluster, rng.integers(synthetic.NUM_COMPANION_CLUSTERS)]
        item = int(catalog.sample(np.array([cluster]), rng)[0])
        if step and rng.random() < synthetic.FOLLOW_PROBABILITY and catalog.successor[views[-1]] not in views:
            item = int(catalog.successor[views[-1]])
        views.append(item)
        cluster = catalog.cluster_of[item]
    return views


def raw_id(number: int) -> str:
    return f"sku-{number + 1:05d}"


@pytest.fixture(scope="module")
def bad_artifact(synthetic_dataset, tmp_path_factory):
    from seqrank.training.artifact import IndexParams
    from seqrank.training.config import load_config
    from seqrank.training.export import export_run
    from seqrank.training.train import fit

    events, attributes = synthetic_dataset
    config = load_config(None, TINY_OVERRIDES + [f"data.path={events}", f"data.attributes={attributes}",
                                                 "optim.max_epochs=1", "optim.lr=0.0000001"])
    run_dir = tmp_path_factory.mktemp("bad_run")
    fit(config, run_dir, progress=False)
    return export_run(run_dir, tmp_path_factory.mktemp("artifacts") / "bad", IndexParams(M=16, ef_construction=100,
                      ef_search=200), name="bad")


def start_prometheus(service, directory: Path):
    metrics = urllib.parse.urlparse(service.metrics_url)
    (directory / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (directory / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "rules.yml")],
        "scrape_configs": [{"job_name": "seqrank-ray", "metrics_path": metrics.path,
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics.port}"]}]}],
    }))
    port = free_port()
    log = open(directory / "prometheus.log", "w")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}",
                                f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    return process, log, Prometheus(f"http://127.0.0.1:{port}")


def wait_until(predicate, timeout_s: float = DEADLINE_S) -> None:
    """Polls (Serve pushes every ~10 s, Prometheus scrapes every second); the asserts after it say what is missing."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(1.0)


def by_version(server: Prometheus, expr: str) -> dict[str, float]:
    return {s["metric"]["model_version"]: float(s["value"][1]) for s in server.query(expr)["data"]["result"]}


def promtool_alert(tmp_path: Path, name: str, per_minute: dict[str, tuple[int, int]], first: str, then: str) -> str:
    """`promtool test rules` of SeqrankNewModelWorse at 110 m: `first` serves alone for 10 m, `then` joins as a 50 %
    canary at 10 m and is promoted at 50 m (`first` gets nothing more); each version's attributed events grow per
    minute by the real service's counts (hits at positions <= 10, misses). Returns the firing model versions."""
    def counter(version: str, bucket: str, increment: int, start: int, stop: int) -> dict:
        values = f"0x{start} 0+{increment}x{stop - start}" if start else f"0+{increment}x{stop}"
        if stop < 120:
            values += f" {increment * (stop - start)}x{120 - stop}"
        return {"series": f'ray_seqrank_attributed_events_total{{model_version="{version}", position_bucket="{bucket}",'
                          f' behavior="pv"}}', "values": values}

    series = []
    for version, start, stop in ((first, 0, 50), (then, 10, 120)):
        hits, misses = per_minute[version]
        series += [counter(version, "4-10", hits, start, stop), counter(version, "miss", misses, start, stop)]
    series += [{"series": f'ray_seqrank_model_info{{model_version="{first}"}}', "values": "1x50 0x70"},
               {"series": f'ray_seqrank_model_info{{model_version="{then}"}}', "values": "0x50 1x70"},
               {"series": f'ray_seqrank_canary_percent{{model_version="{then}"}}', "values": "_x10 50x40 _x70"}]
    directory = tmp_path / name
    directory.mkdir()
    (directory / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (directory / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series,
                   "promql_expr_test": [{"expr": 'ALERTS{alertname="SeqrankNewModelWorse", alertstate="firing"}',
                                         "eval_time": "110m", "exp_samples": []}]}]}))
    result = subprocess.run([PROMTOOL, "test", "rules", str(directory / "test.yml")], capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return ""
    assert "SeqrankNewModelWorse" in output, output  # the expected-empty mismatch, not a broken file
    return output


def test_prometheus_ranks_the_better_model_first_and_the_alert_follows(service, bad_artifact, tmp_path, item_ids):
    good, bad = (json.loads((path / "manifest.json").read_text())["model_version"]
                 for path in (service.artifact, bad_artifact))
    from seqrank.serving.canary import with_canary

    service.apply(with_canary(service.config, is_model_deployment, 50, str(bad_artifact)))
    process, log, server = start_prometheus(service, tmp_path)
    try:
        known = set(item_ids)
        catalog = synthetic._Catalog(NUM_ITEMS, np.random.default_rng(SEED))  # the session log's, by its seed
        rng = np.random.default_rng(7)
        hits, events = Counter(), Counter()
        with service.client() as client:
            for n in range(USERS):
                if n == WARM_USERS:  # rate() needs the counters seen below their final value: let a scrape land
                    wait_until(lambda: all(by_version(server, TOTALS).get(v, 0) >= events[v] for v in (good, bad)))
                views = [raw_id(v) for v in walk(catalog, rng, HISTORY_LENGTH + 1)]
                if not set(views) <= known:
                    continue
                user = f"sim-{n}"
                response = client.rank(user, recent_events=[Event(v, "pv") for v in views[:-1]], k=K)
                assert response.model_version == (bad if in_canary(user, 50) else good)
                shown = [item.item_id for item in response.items]
                client.record_after_list(user, response.request_id, [Event(views[-1], "pv")])
                events[response.model_version] += 1
                hits[response.model_version] += views[-1] in shown
        oracle = {version: hits[version] / events[version] for version in (good, bad)}
        assert oracle[good] > oracle[bad] + 0.1, oracle  # the simulation separates the models at all

        # The real Prometheus: the raw counters equal the test's counts, the recorded hit rate ranks good first.
        def judged() -> bool:
            counted = by_version(server, TOTALS)
            recorded = by_version(server, "seqrank:online_hit_rate_at_10:ratio_rate30m")
            return (all(counted.get(v, 0) >= events[v] for v in (good, bad))
                    and all(math.isfinite(recorded.get(v, math.nan)) for v in (good, bad)))

        wait_until(judged)
        counted = by_version(server, TOTALS)
        recorded = by_version(server, "seqrank:online_hit_rate_at_10:ratio_rate30m")
        hits_counted = by_version(server, 'sum by (model_version) (ray_seqrank_attributed_events_total{'
                                          'position_bucket!="miss", position_bucket!="11+"})')
        newest = by_version(server, "seqrank:model_version:newest")
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()
        service.apply(service.config)
    # other tests of the session may have attributed events too: at least ours, and hit counts at least ours
    assert counted[good] >= events[good] and counted[bad] >= events[bad], (counted, events)
    assert hits_counted.get(good, 0) >= hits[good] and hits_counted.get(bad, 0) >= hits[bad]
    assert recorded[good] > recorded[bad], recorded
    assert set(newest) == {bad}  # the canary is the newest version

    # promtool: the alert on series growing at the real per-minute counts
    per_minute = {version: (int(hits[version]), int(events[version] - hits[version])) for version in (good, bad)}
    assert per_minute[bad][0] + per_minute[bad][1] >= 200 / 30  # the minimum sample is reachable in 30 min
    worse_promoted = promtool_alert(tmp_path, "worse", per_minute, first=good, then=bad)
    better_promoted = promtool_alert(tmp_path, "better", per_minute, first=bad, then=good)
    assert f'model_version="{bad}"' in worse_promoted, worse_promoted
    assert better_promoted == "", better_promoted
