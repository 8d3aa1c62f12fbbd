"""The live catalogue: the artifact's items plus upserted ones, minus hidden ones, with attribute filters.

The store (serving/history) keeps the durable state: for each changed item its upserted attribute values and its
availability, under a store-wide catalogue version. Each replica holds a `LiveItems` snapshot of that state and
keeps it current (`LiveItemsSync`: a poll every `history.catalogue_sync_ms`, and an immediate catch-up when a
request names a newer version). Serving code never mutates the artifact's objects: a `CatalogueView` lays one
`LiveItems` over one model version's `Catalogue`, built once per (model version, catalogue version) and cached,
so a reload re-embeds upserted items with the new model simply by building new views.

Upserted items the model was not trained on get indices after the artifact's (I+1, I+2, ...) in catalogue order
(first upsert first), so a view's index space is the artifact's extended; retrieval scores them exactly (they are
few next to the index) and merges them with the index's results.
"""

from __future__ import annotations

import logging
import threading
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, Mapping, Sequence, TypeVar

import numpy as np

from seqrank.serving.catalogue import Catalogue
from seqrank.training.vocab import PAD_INDEX

logger = logging.getLogger(f"ray.serve.{__name__}")
K = TypeVar("K")
V = TypeVar("V")
VIEW_CACHE_SIZE = 4  # views kept: the current and previous model version, each at the latest catalogue version


@dataclass(frozen=True)
class LiveItems:
    """The store's catalogue state at `version`: upserted attribute values and hidden items, by raw id."""

    version: int = 0
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # upserted or updated items
    hidden: frozenset[str] = frozenset()
    order: tuple[str, ...] = ()  # upserted ids in first-upsert order: new items' index order

    def apply(self, states: Sequence, version: int) -> LiveItems:
        """This state with the store's newer item states (`ItemState`s: raw_item_id, attributes, available)."""
        if version <= self.version and not states:
            return self
        attributes, hidden, order = dict(self.attributes), set(self.hidden), list(self.order)
        for state in states:
            if state.attributes is not None:
                if state.raw_item_id not in attributes:
                    order.append(state.raw_item_id)
                attributes[state.raw_item_id] = tuple(state.attributes)
            if state.available:
                hidden.discard(state.raw_item_id)
            else:
                hidden.add(state.raw_item_id)
        return LiveItems(max(version, self.version), attributes, frozenset(hidden), tuple(order))


@dataclass(frozen=True)
class CatalogueView:
    """One model version's catalogue seen through the live catalogue at one version.

    Indices 1..I are the artifact's items, I+1..I+N the upserted items the model was not trained on.
    """

    base: Catalogue
    live_version: int
    item_ids: np.ndarray  # (I+N+1,) object raw ids
    item_index_of: Mapping[str, int] = field(repr=False)
    new_items: np.ndarray = field(repr=False)  # (N,) object raw ids of the upserted new items, index order
    hidden: np.ndarray = field(repr=False)  # (I+N+1,) bool, PAD True (never returned)
    hidden_items: np.ndarray = field(repr=False)  # (H,) sorted indices of the hidden items (PAD not among them)
    items_with_value: Mapping[str, np.ndarray] = field(repr=False)  # attribute value -> sorted item indices

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_hidden(self) -> int:
        return len(self.hidden_items)

    def allowed(self, include_any: Sequence[str] = (), exclude_any: Sequence[str] = ()) -> np.ndarray:
        """(I+N+1,) bool: items that may be returned: not hidden, having an `include_any` value (when given) and no
        `exclude_any` value. Values the catalogue does not know match no item."""
        if include_any:
            allowed = np.zeros(len(self.item_ids), dtype=bool)
            for value in include_any:
                allowed[self.items_with_value.get(value, _NONE)] = True
        else:
            allowed = np.ones(len(self.item_ids), dtype=bool)
        for value in exclude_any:
            allowed[self.items_with_value.get(value, _NONE)] = False
        allowed &= ~self.hidden
        return allowed

    def indices(self, raw_item_ids: Sequence[str]) -> np.ndarray:
        """(n,) int64 indices of the known raw ids, in order; unknown ids dropped."""
        index_of = self.item_index_of
        return np.fromiter((index_of[raw] for raw in raw_item_ids if raw in index_of), dtype=np.int64)


_NONE = np.zeros(0, dtype=np.int64)


