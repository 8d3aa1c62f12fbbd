"""Served equals offline: every test user of the synthetic log ranked through real gRPC gives the HR@10 and
NDCG@10 that `seqrank evaluate` reports for the same run.

Apples to apples, point by point:
- Input: offline evaluation (training/evaluate.py, split "test") encodes each user's history minus the last event
  and targets that last event. The test sends exactly that history as the Rank request's inline events (raw item
  ids and behaviour names, oldest first; the longest, 76 events, is under `ingress.limits.max_inline_events`), so
  the service's encoder sees the same events and truncates them to the model's max_len as training does.
- Seen items: offline masks every item of the full (untruncated) input history to -inf, the target included when
  the user had already seen it (then it never ranks). Rank with `exclude_seen` removes every item of the request's
  history from the list, also beyond max_len: the same set, so a repeat target is a miss both ways.
- Order: diversity 0 makes MMR a stable top-k by relevance (serving/rerank.py), so the list is pure relevance. The
  relevance is the inner product, plus the transition prior's term after the newest event when the artifact has a
  prior, which is what offline evaluation adds (`evaluate_model(..., prior)`); the second case checks that.
- Per user, beyond the two means: with exact search every listed item's relevance is the offline score of that
  item (the run's encoder on the same history, the same item vectors and prior) and the list is that score's top
  10 among the unseen items, to SCORE_TOLERANCE (float32 arithmetic on both sides, in different libraries). A
  served path that encodes a slightly different history (one event fewer than max_len) moves the scores of long
  histories without necessarily moving any target in or out of a top 10; this check sees it.
- Search: the session's 200-item artifact is under EXACT_SEARCH_MAX_ITEMS, so `retrieval.search: auto` (the
  committed config) scores every item exactly, and the lists must give the offline metrics to 1e-6 (ties: none
  among these float scores; both sides would break them by item index). `retrieval.search: hnsw` goes through the
  graph (ef 400 over 200 items) and the prior's 50 most frequent successors, so it may differ from the full
  ranking where the beam misses an item or a boosted item is neither in the graph's answer nor among those 50:
  HNSW_TOLERANCE.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seqrank.serving.cli import main as seqrank_main
from seqrank.serving.client.ranking_client import rank_request
from seqrank.serving.history import Event
from seqrank.serving.ops.serve_config_check import application
from seqrank.serving.retrieval import EXACT_SEARCH_MAX_ITEMS
from seqrank.training.batches import eval_batches
from seqrank.training.config import load_config
from seqrank.training.evaluate import mask_seen
from seqrank.training.model import encode_histories, load_encoder_dir
from seqrank.training.run_dir import load_run_transitions
from seqrank.training.sources import load_sequences
from tests.e2e.helpers import run_with_prior

K = 10
EXACT_TOLERANCE = 1e-6
# HNSW: a user's rank can only change where the graph's answer (or the prior's 50 successors) lacks an item of
# the exact top 10; at ef 400 over 200 items that is rare. 0.01 allows 8 of the 800 users to change.
HNSW_TOLERANCE = 0.01
SCORE_TOLERANCE = 1e-4  # relevance: float32 products of values of order 1-10 differ by ~1e-6 between libraries
PRIOR_WEIGHT = 1.0
USERS_PER_CALL = 100  # ingress.limits.max_users_per_call


@pytest.fixture(scope="module")
def test_users(tiny_run):
    """(user ids, events per user, target raw id per user): the "test" split exactly as evaluation builds it."""
    data = load_sequences(load_config(tiny_run / "config.yaml").data)
    users, histories, targets = [], [], []
    for batch in eval_batches(data, "test", batch_size=1024):
        for row, user in enumerate(batch.users):
            behaviors = batch.behaviors[row] if batch.behaviors is not None else [0] * len(batch.histories[row])
            users.append(str(data.user_ids[user]))
            histories.append([Event(str(data.item_ids[item]), data.behavior_names[b - 1] if b else "")
                              for item, b in zip(batch.histories[row], behaviors)])
            targets.append(str(data.item_ids[batch.targets[row]]))
    return users, histories, targets


def served_metrics(client, test_users) -> dict[str, float]:
    """HR@K and NDCG@K of the service's lists: one Rank per test user with its test-time history."""
    return served_lists(client, test_users)[0]


def served_lists(client, test_users) -> tuple[dict[str, float], dict[str, tuple[list[str], np.ndarray]]]:
    """(metrics, {user id: (listed raw ids, their relevance)})."""
    users, histories, targets = test_users
    ranks, lists = [], {}
    for start in range(0, len(users), USERS_PER_CALL):
        requests = [rank_request(f"offline-{users[u]}", k=K, diversity=0.0, exclude_seen=True,
                                 recent_events=histories[u]) for u in range(start, min(start + USERS_PER_CALL,
                                                                                      len(users)))]
        response = client.rank_batch(requests)
        for u, result in zip(range(start, start + len(requests)), response.results):
            assert result.status_code == 0, result.status_message
            listed = [item.item_id for item in result.response.items]
            assert len(listed) == K
            lists[users[u]] = (listed, np.array([item.relevance for item in result.response.items]))
            ranks.append(listed.index(targets[u]) if targets[u] in listed else K)
    ranks = np.array(ranks)
    return {f"HR@{K}": float(np.mean(ranks < K)),
            f"NDCG@{K}": float(np.mean(np.where(ranks < K, 1.0 / np.log2(ranks + 2.0), 0.0))),
            "users": float(len(ranks))}, lists


