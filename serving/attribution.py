"""Online quality: which events follow which lists. Pure: no Ray, no gRPC.

Every Rank list an ingress replica answers is remembered under its response's request id (the model version that
produced it and each item's position). A RecordEvents event that names that id (`Event.list_request_id`) is then
a hit at its item's position, bucketed (1, 2-3, 4-10, 11+), or a miss when the item was not on the list; the
ingress counts both per model version (serving/metrics.py), so the online hit rate at k of a version is its hits at
positions <= k over all its attributed events (docs/metrics.md, "Online quality").

The memory is bounded in time and size (`ingress.attribution`: ttl_s, max_lists) and belongs to one replica: with
several ingress replicas an event counts only when it reaches the replica that served its list. Which replica
that is does not depend on the model version or on whether the event is a hit (the proxy routes each call on
its own), so hits over attributed events stay an unbiased per-version ratio; per-list rates (hits over lists
shown) read low by the number of replicas, for every version alike. docs/rollout.md explains the choice.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from seqrank.serving.config import AttributionArgs
from seqrank.serving.validation import ListEvent

MISS = "miss"  # position bucket of an attributed event whose item was not on the list
# (first position, last position or None, label); positions are 1-based. Hit rate at 1, 3 and 10 are sums of them.
POSITION_BUCKETS = ((1, 1, "1"), (2, 3, "2-3"), (4, 10, "4-10"), (11, None, "11+"))
UNSPECIFIED_BEHAVIOR_LABEL = "unspecified"  # Event.behavior "" as a label value (an empty label is no label)


@dataclass(frozen=True)
class ShownList:
    """A list as its user saw it: the version that produced it and each item's 1-based position."""

    model_version: str
    positions: Mapping[str, int]  # raw item id -> position
    expires_at: float  # clock seconds


@dataclass(frozen=True)
class Attribution:
    """One attributed event: the labels it is counted under."""

    model_version: str
    position_bucket: str  # a POSITION_BUCKETS label or MISS
    behavior: str


def position_bucket(position: int | None) -> str:
    """The bucket label of a 1-based position; MISS for None (not on the list)."""
    if position is None:
        return MISS
    for first, last, label in POSITION_BUCKETS:
        if position >= first and (last is None or position <= last):
            return label
    raise ValueError(f"position: must be >= 1, got {position}")


def behavior_label(behavior: str) -> str:
    return behavior or UNSPECIFIED_BEHAVIOR_LABEL


class ListMemory:
    """Shown lists by request id: at most `max_lists`, each for `ttl_s`; the oldest go first. Thread-safe.

    Insertion order is expiry order (one TTL for all; a re-used request id moves to the end), so both bounds
    are enforced by dropping from the front: O(1) per list, no sweeper thread.
    """

    def __init__(self, config: AttributionArgs, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = config.ttl_s
        self._max_lists = config.max_lists
        self._clock = clock
        self._lists: OrderedDict[str, ShownList] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._max_lists > 0

    def __len__(self) -> int:
        return len(self._lists)

    def remember(self, request_id: str, model_version: str, raw_item_ids: Sequence[str]) -> None:
        if not self.enabled:
            return
        now = self._clock()
        # first occurrence wins: a list never shows an item twice, but keep the best position if it did
        positions: dict[str, int] = {}
        for position, raw_item_id in enumerate(raw_item_ids, start=1):
            positions.setdefault(raw_item_id, position)
        shown = ShownList(model_version, positions, now + self._ttl_s)
        with self._lock:
            self._lists.pop(request_id, None)
            self._lists[request_id] = shown
            self._drop_expired(now)
            while len(self._lists) > self._max_lists:
                self._lists.popitem(last=False)

    def lookup(self, request_id: str) -> ShownList | None:
        """The list shown under `request_id`; None when never seen here, expired or evicted."""
        with self._lock:
            shown = self._lists.get(request_id)
            if shown is None:
                return None
            if shown.expires_at <= self._clock():
                self._drop_expired(self._clock())
                return None
            return shown

    def attribute(self, events: Iterable[ListEvent]) -> tuple[list[Attribution], int]:
        """(attributions of the events whose list is remembered, how many named a list it does not know)."""
        attributed, unknown = [], 0
        for event in events:
            shown = self.lookup(event.list_request_id)
            if shown is None:
                unknown += 1
                continue
            attributed.append(Attribution(shown.model_version, position_bucket(shown.positions.get(event.raw_item_id)),
                                          behavior_label(event.behavior)))
        return attributed, unknown

    def _drop_expired(self, now: float) -> None:
        while self._lists:
            oldest = next(iter(self._lists.values()))
            if oldest.expires_at > now:
                return
            self._lists.popitem(last=False)
