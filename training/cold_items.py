"""Vectors for items the model never trained on, from their raw attribute values; numpy only, no torch.

The model's item vector (training/model.py, `SequenceEncoder.item_vectors`) is, per tower,

    v = e_id + (sum of W[a] over the item's real attributes a  +  (S - k) * W[0]) / max(k, 1)

with W the tower's attribute table (row 0 the PAD row, drawn at init and never trained), S the attribute slots per
item (max(max_attributes_per_item, 1)) and k the item's number of real attributes; under cosine similarity v is
L2-normalised (eps 1e-12, as torch's `normalize`), and an ensemble concatenates its towers' vectors. A new item has
no trained id row, so e_id = 0 and everything else comes from the artifact: `attribute_values.json` maps raw values
to indices, `attribute_vectors.npy` holds W per tower, the manifest's cold_items entry gives S and the similarity.

Per item, the raw values are read in order: values the vocabulary does not know (including "") are reported in
`unknown` and ignored; repeats are dropped (the first kept, as training's `load_attributes` does); of the known
values the first S are used and any beyond are dropped (training never saw an item with more than S). An item
with no known value gets the *average item* instead, not the formula (which would give S * W[0], the untrained PAD
row alone): the mean of the catalogue's item vectors (items 1..I, id embeddings included), normalised per tower
under cosine similarity; `average` flags those items so the caller can report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seqrank.training.artifact import Artifact
from seqrank.training.vocab import PAD_INDEX

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default


class ColdItemError(ValueError):
    """The artifact cannot place new items (no attribute vocabulary), or the request is malformed."""


@dataclass(frozen=True, eq=False)
class ColdItems:
    """`cold_item_vectors`' answer, one row or entry per requested item, in request order."""

    vectors: np.ndarray  # (N, D) float32, D = artifact.dim: comparable with artifact.item_vectors
    unknown: list[list[str]]  # per item, values not in the vocabulary (each once, in request order); ignored
    used: list[list[str]]  # per item, the known values that made its vector (at most max_attributes_per_item)
    dropped: list[list[str]]  # per item, known values beyond max_attributes_per_item; ignored
    average: np.ndarray  # (N,) bool: no known value, so the vector is the average item's


def _has_attribute_model(artifact: Artifact) -> bool:
    """Whether the model behind `artifact` pooled attributes at all (old artifacts lack the cold-item files)."""
    config = artifact.encoder_config if isinstance(artifact.manifest.get("encoder_config"), dict) else {}
    return bool(config.get("num_attributes", 0)) or artifact.item_attributes is not None


def _require_vocabulary(artifact: Artifact) -> None:
    if artifact.attribute_values is None and _has_attribute_model(artifact):
        raise ColdItemError(f"{artifact.path}: the model has attributes but the artifact holds no "
                            f"attribute_values.json / attribute_vectors.npy (exported before they existed); "
                            f"export the run again")


def _tower_layout(artifact: Artifact) -> tuple[int, str]:
    """(number of towers, similarity) of the artifact's model."""
    settings = artifact.cold_item_settings
    if settings is not None:
        return settings["num_towers"], settings["similarity"]
    config = artifact.manifest.get("encoder_config")
    config = config if isinstance(config, dict) else {}
    towers = len(config.get("towers") or ()) or 1
    if artifact.dim % towers:
        raise ColdItemError(f"{artifact.path}: dim {artifact.dim} does not split into {towers} towers")
    return towers, config.get("similarity", "dot")


def _normalize_towers(vectors: np.ndarray, num_towers: int) -> np.ndarray:
    """(N, T * d) float64 → the same with each tower's d-slice L2-normalised, as torch's normalize does."""
    split = vectors.reshape(len(vectors), num_towers, -1)
    norms = np.sqrt(np.einsum("ntd,ntd->nt", split, split))[..., None]
    return (split / np.maximum(norms, NORMALIZE_EPS)).reshape(vectors.shape)


def average_item_vector(artifact: Artifact) -> np.ndarray:
    """(D,) float32: the mean of the catalogue's item vectors (1..I), normalised per tower under cosine similarity:
    what an item with no known attribute gets. Zeros for an empty catalogue."""
    num_towers, similarity = _tower_layout(artifact)
    items = artifact.item_vectors[PAD_INDEX + 1:]
    mean = items.mean(axis=0, dtype=np.float64) if len(items) else np.zeros(artifact.dim, dtype=np.float64)
    if similarity == "cosine":
        mean = _normalize_towers(mean[None, :], num_towers)[0]
    return mean.astype(np.float32)


