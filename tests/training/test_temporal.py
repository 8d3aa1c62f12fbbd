"""The temporal protocol on a hand-worked log (oracle: the train/valid/test split written out by hand below), and
`seqrank evaluate`'s confidence intervals and paired comparison end to end on a tiny temporal run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqrank.serving.cli import main
from seqrank.training.batches import eval_batches
from seqrank.training.config import ConfigError, load_config
from seqrank.training.data import SplitProtocol, build_sequences, history_bounds, load_interactions, resolve_cutoff
from seqrank.training.evaluate import (
    Evaluation,
    evaluate_popularity,
    item_popularity,
    per_user_metrics,
    rank_popularity,
    split_summary,
)

# user, item, behaviour, time; cutoffs: valid at 100 s, test at 200 s (an event at a cutoff belongs after it)
LOG = """user_id,item_id,event_type,timestamp
A,a1,pv,10
A,a2,pv,50
A,a3,buy,120
A,a4,pv,150
A,a5,buy,210
A,a6,pv,250
B,b1,pv,20
B,b2,pv,130
B,a1,pv,200
B,b4,buy,230
C,c1,pv,150
C,c2,pv,160
C,a2,pv,205
D,d1,pv,30
D,d2,pv,40
D,d3,pv,100
E,e1,pv,300
F,f1,pv,50
F,f1,buy,150
"""
# By hand. Training input: events before 100 s. C and E have no event before the valid cutoff.
TRAIN = {"A": ["a1", "a2"], "B": ["b1"], "C": [], "D": ["d1", "d2"], "E": [], "F": ["f1"]}
# Next item: valid = history before 100 s, target the first event in [100, 200); C has a target but no history.
VALID = {"A": (["a1", "a2"], "a3"), "B": (["b1"], "b2"), "D": (["d1", "d2"], "d3"), "F": (["f1"], "f1")}
# test = history before 200 s, target the first event at or after 200 s; E has a target but no history.
TEST = {"A": (["a1", "a2", "a3", "a4"], "a5"), "B": (["b1", "b2"], "a1"), "C": (["c1", "c2"], "a2")}
# Next purchase: targets are buy events only; the history is the same.
VALID_BUY = {"A": (["a1", "a2"], "a3"), "F": (["f1"], "f1")}
TEST_BUY = {"A": (["a1", "a2", "a3", "a4"], "a5"), "B": (["b1", "b2"], "b4")}


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    return path


def split_of(log_path, target_behavior=""):
    return build_sequences(load_interactions(log_path),
                           protocol=SplitProtocol("temporal", 100, 200, target_behavior))


def evaluated(data, split) -> dict[str, tuple[list[str], str]]:
    """What evaluation actually ranks: eval_batches' histories and targets, as raw ids."""
    found = {}
    for batch in eval_batches(data, split, batch_size=2):
        for user, history, target in zip(batch.users, batch.histories, batch.targets):
            found[data.user_ids[user]] = (data.item_ids[history].tolist(), data.item_ids[target])
    return found


def test_next_item_split_matches_the_hand_worked_one(log_path):
    data = split_of(log_path)
    start, end = history_bounds(data, "train")
    assert {data.user_ids[u]: data.item_ids[data.items[start[u]:end[u]]].tolist()
            for u in range(data.num_users)} == TRAIN
    assert evaluated(data, "valid") == VALID
    assert evaluated(data, "test") == TEST


def test_next_purchase_split_matches_the_hand_worked_one(log_path):
    data = split_of(log_path, "buy")
    assert evaluated(data, "valid") == VALID_BUY
    assert evaluated(data, "test") == TEST_BUY


def test_split_summary_counts_users_without_history_and_cold_targets(log_path):
    data = split_of(log_path)
    # valid: C has a target but nothing before 100 s; a3, b2 and d3 never occur before 100 s (cold); F's target f1
    # is in F's own history (seen)
    assert split_summary(data, "valid") == {"users": 4, "users_without_history": 1, "cold_targets": 3,
                                            "seen_targets": 1}
    # test: E has nothing before 200 s; a5 is cold, a1 and a2 were trained on
    assert split_summary(data, "test") == {"users": 3, "users_without_history": 1, "cold_targets": 1,
                                           "seen_targets": 0}