def build_view(base: Catalogue, live: LiveItems) -> CatalogueView:
    """The view of `base` (one model version) through `live`, done once per pair. The artifact's attribute index
    (`base.items_with_value`, built at reload) is reused; only the values of upserted items are re-indexed, so the
    cost follows the catalogue changes, not the catalogue."""
    num_trained = base.num_items
    new_items = np.array([raw for raw in live.order if raw not in base.item_index_of], dtype=object)
    item_ids = np.concatenate([base.item_ids, new_items]) if len(new_items) else base.item_ids
    new_index_of = {raw: num_trained + 1 + position for position, raw in enumerate(new_items)}
    item_index_of = ChainMap(new_index_of, base.item_index_of) if new_index_of else base.item_index_of
    hidden = np.zeros(len(item_ids), dtype=bool)
    hidden[PAD_INDEX] = True
    hidden_items = np.array(sorted(item_index_of[raw] for raw in live.hidden if raw in item_index_of), np.int64)
    hidden[hidden_items] = True
    overrides = {item_index_of[raw]: values for raw, values in live.attributes.items() if raw in item_index_of}
    return CatalogueView(base, live.version, item_ids, item_index_of, new_items, hidden, hidden_items,
                         _with_overrides(base, overrides))


def _with_overrides(base: Catalogue, overrides: Mapping[int, tuple[str, ...]]) -> Mapping[str, np.ndarray]:
    """`base.items_with_value` with the upserted items' values replacing what the artifact said about them."""
    if not overrides:
        return base.items_with_value
    replaced = np.array(sorted(index for index in overrides if index <= base.num_items), dtype=np.int64)
    added: dict[str, list[int]] = {}
    for index, values in overrides.items():
        for value in values:
            added.setdefault(value, []).append(index)
    touched = set(added).union(*(base.values_of(int(index)) for index in replaced))
    items_with_value = dict(base.items_with_value)
    for value in touched:
        kept = items_with_value.get(value, _NONE)
        kept = kept[~np.isin(kept, replaced)] if len(replaced) else kept
        items_with_value[value] = np.union1d(kept, np.asarray(added.get(value, ()), dtype=np.int64))
    return items_with_value


class BuiltOnce(Generic[K, V]):
    """The last few values of `build(key)`, each built on first use; thread-safe (Serve may run requests in
    threads). For views and the indexes over them, keyed by (model version, catalogue version)."""

    def __init__(self, size: int = VIEW_CACHE_SIZE) -> None:
        self._values: OrderedDict[K, V] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: K, build: Callable[[], V]) -> V:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
                return value
        value = build()  # outside the lock: concurrent builders of one key agree on the result
        with self._lock:
            self._values[key] = value
            while len(self._values) > self._size:
                self._values.popitem(last=False)
        return value


class ViewCache:
    """The views a replica uses."""

    def __init__(self, size: int = VIEW_CACHE_SIZE) -> None:
        self._views: BuiltOnce[tuple[str, int], CatalogueView] = BuiltOnce(size)

    def view(self, base: Catalogue, live: LiveItems) -> CatalogueView:
        return self._views.get((base.model_version, live.version), lambda: build_view(base, live))


class LiveItemsSync:
    """Keeps a replica's `LiveItems` current: a background poll every `interval_s`, and `catch_up(version)` for a
    request that must see a version this replica has not polled yet (read-your-writes across replicas).

    `read_since(version) -> (states, new_version)` is the store's `items_since`; its errors leave the snapshot as it
    was (the next poll tries again), so a store outage never stops ranking on the catalogue already known.
    """

    def __init__(self, read_since: Callable[[int], tuple[list, int]], interval_s: float, owner: str) -> None:
        self._read_since = read_since
        self._interval_s = interval_s
        self._owner = owner
        self._lock = threading.Lock()
        self.current = LiveItems()
        self._stopped = threading.Event()
        self._poller: threading.Thread | None = None

    def refresh(self) -> LiveItems:
        """Reads the changes since the held version and applies them; returns the snapshot now held."""
        states, version = self._read_since(self.current.version)
        return self.apply(states, version)

    def apply(self, states: Sequence, version: int) -> LiveItems:
        """Applies states read at store version `version`. States are items' latest states, not deltas, so
        applying them twice is harmless; a read older than the held snapshot is dropped, never applied over it."""
        with self._lock:
            held = self.current
            if version >= held.version and (states or version > held.version):
                self.current = held.apply(states, version)
            return self.current

    def catch_up(self, version: int) -> LiveItems:
        """The snapshot at `version` or later: refreshes first when the held one is older."""
        held = self.current
        return held if held.version >= version else self.refresh()

    def start(self, wait_s: float) -> None:
        """Reads the store's whole catalogue state, waiting up to `wait_s` for it, then polls in the background.
        A store that cannot answer by then does not hold the replica's start: it serves the artifact's catalogue
        until a read succeeds (logged)."""
        first_read = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(first_read,), name=f"{self._owner}-catalogue-sync",
                                        daemon=True)
        self._poller.start()
        if not first_read.wait(wait_s):
            logger.warning("%s: the live catalogue did not load within %.1f s; serving the artifact's catalogue "
                           "until it does", self._owner, wait_s)

    def _poll(self, first_read: threading.Event) -> None:
        while True:
            try:
                self.refresh()
            except Exception as error:  # the store is down or slow: keep the known catalogue, try again later
                logger.warning("%s: catalogue sync failed, keeping version %d: %s", self._owner,
                               self.current.version, error)
            first_read.set()
            if self._stopped.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stopped.set()
