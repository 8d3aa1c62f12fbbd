"""The versioned model artifact that training exports and serving loads; imports no torch.

An artifact directory describes itself: a manifest (version, data fingerprint, metrics, encoder config, index
parameters, sha256 of every file), encoder weights (safetensors), item vectors (float32 .npy), an hnswlib
inner-product index, and the raw item ids. Nothing in it is a pickle, and `load_artifact` verifies every
checksum before anything is used, so a truncated copy or a swapped file is refused instead of served.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from seqrank.training.transitions import FILES as TRANSITION_FILES
from seqrank.training.transitions import TransitionPrior, load_transitions
from seqrank.training.vocab import PAD_INDEX

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.safetensors"
ITEM_VECTORS_FILE = "item_vectors.npy"
INDEX_FILE = "index.hnsw"
ITEM_IDS_FILE = "item_ids.json"
ITEM_ATTRIBUTES_FILE = "item_attributes.npy"
ITEM_POPULARITY_FILE = "item_popularity.npy"
REQUIRED_FILES = (ENCODER_FILE, ITEM_VECTORS_FILE, INDEX_FILE, ITEM_IDS_FILE, ITEM_POPULARITY_FILE)


class ArtifactError(ValueError):
    """A missing, corrupted or inconsistent artifact; the message names the file."""


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters; `ef_search` is the default query-time beam, serving may raise it.

    `norm_augmented`: items are indexed with sqrt(max|x|^2 - |x|^2) appended and queries with a 0, so inner
    products (and their ranking) are unchanged while the graph is built over equal-norm vectors; see
    `augment_items`; it needs a wider beam for the same recall@10 but keeps gaining recall@100 where the plain
    index levels off (docs/benchmarks/retrieval.md, "HNSW against exact inner-product search"). `seqrank export --norm-augment` sets it.
    """

    space: str = "ip"
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 200
    norm_augmented: bool = False  # also what manifests written before the field existed mean


def augment_items(vectors: np.ndarray) -> np.ndarray:
    """(I, D) -> (I, D+1) float32: each row with sqrt(max_norm^2 - |x|^2) appended, so all rows share one norm.

    With a 0 appended to each query (`augment_queries`), <q', x'> = <q, x>. An inner-product graph over raw
    vectors lets a few long vectors look close to everything, and HNSW recall@100 levels off below 0.99 however
    wide the beam; over equal norms it is a cosine graph (Bachrach et al., RecSys 2014, "Speeding up the Xbox
    recommender system using a Euclidean transformation for inner-product spaces"). Measured: docs/benchmarks/retrieval.md,
    "Scale out".
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    norms_sq = np.einsum("id,id->i", vectors, vectors, dtype=np.float64)
    extra = np.sqrt(np.maximum(norms_sq.max(initial=0.0) - norms_sq, 0.0)).astype(np.float32)
    return np.hstack([vectors, extra[:, None]])


def augment_queries(vectors: np.ndarray) -> np.ndarray:
    """(B, D) -> (B, D+1) float32 with a 0 appended: the query side of `augment_items`."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    return np.hstack([vectors, np.zeros((len(vectors), 1), dtype=np.float32)])


