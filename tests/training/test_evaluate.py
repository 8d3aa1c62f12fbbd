"""Full-ranking evaluation against an independent brute-force oracle written here in numpy.

The oracle re-derives everything `evaluate_model` / `evaluate_popularity` / `ranking_report` compute, from the
documented rules rather than from their code:

  - split (training/data.py `history_bounds`): the valid input is every event but the last two and its target the
    second-to-last event; the test input is every event but the last (so it holds the valid target) and its
    target the last event;
  - masking (training/evaluate.py module docstring): every item of the FULL input history is removed (score
    -inf), also items older than the encoder's max_len window, and PAD. The target is NOT spared: a target that
    repeats a history item is masked like any other seen item (the Dross/gSASRec convention: a repeat cannot be
    recommended, so it counts as a miss);
  - rank (0-based): the number of items scored strictly above the target, plus the items tied with it that have
    a LOWER item index (evaluate.py: "ties are broken by item index", so an integer-valued baseline is not credited
    with every tie). -inf ties -inf, so a masked target ranks below every unmasked item and below every masked
    item with a lower index, PAD (index 0) included;
  - HR@K = share of ranks < K; NDCG@K = mean of 1/log2(rank + 2) inside the top K; MRR = mean of 1/(rank + 1)
    over the full ranking; coverage@K = distinct items in all users' top-K lists / catalogue size; ILD@K = mean
    over users of the mean pairwise cosine distance (1 - cos) between the K listed items' output vectors.

Scores of the random cases come from a real tiny SequenceEncoder (its user vectors via `encode_histories`, one
user at a time, and `output_item_vectors()`): what is under test is the masking, ranking and metric arithmetic.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from seqrank.training.batches import EvalBatch
from seqrank.training.data import SequenceData
from seqrank.training.evaluate import Evaluation, evaluate_model, evaluate_popularity, rank_batch
from seqrank.training.metrics import ranking_report
from seqrank.training.model import EncoderConfig, SequenceEncoder, encode_histories

KS = (1, 3, 5, 10)
AMBIGUITY = 1e-4  # float32 (the code) vs float64 (the oracle): score gaps below this could flip an order


# ------------------------------------------------------------------------------------------------ the oracle


def sequence_data(sequences: list[list[int]], num_items: int) -> SequenceData:
    """SequenceData holding exactly `sequences` (item indices 1..num_items, oldest first), one per user."""
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    return SequenceData(
        user_ids=np.array([f"u{u}" for u in range(len(sequences))], dtype=object),
        item_ids=np.array([""] + [f"i{i}" for i in range(1, num_items + 1)], dtype=object),
        offsets=offsets,
        items=np.concatenate([np.asarray(s) for s in sequences]).astype(np.int32),
        behaviors=None, behavior_names=(), item_attributes=None, num_attributes=0, fingerprint="oracle",
    )


def split_of(sequence: list[int], split: str) -> tuple[list[int], int]:
    """(input history, target) of one user's full sequence under leave-one-out."""
    if split == "valid":
        return list(sequence[:-2]), sequence[-2]
    assert split == "test"
    return list(sequence[:-1]), sequence[-1]


def masked(scores: np.ndarray, history: list[int]) -> np.ndarray:
    """(I+1,) float64 scores with PAD and every history item (the target too, if it is one) set to -inf."""
    out = np.array(scores, dtype=np.float64)
    out[0] = -np.inf
    for item in history:
        out[item] = -np.inf
    return out


def oracle_rank(scores: np.ndarray, target: int) -> int:
    """Items strictly above the target, plus equal-scored items with a lower index (the documented tie rule)."""
    rank = 0
    for item, score in enumerate(scores):
        if item == target:
            continue
        if score > scores[target] or (score == scores[target] and item < target):
            rank += 1
    return rank


def oracle_top(scores: np.ndarray, k: int) -> set[int]:
    """The k best items; the case generators make sure no tie straddles the cut."""
    order = sorted(range(len(scores)), key=lambda item: -scores[item])
    return set(order[:k])


