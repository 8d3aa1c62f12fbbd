"""Typed training configuration: one YAML file plus `--set section.key=value` overrides.

Each component owns a section (data, model, optim, eval); `TrainConfig` only composes them. Unknown keys and
values of the wrong type are errors, so a misspelled setting never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema; the message names the key."""


@dataclass
class DataConfig:
    path: str = ""  # log file; empty means "generate the synthetic log" (see `synthetic`)
    format: str = "auto"  # auto | events | s3rec | sasrec
    attributes: str = ""  # optional item side information, JSON {raw_item_id: [attribute, ...]}
    kcore: int = 0  # iterative k-core filter on users and items; 0 = off (the Amazon files are already 5-core)
    max_events_per_user: int = 0  # keep only each user's most recent events; 0 = keep all
    # Evaluation protocol (docs/training.md, "Evaluation protocols"): leave_one_out holds out each user's last two
    # events; temporal trains on events before valid_cutoff, validates on each user's first event in
    # [valid_cutoff, test_cutoff) and tests on the first event at or after test_cutoff. A cutoff below 1 is a
    # quantile of the event times, otherwise Unix seconds. temporal only: target_behavior = the behaviour a target
    # must have ("buy": next purchase), "" = any event.
    protocol: str = "leave_one_out"  # leave_one_out | temporal
    valid_cutoff: float = 0.8
    test_cutoff: float = 0.9
    target_behavior: str = ""
    synthetic_users: int = 2000  # used only when path is empty
    synthetic_items: int = 500
    synthetic_seed: int = 0


