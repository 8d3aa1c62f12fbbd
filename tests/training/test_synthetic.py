"""seqrank.training.synthetic: deterministic, realistic in shape, and sequential enough to separate models from popularity."""

import json

import numpy as np
import pytest

from seqrank.training.config import DataConfig
from seqrank.training.data import build_sequences, history_bounds, load_interactions, targets
from seqrank.training.sources import load_sequences
from seqrank.training.synthetic import generate_attributes, generate_log, write_synthetic_dataset


@pytest.fixture(scope="module")
def log():
    return generate_log(2000, 500, seed=0)


@pytest.fixture(scope="module")
def data(log):
    return build_sequences(log)


def hit_rate_at_10(scores_of, data) -> float:
    """Test-split HR@10 with the user's seen items masked, as training.evaluate does."""
    start, end = history_bounds(data, "test")
    wanted = targets(data, "test")
    hits = 0
    for user in range(data.num_users):
        history = data.items[start[user] : end[user]]
        scores = scores_of(history).astype(np.float64)
        scores[history] = -np.inf
        scores[0] = -np.inf
        hits += wanted[user] in np.argsort(-scores, kind="stable")[:10]
    return hits / data.num_users


def test_deterministic_under_seed(log):
    again = generate_log(2000, 500, seed=0)
    for name in ("user_ids", "item_ids", "timestamps", "behaviors"):
        assert np.array_equal(getattr(log, name), getattr(again, name))
    other = generate_log(2000, 500, seed=1)
    assert len(other) != len(log) or not np.array_equal(other.item_ids, log.item_ids)


def test_shape_of_the_log(log, data):
    assert data.num_users == 2000 and set(log.user_ids) == {f"u{u}" for u in range(2000)}
    assert set(log.item_ids) <= {f"sku-{n:05d}" for n in range(1, 501)} and data.num_items >= 480
    assert 15 <= len(log) / 2000 <= 20
    assert data.lengths().min() >= 3 and len(data.items) == len(log)  # nothing to drop or dedupe
    assert log.timestamps.dtype == np.int64
    same_user = log.user_ids[1:] == log.user_ids[:-1]
    assert (np.diff(log.timestamps)[same_user] > 0).all()  # grouped by user, strictly in time order


def test_behaviour_mix_and_funnel(data):
    assert data.behavior_names == ("pv", "cart", "fav", "buy")
    share = np.bincount(data.behaviors, minlength=5)[1:] / len(data.behaviors)
    assert 0.87 <= share[0] <= 0.93 and 0.035 <= share[1] <= 0.065
    assert 0.02 <= share[2] <= 0.045 and 0.01 <= share[3] <= 0.03
    buys = np.flatnonzero(data.behaviors == 4)
    after_cart = (data.behaviors[buys - 1] == 2) & (data.items[buys - 1] == data.items[buys])
    assert after_cart.mean() >= 0.7


def test_long_tailed_popularity(data):
    counts = np.sort(np.bincount(data.items)[1:])[::-1]
    top_decile_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert 0.3 <= top_decile_share <= 0.7
    assert counts[0] >= 10 * np.median(counts)


def test_sequence_signal_beats_most_popular(data):
    """A first-order item transition model (a weak sequence model) must clearly beat most-popular."""
    start, end = history_bounds(data, "train")
    transitions = np.zeros((data.num_items + 1, data.num_items + 1))
    popularity = np.zeros(data.num_items + 1)
    for user in range(data.num_users):
        history = data.items[start[user] : end[user]]
        np.add.at(transitions, (history[:-1], history[1:]), 1)
        np.add.at(popularity, history, 1)
    markov = hit_rate_at_10(lambda history: transitions[history[-1]] + 1e-6 * popularity, data)
    most_popular = hit_rate_at_10(lambda history: popularity.copy(), data)
    assert markov >= 0.4 and markov >= 3 * most_popular


def test_attributes_follow_the_latent_clusters(log, data):
    raw_items = sorted(set(log.item_ids))
    attributes = generate_attributes(raw_items, seed=0)
    assert attributes == generate_attributes(raw_items[::-1], seed=0)  # per item, independent of order
    assert set(attributes) == set(raw_items) and all(len(pair) == 2 for pair in attributes.values())
    category_of_brand = {}
    for category, brand in attributes.values():
        assert category_of_brand.setdefault(brand, category) == category  # each brand lives in one category
    category = np.array([""] + [attributes[raw][0] for raw in data.item_ids[1:]], dtype=object)
    views = data.items[data.behaviors == 1]
    same = np.mean(category[views[1:]] == category[views[:-1]])
    assert same >= 0.5  # a random pair shares one of 20 categories far less often
    with pytest.raises(ValueError, match="not a synthetic id"):
        generate_attributes(["42"], seed=0)


def test_written_dataset_round_trips(tmp_path, log):
    events_path, attributes_path = write_synthetic_dataset(tmp_path / "synth", 2000, 500, seed=0)
    loaded = load_interactions(events_path)
    for name in ("user_ids", "item_ids", "timestamps", "behaviors"):
        assert np.array_equal(getattr(loaded, name), getattr(log, name))
    data = load_sequences(DataConfig(path=str(events_path), attributes=str(attributes_path)))
    assert data.item_attributes.shape == (data.num_items + 1, 2) and (data.item_attributes[1:] > 0).all()
    assert data.num_attributes == len({value for pair in json.loads(attributes_path.read_text()).values()
                                       for value in pair})


@pytest.mark.parametrize("num_users, num_items", [(1, 2), (7, 30), (50, 3)])
def test_tiny_sizes(num_users, num_items):
    tiny = generate_log(num_users, num_items, seed=5)
    assert len(set(tiny.user_ids)) == num_users and len(set(tiny.item_ids)) <= num_items


def test_rejects_empty_catalog():
    with pytest.raises(ValueError, match="num_items >= 2"):
        generate_log(10, 1, seed=0)


def test_flatter_popularity_reaches_more_of_a_big_catalogue():
    default, flat = generate_log(400, 20_000, seed=0), generate_log(400, 20_000, seed=0, zipf_exponent=0.5)
    assert len(set(flat.item_ids)) > 1.3 * len(set(default.item_ids))
    assert default.source == "synthetic(num_users=400, num_items=20000, seed=0)"  # default logs keep their identity
    with pytest.raises(ValueError, match="zipf_exponent"):
        generate_log(10, 10, zipf_exponent=-1.0)