def oracle_report(ranks: list[int], tops: list[dict[int, set[int]]], item_vectors: np.ndarray | None,
                  ks: tuple[int, ...], num_items: int) -> dict[str, float]:
    """Every metric by hand, with Python loops and floats."""
    n = len(ranks)
    report = {}
    for k in ks:
        report[f"HR@{k}"] = sum(r < k for r in ranks) / n
        report[f"NDCG@{k}"] = sum(1.0 / np.log2(r + 2) if r < k else 0.0 for r in ranks) / n
        if tops:
            report[f"coverage@{k}"] = len(set().union(*(top[k] for top in tops))) / num_items
        if item_vectors is not None:
            per_user = []
            for top in tops:
                pairs = list(itertools.combinations(sorted(top[k]), 2))
                distances = [1.0 - cosine(item_vectors[a], item_vectors[b]) for a, b in pairs]
                per_user.append(sum(distances) / len(pairs) if pairs else 0.0)
            report[f"ILD@{k}"] = sum(per_user) / n
    report["MRR"] = sum(1.0 / (r + 1) for r in ranks) / n
    report["users"] = float(n)
    return report


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_reports_match(got: dict[str, float], expected: dict[str, float], keys: list[str] | None = None) -> None:
    for key in keys or list(expected):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), key


# ------------------------------------------------------------------------------------------------ random cases


def random_sequences(rng: np.random.Generator, num_users: int, num_items: int) -> list[list[int]]:
    """3..12 events per user, items drawn with replacement (so histories repeat items, and some targets repeat
    a history item); one user always repeats their valid and test targets inside the history."""
    sequences = [rng.integers(1, num_items + 1, size=int(rng.integers(3, 13))).tolist() for _ in range(num_users)]
    repeat = sequences[0]
    sequences[0] = repeat[:-2] + [repeat[0], repeat[0]] if len(repeat) > 3 else [repeat[0]] * 4
    return sequences


def tiny_model(num_items: int, seed: int) -> SequenceEncoder:
    """A real one-layer GPT-2 encoder that sees only the newest 4 events; item vectors with unit-scale entries so
    that scores spread far wider than float32 rounding."""
    torch.manual_seed(seed)
    model = SequenceEncoder(EncoderConfig(num_items=num_items, max_len=4, hidden_size=8, num_layers=1, num_heads=1,
                                          intermediate_size=16, dropout=0.0, attention_dropout=0.0))
    with torch.no_grad():
        model.item_embedding.weight.normal_()
        model.item_embedding.weight[0].zero_()
    return model.eval()


def model_oracle(model: SequenceEncoder, sequences: list[list[int]], split: str, users: list[int], ks, num_items):
    """The oracle's report for `model` on `users`, scoring all items in float64 one user at a time."""
    item_vectors = model.output_item_vectors()[: num_items + 1].detach().double().numpy()
    ranks, tops = [], []
    for user in users:
        history, target = split_of(sequences[user], split)
        user_vector = encode_histories(model, [np.array(history)])[0].astype(np.float64)
        scores = masked(item_vectors @ user_vector, history)
        finite = np.sort(scores[np.isfinite(scores)])[::-1]
        # the case must not hinge on float rounding: the target clear of every other finite score, no tie at a cut
        if np.isfinite(scores[target]):
            others = np.delete(scores, target)
            assert np.min(np.abs(others[np.isfinite(others)] - scores[target])) > AMBIGUITY
        assert len(finite) > max(ks) and all(finite[k - 1] - finite[k] > AMBIGUITY for k in ks)
        ranks.append(oracle_rank(scores, target))
        tops.append({k: oracle_top(scores, k) for k in ks})
    return oracle_report(ranks, tops, item_vectors, ks, num_items)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_model_matches_the_brute_force_oracle(seed, split):
    """Every metric of a real tiny model equals the one computed by hand: ranks would be shifted by one if the
    target counted above itself, and too low if seen items (also those older than max_len) were not masked."""
    rng = np.random.default_rng(seed)
    num_items = int(rng.integers(25, 36))
    sequences = random_sequences(rng, num_users=7, num_items=num_items)
    model = tiny_model(num_items, seed)
    expected = model_oracle(model, sequences, split, list(range(len(sequences))), KS, num_items)
    got = evaluate_model(model, sequence_data(sequences, num_items), split, Evaluation(ks=KS, batch_size=3))
    assert_reports_match(got, expected)
    assert set(got) == set(expected)


def test_the_random_cases_exercise_masking_and_repeated_targets():
    """Guards the oracle test above against cases too easy to tell a bug apart: masking must change some rank,
    some history must reach beyond the encoder's window, and some target must repeat a history item."""
    changed, beyond_window, repeated_target = 0, 0, 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        num_items = int(rng.integers(25, 36))
        sequences = random_sequences(rng, num_users=7, num_items=num_items)
        model = tiny_model(num_items, seed)
        vectors = model.output_item_vectors()[: num_items + 1].detach().double().numpy()
        for sequence in sequences:
            for split in ("valid", "test"):
                history, target = split_of(sequence, split)
                raw = vectors @ encode_histories(model, [np.array(history)])[0].astype(np.float64)
                raw[0] = -np.inf
                changed += oracle_rank(masked(raw, history), target) != oracle_rank(raw, target)
                beyond_window += len(set(history[:-4]) - set(history[-4:])) > 0
                repeated_target += target in history
    assert changed >= 10 and beyond_window >= 10 and repeated_target >= 8


