"""Warm start: a run that continues from an earlier model (a run directory or an artifact) on newer data.

Everything is matched by name, never by position, because the newer data indexes its items, behaviours and
attribute values in its own order (first appearance):
  - item rows by raw item id. Items of the parent absent from the newer data stay in the vocabulary, appended
    after the data's own items with their trained rows, so ids the service already answers with (and histories
    naming them) keep working; the catalogue only grows. To drop items, train from scratch.
  - new items start where serving places an item it never trained on (training/cold_items.py
    `placed_item_vectors`: attribute pooling, stretched to the length of trained items sharing its values) when
    the model has attributes; otherwise they keep the standard initialisation.
  - behaviour rows by behaviour name (names the parent knew but the newer data lacks are kept), attribute rows by
    raw attribute value (the PAD row too: item vectors add it per empty slot), each tower of an ensemble alike.
  - every other weight is copied exactly; the architecture must be the parent's. The optimiser starts afresh.
So before its first step a warm-started model scores the items it shares with its parent exactly as the parent
did. The run records its parent (path, kind, weights sha256, model version when an artifact) in parent.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from seqrank.training import run_dir as run_files
from seqrank.training.artifact import (
    COLD_ITEMS_KEY,
    MANIFEST_FILE,
    Artifact,
    cold_item_settings_for,
    load_artifact,
    sha256_file,
)
from seqrank.training.cold_items import placed_item_vectors
from seqrank.training.config import Architecture
from seqrank.training.data import SequenceData, attribute_vocabulary, load_attributes
from seqrank.training.export import run_attribute_values, tower_attribute_vectors
from seqrank.training.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EncoderConfig,
    EncoderEnsemble,
    SequenceEncoder,
    load_encoder,
    load_encoder_dir,
)
from seqrank.training.vocab import PAD_INDEX

PARENT_FILE = run_files.PARENT_FILE
ITEM_TABLE, BEHAVIOR_TABLE, ATTRIBUTE_TABLE = "item_embedding.weight", "behavior_embedding.weight", \
    "attribute_embedding.weight"
ATTRIBUTE_BUFFER = "item_attributes"  # the child's own attribute matrix, never copied


class WarmStartError(ValueError):
    """A parent the newer run cannot continue from; the message names what differs."""


@dataclass(frozen=True, eq=False)
class ParentModel:
    """The model a run continues from, with the names of its rows."""

    path: Path
    kind: str  # "run" | "artifact"
    model: SequenceEncoder | EncoderEnsemble  # eval mode, CPU
    item_ids: list[str]  # raw id per item index, "" at PAD_INDEX
    behavior_names: list[str]  # behaviour index b is behavior_names[b - 1]
    attribute_values: list[str] | None  # raw value per attribute index, "" at PAD; None = no attributes
    weights_sha256: str
    model_version: str  # the artifact's; "" for a run directory (versions are given at export)

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    def record(self) -> dict:
        """parent.json: what a run continued from."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "weights_sha256": self.weights_sha256,
                "model_version": self.model_version, "num_items": len(self.item_ids) - 1}


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def load_parent(path: str | Path, attributes_path: str = "") -> ParentModel:
    """A run directory or an artifact. A run's attribute indices are named from `attributes_path` (the newer
    run's file; it must still give the parent's items their values) or else the run's own data.attributes."""
    path = Path(path)
    if is_artifact(path):
        artifact = load_artifact(path)
        model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path)
        return ParentModel(path, "artifact", model, list(artifact.item_ids), artifact.behavior_names,
                           artifact.attribute_values if model.config.num_attributes else None,
                           artifact.manifest["files"][artifact.encoder_weights_path.name], artifact.model_version)
    if not (path / CONFIG_FILE).is_file():
        raise WarmStartError(f"init_from: {path} is neither a run directory ({CONFIG_FILE}) nor an artifact "
                             f"({MANIFEST_FILE})")
    model = load_encoder_dir(path)
    values = None
    if model.config.num_attributes:
        matrix = model.item_attributes[: model.config.num_items + 1].numpy()
        values = run_attribute_values(path, matrix, attributes_path or None)
    return ParentModel(path, "run", model, run_files.read_item_ids(path), run_files.read_data_info(path).behavior_names,
                       values, sha256_file(path / WEIGHTS_FILE), "")


# ------------------------------------------------------------------------------------------- the vocabulary


def _extension_fingerprint(data_fingerprint: str, items: list[str], behaviors: list[str], slots: int) -> str:
    text = json.dumps({"data": data_fingerprint, "items": items, "behaviors": behaviors, "slots": slots})
    return hashlib.sha256(text.encode()).hexdigest()