def offline_scores(run_dir) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """({user id: (I+1,) scores with seen items at -inf}, {raw item id: index}): what `seqrank evaluate` ranks,
    computed with the same training functions (training/evaluate.py `evaluate_model`, kept per user)."""
    data = load_sequences(load_config(run_dir / "config.yaml").data)
    model = load_encoder_dir(run_dir)
    model.eval()
    prior = load_run_transitions(run_dir)
    scores = {}
    with torch.no_grad():
        item_vectors = model.output_item_vectors()[: data.num_items + 1].float()
        for batch in eval_batches(data, "test", batch_size=1024):
            block = torch.from_numpy(encode_histories(model, batch.histories, batch.behaviors)) @ item_vectors.T
            if prior is not None:
                block += torch.from_numpy(prior.dense_rows(np.array([h[-1] for h in batch.histories])))
            block = mask_seen(block, batch.histories).numpy()
            scores.update({str(data.user_ids[user]): block[row] for row, user in enumerate(batch.users)})
    return scores, {str(raw): index for index, raw in enumerate(data.item_ids)}


def assert_lists_are_offline_top_k(lists, run_dir):
    scores, index_of = offline_scores(run_dir)
    assert lists.keys() == scores.keys()
    for user, (listed, relevance) in lists.items():
        row = scores[user]
        listed_indices = [index_of[raw] for raw in listed]
        np.testing.assert_allclose(relevance, row[listed_indices], rtol=0, atol=SCORE_TOLERANCE, err_msg=user)
        rest = np.delete(row, listed_indices)
        assert row[listed_indices].min() >= rest.max() - SCORE_TOLERANCE, user  # a top K of the unseen items


def offline_metrics(run_dir, capsys) -> dict[str, float]:
    """`seqrank evaluate --run RUN --json`: the training package's full-ranking evaluation of the run."""
    capsys.readouterr()
    assert seqrank_main(["evaluate", "--run", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_close(case, served, offline, tolerance):
    print(f"{case}: served {served}, offline {offline}")  # shown with -rP
    assert served["users"] == offline["users"]
    for name in (f"HR@{K}", f"NDCG@{K}"):
        assert abs(served[name] - offline[name]) <= tolerance, (name, served[name], offline[name])


@pytest.fixture(scope="module")
def prior_run(tiny_run, tmp_path_factory):
    """The session's run with a transition prior at PRIOR_WEIGHT (as `fit` keeps one), and its artifact."""
    return run_with_prior(tiny_run, tmp_path_factory.mktemp("offline-prior"), PRIOR_WEIGHT, name="offline-prior")


def test_served_lists_give_the_offline_metrics(service, client, tiny_run, prior_run, test_users, capsys):
    users = len(test_users[0])
    num_items = len(load_sequences(load_config(tiny_run / "config.yaml").data).item_ids) - 1
    assert users > 700 and num_items <= EXACT_SEARCH_MAX_ITEMS  # (nearly) every user; exact by size
    assert application(service.config)["args"]["retrieval"].get("search", "auto") == "auto"

    # 1. The session's artifact (no prior), the committed config: exact search.
    (served, lists), offline = served_lists(client, test_users), offline_metrics(tiny_run, capsys)
    assert offline["users"] == users
    assert_close("exact", served, offline, EXACT_TOLERANCE)
    assert_lists_are_offline_top_k(lists, tiny_run)

    run, artifact = prior_run
    try:
        # 2. With a transition prior (reloaded in place): served relevance = inner product + the prior's term.
        service.apply(service.with_artifact(artifact))
        offline = offline_metrics(run, capsys)
        assert offline[f"NDCG@{K}"] != pytest.approx(offline_metrics_without_prior(run, capsys)[f"NDCG@{K}"])
        with service.client() as prior_client:
            served, lists = served_lists(prior_client, test_users)
            assert_close("exact, prior", served, offline, EXACT_TOLERANCE)
            assert_lists_are_offline_top_k(lists, run)

            # 3. The graph instead (`retrieval.search: hnsw`): close, within the stated tolerance.
            config = service.with_artifact(artifact)
            application(config)["args"]["retrieval"]["search"] = "hnsw"
            service.apply(config)
            assert_close("hnsw, prior", served_metrics(prior_client, test_users), offline, HNSW_TOLERANCE)
    finally:
        service.apply(service.config)  # the session's artifact and config for the other tests


def offline_metrics_without_prior(run_dir, capsys) -> dict[str, float]:
    capsys.readouterr()
    assert seqrank_main(["evaluate", "--run", str(run_dir), "--json", "--no-transitions"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

