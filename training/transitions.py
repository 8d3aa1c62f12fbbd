"""Item-to-item transition prior: how often item b directly followed item a in the training histories.

The encoder ranks by a user's whole sequence; shoppers also move between specific items in patterns a 64-wide
vector blurs (a refill after its device, the next size up). The prior adds `weight * log(1 + count(last → item))`
to each item's score, where `last` is the newest history item: a first-order Markov term beside the transformer,
as FPMC adds one beside matrix factorisation. Counts come from the training split only (the same events the
encoder learns from), the weight is chosen on the validation split after training, and serving applies the same
term to its candidates, adding the last item's most frequent successors to what the index returns, so a new
event changes the list at once.

Stored as CSR arrays (numpy only, so the torch-free serving processes can load it; never pickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # training.data imports training.artifact, which loads priors from this module
    from seqrank.training.data import SequenceData

INDPTR_FILE = "transitions_indptr.npy"
SUCCESSORS_FILE = "transitions_successors.npy"
COUNTS_FILE = "transitions_counts.npy"
FILES = (INDPTR_FILE, SUCCESSORS_FILE, COUNTS_FILE)


@dataclass(frozen=True)
class TransitionPrior:
    """Counts of direct successions a → b as CSR over items 0..I (row 0, PAD, stays empty).

    successors of a: successors[indptr[a]:indptr[a + 1]], most frequent first, with their counts.
    """

    indptr: np.ndarray  # (I + 2,) int64
    successors: np.ndarray  # (P,) int64 item indices
    counts: np.ndarray  # (P,) float32, > 0
    weight: float = 0.0

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 2

    def with_weight(self, weight: float) -> "TransitionPrior":
        return TransitionPrior(self.indptr, self.successors, self.counts, float(weight))

    def successors_of(self, item: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(items, weight * log1p(count)) of `item`'s successors, most frequent first, at most `limit`."""
        start, end = int(self.indptr[item]), int(self.indptr[item + 1])
        if limit is not None:
            end = min(end, start + limit)
        return self.successors[start:end], self.weight * np.log1p(self.counts[start:end])

    def boost(self, item: int, candidates: np.ndarray) -> np.ndarray:
        """(C,) float64 prior term of each candidate after `item` (0 where b never followed it)."""
        items, terms = self.successors_of(item)
        if len(items) == 0:
            return np.zeros(len(candidates), dtype=np.float64)
        order = np.argsort(items)
        items, terms = items[order], terms[order]
        position = np.minimum(np.searchsorted(items, candidates), len(items) - 1)
        return np.where(items[position] == candidates, terms[position], 0.0).astype(np.float64)

    def dense_rows(self, items: np.ndarray) -> np.ndarray:
        """(B, I + 1) float32 prior terms after each of `items`: the full-ranking evaluation's form."""
        items = np.asarray(items, dtype=np.int64)
        starts, ends = self.indptr[items], self.indptr[items + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(items)), lengths)
        positions = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        out = np.zeros((len(items), self.num_items + 1), dtype=np.float32)
        out[rows, self.successors[positions]] = self.weight * np.log1p(self.counts[positions])
        return out

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        np.save(directory / INDPTR_FILE, self.indptr)
        np.save(directory / SUCCESSORS_FILE, self.successors)
        np.save(directory / COUNTS_FILE, self.counts)


def count_transitions(data: SequenceData) -> TransitionPrior:
    """Direct successions inside each user's training events (the part before the validation and test items)."""
    from seqrank.training.data import history_bounds

    start, end = history_bounds(data, "train")
    lengths = np.maximum(end - start - 1, 0)  # pairs per user
    first = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    sources, targets = data.items[first].astype(np.int64), data.items[first + 1].astype(np.int64)
    size = data.num_items + 1
    pairs, counts = np.unique(sources * size + targets, return_counts=True)
    sources, targets = pairs // size, pairs % size
    order = np.lexsort((-counts, sources))  # by source, most frequent successor first
    sources, targets, counts = sources[order], targets[order], counts[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(sources, minlength=size))]).astype(np.int64)  # (I + 2,)
    return TransitionPrior(indptr, targets, counts.astype(np.float32))


def load_transitions(directory: str | Path, weight: float, load_array=None) -> TransitionPrior | None:
    """The prior saved in `directory` at `weight`, or None when the directory holds none."""
    directory = Path(directory)
    if not all((directory / name).exists() for name in FILES):
        return None
    load = load_array or (lambda path: np.load(path, allow_pickle=False))
    prior = TransitionPrior(load(directory / INDPTR_FILE).astype(np.int64),
                            load(directory / SUCCESSORS_FILE).astype(np.int64),
                            load(directory / COUNTS_FILE).astype(np.float32), float(weight))
    if prior.indptr[-1] != len(prior.successors) or len(prior.successors) != len(prior.counts):
        raise ValueError(f"{directory}: transition arrays disagree in length")
    return prior
