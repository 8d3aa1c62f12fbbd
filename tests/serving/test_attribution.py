"""The list memory behind online quality: bounded by age and by count, oldest first; position buckets; a list
re-used under one request id is the latest one. Oracles: hand-worked expectations and a fake clock."""

from __future__ import annotations

import pytest

from seqrank.serving.attribution import MISS, Attribution, ListMemory, position_bucket
from seqrank.serving.config import AttributionArgs
from seqrank.serving.validation import ListEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("position, label", [(1, "1"), (2, "2-3"), (3, "2-3"), (4, "4-10"), (10, "4-10"),
                                             (11, "11+"), (500, "11+"), (None, MISS)])
def test_position_buckets_are_the_documented_ones(position, label):
    assert position_bucket(position) == label


def test_hits_by_position_and_misses_under_the_lists_model_version():
    memory = ListMemory(AttributionArgs())
    memory.remember("r1", "v1", ["a", "b", "c", "d"])
    memory.remember("r2", "v2", ["d", "a"])
    events = [ListEvent("r1", "a", "buy"), ListEvent("r1", "d", ""), ListEvent("r1", "z", "pv"),
              ListEvent("r2", "a", "pv"), ListEvent("r3", "a", "pv")]
    attributed, unknown = memory.attribute(events)
    assert attributed == [Attribution("v1", "1", "buy"), Attribution("v1", "4-10", "unspecified"),
                          Attribution("v1", MISS, "pv"), Attribution("v2", "2-3", "pv")]
    assert unknown == 1


def test_lists_expire_after_ttl():
    clock = Clock()
    memory = ListMemory(AttributionArgs(ttl_s=60.0, max_lists=10), clock)
    memory.remember("old", "v1", ["a"])
    clock.now += 30
    memory.remember("new", "v1", ["a"])
    clock.now += 30  # "old" is exactly 60 s old: gone; "new" 30 s: kept
    assert memory.lookup("old") is None and memory.lookup("new") is not None
    clock.now += 29.9
    assert memory.lookup("new") is not None
    clock.now += 0.1
    assert memory.lookup("new") is None
    assert len(memory) == 0  # expired lists do not stay in memory


def test_at_most_max_lists_the_oldest_evicted_first():
    memory = ListMemory(AttributionArgs(max_lists=3))
    for n in range(5):
        memory.remember(f"r{n}", "v1", ["a"])
    assert len(memory) == 3
    assert [memory.lookup(f"r{n}") is not None for n in range(5)] == [False, False, True, True, True]
    memory.remember("r2", "v2", ["b"])  # re-used id: the newest list, moved to the end
    memory.remember("r5", "v1", ["a"])
    assert memory.lookup("r3") is None and memory.lookup("r2").model_version == "v2"


def test_max_lists_zero_remembers_nothing():
    memory = ListMemory(AttributionArgs(max_lists=0))
    memory.remember("r1", "v1", ["a"])
    assert not memory.enabled and memory.attribute([ListEvent("r1", "a", "")]) == ([], 1)