def _split_values(values: Sequence[str], index_of: dict[str, int], slots: int, row: int):
    """One item's raw values → (indices used, used, unknown, dropped)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ColdItemError(f"item {row}: attributes must be a list of strings, got {type(values).__name__}")
    used, unknown, dropped, seen = [], [], [], set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ColdItemError(f"item {row}: attribute value {value!r} is not a string")
        value = str(value)  # integers name the same value as in training's attributes file
        if value in seen:
            continue
        seen.add(value)
        if value not in index_of:
            unknown.append(value)
        elif len(used) < slots:
            used.append(value)
        else:
            dropped.append(value)
    return [index_of[value] for value in used], used, unknown, dropped


def cold_item_vectors(artifact: Artifact, attribute_lists: Sequence[Sequence[str]], *,
                      average_vector: np.ndarray | None = None) -> ColdItems:
    """Vectors for new items from their raw attribute values: the model's item vector with a zero id embedding.

    `attribute_lists[n]` is item n's raw values. See the module docstring for how unknown, repeated and surplus
    values are treated and what an item with no known value gets. An artifact whose model has no attributes knows
    no value, so every item gets the average item; one whose model has attributes but that lacks the cold-item
    files (exported before they existed) is a ColdItemError. `average_vector` is `average_item_vector(artifact)`
    computed once by the caller (it reads the whole catalogue); computed here when needed and not given.
    """
    _require_vocabulary(artifact)
    if isinstance(attribute_lists, (str, bytes)) or not isinstance(attribute_lists, Sequence):
        raise ColdItemError(f"attribute_lists must be a list of lists, got {type(attribute_lists).__name__}")
    if average_vector is not None and np.shape(average_vector) != (artifact.dim,):
        raise ColdItemError(f"average_vector: shape {np.shape(average_vector)}, expected ({artifact.dim},)")
    index_of = artifact.attribute_index_of or {}
    settings = artifact.cold_item_settings
    slots = max(settings["max_attributes_per_item"], 1) if settings is not None else 1
    parts = [_split_values(values, index_of, slots, row) for row, values in enumerate(attribute_lists)]
    count = len(parts)
    num_towers, similarity = _tower_layout(artifact)
    known = np.array([len(indices) for indices, *_ in parts], dtype=np.int64)  # k per item
    average = known == 0
    vectors = np.zeros((count, artifact.dim), dtype=np.float64)
    if settings is not None and (~average).any():
        rows = np.flatnonzero(~average)
        indices = np.zeros((len(rows), slots), dtype=np.int64)  # PAD_INDEX in the empty slots
        for out, row in enumerate(rows):
            indices[out, : known[row]] = parts[row][0]
        real = indices != PAD_INDEX  # (n, S)
        k = known[rows][:, None].astype(np.float64)  # (n, 1)
        towers = []
        for table in artifact.attribute_vectors:  # (A + 1, d) per tower
            gathered = table[indices].astype(np.float64)  # (n, S, d)
            total = (gathered * real[..., None]).sum(axis=1)  # the real attributes
            total += (slots - k) * table[PAD_INDEX].astype(np.float64)  # empty slots: the untrained PAD row
            towers.append(total / np.maximum(k, 1.0))  # + the id embedding, 0 for a new item
        tower_vectors = np.concatenate(towers, axis=1)
        if similarity == "cosine":
            tower_vectors = _normalize_towers(tower_vectors, num_towers)
        vectors[rows] = tower_vectors
    if average.any():
        vectors[average] = average_item_vector(artifact) if average_vector is None else average_vector
    return ColdItems(
        vectors=vectors.astype(np.float32),
        unknown=[part[2] for part in parts],
        used=[part[1] for part in parts],
        dropped=[part[3] for part in parts],
        average=average,
    )


def placed_item_vectors(artifact: Artifact, attribute_lists: Sequence[Sequence[str]]) -> ColdItems:
    """What serving places a new item at: `cold_item_vectors`' direction, and under dot-product similarity the
    length of the trained items that carry its values.

    Without an id embedding the model's formula is systematically short (on Amazon Beauty's committed recipe the
    cold vectors averaged 0.72 in length against 1.53 for trained items), and under inner-product retrieval a short
    vector is never in anyone's top 10: 0 of 2,346 held-out new items there (docs/benchmarks/catalogue.md "New
    items"). The length of a trained item is what its events taught the model about how often to show it, so a new
    item borrows the mean length of the trained items sharing its attribute values (each (value, item) pair
    counted once), all trained items when none does. Cosine similarity normalises lengths away: unchanged there,
    as are the average-item vectors.
    """
    placed = cold_item_vectors(artifact, attribute_lists)
    _, similarity = _tower_layout(artifact)
    rows = np.flatnonzero(~placed.average)
    if similarity == "cosine" or not len(rows) or artifact.item_attributes is None:
        return placed
    trained = artifact.item_vectors[1:].astype(np.float64)
    lengths = np.linalg.norm(trained, axis=1)  # (I,)
    codes = artifact.item_attributes[1:]  # (I, S), 0 = empty slot
    size = len(artifact.attribute_values or ()) + 1
    carriers = np.bincount(codes.ravel(), minlength=size).astype(np.float64)
    total = np.bincount(codes.ravel(), weights=np.repeat(lengths, codes.shape[1]), minlength=size)
    index_of = artifact.attribute_index_of or {}
    vectors = placed.vectors.astype(np.float64)
    for row in rows:
        values = [index_of[value] for value in placed.used[row]]
        count = carriers[values].sum()
        target = total[values].sum() / count if count else lengths.mean()
        norm = np.linalg.norm(vectors[row])
        if norm > 0:
            vectors[row] *= target / norm
    return ColdItems(vectors=vectors.astype(np.float32), unknown=placed.unknown, used=placed.used,
                     dropped=placed.dropped, average=placed.average)


def attributes_of_items(artifact: Artifact, item_indices: Sequence[int] | np.ndarray) -> list[list[str]]:
    """The raw attribute values of trained items (internal indices 1..I; the PAD index 0 has none), in slot order.

    [] for every item when the model has no attributes; a ColdItemError when it has them but the artifact lacks
    attribute_values.json, or when an index is outside 0..num_items.
    """
    _require_vocabulary(artifact)
    indices = np.asarray(item_indices)
    if indices.size and (indices.ndim != 1 or indices.dtype.kind not in "iu"):
        raise ColdItemError(f"item_indices must be a 1-d sequence of integers, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() > artifact.num_items):
        raise ColdItemError(f"item indices {int(indices.min())}..{int(indices.max())} outside "
                            f"0..{artifact.num_items}")
    if artifact.attribute_values is None or artifact.item_attributes is None:
        return [[] for _ in indices]
    values = artifact.attribute_values
    return [[values[a] for a in artifact.item_attributes[index] if a != PAD_INDEX] for index in indices]