@dataclass(frozen=True)
class Architecture:
    """The encoder's architecture, declared once: `ModelConfig` (the `model:` section) adds the training-only
    settings to it, and `model.EncoderConfig` (the exported encoder_config.json) adds the sizes the data gave."""

    backbone: str = "gpt2"  # gpt2 | llama (causal, SASRec-like) | bert (bidirectional, BERT4Rec-like)
    max_len: int = 50  # most recent events the encoder sees
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    intermediate_size: int = 256
    dropout: float = 0.5  # hidden and embedding dropout
    attention_dropout: float = 0.5
    similarity: str = "dot"  # dot | cosine (L2-normalised vectors, scores divided by temperature)
    temperature: float = 1.0  # cosine only
    frequency_mix: float = 0.0  # causal only: weight of BSARec's low-pass filter path beside attention; 0 = off
    frequency_cutoff: int = 5  # low-pass keeps the lowest frequency_cutoff // 2 + 1 frequencies of max_len
    towers: list[str] = field(default_factory=list)  # e.g. [gpt2, llama]: an ensemble whose scores add; [] = backbone

    def architecture(self) -> dict:
        """This object's architecture fields alone (a ModelConfig's, without its training settings)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)}


@dataclass(frozen=True)
class ModelConfig(Architecture):
    use_behaviors: bool = True  # add a behaviour-type embedding when the data has types
    use_attributes: bool = True  # add pooled attribute embeddings when side information is given
    mask_probability: float = 0.2  # bert cloze only: share of positions masked in training
    bert_objective: str = "cloze"  # bert only: cloze (BERT4Rec) | next (each prefix + [MASK] predicts its next item)
    item_dropout: float = 0.0  # causal only: share of input items replaced by [MASK] in training


@dataclass
class OptimConfig:
    loss: str = "ce"  # ce (full softmax) | sampled (sampled softmax + logQ) | bce (one sampled negative)
    num_negatives: int = 256  # sampled softmax only: shared negatives per batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10  # epochs without validation NDCG@10 improvement before stopping
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at max_epochs)
    warmup_steps: int = 0
    mask_history: bool = False  # ce only: leave already-seen items out of the softmax, as evaluation does
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast on CUDA only
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    sparse_item_embeddings: bool = False  # item table: sparse gradients + SparseAdam, so a step costs O(rows it
    # touches), not O(catalogue); for sampled softmax on large catalogues (docs/benchmarks/retrieval.md, "A million-item catalogue")
    cuda_graphs: bool = False  # CUDA only: replay each step's forward and backward as one CUDA graph per batch
    # shape (training/cuda_graphs.py); batches are padded to optim.batch_size rows and a multiple of graph_length
    graph_length: int = 8


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 1024
    valid_users: int = 0  # validate on a fixed random subset of users for speed; 0 = all
    test_users: int = 0  # final valid and test evaluation on a fixed random subset of users; 0 = all


@dataclass
class DistributedConfig:
    backend: str = "local"  # local (this process) | ray (data-parallel workers through Ray Train's TorchTrainer)
    num_workers: int = 2  # ray only; optim.batch_size is the global batch, split evenly across the workers
    use_gpu: bool = False  # ray only: one GPU per worker (NCCL), else CPU workers (gloo)
    cpus_per_worker: int = 1  # ray only; also each worker's torch threads unless optim.num_threads is set
    address: str = ""  # ray only: "" starts a private local Ray for the run; "auto" or ray://... joins a cluster


@dataclass
class TransitionConfig:
    # Weights of the item-to-item transition prior (training/transitions.py) to try after training: the one with
    # the best validation NDCG@10 is kept with the run and exported; [0.0] = no prior.
    weights: list[float] = field(default_factory=lambda: [0.0])


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    transitions: TransitionConfig = field(default_factory=TransitionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, key: str):
    """Check `value` against a dataclass field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (str, float) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """`model.hidden_size=128` → {"model": {"hidden_size": 128}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. model.hidden_size=128")
    value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    return {parts[0]: {parts[1]: value}}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read the default config, then `path` on top of it, then each override; validate the result."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()) or {}
    if path is not None:
        text = Path(path).read_text()
        raw = _merge(raw, yaml.safe_load(text) or {})
    for override in overrides:
        raw = _merge(raw, parse_override(override))
    config = _build(TrainConfig, raw, "")
    validate_config(config)
    return config


def config_from_dict(raw: dict) -> TrainConfig:
    config = _build(TrainConfig, raw, "")
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    choices = {
        "data.format": (config.data.format, ("auto", "events", "s3rec", "sasrec")),
        "data.protocol": (config.data.protocol, ("leave_one_out", "temporal")),
        "model.backbone": (config.model.backbone, ("gpt2", "llama", "bert")),
        "model.bert_objective": (config.model.bert_objective, ("cloze", "next")),
        "optim.loss": (config.optim.loss, ("ce", "sampled", "bce")),
        "optim.device": (config.optim.device, ("auto", "cpu", "cuda")),
        "model.similarity": (config.model.similarity, ("dot", "cosine")),
        "optim.lr_schedule": (config.optim.lr_schedule, ("constant", "cosine")),
        "distributed.backend": (config.distributed.backend, ("local", "ray")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    positive = {
        "model.max_len": config.model.max_len,
        "model.hidden_size": config.model.hidden_size,
        "model.num_layers": config.model.num_layers,
        "model.num_heads": config.model.num_heads,
        "optim.batch_size": config.optim.batch_size,
        "optim.max_epochs": config.optim.max_epochs,
        "optim.num_negatives": config.optim.num_negatives,
        "eval.batch_size": config.eval.batch_size,
        "distributed.num_workers": config.distributed.num_workers,
        "distributed.cpus_per_worker": config.distributed.cpus_per_worker,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if config.model.hidden_size % config.model.num_heads:
        raise ConfigError("model.hidden_size must be divisible by model.num_heads")
    for key, value in (("model.dropout", config.model.dropout), ("model.attention_dropout", config.model.attention_dropout),
                       ("model.mask_probability", config.model.mask_probability),
                         ("model.item_dropout", config.model.item_dropout)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    for tower in config.model.towers:
        if tower not in ("gpt2", "llama"):
            raise ConfigError(f"model.towers: {tower!r} is not a causal backbone (gpt2, llama)")
    if not 0.0 <= config.model.frequency_mix <= 1.0:
        raise ConfigError(f"model.frequency_mix: must be in [0, 1], got {config.model.frequency_mix}")
    if config.model.frequency_mix and config.model.backbone == "bert" and not config.model.towers:
        raise ConfigError("model.frequency_mix: the low-pass path is causal; backbone bert cannot take it")
    for key, value in (("data.valid_cutoff", config.data.valid_cutoff), ("data.test_cutoff", config.data.test_cutoff)):
        if value <= 0:
            raise ConfigError(f"{key}: must be a quantile in (0, 1) or Unix seconds >= 1, got {value}")
    if (config.data.valid_cutoff < 1) == (config.data.test_cutoff < 1) and \
            not config.data.valid_cutoff < config.data.test_cutoff:
        raise ConfigError(f"data.valid_cutoff: must come before data.test_cutoff, got {config.data.valid_cutoff} and "
                          f"{config.data.test_cutoff}")
    if config.data.target_behavior and config.data.protocol != "temporal":
        raise ConfigError("data.target_behavior: needs data.protocol: temporal (leave-one-out holds out the last "
                          "events, whatever their behaviour)")
    if config.data.kcore < 0:
        raise ConfigError(f"data.kcore: must be >= 0, got {config.data.kcore}")
    if not config.transitions.weights or any(w < 0 for w in config.transitions.weights):
        raise ConfigError(f"transitions.weights: must be a non-empty list of weights >= 0, got {config.transitions.weights}")
    if not config.eval.ks or any(k <= 0 for k in config.eval.ks):
        raise ConfigError(f"eval.ks: must be positive integers, got {config.eval.ks}")
    if config.optim.cuda_graphs and (config.optim.loss != "ce" or config.optim.sparse_item_embeddings
                                     or config.distributed.backend == "ray" or config.optim.device == "cpu"
                                     or not config.model.towers and config.model.backbone == "bert"):
        raise ConfigError("optim.cuda_graphs: only for full-softmax (optim.loss=ce), dense-table, single-process, "
                          "causal training on CUDA (sampled softmax draws its shapes at run time; DDP and "
                          "SparseAdam are not captured)")
    if config.optim.graph_length <= 0:
        raise ConfigError(f"optim.graph_length: must be > 0, got {config.optim.graph_length}")
    if config.optim.sparse_item_embeddings and config.distributed.backend == "ray":
        raise ConfigError("optim.sparse_item_embeddings: not supported with distributed.backend=ray (DDP all-reduces "
                          "dense gradients; sparse ones need gloo and are untested here)")
