"""The live catalogue laid over one model version: new items' indices, hidden items, attribute filters, the sync.

Filters are checked against a brute-force oracle over plain Python sets: for each item, its attribute values
(the artifact's, or the upserted ones that replace them), then include/exclude/hidden applied one item at a time.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from seqrank.serving.catalogue import Catalogue
from seqrank.serving.live_catalogue import LiveItems, LiveItemsSync, ViewCache, build_view

VALUES = ("", "cat-a", "cat-b", "brand-x", "brand-y")  # attribute index -> raw value, 0 = PAD
# Trained items 1..6 and their attribute indices (0 pads).
ITEM_ATTRIBUTES = np.array([[0, 0], [1, 3], [1, 4], [2, 3], [2, 0], [0, 0], [1, 0]], dtype=np.int32)


@dataclass(frozen=True)
class State:  # the store's ItemState shape
    raw_item_id: str
    attributes: tuple[str, ...] | None
    available: bool


def catalogue(version: str = "v1") -> Catalogue:
    item_ids = np.array(["", "i1", "i2", "i3", "i4", "i5", "i6"], dtype=object)
    return Catalogue(
        model_version=version, item_ids=item_ids, item_index_of={raw: i for i, raw in enumerate(item_ids) if i},
        behavior_names=("pv",), behavior_index_of={"pv": 1, "": 1}, popular_items=np.arange(1, 7),
        item_popularity=np.array([0, 6, 5, 4, 3, 2, 1], dtype=np.float32), manifest={},
        attribute_values=VALUES, item_attributes=ITEM_ATTRIBUTES,
    )


def live_items(*states: State, version: int = 1) -> LiveItems:
    return LiveItems().apply(list(states), version)


def oracle_allowed(view, live: LiveItems, include, exclude) -> set[str]:
    trained = {f"i{i}": {VALUES[code] for code in ITEM_ATTRIBUTES[i] if code} for i in range(1, 7)}
    values = {**trained, **{raw: set(attrs) for raw, attrs in live.attributes.items()}}
    return {raw for raw, have in values.items()
            if (not include or have & set(include)) and not have & set(exclude) and raw not in live.hidden}


def test_upserted_items_get_indices_after_the_artifacts_in_first_upsert_order():
    live = live_items(State("new-b", ("cat-a",), True), State("i2", ("cat-b",), True), State("new-a", (), True))
    view = build_view(catalogue(), live)
    assert list(view.item_ids) == ["", "i1", "i2", "i3", "i4", "i5", "i6", "new-b", "new-a"]
    assert [view.item_index_of[raw] for raw in ("i2", "new-b", "new-a")] == [2, 7, 8]  # i2 is trained: no new index
    assert list(view.new_items) == ["new-b", "new-a"] and view.num_items == 8


@pytest.mark.parametrize("include, exclude", [
    ((), ()), (("cat-a",), ()), ((), ("brand-x",)), (("cat-a", "cat-b"), ("brand-y",)), (("unknown",), ()),
    ((), ("unknown",)), (("brand-x",), ("cat-b",)),
])
def test_allowed_items_equal_a_brute_force_over_item_attribute_sets(include, exclude):
    live = live_items(State("new-1", ("cat-a", "brand-y"), True), State("i3", ("cat-a",), True),  # i3 re-tagged
                      State("i1", None, False), State("new-2", ("cat-b",), False))  # hidden: a trained, a new
    view = build_view(catalogue(), live)
    allowed = view.allowed(include, exclude)
    assert {str(view.item_ids[i]) for i in np.flatnonzero(allowed)} == oracle_allowed(view, live, include, exclude)
    assert not allowed[0]  # PAD never


def test_hide_then_restore_and_the_latest_state_wins():
    live = LiveItems().apply([State("i4", None, False)], 1)
    assert live.hidden == {"i4"}
    live = live.apply([State("i4", None, True), State("i5", None, False)], 2)
    assert live.hidden == {"i5"} and live.version == 2
    view = build_view(catalogue(), live)
    assert view.num_hidden == 1 and view.hidden[5] and not view.hidden[4]


def test_an_attribute_upsert_keeps_availability_and_vice_versa():
    live = LiveItems().apply([State("n", ("cat-a",), True)], 1).apply([State("n", ("cat-a",), False)], 2)
    assert live.attributes["n"] == ("cat-a",) and live.hidden == {"n"}
    live = live.apply([State("n", ("cat-b",), False)], 3)
    assert live.attributes["n"] == ("cat-b",) and live.hidden == {"n"} and live.order == ("n",)


def test_view_cache_builds_once_per_model_and_catalogue_version():
    cache, base = ViewCache(size=2), catalogue()
    first = live_items(version=1)
    assert cache.view(base, first) is cache.view(base, first)
    second = first.apply([State("n", ("cat-a",), True)], 2)
    assert cache.view(base, second) is not cache.view(base, first)


class FakeStore:
    """items_since over an in-memory list of (version, state), like the store's: latest state per item."""

    def __init__(self):
        self.changes: list[tuple[int, State]] = []
        self.reads = 0
        self.fail = False

    def write(self, *states: State) -> int:
        version = (self.changes[-1][0] if self.changes else 0) + 1
        self.changes += [(version, state) for state in states]
        return version

    def items_since(self, version: int):
        self.reads += 1
        if self.fail:
            raise ConnectionError("store down")
        latest = {}
        for changed, state in self.changes:
            if changed > version:
                latest[state.raw_item_id] = state
        return list(latest.values()), (self.changes[-1][0] if self.changes else 0)


def test_sync_catches_up_to_a_version_it_has_not_polled_yet():
    store = FakeStore()
    sync = LiveItemsSync(store.items_since, interval_s=3600, owner="test")  # no poll in the test's lifetime
    sync.start(wait_s=5)
    version = store.write(State("n", ("cat-a",), True))
    assert sync.current.version == 0
    assert sync.catch_up(version).attributes == {"n": ("cat-a",)}
    reads = store.reads
    sync.catch_up(version)
    assert store.reads == reads  # already there: no store read
    sync.stop()


def test_a_read_older_than_the_held_snapshot_is_never_applied_over_it():
    store = FakeStore()
    sync = LiveItemsSync(store.items_since, interval_s=3600, owner="test")
    store.write(State("n", None, False))
    old_states, old_version = store.items_since(0)  # read, but applied late
    store.write(State("n", None, True))
    sync.refresh()
    assert sync.current.hidden == frozenset()
    sync.apply(old_states, old_version)
    assert sync.current.hidden == frozenset()  # the stale "hidden" did not come back


def test_a_store_down_at_start_leaves_the_replica_serving_and_polling():
    store = FakeStore()
    store.fail = True
    sync = LiveItemsSync(store.items_since, interval_s=0.05, owner="test")
    sync.start(wait_s=1)
    assert sync.current.version == 0
    store.fail = False
    store.write(State("n", None, False))
    done = threading.Event()
    for _ in itertools.repeat(None, 100):
        if sync.current.version == 1:
            done.set()
            break
        done.wait(0.05)
    sync.stop()
    assert sync.current.hidden == {"n"}
