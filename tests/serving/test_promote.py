"""The promotion gate (serving/ops/promote.py, `seqrank promote`): the rule on hand-worked per-user values, the
holdout's targets on a hand-built log, artifact ranks against a brute-force ranking, the refusal's exit status and
one-line reason, and the Kubernetes overlay it writes (rendered as kustomize would)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from seqrank.serving.cli import main
from seqrank.serving.ops.promote import (
    compare,
    decide,
    per_user_metrics,
    read_holdout,
    write_k8s_artifact,
)
from seqrank.training.artifact import IndexParams, load_artifact
from seqrank.training.bootstrap import Interval, paired_difference
from seqrank.training.config import load_config
from seqrank.training.export import export_run
from seqrank.training.model import encode_histories, load_encoder_dir
from seqrank.training.run_dir import load_run_transitions
from seqrank.training.synthetic import generate_log
from seqrank.training.train import fit
from tests.conftest import TINY_OVERRIDES
from tests.k8s.conftest import K8S_DIR
from tests.k8s.kustomize import build


def constant_difference(n: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    against = np.linspace(0.0, 0.5, n)
    return against + value, against


@pytest.mark.parametrize("difference, margin, promoted", [
    (-0.10, 0.0, False),  # every user worse by 0.1: the interval is [-0.1, -0.1], below 0
    (-0.10, 0.05, False),  # still below -0.05
    (-0.10, 0.2, True),  # within a margin of 0.2
    (0.0, 0.0, True),  # equal: not worse
    (0.05, 0.0, True),
])
def test_the_rule_on_a_constant_paired_difference(difference, margin, promoted):
    candidate, against = constant_difference(200, difference)
    interval = paired_difference(candidate, against)
    assert interval.low == pytest.approx(difference) and interval.high == pytest.approx(difference)
    decision = decide(candidate, against, interval, margin=margin, min_users=100)
    assert decision.promote is promoted
    assert decision.reason.startswith("promoted" if promoted else "refused") and "\n" not in decision.reason


def test_the_rule_on_a_noisy_difference():
    """Half of 100 users lose 0.2, half lose nothing: mean -0.1; a resample's mean is -0.2 * Binomial(100, 1/2) / 100,
    whose 2.5 % and 97.5 % points are about 40 and 60 losers, so the interval is about [-0.12, -0.08]. Refused at
    margins 0 and 0.05 (-0.08 is below both negated); promoted at 0.09, where the mean alone (-0.1) is below -0.09
    but the interval's upper bound is not: the rule refuses only a regression the data is sure of; and at 0.2."""
    against = np.full(100, 0.3)
    candidate = against - np.tile([0.0, 0.2], 50)
    interval = paired_difference(candidate, against, resamples=2000)
    assert -0.125 < interval.low < -0.115 and -0.085 < interval.high < -0.075
    for margin, promoted in ((0.0, False), (0.05, False), (0.09, True), (0.2, True)):
        assert decide(candidate, against, interval, margin=margin, min_users=100).promote is promoted, margin


def test_too_few_users_is_no_evidence():
    candidate, against = constant_difference(99, 0.2)
    decision = decide(candidate, against, Interval(0.2, 0.2, 0.2), margin=0.0, min_users=100)
    assert not decision.promote and "99 held-out users" in decision.reason


def test_per_user_metrics_by_hand():
    metrics = per_user_metrics(np.array([0, 1, 9, 10, 500]))
    np.testing.assert_allclose(metrics["NDCG@10"], [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0])
    np.testing.assert_array_equal(metrics["HR@10"], [1, 1, 1, 0, 0])


def test_compare_ranks_decides_on_ndcg():
    candidate_ranks, against_ranks = np.zeros(150, dtype=int), np.full(150, 20)  # always first vs always missed
    comparison = compare(candidate_ranks, against_ranks)
    assert comparison.decision.promote and comparison.difference["NDCG@10"].low == pytest.approx(1.0)
    assert not compare(against_ranks, candidate_ranks).decision.promote


def write_events(path, rows):
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event_type"]).to_csv(path, index=False)
    return path


def test_holdout_targets_by_hand(tmp_path):
    path = write_events(tmp_path / "events.csv", [
        ("a", "x", 1, "pv"), ("a", "y", 2, "pv"), ("a", "z", 3, "buy"),  # target z after x, y
        ("b", "x", 1, "pv"), ("b", "y", 2, "pv"), ("b", "x", 3, "pv"),  # last event repeats x: left out
        ("c", "x", 1, "pv"),  # no history
        ("d", "y", 5, "pv"), ("d", "x", 1, "pv"), ("d", "x", 6, "pv"), ("d", "w", 7, "cart"),  # unsorted file
        ("e", "x", 1, "pv"), ("e", "x", 6, "pv"), ("e", "w", 7, "pv"),
    ])
    last = {u.user_id: ([e.raw_item_id for e in u.history], u.target) for u in read_holdout(path)}
    assert last == {"a": (["x", "y"], "z"), "d": (["x", "y", "x"], "w"), "e": (["x", "x"], "w")}
    since = {u.user_id: ([e.raw_item_id for e in u.history], u.target) for u in read_holdout(path, since=5)}
    # the first event at or after 5 whose item the user has not had: d's y at 5; e's x at 6 repeats, so w
    assert since == {"d": (["x"], "y"), "e": (["x", "x"], "w")}
    assert [e.behavior for u in read_holdout(path) if u.user_id == "a" for e in u.history] == ["pv", "pv"]


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    """New users of the tiny run's synthetic world (same catalogue, other users)."""
    log = generate_log(300, 200, seed=0)
    path = tmp_path_factory.mktemp("holdout") / "holdout.csv"
    pd.DataFrame({"user_id": log.user_ids, "item_id": log.item_ids, "timestamp": log.timestamps,
                  "event_type": log.behaviors}).to_csv(path, index=False)
    return path