class ItemIndex:
    """An hnswlib "ip" index over items, queried with plain user vectors whether or not it is norm-augmented.

    knn_query returns hnswlib's (labels, distances) with distance = 1 - <user vector, item vector>.
    """

    def __init__(self, index, norm_augmented: bool) -> None:
        self.index = index  # hnswlib.Index; read-only once built (queries may run concurrently)
        self.norm_augmented = norm_augmented

    def knn_query(self, vectors: np.ndarray, k: int):
        if self.norm_augmented:
            vectors = augment_queries(vectors)
        return self.index.knn_query(vectors, k=k)

    def set_ef(self, ef: int) -> None:
        self.index.set_ef(ef)

    def set_num_threads(self, num_threads: int) -> None:
        self.index.set_num_threads(num_threads)

    def save_index(self, path: str) -> None:
        self.index.save_index(path)


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    item_vectors: np.ndarray  # (num_items + 1, D) float32, row PAD_INDEX is zeros
    item_ids: list[str]  # raw item id of each internal index; item_ids[PAD_INDEX] == ""
    item_index_of: dict[str, int] = field(repr=False)
    item_attributes: np.ndarray | None  # (num_items + 1, A_max) int32 or None
    item_popularity: np.ndarray  # (num_items + 1,) float32 training event counts: the cold-start fallback
    transitions: TransitionPrior | None = None  # the item-to-item prior at its chosen weight; None = none

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def encoder_config(self) -> dict:
        return self.manifest["encoder_config"]

    @property
    def encoder_weights_path(self) -> Path:
        return self.path / ENCODER_FILE

    @property
    def index_params(self) -> IndexParams:
        return IndexParams(**self.manifest["index"])

    @property
    def behavior_names(self) -> list[str]:
        return list(self.manifest.get("behavior_names", []))

    def load_index(self, ef_search: int | None = None) -> ItemIndex:
        """Load the hnswlib index; `ef_search` defaults to the exported one."""
        import hnswlib

        params = self.index_params
        index = hnswlib.Index(space=params.space, dim=self.dim + int(params.norm_augmented))
        index.load_index(str(self.path / INDEX_FILE), max_elements=self.num_items)
        index.set_ef(max(ef_search or params.ef_search, 1))
        return ItemIndex(index, params.norm_augmented)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_model_version(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{secrets.token_hex(4)}"


def build_hnsw_index(item_vectors: np.ndarray, params: IndexParams, num_threads: int = 1,
                     items: np.ndarray | None = None) -> ItemIndex:
    """An inner-product hnswlib index over `items` (default all, 1..I; labels = internal item indices)."""
    import hnswlib

    if items is None:
        items = np.arange(PAD_INDEX + 1, item_vectors.shape[0], dtype=np.int64)
    vectors = item_vectors[items]  # (n, D)
    if params.norm_augmented:
        vectors = augment_items(vectors)  # (n, D+1)
    index = hnswlib.Index(space=params.space, dim=vectors.shape[1])
    index.init_index(max_elements=max(len(items), 1), M=params.M, ef_construction=params.ef_construction,
                     random_seed=0)
    index.set_num_threads(num_threads)
    index.add_items(vectors, items)
    index.set_ef(params.ef_search)
    return ItemIndex(index, params.norm_augmented)


def write_artifact(
    out_dir: str | Path,
    *,
    encoder_weights: Path,
    item_vectors: np.ndarray,
    item_ids: list[str],
    item_attributes: np.ndarray | None,
    item_popularity: np.ndarray,
    index_params: IndexParams,
    manifest_fields: dict,
    transitions: TransitionPrior | None = None,
) -> Path:
    """Write every file into a temporary sibling directory, checksum them, then rename into place.

    The rename makes the export atomic: a serving replica pointed at `out_dir` never sees half an artifact.
    """
    out_dir = Path(out_dir)
    if len(item_ids) != item_vectors.shape[0] or item_ids[PAD_INDEX] != "":
        raise ArtifactError(f"{ITEM_IDS_FILE}: expected {item_vectors.shape[0]} ids with '' at index 0")
    staging = out_dir.with_name(out_dir.name + ".tmp-" + secrets.token_hex(3))
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(encoder_weights, staging / ENCODER_FILE)
        np.save(staging / ITEM_VECTORS_FILE, np.ascontiguousarray(item_vectors, dtype=np.float32))
        (staging / ITEM_IDS_FILE).write_text(json.dumps(item_ids))
        np.save(staging / ITEM_POPULARITY_FILE, np.asarray(item_popularity, dtype=np.float32))
        if item_attributes is not None:
            np.save(staging / ITEM_ATTRIBUTES_FILE, np.ascontiguousarray(item_attributes, dtype=np.int32))
        build_hnsw_index(item_vectors, index_params, num_threads=os.cpu_count() or 1).save_index(
            str(staging / INDEX_FILE)
        )
        if transitions is not None and transitions.weight > 0:
            if transitions.num_items != len(item_ids) - 1:
                raise ArtifactError(f"transitions: {transitions.num_items} items, the catalogue has {len(item_ids) - 1}")
            transitions.save(staging)
            manifest_fields = {**manifest_fields, "transitions": {"weight": transitions.weight,
                                                                   "pairs": int(len(transitions.successors))}}
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest_fields,
            "num_items": len(item_ids) - 1,
            "dim": int(item_vectors.shape[1]),
            "index": index_params.__dict__,
            "files": files,
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_array(path: Path) -> np.ndarray:
    """A numeric .npy; never unpickles: an object array (a pickle inside .npy) is an ArtifactError naming the file."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False", or a bad header
        raise ArtifactError(f"{path}: not a plain numeric .npy array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise ArtifactError(f"{path}: dtype {array.dtype} is not numeric")
    return array


def load_artifact(path: str | Path) -> Artifact:
    """Verify every checksum, then load; raises ArtifactError naming the first bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; not a seqrank artifact directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files", {})
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{path / name}: not listed in the manifest; incomplete artifact")
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise ArtifactError(f"{file_path}: missing; incomplete artifact")
        if sha256_file(file_path) != expected:
            raise ArtifactError(f"{file_path}: sha256 mismatch; the artifact is corrupted")
    item_vectors = load_array(path / ITEM_VECTORS_FILE)
    item_ids = json.loads((path / ITEM_IDS_FILE).read_text())
    if item_vectors.shape != (manifest["num_items"] + 1, manifest["dim"]) or len(item_ids) != manifest["num_items"] + 1:
        raise ArtifactError(f"{path / ITEM_VECTORS_FILE}: shape {item_vectors.shape} disagrees with the manifest")
    attributes = None
    if ITEM_ATTRIBUTES_FILE in files:
        attributes = load_array(path / ITEM_ATTRIBUTES_FILE)
    transitions = None
    if "transitions" in manifest:
        for name in TRANSITION_FILES:
            if name not in files:
                raise ArtifactError(f"{path / name}: not listed in the manifest; incomplete artifact")
        try:
            transitions = load_transitions(path, manifest["transitions"]["weight"], load_array)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        if transitions.num_items != manifest["num_items"]:
            raise ArtifactError(f"{path}: the transition prior covers {transitions.num_items} items, "
                                f"the manifest {manifest['num_items']}")
    return Artifact(
        path=path,
        manifest=manifest,
        item_vectors=item_vectors,
        item_ids=item_ids,
        item_index_of={raw: index for index, raw in enumerate(item_ids) if index != PAD_INDEX},
        item_attributes=attributes,
        item_popularity=load_array(path / ITEM_POPULARITY_FILE),
        transitions=transitions,
    )
