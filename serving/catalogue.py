"""An artifact's vocabulary as serving uses it: raw item ids <-> item indices, behaviour names, popularity.

Requests, the history store and the messages between deployments carry raw ids and behaviour names only; each
stage maps them with the catalogue of the model version it runs, so a history recorded under one model stays
usable under the next. Items the version does not know are dropped; behaviour names it does not know (a stored
history after a model swap) become 0, the "no behaviour" index; "" (unspecified) becomes the first behaviour,
the dominant type in every log we train on (pv). Torch-free, like training/artifact.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress
from typing import Mapping, Sequence

import numpy as np

from seqrank.training.artifact import Artifact
from seqrank.training.vocab import PAD_INDEX, UNSPECIFIED_BEHAVIOR

NO_BEHAVIOR_INDEX = 0



@dataclass(frozen=True)
class History:
    """A user's events as the stages see them, oldest first: raw item ids and behaviour names."""

    item_ids: tuple[str, ...]
    behaviors: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.behaviors):
            raise ValueError(f"history: {len(self.item_ids)} item ids but {len(self.behaviors)} behaviours")

    def __len__(self) -> int:
        return len(self.item_ids)


def _attribute_values(artifact: Artifact) -> tuple[str, ...] | None:
    values = getattr(artifact, "attribute_values", None)
    return tuple(values) if values is not None else None


def _items_with_value(values: tuple[str, ...] | None, item_attributes: np.ndarray | None) -> dict[str, np.ndarray]:
    """Attribute value -> sorted indices of the trained items carrying it, one sort over (code, item) pairs."""
    if values is None or item_attributes is None:
        return {}
    codes = item_attributes[PAD_INDEX + 1:]  # (I, S)
    items = np.repeat(np.arange(PAD_INDEX + 1, len(item_attributes), dtype=np.int64), codes.shape[1])
    codes = codes.ravel()
    real = codes > 0
    codes, items = codes[real], items[real]
    order = np.lexsort((items, codes))
    codes, items = codes[order], items[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    return {values[codes[start]]: np.unique(group)
            for start, group in zip(starts, np.split(items, starts[1:]))}


@dataclass(frozen=True)
class Catalogue:
    model_version: str
    item_ids: np.ndarray  # (I+1,) object: raw id of each item index; item_ids[PAD_INDEX] == ""
    item_index_of: Mapping[str, int] = field(repr=False)
    behavior_names: tuple[str, ...]  # behaviour index b is behavior_names[b - 1]
    behavior_index_of: Mapping[str, int] = field(repr=False)  # includes "" -> 1 when there are behaviours
    popular_items: np.ndarray = field(repr=False)  # (I,) int64 item indices, most trained-on first
    item_popularity: np.ndarray = field(repr=False)  # (I+1,) float32 training event counts
    manifest: Mapping = field(repr=False)
    # Raw attribute value of each attribute index (0 = PAD ""), and each trained item's attribute indices; None when
    # the artifact has no attributes (filters then match upserted items only).
    attribute_values: tuple[str, ...] | None = field(default=None, repr=False)
    item_attributes: np.ndarray | None = field(default=None, repr=False)  # (I+1, A) int
    # Attribute value -> the trained items carrying it (sorted indices): what filters look up, built once here
    # (at reload) so a request never walks the catalogue.
    items_with_value: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> Catalogue:
        behavior_names = tuple(artifact.behavior_names)
        behavior_index_of = {name: index for index, name in enumerate(behavior_names, start=1)}
        if behavior_names:
            behavior_index_of[UNSPECIFIED_BEHAVIOR] = 1
        popularity = np.asarray(artifact.item_popularity, dtype=np.float32)
        # Stable sort: equally popular items keep index order, so the fallback list is deterministic.
        popular_items = np.argsort(-popularity[PAD_INDEX + 1 :], kind="stable").astype(np.int64) + 1
        return cls(
            model_version=artifact.model_version,
            item_ids=np.asarray(artifact.item_ids, dtype=object),
            item_index_of=artifact.item_index_of,
            behavior_names=behavior_names,
            behavior_index_of=behavior_index_of,
            popular_items=popular_items,
            item_popularity=popularity,
            manifest=artifact.manifest,
            attribute_values=_attribute_values(artifact),
            item_attributes=artifact.item_attributes,
        )

    def __post_init__(self) -> None:
        if not self.items_with_value:
            object.__setattr__(self, "items_with_value", _items_with_value(self.attribute_values,
                                                                          self.item_attributes))

    def values_of(self, item_index: int) -> tuple[str, ...]:
        """A trained item's raw attribute values; () without attributes."""
        if self.attribute_values is None or self.item_attributes is None:
            return ()
        return tuple(self.attribute_values[code] for code in self.item_attributes[item_index] if code > 0)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def known(self, raw_item_ids: Sequence[str]) -> np.ndarray:
        """(N,) bool: which raw ids this version can encode or return."""
        return np.fromiter((raw in self.item_index_of for raw in raw_item_ids), dtype=bool, count=len(raw_item_ids))

    def item_indices(self, raw_item_ids: Sequence[str]) -> np.ndarray:
        """Item indices of the known raw ids, in order; unknown ids are dropped. (n,) int64."""
        index_of = self.item_index_of
        return np.fromiter((index_of[raw] for raw in raw_item_ids if raw in index_of), dtype=np.int64)

    def restrict(self, history: History) -> History:
        """The events whose item this version knows, in order."""
        keep = self.known(history.item_ids)
        if keep.all():
            return history
        return History(
            item_ids=tuple(compress(history.item_ids, keep)), behaviors=tuple(compress(history.behaviors, keep))
        )

    def history_indices(self, history: History) -> tuple[np.ndarray, np.ndarray]:
        """(items (n,), behaviours (n,)) int64 of the events whose item this version knows, oldest first."""
        index_of, behavior_of = self.item_index_of, self.behavior_index_of
        pairs = [
            (index_of[raw], behavior_of.get(behavior, NO_BEHAVIOR_INDEX))
            for raw, behavior in zip(history.item_ids, history.behaviors)
            if raw in index_of
        ]
        indices = np.array(pairs, dtype=np.int64).reshape(-1, 2)  # (n, 2)
        return indices[:, 0], indices[:, 1]