def test_evaluate_model_on_a_subset_of_users_ranks_only_those():
    """Evaluation.users picks whom to evaluate: the report is the oracle's over exactly those users."""
    rng = np.random.default_rng(11)
    num_items = 25
    sequences = random_sequences(rng, num_users=9, num_items=num_items)
    model = tiny_model(num_items, 11)
    users = [7, 2, 5]
    expected = model_oracle(model, sequences, "test", users, KS, num_items)
    got = evaluate_model(model, sequence_data(sequences, num_items), "test",
                         Evaluation(ks=KS, batch_size=2, users=np.array(users)))
    assert_reports_match(got, expected)


def popularity_oracle(sequences: list[list[int]], split: str, num_items: int) -> list[int]:
    """Ranks of the most-popular baseline: counts over every user's input history for `split`, then per user
    masked and ranked like the model (integer scores: ties everywhere, broken by item index)."""
    counts = np.zeros(num_items + 1)
    for sequence in sequences:
        for item in split_of(sequence, split)[0]:
            counts[item] += 1
    return [oracle_rank(masked(counts, history), target)
            for history, target in (split_of(sequence, split) for sequence in sequences)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_popularity_matches_the_oracle_under_heavy_ties(seed, split):
    """12 items and 40 users: counts tie constantly, so the rank depends on the tie rule as much as on the masking.
    (coverage is left out here: which of several tied items torch.topk lists is not specified.)"""
    rng = np.random.default_rng(100 + seed)
    num_items = 12
    sequences = [rng.integers(1, num_items + 1, size=int(rng.integers(3, 9))).tolist() for _ in range(40)]
    ranks = popularity_oracle(sequences, split, num_items)
    expected = oracle_report(ranks, [], None, KS, num_items)
    got = evaluate_popularity(sequence_data(sequences, num_items), split, Evaluation(ks=KS, batch_size=16))
    assert_reports_match(got, expected)
    assert not any(key.startswith("ILD") for key in got)


# ------------------------------------------------------------------------------------------------ by hand


def test_popularity_on_five_items_worked_by_hand():
    """Five items, three users; every number below is worked out by hand from the rules in the module docstring."""
    sequences = [[1, 2, 1, 3],   # u0
                 [2, 4, 2, 5],   # u1
                 [3, 4, 5, 2]]   # u2
    data = sequence_data(sequences, num_items=5)

    # test split: inputs u0 [1,2,1] -> 3, u1 [2,4,2] -> 5, u2 [3,4,5] -> 2
    # popularity over the inputs: item 1: 2 (u0 twice), 2: 1 + 2 = 3, 3: 1, 4: 1 + 1 = 2, 5: 1
    #   u0 masks {1, 2}: left 3:1, 4:2, 5:1; target 3 (1): above it item 4; item 5 ties but has a higher index -> 1
    #   u1 masks {2, 4}: left 1:2, 3:1, 5:1; target 5 (1): above it item 1; item 3 ties with a lower index -> 2
    #   u2 masks {3, 4, 5}: left 1:2, 2:3; target 2 (3) is the best -> 0
    # (unmasked, the ranks would be 3, 4, 0; counting the target above itself, 2, 3, 1)
    # ranks 1, 2, 0:
    #   HR@1 = 1/3; HR@2 = 2/3; HR@3 = 3/3
    #   NDCG@2 = (1/log2(1+2) + 0 + 1/log2(0+2)) / 3 = (0.6309298 + 1) / 3 = 0.5436433
    #   NDCG@3 = (0.6309298 + 1/log2(2+2) + 1) / 3 = (0.6309298 + 0.5 + 1) / 3 = 0.7103099
    #   MRR = (1/2 + 1/3 + 1/1) / 3 = 11/18 = 0.6111111
    #   top-1 lists: u0 {4}, u1 {1}, u2 {2} -> coverage@1 = 3/5 = 0.6
    report = evaluate_popularity(data, "test", Evaluation(ks=(1, 2, 3)))
    assert report["HR@1"] == pytest.approx(1 / 3)
    assert report["HR@2"] == pytest.approx(2 / 3)
    assert report["HR@3"] == pytest.approx(1.0)
    assert report["NDCG@1"] == pytest.approx(1 / 3)
    assert report["NDCG@2"] == pytest.approx(0.5436433, abs=1e-7)
    assert report["NDCG@3"] == pytest.approx(0.7103099, abs=1e-7)
    assert report["MRR"] == pytest.approx(11 / 18)
    assert report["coverage@1"] == pytest.approx(0.6)
    assert report["users"] == 3

    # valid split: inputs u0 [1,2] -> 1, u1 [2,4] -> 2, u2 [3,4] -> 5
    # popularity: item 1: 1, 2: 1 + 1 = 2, 3: 1, 4: 1 + 1 = 2, 5: 0
    #   u0 masks {1, 2} and its target 1 is one of them (-inf): above it 3:1, 4:2, 5:0 -> 3; -inf ties with a
    #      lower index: PAD (0) -> 4
    #   u1 masks {2, 4}, target 2 is one of them: above it 1:1, 3:1, 5:0 -> 3; PAD ties lower -> 4
    #   u2 masks {3, 4}: left 1:1, 2:2, 5:0; target 5 (0): above it items 1 and 2 -> 2
    # ranks 4, 4, 2: HR@3 = 1/3; MRR = (1/5 + 1/5 + 1/3) / 3 = 0.2444444
    report = evaluate_popularity(data, "valid", Evaluation(ks=(3,)))
    assert report["HR@3"] == pytest.approx(1 / 3)
    assert report["NDCG@3"] == pytest.approx(0.5 / 3)  # 1/log2(2+2) / 3
    assert report["MRR"] == pytest.approx(0.2444444, abs=1e-7)


def test_rank_batch_and_report_on_five_items_worked_by_hand():
    """rank_batch on explicit scores, then ranking_report with explicit item vectors, numbers written out."""
    # index:                 PAD  1    2    3    4    5
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.1, 0.3],    # user A: history [1], target 2
                           [0.0, 0.2, 0.8, 0.2, 0.6, 0.4]])   # user B: history [2], target 3
    batch = EvalBatch(users=np.array([0, 1]), histories=[np.array([1]), np.array([2])], behaviors=None,
                      targets=np.array([2, 3]))
    ranks, top = rank_batch(scores, batch, top_k=4)
    # A: item 1 (0.9) is seen; left 2:0.5, 3:0.7, 4:0.1, 5:0.3 -> only item 3 above the target -> rank 1
    # B: item 2 (0.8) is seen; left 1:0.2, 3:0.2, 4:0.6, 5:0.4 -> 4 and 5 above, 1 ties with a lower index -> 3
    assert ranks.tolist() == [1, 3]
    # top lists: A [3, 2, 5, 4]; B [4, 5, then 1 and 3 in either order]
    assert top[0].tolist() == [3, 2, 5, 4]
    assert top[1, :2].tolist() == [4, 5] and set(top[1, 2:].tolist()) == {1, 3}

    vectors = np.array([[0, 0], [0, 1], [1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float32)
    report = ranking_report(ranks, top, vectors, [1, 2, 4], num_items=5)
    # HR@1 = 0; HR@2 = 1/2 (rank 1 < 2); HR@4 = 2/2
    # NDCG@2 = (1/log2(1+2) + 0) / 2 = 0.6309298 / 2 = 0.3154649
    # NDCG@4 = (1/log2(3) + 1/log2(3+2)) / 2 = (0.6309298 + 0.4306766) / 2 = 0.5308032
    # MRR = (1/2 + 1/4) / 2 = 0.375
    # coverage@1 = |{3, 4}| / 5 = 0.4; coverage@2 = |{3, 2, 4, 5}| / 5 = 0.8; coverage@4 = 5/5
    # ILD@2: A lists 3 (0,1) and 2 (1,0): cos 0 -> distance 1; B lists 4 (1,1) and 5 (1,0): cos 1/sqrt(2) ->
    #        distance 1 - 0.7071068 = 0.2928932; mean (1 + 0.2928932) / 2 = 0.6464466
    expected = {"HR@1": 0.0, "HR@2": 0.5, "HR@4": 1.0, "NDCG@1": 0.0, "NDCG@2": 0.3154649, "NDCG@4": 0.5308032,
                "MRR": 0.375, "coverage@1": 0.4, "coverage@2": 0.8, "coverage@4": 1.0, "ILD@1": 0.0,
                "ILD@2": 0.6464466}
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-6), key