def extend_vocabulary(data: SequenceData, item_ids: list[str], behavior_names: list[str], attributes_path: str,
                      attribute_slots: int) -> SequenceData:
    """`data` with the raw items of `item_ids` it lacks appended (in that order, no events), the behaviour names
    it lacks appended, and its attribute matrix rebuilt over the longer vocabulary with at least
    `attribute_slots` slots. The data's own indices are unchanged; so is everything when nothing is missing."""
    known = set(data.item_ids[PAD_INDEX + 1:].tolist())
    extra_items = [raw for raw in item_ids[PAD_INDEX + 1:] if raw not in known]
    extra_behaviors = [name for name in behavior_names if name not in data.behavior_names]
    if extra_behaviors and data.behaviors is None:
        raise WarmStartError(f"init_from: the parent embeds behaviour types {behavior_names} but the newer data "
                             "has none (an event_type column)")
    width = data.item_attributes.shape[1] if data.item_attributes is not None else 0
    if not extra_items and not extra_behaviors and width >= attribute_slots:
        return data
    all_items = np.concatenate([data.item_ids, np.array(extra_items, dtype=object)])
    item_attributes, num_attributes = data.item_attributes, data.num_attributes
    if attributes_path:
        item_attributes, num_attributes = load_attributes(attributes_path, all_items)
        if item_attributes.shape[1] < attribute_slots:  # the parent's slot count: its empty-slot term stays the same
            item_attributes = np.pad(item_attributes, ((0, 0), (0, attribute_slots - item_attributes.shape[1])))
    return replace(data, item_ids=all_items, behavior_names=tuple(data.behavior_names) + tuple(extra_behaviors),
                   item_attributes=item_attributes, num_attributes=num_attributes,
                   fingerprint=_extension_fingerprint(data.fingerprint, extra_items, extra_behaviors,
                                                      item_attributes.shape[1] if item_attributes is not None else 0))


def data_for_parent(data: SequenceData, parent: ParentModel, attributes_path: str) -> SequenceData:
    """The newer data over the union vocabulary the warm-started model is built on."""
    if parent.config.num_attributes and not attributes_path:
        raise WarmStartError("init_from: the parent pools item attributes; give the attributes file "
                             "(data.attributes / --attributes)")
    return extend_vocabulary(data, parent.item_ids, parent.behavior_names, attributes_path,
                             parent.config.max_attributes_per_item if attributes_path else 0)


def recorded_data(run_dir: str | Path, data: SequenceData, attributes_path: str) -> SequenceData:
    """A finished warm-started run's data rebuilt from its log (what `seqrank evaluate` needs): the log's data
    extended to the vocabulary the run recorded. Runs without a parent get `data` back unchanged."""
    run_dir = Path(run_dir)
    if not (run_dir / PARENT_FILE).is_file():
        return data
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    return extend_vocabulary(data, run_files.read_item_ids(run_dir), run_files.read_data_info(run_dir).behavior_names,
                             attributes_path, config.get("max_attributes_per_item", 0) if attributes_path else 0)


# ------------------------------------------------------------------------------------------- the weights


def check_architecture(child: EncoderConfig, parent: EncoderConfig) -> None:
    differing = [f.name for f in fields(Architecture) if getattr(child, f.name) != getattr(parent, f.name)]
    if differing:
        shown = ", ".join(f"model.{name}: {getattr(parent, name)!r} in the parent, {getattr(child, name)!r} here"
                          for name in differing)
        raise WarmStartError(f"init_from: the architecture must be the parent's ({shown})")
    for table, size in (("behaviour", "num_behaviors"), ("attribute", "num_attributes")):
        if bool(getattr(parent, size)) != bool(getattr(child, size)):
            raise WarmStartError(f"init_from: the parent {'has' if getattr(parent, size) else 'has no'} a {table} "
                                 f"table and this run {'has' if getattr(child, size) else 'has none'}; use the same "
                                 f"model.use_behaviors / model.use_attributes and the same kind of data")


def row_map(child_names, parent_names) -> tuple[np.ndarray, np.ndarray]:
    """(child rows, parent rows) of the names both tables hold, matched by name; index 0 (PAD) excluded."""
    parent_index = {name: index for index, name in enumerate(parent_names) if index != PAD_INDEX}
    pairs = [(index, parent_index[name]) for index, name in enumerate(child_names)
             if index != PAD_INDEX and name in parent_index]
    child_rows, parent_rows = (np.array(column, dtype=np.int64) for column in zip(*pairs)) if pairs else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return child_rows, parent_rows


@dataclass(frozen=True)
class RowMaps:
    """Child rows ← parent rows of each table; names in child index order, PAD (0) first."""

    items: tuple[np.ndarray, np.ndarray]
    behaviors: tuple[np.ndarray, np.ndarray]
    attributes: tuple[np.ndarray, np.ndarray]


def row_maps(data: SequenceData, parent: ParentModel, child_attribute_values: list[str] | None) -> RowMaps:
    return RowMaps(
        items=row_map(list(data.item_ids), parent.item_ids),
        behaviors=row_map(["", *data.behavior_names], ["", *parent.behavior_names]),
        attributes=row_map(child_attribute_values or [""], parent.attribute_values or [""]),
    )


def _copy_rows(child: torch.Tensor, parent: torch.Tensor, rows: tuple[np.ndarray, np.ndarray],
               extra: tuple[int, int] | None = None) -> None:
    """child[c] = parent[p] for the mapped rows, PAD (row 0) too; `extra`: one more (child row, parent row)."""
    child_rows, parent_rows = rows
    child[PAD_INDEX] = parent[PAD_INDEX]
    if len(child_rows):
        child[torch.from_numpy(child_rows)] = parent[torch.from_numpy(parent_rows)]
    if extra is not None:
        child[extra[0]] = parent[extra[1]]