def test_popularity_sees_only_the_input_histories(log_path):
    data = split_of(log_path)
    counts = dict(zip(data.item_ids, item_popularity(data, "test")))
    # the events before 200 s: each of these items once (B's a1 at 200 s and C's a2 at 205 s come after)
    assert {item: count for item, count in counts.items() if count} == {
        **{item: 1.0 for item in ("a1", "a2", "a3", "a4", "b1", "b2", "c1", "c2", "d1", "d2", "d3")}, "f1": 2.0}
    report = evaluate_popularity(data, "test", Evaluation(ks=(1, 5)))
    assert report["users"] == 3
    ranked = rank_popularity(data, "test", Evaluation(ks=(1, 5), batch_size=1))
    assert data.user_ids[ranked.users].tolist() == ["A", "B", "C"]  # ascending user index, whatever the batching
    per_user = per_user_metrics(ranked.target_ranks, (1, 5))
    assert {name: values.mean() for name, values in per_user.items()} == pytest.approx(
        {name: report[name] for name in per_user})


def test_seen_targets_are_reachable_only_when_seen_items_stay_candidates(log_path):
    """F's valid target f1 is in F's history. Before 100 s a1, a2, b1, d1, d2 and f1 have one event each; items
    are indexed by first appearance (a1..a6 = 1..6, b1 7, b2 8, b4 9, c1 10, c2 11, d1..d3 12..14, e1 15, f1 16) and
    ties rank the lower index first, so unmasked f1 ranks 5th (0-based 5); masked, it ranks below every item."""
    data = split_of(log_path)
    f = list(data.user_ids).index("F")
    for seen_masked, expected in ((False, 5), (True, data.num_items)):
        ranked = rank_popularity(data, "valid", Evaluation(ks=(3,), seen_masked=seen_masked))
        assert ranked.target_ranks[list(ranked.users).index(f)] == expected


def test_quantile_cutoffs_and_the_protocol_settings(log_path):
    times = np.array([50, 10, 40, 30, 20], dtype=np.int64)
    assert resolve_cutoff(0.4, times) == 30  # sorted 10 20 [30] 40 50: rank floor(0.4 * 5) = 2
    assert resolve_cutoff(0.99, times) == 50 and resolve_cutoff(1700000000, times) == 1700000000
    with pytest.raises(ValueError, match="valid_cutoff"):
        build_sequences(load_interactions(log_path), protocol=SplitProtocol("temporal", 0.95, 150))
    with pytest.raises(ValueError, match="target_behavior"):
        split_of(log_path, "fav")
    with pytest.raises(ConfigError, match="target_behavior"):
        load_config(None, ["data.target_behavior=buy"])
    with pytest.raises(ConfigError, match="data.protocol"):
        load_config(None, ["data.protocol=random"])
    with pytest.raises(ConfigError, match="valid_cutoff"):
        load_config(None, ["data.protocol=temporal", "data.valid_cutoff=0.9", "data.test_cutoff=0.8"])


def test_leave_one_out_fingerprints_do_not_change(log_path):
    """Runs trained before the protocol setting existed still pass `seqrank evaluate`'s fingerprint check."""
    loo = build_sequences(load_interactions(log_path))
    assert loo.temporal is None
    assert split_of(log_path).fingerprint != loo.fingerprint


def test_evaluate_prints_intervals_and_a_paired_difference_on_a_temporal_run(tmp_path, synthetic_dataset, capsys):
    events, _ = synthetic_dataset
    run = tmp_path / "run"
    assert main(["train", "--data", str(events), "--out", str(run), "--quiet",
                 "--set", "data.protocol=temporal", "--set", "optim.max_epochs=1", "--set", "model.hidden_size=16",
                 "--set", "model.intermediate_size=32", "--set", "optim.num_threads=1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json", "--against", "popular", "--resamples", "200"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["protocol"] == "temporal" and report["split"]["users"] == report["users"] > 0
    for name in ("NDCG@10", "HR@10", "MRR"):
        low, high = report["ci95"][name]
        assert low <= report[name] <= high
    assert main(["evaluate", "--run", str(run), "--json", "--baseline", "popular", "--against", "popular"]) == 0
    same = json.loads(capsys.readouterr().out)["against"]["difference"]
    assert all(d == {"mean": 0.0, "low": 0.0, "high": 0.0} for d in same.values())
    assert main(["evaluate", "--run", str(run), "--against", "popular", "--resamples", "100"]) == 0
    assert "paired difference" in capsys.readouterr().out
