"""The versioned model artifact that training exports and serving loads; imports no torch.

An artifact directory describes itself: a manifest (version, data fingerprint, metrics, encoder config, index
parameters, sha256 of every file), encoder weights (safetensors), item vectors (float32 .npy), an hnswlib
inner-product index, and the raw item ids. Nothing in it is a pickle, and `load_artifact` verifies every
checksum before anything is used, so a truncated copy or a swapped file is refused instead of served. The manifest
itself is not signed, so the loader also confines every name it lists to the directory and checks every array's
shape and dtype against its `num_items` and `dim` (docs/artifact.md, "What the loader checks").
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from seqrank.training.transitions import COUNTS_FILE, INDPTR_FILE, SUCCESSORS_FILE, TransitionPrior, load_transitions
from seqrank.training.transitions import FILES as TRANSITION_FILES
from seqrank.training.vocab import PAD_INDEX

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.safetensors"
ITEM_VECTORS_FILE = "item_vectors.npy"
INDEX_FILE = "index.hnsw"
ITEM_IDS_FILE = "item_ids.json"
ITEM_ATTRIBUTES_FILE = "item_attributes.npy"
ITEM_POPULARITY_FILE = "item_popularity.npy"
ATTRIBUTE_VALUES_FILE = "attribute_values.json"  # raw value of each attribute index, "" at the PAD index 0
ATTRIBUTE_VECTORS_FILE = "attribute_vectors.npy"  # (towers, A + 1, tower dim) attribute embeddings: cold items
COLD_ITEMS_KEY = "cold_items"  # manifest: what training/cold_items.py needs beside the two files
SIMILARITIES = ("dot", "cosine")
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
    # Side information for items the model never trained on (training/cold_items.py); None when the model has no
    # attributes or the artifact was exported before these files existed.
    attribute_values: list[str] | None = None  # (A + 1) raw attribute values by index, "" at PAD_INDEX
    attribute_vectors: np.ndarray | None = None  # (num_towers, A + 1, tower_dim) float32 attribute embeddings
    attribute_index_of: dict[str, int] | None = field(default=None, repr=False)  # raw value -> index 1..A

    @property
    def cold_item_settings(self) -> dict | None:
        """The manifest's cold_items entry (similarity, max_attributes_per_item, num_towers, tower_dim,
        num_attributes), checked at load; None when the artifact has no attribute vocabulary."""
        return self.manifest.get(COLD_ITEMS_KEY) if self.attribute_values is not None else None

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
        """Load the hnswlib index and check it against the catalogue; `ef_search` defaults to the exported one.

        hnswlib takes the element count from the file (not `max_elements`) and the dimension from the caller
        without comparing it to the file's, so an index over another catalogue, or a plain index read as
        `norm_augmented` (one coordinate too many per vector), would load and return labels that are not this
        artifact's items, or distances over misread vectors. Hence: labels must be exactly 1..num_items, and a
        sample of stored vectors must equal the item vectors the index was built from. (An augmented index read
        as plain reads each vector's first D coordinates, the item vector itself: exact, nothing to refuse.)
        """
        import hnswlib

        params = self.index_params
        index_path = self.path / INDEX_FILE
        index = hnswlib.Index(space=params.space, dim=self.dim + int(params.norm_augmented))
        try:
            index.load_index(str(index_path), max_elements=self.num_items)
        except RuntimeError as exc:  # hnswlib: "Index seems to be corrupted or unsupported"
            raise ArtifactError(f"{index_path}: not a readable hnswlib index ({exc})") from None
        count = index.get_current_count()
        if count != self.num_items:
            raise ArtifactError(f"{index_path}: {count} elements, expected num_items = {self.num_items}")
        labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
        if not np.array_equal(labels, np.arange(PAD_INDEX + 1, self.num_items + 1)):
            raise ArtifactError(f"{index_path}: labels are not the item indices 1..{self.num_items}")
        sample = labels[np.linspace(0, len(labels) - 1, num=min(len(labels), 32), dtype=np.int64)]
        expected = self.item_vectors[sample]
        if params.norm_augmented:  # the extra coordinate depends on the largest norm over all items
            norms_sq = np.einsum("id,id->i", self.item_vectors[PAD_INDEX + 1:], self.item_vectors[PAD_INDEX + 1:],
                                 dtype=np.float64)
            extra = np.sqrt(np.maximum(norms_sq.max(initial=0.0) - norms_sq[sample - (PAD_INDEX + 1)], 0.0))
            expected = np.hstack([expected, extra[:, None].astype(np.float32)])
        if len(sample) and not np.allclose(index.get_items(sample), expected, rtol=1e-4, atol=1e-5):
            raise ArtifactError(f"{index_path}: stored vectors differ from {ITEM_VECTORS_FILE} (dim {self.dim}, "
                                f"norm_augmented {params.norm_augmented}); the index belongs to another artifact")
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
    attribute_values: list[str] | None = None,
    attribute_vectors: np.ndarray | None = None,
) -> Path:
    """Write every file into a temporary sibling directory, checksum them, then rename into place.

    The rename makes the export atomic: a serving replica pointed at `out_dir` never sees half an artifact.
    `attribute_values` and `attribute_vectors` (both or neither) add the cold-item files and the manifest's
    cold_items entry, whose similarity and max_attributes_per_item come from manifest_fields' encoder_config; they
    are checked here as `load_artifact` checks them, so an export never writes an artifact that would be refused.
    """
    out_dir = Path(out_dir)
    if len(item_ids) != item_vectors.shape[0] or item_ids[PAD_INDEX] != "":
        raise ArtifactError(f"{ITEM_IDS_FILE}: expected {item_vectors.shape[0]} ids with '' at index 0")
    if (attribute_values is None) != (attribute_vectors is None):
        raise ArtifactError(f"{ATTRIBUTE_VALUES_FILE} and {ATTRIBUTE_VECTORS_FILE}: give both or neither")
    if attribute_values is not None:
        attribute_vectors = np.ascontiguousarray(attribute_vectors, dtype=np.float32)
        encoder_config = manifest_fields.get("encoder_config", {})
        cold_items = cold_item_settings_for(encoder_config, attribute_vectors)
        check_cold_item_settings(cold_items, encoder_config, int(item_vectors.shape[1]), Path(MANIFEST_FILE))
        check_attribute_values(Path(ATTRIBUTE_VALUES_FILE), attribute_values, cold_items["num_attributes"])
        check_attribute_vectors(Path(ATTRIBUTE_VECTORS_FILE), attribute_vectors, cold_items)
        manifest_fields = {**manifest_fields, COLD_ITEMS_KEY: cold_items}
    staging = out_dir.with_name(out_dir.name + ".tmp-" + secrets.token_hex(3))
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(encoder_weights, staging / ENCODER_FILE)
        np.save(staging / ITEM_VECTORS_FILE, np.ascontiguousarray(item_vectors, dtype=np.float32))
        (staging / ITEM_IDS_FILE).write_text(json.dumps(item_ids))
        np.save(staging / ITEM_POPULARITY_FILE, np.asarray(item_popularity, dtype=np.float32))
        if item_attributes is not None:
            np.save(staging / ITEM_ATTRIBUTES_FILE, np.ascontiguousarray(item_attributes, dtype=np.int32))
        if attribute_values is not None:
            (staging / ATTRIBUTE_VALUES_FILE).write_text(json.dumps(list(attribute_values)))
            np.save(staging / ATTRIBUTE_VECTORS_FILE, attribute_vectors)
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


KIND_NAMES = {"f": "floating", "iu": "integer", "iuf": "numeric"}


def check_contained(root: Path, manifest_path: Path, key: str, name: object) -> None:
    """A name the manifest lists under `key` must be a plain file name that stays inside the artifact directory.

    The manifest is not signed (it carries the checksums), so its names are input: `../x` or `/etc/hostname`
    would make the loader read and hash files outside the artifact. A name must be one path component (no
    separators, not `.` or `..`), and must resolve inside the artifact directory, so a symlink that leaves it is
    refused too. `root` is the resolved artifact directory (which may itself be a symlink, e.g. `current -> v3`).
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ArtifactError(f"{manifest_path}: {key} entry {name!r} is not a plain file name inside the artifact "
                            f"directory")
    try:
        resolved = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ArtifactError(f"{manifest_path}: {key} entry {name!r} cannot be resolved ({exc})") from None
    if resolved == root or not resolved.is_relative_to(root):
        raise ArtifactError(f"{manifest_path}: {key} entry {name!r} resolves to {resolved}, outside the artifact "
                            f"directory {root}")


def manifest_int(manifest: dict, key: str, minimum: int, where: str) -> int:
    """An integer the manifest (or its encoder_config) must hold; JSON true/false is not one."""
    value = manifest.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ArtifactError(f"{where}: {key} {value!r} is not an integer >= {minimum}")
    return value


def check_array(path: Path, array: np.ndarray, shape: tuple, kinds: str, what: str) -> None:
    """Shape and dtype kind ("f", "iu" or "iuf") of a loaded array, or an ArtifactError naming the file."""
    if array.shape != shape:
        raise ArtifactError(f"{path}: shape {array.shape}, expected {shape} ({what})")
    if array.dtype.kind not in kinds:
        raise ArtifactError(f"{path}: dtype {array.dtype}, expected {KIND_NAMES[kinds]} ({what})")


def load_item_ids(path: Path, num_items: int) -> list[str]:
    """item_ids.json: num_items + 1 strings, "" at PAD_INDEX, the rest non-empty and unique (a raw id maps to one
    item index; a duplicate would make one of the two items unreachable)."""
    try:
        item_ids = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    return _check_vocabulary(path, item_ids, num_items, ("id", "ids", "item", "num_items"))


def load_item_attributes(path: Path, num_items: int, encoder_config: dict, manifest_path: Path) -> np.ndarray:
    """(num_items + 1, A_max) integer attribute indices in 0..num_attributes (0 pads), as the encoder was built.

    The width is max(max_attributes_per_item, 1) (the encoder's attribute table) and the values stay within the
    attribute vocabulary when encoder_config says them; an artifact whose config does not is checked for rows and
    dtype only.
    """
    attributes = load_array(path)
    where = f"{manifest_path}: encoder_config"
    width = attributes.shape[1] if attributes.ndim == 2 else -1
    if "max_attributes_per_item" in encoder_config:
        width = max(manifest_int(encoder_config, "max_attributes_per_item", 0, where), 1)
    check_array(path, attributes, (num_items + 1, width), "iu",
                "num_items + 1 rows with PAD, encoder_config max_attributes_per_item columns")
    vocabulary = None
    if "num_attributes" in encoder_config:
        vocabulary = manifest_int(encoder_config, "num_attributes", 0, where)
    low, high = (int(attributes.min()), int(attributes.max())) if attributes.size else (0, 0)
    if low < 0 or (vocabulary is not None and high > vocabulary):
        expected = "0 or more" if vocabulary is None else f"0..{vocabulary} (encoder_config num_attributes)"
        raise ArtifactError(f"{path}: values in {low}..{high}, expected {expected}; 0 pads")
    return attributes


def cold_item_settings_for(encoder_config: dict, attribute_vectors: np.ndarray) -> dict:
    """The manifest's cold_items entry for an export: the encoder's similarity and attribute slots, and the
    (towers, A + 1, tower dim) layout of `attribute_vectors`."""
    where = f"{MANIFEST_FILE}: encoder_config"
    if attribute_vectors.ndim != 3:
        raise ArtifactError(f"{ATTRIBUTE_VECTORS_FILE}: shape {attribute_vectors.shape}, expected "
                            f"(num_towers, num_attributes + 1, tower_dim)")
    num_towers, rows, tower_dim = (int(n) for n in attribute_vectors.shape)
    return {
        "similarity": encoder_config.get("similarity"),
        "max_attributes_per_item": manifest_int(encoder_config, "max_attributes_per_item", 1, where),
        "num_attributes": rows - 1,
        "num_towers": num_towers,
        "tower_dim": tower_dim,
    }


def check_cold_item_settings(settings: object, encoder_config: dict, dim: int, manifest_path: Path) -> dict:
    """The manifest's cold_items entry: its own types, num_towers * tower_dim = dim, and agreement with every
    encoder_config field that records the same thing (similarity, max_attributes_per_item, num_attributes,
    hidden_size = tower_dim, the number of towers)."""
    where = f"{manifest_path}: {COLD_ITEMS_KEY}"
    if not isinstance(settings, dict):
        raise ArtifactError(f"{where} is not a JSON object")
    if settings.get("similarity") not in SIMILARITIES:
        raise ArtifactError(f"{where}: similarity {settings.get('similarity')!r} is not one of "
                            f"{', '.join(SIMILARITIES)}")
    for key in ("max_attributes_per_item", "num_attributes", "num_towers", "tower_dim"):
        manifest_int(settings, key, 1, where)
    if settings["num_towers"] * settings["tower_dim"] != dim:
        raise ArtifactError(f"{where}: num_towers {settings['num_towers']} x tower_dim {settings['tower_dim']} "
                            f"is not the manifest's dim {dim}")
    recorded = {key: encoder_config[key] for key in ("similarity", "max_attributes_per_item", "num_attributes")
                if key in encoder_config}
    if "hidden_size" in encoder_config:
        recorded["tower_dim"] = encoder_config["hidden_size"]
    if "towers" in encoder_config:
        recorded["num_towers"] = len(encoder_config["towers"] or ()) or 1
    for key, value in recorded.items():
        if settings[key] != value:
            raise ArtifactError(f"{where}: {key} {settings[key]!r}, encoder_config says {value!r}")
    return settings


def check_attribute_values(path: Path, values: object, num_attributes: int) -> list[str]:
    """attribute_values.json's list: num_attributes + 1 strings, "" at the PAD index 0, the rest non-empty and
    unique (a raw value must name one attribute index)."""
    return _check_vocabulary(path, values, num_attributes, ("value", "values", "attribute", "num_attributes"))


def _check_vocabulary(path: Path, names: object, count: int, words: tuple[str, str, str, str]) -> list[str]:
    """A list of count + 1 strings, "" at PAD_INDEX, the rest non-empty and unique: item_ids.json and
    attribute_values.json. `words`: (one, many, index kind, size name) for the messages."""
    one, many, kind, size = words
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ArtifactError(f"{path}: expected a JSON list of strings")
    if len(names) != count + 1:
        raise ArtifactError(f"{path}: {len(names)} {many}, expected {size} + 1 = {count + 1} (PAD first)")
    if names[PAD_INDEX] != "":
        raise ArtifactError(f"{path}: {one} {names[PAD_INDEX]!r} at the PAD index {PAD_INDEX}, expected ''")
    real = names[PAD_INDEX + 1:]
    if "" in real:
        raise ArtifactError(f"{path}: empty {one} at {kind} index {real.index('') + PAD_INDEX + 1}")
    if len(set(real)) != len(real):
        duplicate = next(name for name, times in Counter(real).items() if times > 1)
        raise ArtifactError(f"{path}: {one} {duplicate!r} appears more than once")
    return names


def check_attribute_vectors(path: Path, vectors: np.ndarray, settings: dict) -> np.ndarray:
    """attribute_vectors.npy: (num_towers, num_attributes + 1, tower_dim) float32, all finite."""
    shape = (settings["num_towers"], settings["num_attributes"] + 1, settings["tower_dim"])
    check_array(path, vectors, shape, "f", "cold_items num_towers, num_attributes + 1, tower_dim")
    if vectors.dtype != np.float32:
        raise ArtifactError(f"{path}: dtype {vectors.dtype}, expected float32")
    if not np.isfinite(vectors).all():
        raise ArtifactError(f"{path}: contains NaN or infinite values")
    return vectors


def load_cold_item_files(path: Path, manifest: dict, files: dict, encoder_config: dict, dim: int,
                         item_attributes: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    """attribute_values.json and attribute_vectors.npy, checked against the manifest's cold_items entry and
    each other (and the item attributes, whose indices they name)."""
    manifest_path = path / MANIFEST_FILE
    for name in (ATTRIBUTE_VALUES_FILE, ATTRIBUTE_VECTORS_FILE):
        if name not in files:
            raise ArtifactError(f"{path / name}: not listed in the manifest; incomplete artifact")
    if COLD_ITEMS_KEY not in manifest:
        raise ArtifactError(f"{manifest_path}: {COLD_ITEMS_KEY} missing beside {ATTRIBUTE_VALUES_FILE} and "
                            f"{ATTRIBUTE_VECTORS_FILE}")
    settings = check_cold_item_settings(manifest[COLD_ITEMS_KEY], encoder_config, dim, manifest_path)
    values_path = path / ATTRIBUTE_VALUES_FILE
    try:
        values = json.loads(values_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{values_path}: not valid JSON ({exc})") from None
    values = check_attribute_values(values_path, values, settings["num_attributes"])
    vectors = check_attribute_vectors(path / ATTRIBUTE_VECTORS_FILE, load_array(path / ATTRIBUTE_VECTORS_FILE),
                                      settings)
    if item_attributes is not None:
        width = max(settings["max_attributes_per_item"], 1)
        if item_attributes.shape[1] != width or (item_attributes.size and item_attributes.max() > len(values) - 1):
            raise ArtifactError(f"{path / ITEM_ATTRIBUTES_FILE}: shape {item_attributes.shape} with values up to "
                                f"{int(item_attributes.max(initial=0))}, expected {width} columns and values "
                                f"0..{len(values) - 1} ({COLD_ITEMS_KEY} in the manifest)")
    return values, vectors


def load_artifact_transitions(path: Path, manifest: dict, num_items: int) -> TransitionPrior:
    """The transition prior's CSR arrays, checked so that every lookup stays inside the catalogue.

    indptr (num_items + 2,) integer, 0 first, non-decreasing, ending at the number of pairs; successors (P,)
    integer item indices 1..num_items (serving writes them into (num_items + 1)-wide rows); counts (P,) finite
    and > 0 (log1p of a negative count is NaN). The dtypes are checked before `load_transitions` casts them, so a
    float array is refused rather than truncated.
    """
    settings = manifest["transitions"]
    weight = settings.get("weight") if isinstance(settings, dict) else None
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not np.isfinite(weight) or weight < 0:
        raise ArtifactError(f"{path / MANIFEST_FILE}: transitions weight {weight!r} is not a finite number >= 0")
    kinds = {INDPTR_FILE: "iu", SUCCESSORS_FILE: "iu", COUNTS_FILE: "iuf"}

    def load_checked(file_path: Path) -> np.ndarray:
        array = load_array(file_path)
        if array.ndim != 1 or array.dtype.kind not in kinds[file_path.name]:
            raise ArtifactError(f"{file_path}: shape {array.shape} dtype {array.dtype}, expected a 1-d "
                                f"{KIND_NAMES[kinds[file_path.name]]} array")
        return array

    try:
        prior = load_transitions(path, weight, load_checked)
    except ArtifactError:
        raise
    except ValueError as exc:  # load_transitions: "transition arrays disagree in length"
        raise ArtifactError(str(exc)) from None
    if prior is None:  # every file was listed and verified above; unreachable unless removed meanwhile
        raise ArtifactError(f"{path}: transition prior files missing")
    if prior.indptr.shape != (num_items + 2,):
        raise ArtifactError(f"{path / INDPTR_FILE}: shape {prior.indptr.shape}, expected ({num_items + 2},) "
                            f"(num_items + 2)")
    pairs = len(prior.successors)
    if prior.indptr[0] != 0 or np.any(np.diff(prior.indptr) < 0) or prior.indptr[-1] != pairs:
        raise ArtifactError(f"{path / INDPTR_FILE}: not a CSR row pointer (0 first, non-decreasing, {pairs} last)")
    if pairs and (prior.successors.min() < PAD_INDEX + 1 or prior.successors.max() > num_items):
        raise ArtifactError(f"{path / SUCCESSORS_FILE}: item indices {prior.successors.min()}.."
                            f"{prior.successors.max()}, expected 1..{num_items}")
    if pairs and not (np.isfinite(prior.counts).all() and prior.counts.min() > 0):
        raise ArtifactError(f"{path / COUNTS_FILE}: counts must be finite and > 0")
    if "pairs" in settings and settings["pairs"] != pairs:
        raise ArtifactError(f"{path / MANIFEST_FILE}: transitions pairs {settings['pairs']!r}, the arrays hold {pairs}")
    return prior


def load_artifact(path: str | Path) -> Artifact:
    """Verify every file name and checksum, then load and check every array's shape and dtype against the manifest.

    Raises ArtifactError naming the first bad file: the manifest names only plain files inside the directory, and
    nothing that serving indexes with an item index (vectors, ids, popularity, attributes, the transition prior)
    can be shorter or longer than the catalogue, so a bad artifact is refused at load, not at some later request.
    """
    path = Path(path)
    root = path.resolve()
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; not a seqrank artifact directory")
    check_contained(root, manifest_path, "manifest", MANIFEST_FILE)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{manifest_path}: files is not a JSON object of file name -> sha256")
    for name in files:
        check_contained(root, manifest_path, "files", name)  # every name before any file is read
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactError(f"{path / name}: not listed in the manifest; incomplete artifact")
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise ArtifactError(f"{file_path}: missing; incomplete artifact")
        if sha256_file(file_path) != expected:
            raise ArtifactError(f"{file_path}: sha256 mismatch; the artifact is corrupted")
    num_items = manifest_int(manifest, "num_items", 0, str(manifest_path))
    dim = manifest_int(manifest, "dim", 1, str(manifest_path))
    encoder_config = manifest.get("encoder_config", {})
    if not isinstance(encoder_config, dict):
        raise ArtifactError(f"{manifest_path}: encoder_config is not a JSON object")
    if encoder_config.get("num_items", num_items) != num_items:
        raise ArtifactError(f"{manifest_path}: encoder_config num_items {encoder_config['num_items']!r}, "
                            f"the manifest's num_items {num_items}")

    item_vectors = load_array(path / ITEM_VECTORS_FILE)
    check_array(path / ITEM_VECTORS_FILE, item_vectors, (num_items + 1, dim), "f", "num_items + 1, dim")
    if item_vectors.dtype != np.float32:  # what the index was built from and what serving scores with
        raise ArtifactError(f"{path / ITEM_VECTORS_FILE}: dtype {item_vectors.dtype}, expected float32")
    if not np.isfinite(item_vectors).all():
        raise ArtifactError(f"{path / ITEM_VECTORS_FILE}: contains NaN or infinite values")
    item_ids = load_item_ids(path / ITEM_IDS_FILE, num_items)
    popularity = load_array(path / ITEM_POPULARITY_FILE)
    check_array(path / ITEM_POPULARITY_FILE, popularity, (num_items + 1,), "iuf", "num_items + 1")
    if not (np.isfinite(popularity).all() and (popularity >= 0).all()):
        raise ArtifactError(f"{path / ITEM_POPULARITY_FILE}: counts must be finite and >= 0")
    attributes = None
    if ITEM_ATTRIBUTES_FILE in files:
        attributes = load_item_attributes(path / ITEM_ATTRIBUTES_FILE, num_items, encoder_config, manifest_path)
    transitions = None
    if "transitions" in manifest:
        for name in TRANSITION_FILES:
            if name not in files:
                raise ArtifactError(f"{path / name}: not listed in the manifest; incomplete artifact")
        transitions = load_artifact_transitions(path, manifest, num_items)
    attribute_values = attribute_vectors = None
    if ATTRIBUTE_VALUES_FILE in files or ATTRIBUTE_VECTORS_FILE in files or COLD_ITEMS_KEY in manifest:
        attribute_values, attribute_vectors = load_cold_item_files(path, manifest, files, encoder_config, dim,
                                                                   attributes)
    return Artifact(
        path=path,
        manifest=manifest,
        item_vectors=item_vectors,
        item_ids=item_ids,
        item_index_of={raw: index for index, raw in enumerate(item_ids) if index != PAD_INDEX},
        item_attributes=attributes,
        item_popularity=popularity,
        transitions=transitions,
        attribute_values=attribute_values,
        attribute_vectors=attribute_vectors,
        attribute_index_of=None if attribute_values is None else
        {value: index for index, value in enumerate(attribute_values) if index != PAD_INDEX},
    )