@torch.no_grad()
def copy_weights(child: SequenceEncoder | EncoderEnsemble, parent: ParentModel, maps: RowMaps) -> None:
    """Every parameter and buffer of `parent` into `child`: tables by name through `maps`, the rest exactly."""
    check_architecture(child.config, parent.config)
    parent_state = parent.model.state_dict()
    mask_rows = (child.config.num_items + 1, parent.config.num_items + 1)  # [MASK] of bidirectional models
    for name, tensor in child.state_dict().items():
        source = parent_state[name]
        if name.endswith(ITEM_TABLE):
            _copy_rows(tensor, source, maps.items, mask_rows)
        elif name.endswith(BEHAVIOR_TABLE):
            _copy_rows(tensor, source, maps.behaviors)
        elif name.endswith(ATTRIBUTE_TABLE):
            _copy_rows(tensor, source, maps.attributes)
        elif name.endswith(ATTRIBUTE_BUFFER):
            continue
        elif tensor.shape != source.shape:
            raise WarmStartError(f"init_from: {name} has shape {tuple(source.shape)} in the parent, "
                                 f"{tuple(tensor.shape)} here")
        else:
            tensor.copy_(source)


def _towers(model: SequenceEncoder | EncoderEnsemble) -> list[SequenceEncoder]:
    return list(model.towers) if isinstance(model, EncoderEnsemble) else [model]


def _parent_as_artifact(parent: ParentModel) -> Artifact:
    """The parent in the form serving places new items from (the same vectors an export would hold)."""
    model, config = parent.model, parent.config
    item_vectors = model.output_item_vectors()[: config.num_items + 1].float().numpy().copy()
    item_vectors[PAD_INDEX] = 0.0
    attribute_vectors = tower_attribute_vectors(model)
    encoder_config = asdict(config)
    manifest = {"encoder_config": encoder_config, "model_version": parent.model_version,
                COLD_ITEMS_KEY: cold_item_settings_for(encoder_config, attribute_vectors)}
    values = parent.attribute_values
    return Artifact(path=parent.path, manifest=manifest, item_vectors=item_vectors, item_ids=parent.item_ids,
                    item_index_of={raw: index for index, raw in enumerate(parent.item_ids)},
                    item_attributes=model.item_attributes[: config.num_items + 1].numpy(),
                    item_popularity=np.zeros(config.num_items + 1, dtype=np.float32), attribute_values=values,
                    attribute_vectors=attribute_vectors,
                    attribute_index_of={value: index for index, value in enumerate(values) if index != PAD_INDEX})


@torch.no_grad()
def place_new_items(child: SequenceEncoder | EncoderEnsemble, parent: ParentModel, new_items: np.ndarray,
                    attribute_lists: list[list[str]]) -> None:
    """Set the id rows of `new_items` (child indices) so that each item vector is where serving would place it:
    id row = placed vector - the item's attribute pooling, per tower (under cosine the placed vector is already
    unit length per tower, so normalising leaves it there)."""
    placed = torch.from_numpy(placed_item_vectors(_parent_as_artifact(parent), attribute_lists).vectors)
    indices = torch.from_numpy(new_items)
    start = 0
    for tower in _towers(child):
        width = tower.config.hidden_size
        pooled = tower.item_vectors(indices) - tower.item_embedding.weight[indices]  # (N, d) attributes alone
        tower.item_embedding.weight[indices] = placed[:, start:start + width] - pooled
        start += width


def initialise_from_parent(child: SequenceEncoder | EncoderEnsemble, data: SequenceData, parent: ParentModel,
                           attributes_path: str) -> RowMaps:
    """Copy the parent into the freshly built `child` (built on `data_for_parent`'s data) and place new items."""
    child_values = attribute_vocabulary(attributes_path, data.item_ids) if child.config.num_attributes else None
    maps = row_maps(data, parent, child_values)
    copy_weights(child, parent, maps)
    new_items = np.setdiff1d(np.arange(PAD_INDEX + 1, data.num_items + 1), maps.items[0])
    if len(new_items) and child.config.num_attributes:
        attributes = child.item_attributes[torch.from_numpy(new_items)].numpy()
        place_new_items(child, parent, new_items,
                        [[child_values[a] for a in row if a != PAD_INDEX] for row in attributes])
    return maps


def inherited_settings(path: str | Path) -> tuple[Path | None, list[str]]:
    """What a warm-started run's config starts from when none is given: a parent run's config.yaml, or for an
    artifact (which keeps no training settings) the defaults plus its architecture as overrides."""
    path = Path(path)
    if not is_artifact(path):
        return path / run_files.CONFIG_FILE, []
    encoder_config = json.loads((path / MANIFEST_FILE).read_text())["encoder_config"]
    return None, [f"model.{f.name}={json.dumps(encoder_config[f.name])}" for f in fields(Architecture)
                  if f.name in encoder_config]
