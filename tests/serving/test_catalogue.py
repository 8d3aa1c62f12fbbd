"""Raw ids and behaviour names -> indices under one model version: unknown items dropped, unknown names -> 0."""

import numpy as np
import pytest

from seqrank.serving.catalogue import NO_BEHAVIOR_INDEX, Catalogue, History
from seqrank.training.artifact import load_artifact
from tests.serving.artifacts import write_small_artifact


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    return Catalogue.from_artifact(load_artifact(write_small_artifact(tmp_path_factory.mktemp("a") / "v1")))


def test_item_indices_keep_order_and_drop_unknown_ids(catalogue):
    np.testing.assert_array_equal(catalogue.item_indices(["sku-3", "nope", "sku-1"]), [3, 1])
    assert catalogue.item_indices([]).shape == (0,)


def test_history_indices_map_behaviours_unspecified_to_the_first_and_unknown_to_none(catalogue):
    history = History(item_ids=("sku-2", "gone", "sku-5", "sku-7"), behaviors=("buy", "pv", "", "zoom"))
    items, behaviors = catalogue.history_indices(history)
    np.testing.assert_array_equal(items, [2, 5, 7])  # "gone" is not in this version
    np.testing.assert_array_equal(behaviors, [4, 1, NO_BEHAVIOR_INDEX])


def test_restrict_keeps_only_known_events_in_order(catalogue):
    history = History(item_ids=("x", "sku-4", "y", "sku-1"), behaviors=("pv", "cart", "pv", "buy"))
    assert catalogue.restrict(history) == History(item_ids=("sku-4", "sku-1"), behaviors=("cart", "buy"))
    known = History(item_ids=("sku-4",), behaviors=("pv",))
    assert catalogue.restrict(known) is known
    assert catalogue.history_indices(History((), ()))[0].shape == (0,)


def test_popular_items_are_ordered_by_training_count(catalogue):
    np.testing.assert_array_equal(catalogue.popular_items, np.arange(1, 13))  # the small artifact: 12, 11, ... 1
    assert catalogue.item_ids[catalogue.popular_items[0]] == "sku-1"


def test_history_rejects_misaligned_fields():
    with pytest.raises(ValueError, match="history"):
        History(item_ids=("a", "b"), behaviors=("pv",))