def test_artifact_ranks_match_a_brute_force_ranking(tiny_run, tiny_artifact, holdout):
    from seqrank.serving.ops.promote import artifact_ranks

    users = read_holdout(holdout)[:60]
    ranks = artifact_ranks(load_artifact(tiny_artifact), users)
    model = load_encoder_dir(tiny_run)
    item_ids = json.loads((tiny_run / "item_ids.json").read_text())
    names = json.loads((tiny_run / "data.json").read_text())["behavior_names"]
    prior = load_run_transitions(tiny_run)
    vectors = model.output_item_vectors().detach().numpy()[: len(item_ids)]
    for user, rank in zip(users, ranks):
        history = [item_ids.index(e.raw_item_id) for e in user.history]
        user_vector = encode_histories(model, [np.array(history)],
                                       [np.array([names.index(e.behavior) + 1 for e in user.history])])[0]
        scores = vectors @ user_vector + (prior.dense_rows(np.array([history[-1]]))[0] if prior else 0.0)
        order = [i for i in sorted(range(1, len(item_ids)), key=lambda i: (-scores[i], i)) if i not in history]
        assert rank == order.index(item_ids.index(user.target)), user.user_id


@pytest.fixture(scope="module")
def untrained_artifact(tmp_path_factory, synthetic_dataset):
    """A deliberately worse candidate: the tiny recipe at learning rate 0, so its weights stay at the init."""
    events, attributes = synthetic_dataset
    directory = tmp_path_factory.mktemp("untrained")
    config = load_config(None, TINY_OVERRIDES + ["optim.max_epochs=1", "optim.lr=0.0", f"data.path={events}",
                                                 f"data.attributes={attributes}"])
    fit(config, directory / "run", progress=False)
    return export_run(directory / "run", directory / "artifact", IndexParams(M=16), name="untrained")


def test_a_worse_candidate_is_refused_with_one_line(untrained_artifact, tiny_artifact, holdout, tmp_path, capsys):
    report = tmp_path / "report.json"
    status = main(["promote", "--candidate", str(untrained_artifact), "--against", str(tiny_artifact),
                   "--holdout", str(holdout), "--json", str(report)])
    captured = capsys.readouterr()
    assert status == 1
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("refused: candidate worse"), captured.err
    assert "NDCG@10" in captured.out and "HR@10" in captured.out  # the comparison table
    written = json.loads(report.read_text())
    assert written["promote"] is False and written["difference"]["NDCG@10"]["high"] < 0


def test_a_run_candidate_refused_leaves_no_artifact(tiny_run, tiny_artifact, holdout, tmp_path, capsys):
    out = tmp_path / "exported"
    status = main(["promote", "--candidate", str(tiny_run), "--against", str(tiny_artifact),
                   "--holdout", str(holdout), "--out", str(out), "--min-users", "100000"])
    assert status == 1 and not out.exists()
    assert "fewer than min_users=100000" in capsys.readouterr().err


def test_a_promoted_candidate_is_written_into_the_k8s_overlay(tiny_artifact, untrained_artifact, holdout, tmp_path,
                                                             capsys):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, k8s)
    status = main(["promote", "--candidate", str(tiny_artifact), "--against", str(untrained_artifact),
                   "--holdout", str(holdout), "--deploy", "k8s", "--overlay", str(k8s / "overlays" / "prod-gpu"),
                   "--artifact-ref", "/artifacts/2026-12-06"])
    assert status == 0, capsys.readouterr().err
    assert "promoted" in capsys.readouterr().out
    from seqrank.serving.ops.k8s_render import stale_patches

    assert stale_patches(k8s) == {}  # the committed patches equal a fresh render of the edited overrides

    def model_paths(directory):
        (service,) = [o for o in build(directory) if o["kind"] == "RayService"]
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        return {d["name"]: d.get("user_config", {}).get("artifact_path") for d in config["applications"][0]["deployments"]}

    assert set(model_paths(k8s / "overlays" / "prod-gpu").values()) == {"/artifacts/2026-12-06"}
    assert set(model_paths(k8s / "base").values()) == {"/artifacts/v1"}  # the base and dev-cpu keep theirs
    # a second promotion replaces the value it wrote
    write_k8s_artifact(k8s / "overlays" / "prod-gpu", "/artifacts/2026-12-07")
    assert set(model_paths(k8s / "overlays" / "prod-gpu").values()) == {"/artifacts/2026-12-07"}
    assert stale_patches(k8s) == {}


def test_the_artifact_path_edit_leaves_a_canary_path_alone(tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, k8s)
    overrides = k8s / "base" / "serve-overrides.yaml"
    text = overrides.read_text()
    assert "{artifact_path: /artifacts/v1}" in text
    overrides.write_text(text.replace("{artifact_path: /artifacts/v1}", "{artifact_path: /artifacts/v1, "
                                      "canary_artifact_path: /artifacts/v2, canary_percent: 5}"))
    write_k8s_artifact(k8s / "base", "/artifacts/v3")
    config = yaml.safe_load(overrides.read_text())
    user_configs = [d["user_config"] for d in config["applications"][0]["deployments"] if "user_config" in d]
    assert user_configs and all(c == {"artifact_path": "/artifacts/v3", "canary_artifact_path": "/artifacts/v2",
                                      "canary_percent": 5} for c in user_configs)
