"""The sequence encoder: a behaviour sequence in, an interest vector out.

Items are never text: each item index has its own learned embedding, to which we add a behaviour-type embedding
(pv/cart/fav/buy) and the mean of its attribute embeddings (category, brand: how a rare item still gets a usable
vector), then feed the sum to a Hugging Face transformer through `inputs_embeds`. The user vector is the hidden
state at the most recent position (causal, SASRec-like) or at an appended [MASK] position (bidirectional,
BERT4Rec-like). Scores are inner products with the same item table, so retrieval is maximum-inner-product search.

Positions count backwards from the most recent event (0 = newest), so "how recent" means the same thing for every
user whatever their history length, as with SASRec's left padding, while batches stay right-padded and trimmed.

This module is the only definition of the model: serving imports `load_encoder` and `encode_histories`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from seqrank.training.config import Architecture
from seqrank.training.vocab import PAD_INDEX

CONFIG_FILE = "encoder_config.json"
WEIGHTS_FILE = "encoder.safetensors"
CAUSAL_BACKBONES = ("gpt2", "llama")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig(Architecture):
    """An encoder as built and exported: the architecture plus the sizes its training data gave."""

    num_items: int
    num_behaviors: int = 0  # 0 = the data has no behaviour types
    num_attributes: int = 0  # 0 = no side information
    max_attributes_per_item: int = 0

    def __post_init__(self):
        object.__setattr__(self, "towers", tuple(self.towers))  # JSON gives a list

    @property
    def causal(self) -> bool:
        return all(backbone in CAUSAL_BACKBONES for backbone in self.towers or (self.backbone,))

    @property
    def mask_index(self) -> int:
        """Bidirectional models read the user vector at an appended [MASK] token, an extra item index."""
        return self.num_items + 1


def build_backbone(config: EncoderConfig) -> nn.Module:
    """A transformers model used only through `inputs_embeds`; its word-embedding table is unused and tiny."""
    if config.backbone == "gpt2":
        from transformers import GPT2Config, GPT2Model

        hf_config = GPT2Config(
            vocab_size=1, n_positions=config.max_len + 1, n_embd=config.hidden_size, n_layer=config.num_layers,
            n_head=config.num_heads, n_inner=config.intermediate_size, resid_pdrop=config.dropout,
            embd_pdrop=config.dropout, attn_pdrop=config.attention_dropout, activation_function="gelu",
            bos_token_id=None, eos_token_id=None,
        )
        return GPT2Model(hf_config)
    if config.backbone == "llama":
        from transformers import LlamaConfig, LlamaModel

        hf_config = LlamaConfig(
            vocab_size=1, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads, max_position_embeddings=config.max_len + 1,
            attention_dropout=config.attention_dropout, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        return LlamaModel(hf_config)
    if config.backbone == "bert":
        from transformers import BertConfig, BertModel

        hf_config = BertConfig(
            vocab_size=1, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_len + 1, type_vocab_size=1, pad_token_id=0,
        )
        return BertModel(hf_config, add_pooling_layer=False)
    raise ValueError(f"backbone: {config.backbone!r} is not one of gpt2, llama, bert")


def low_pass_kernel(length: int, cutoff: int) -> torch.Tensor:
    """Weights by distance d = 0..length-1 of BSARec's low-pass filter, read at a sequence's newest position.

    BSARec zeroes all but the lowest `cutoff // 2 + 1` rFFT bins of a left-padded window of `length` steps; at the
    window's last position that circular filter is exactly sum_d kernel[d] * x[t - d], a fixed recency weighting.
    Applying the same weighting at every position keeps the filter causal, so all positions can be trained at once.
    """
    bins = cutoff // 2 + 1
    d = torch.arange(length, dtype=torch.float64)
    k = torch.arange(1, bins, dtype=torch.float64).unsqueeze(1)
    return ((1.0 + 2.0 * torch.cos(2 * torch.pi * k * d / length).sum(0)) / length).float()


class FrequencyMixedAttention(nn.Module):
    """alpha * (low-pass + beta * high-pass of the block input) + (1 - alpha) * self-attention (BSARec, causal).

    Self-attention is good at picking out single related items and poor at the smooth, slowly drifting part of a
    user's taste; the low-pass path supplies that part and beta (learned per channel) rescales what it leaves out.
    Wraps a backbone block's attention module in place, so the rest of the Hugging Face block is untouched.
    """

    def __init__(self, attention: nn.Module, config: EncoderConfig):
        super().__init__()
        self.attention = attention
        self.alpha = config.frequency_mix
        kernel = low_pass_kernel(config.max_len, config.frequency_cutoff)
        distance = torch.arange(config.max_len).unsqueeze(1) - torch.arange(config.max_len).unsqueeze(0)
        self.register_buffer("low_pass", torch.where(distance >= 0, kernel[distance.clamp(min=0)], 0.0), persistent=False)
        self.sqrt_beta = nn.Parameter(torch.randn(config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, D)
        attended, *rest = self.attention(*args, **kwargs)
        T = hidden.shape[1]
        low = self.low_pass[:T, :T].to(hidden.dtype) @ hidden
        filtered = self.dropout(low + self.sqrt_beta.square() * (hidden - low))
        return (self.alpha * filtered + (1.0 - self.alpha) * attended, *rest)


def mix_frequency_paths(backbone: nn.Module, config: EncoderConfig) -> None:
    if not config.causal:
        raise ValueError("frequency_mix: only the causal backbones (gpt2, llama) take the causal low-pass path")
    if config.backbone == "gpt2":
        for block in backbone.h:
            block.attn = FrequencyMixedAttention(block.attn, config)
    else:
        for layer in backbone.layers:
            layer.self_attn = FrequencyMixedAttention(layer.self_attn, config)


class SequenceEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, item_attributes: np.ndarray | None = None):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.item_embedding = nn.Embedding(config.num_items + 2, D, padding_idx=PAD_INDEX)  # +PAD, +[MASK]
        self.behavior_embedding = (
            nn.Embedding(config.num_behaviors + 1, D, padding_idx=0) if config.num_behaviors else None
        )
        self.attribute_embedding = (
            nn.Embedding(config.num_attributes + 1, D, padding_idx=0) if config.num_attributes else None
        )
        attributes = torch.zeros(config.num_items + 2, max(config.max_attributes_per_item, 1), dtype=torch.long)
        if item_attributes is not None and config.num_attributes:
            attributes[: item_attributes.shape[0], : item_attributes.shape[1]] = torch.as_tensor(item_attributes)
        self.register_buffer("item_attributes", attributes, persistent=True)
        # GPT-2 and BERT already apply dropout to the embeddings they are fed (after adding positions); Llama does not
        self.input_dropout = nn.Dropout(config.dropout if config.backbone == "llama" else 0.0)
        self.backbone = build_backbone(config)
        if config.frequency_mix:
            mix_frequency_paths(self.backbone, config)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        for table in (self.behavior_embedding, self.attribute_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[PAD_INDEX].zero_()

    def item_vectors(self, item_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Output/input vectors of items: id embedding + attribute embeddings summed over the item's A attribute
        slots, divided by its number of real attributes. (I+2, D) or (*idx, D).

        The whole table (item_indices None, every full-softmax step) is the weight itself, not a lookup of every
        row, and the attribute sum is one embedding_bag: a few kernels per step instead of a gather and a sum over
        the catalogue. An empty slot adds the attribute table's PAD row, which is drawn at init and never trained;
        that term is kept exactly as the per-slot lookup computed it, so every trained model keeps its vectors.
        """
        if item_indices is None and not self.item_embedding.sparse:  # a sparse table needs its lookup's gradient
            vectors, attributes = self.item_embedding.weight, self.item_attributes  # (I+2, D), (I+2, A)
        else:
            if item_indices is None:
                item_indices = torch.arange(self.item_embedding.num_embeddings, device=self.item_attributes.device)
            vectors, attributes = self.item_embedding(item_indices), self.item_attributes[item_indices]
        if self.attribute_embedding is not None:
            table = self.attribute_embedding.weight
            real = (attributes > 0).sum(-1, keepdim=True)  # (*, 1)
            bags = attributes.reshape(-1, attributes.shape[-1])
            total = nn.functional.embedding_bag(bags, table, mode="sum", padding_idx=0).reshape(*attributes.shape[:-1], -1)
            total = total + (attributes.shape[-1] - real) * table[0].detach()  # empty slots: the untrained PAD row
            vectors = vectors + total / real.clamp(min=1)
        return vectors

    def output_item_vectors(self, item_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors that user vectors are scored against (normalised under cosine similarity)."""
        vectors = self.item_vectors(item_indices)
        if self.config.similarity == "cosine":
            vectors = nn.functional.normalize(vectors, dim=-1)
        return vectors

    def project_users(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states → user vectors such that score = user_vector · output_item_vector."""
        if self.config.similarity == "cosine":
            hidden = nn.functional.normalize(hidden, dim=-1) / self.config.temperature
        return hidden

    def forward(self, item_indices: torch.Tensor, behavior_indices: torch.Tensor | None, lengths: torch.Tensor):
        """Right-padded (B, T) histories with their lengths → hidden states (B, T, D)."""
        B, T = item_indices.shape
        x = self.item_vectors(item_indices)  # (B, T, D)
        if self.behavior_embedding is not None and behavior_indices is not None:
            x = x + self.behavior_embedding(behavior_indices)
        x = self.input_dropout(x)
        steps = torch.arange(T, device=item_indices.device).unsqueeze(0)  # (1, T)
        position_ids = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # newest event is position 0
        if self.config.causal:
            # Causal attention never looks right, so right padding cannot leak into real positions: no mask needed,
            # which keeps SDPA on its fused is_causal path.
            out = self.backbone(inputs_embeds=x, position_ids=position_ids)
        else:
            attention_mask = (steps < lengths.unsqueeze(1)).long()
            out = self.backbone(inputs_embeds=x, position_ids=position_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def user_vectors(self, item_indices, behavior_indices, lengths) -> torch.Tensor:
        """(B, T) right-padded histories → (B, D) vectors read at the last real position."""
        hidden = self.forward(item_indices, behavior_indices, lengths)
        return self.project_users(hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1])

    def score_all(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, I+1) inner-product scores over the catalogue; PAD and [MASK] get -inf."""
        item_vectors = self.output_item_vectors()[: self.config.num_items + 1]
        scores = user_vectors @ item_vectors.T
        scores[:, PAD_INDEX] = float("-inf")
        return scores


class EncoderEnsemble(nn.Module):
    """Independently trained towers whose scores add up: user and item vectors are the towers' concatenated.

    A sum of dot products is the dot product of the concatenations, so the ensemble is still one maximum-inner-
    product search for retrieval, and serving needs nothing new. Each tower has its own item table and its own
    loss (training/train.py), so the towers stay as diverse as separately trained models.
    """

    def __init__(self, config: EncoderConfig, item_attributes: np.ndarray | None = None):
        super().__init__()
        if not config.causal:
            raise ValueError(f"towers: {list(config.towers)} must all be causal backbones ({', '.join(CAUSAL_BACKBONES)})")
        self.config = config
        self.towers = nn.ModuleList(
            SequenceEncoder(replace(config, backbone=backbone, towers=()), item_attributes) for backbone in config.towers
        )

    @classmethod
    def of(cls, models: list[SequenceEncoder]) -> "EncoderEnsemble":
        """Separately trained single models (same data, same settings but the backbone) as one ensemble."""
        config = replace(models[0].config, towers=tuple(m.config.backbone for m in models))
        for model in models:
            if replace(model.config, backbone=models[0].config.backbone) != models[0].config:
                raise ValueError("towers: every model must share the catalogue and all settings but the backbone")
        ensemble = cls.__new__(cls)
        nn.Module.__init__(ensemble)
        ensemble.config, ensemble.towers = config, nn.ModuleList(models)
        if not config.causal:
            raise ValueError(f"towers: {list(config.towers)} must all be causal backbones")
        return ensemble

    @property
    def behavior_embedding(self) -> nn.Module | None:
        return self.towers[0].behavior_embedding

    @property
    def item_attributes(self) -> torch.Tensor:
        return self.towers[0].item_attributes

    def output_item_vectors(self, item_indices: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([tower.output_item_vectors(item_indices) for tower in self.towers], dim=-1)

    def user_vectors(self, item_indices, behavior_indices, lengths) -> torch.Tensor:
        return torch.cat([tower.user_vectors(item_indices, behavior_indices, lengths) for tower in self.towers], -1)

    score_all = SequenceEncoder.score_all


def build_encoder(config: EncoderConfig, item_attributes: np.ndarray | None = None) -> SequenceEncoder | EncoderEnsemble:
    return EncoderEnsemble(config, item_attributes) if config.towers else SequenceEncoder(config, item_attributes)


def pad_histories(
    histories: list[np.ndarray], behaviors: list[np.ndarray] | None, config: EncoderConfig
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Truncate each history to its newest events and right-pad to the longest; bidirectional models get [MASK].

    Returns (items (B, T), behaviours (B, T) or None, lengths (B,)); every history must be non-empty.
    """
    keep = config.max_len if config.causal else config.max_len - 1
    truncated = [np.asarray(h[-keep:], dtype=np.int64) for h in histories]
    truncated_behaviors = None
    if behaviors is not None:
        truncated_behaviors = [np.asarray(b[-keep:], dtype=np.int64) for b in behaviors]
    if not config.causal:
        truncated = [np.append(h, config.mask_index) for h in truncated]
        if truncated_behaviors is not None:
            truncated_behaviors = [np.append(b, 0) for b in truncated_behaviors]
    lengths = np.array([len(h) for h in truncated], dtype=np.int64)
    T = int(lengths.max())
    items = np.full((len(truncated), T), PAD_INDEX, dtype=np.int64)
    behavior_matrix = np.zeros((len(truncated), T), dtype=np.int64) if truncated_behaviors is not None else None
    for row, h in enumerate(truncated):
        items[row, : len(h)] = h
        if behavior_matrix is not None:
            behavior_matrix[row, : len(h)] = truncated_behaviors[row]
    return (
        torch.from_numpy(items),
        torch.from_numpy(behavior_matrix) if behavior_matrix is not None else None,
        torch.from_numpy(lengths),
    )


def padded_on(
    model: SequenceEncoder, histories: list[np.ndarray], behaviors: list[np.ndarray] | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`pad_histories` for `model` (behaviours dropped when it has no behaviour table), moved to `device`."""
    if model.behavior_embedding is None:
        behaviors = None
    items, behavior_matrix, lengths = pad_histories(histories, behaviors, model.config)
    items, lengths = items.to(device, non_blocking=True), lengths.to(device, non_blocking=True)
    if behavior_matrix is not None:
        behavior_matrix = behavior_matrix.to(device, non_blocking=True)
    return items, behavior_matrix, lengths


@torch.no_grad()
def encode_histories(
    model: SequenceEncoder,
    histories: list[np.ndarray],
    behaviors: list[np.ndarray] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Histories of internal item indices (oldest first) → (B, D) float32 user vectors.

    The one path from a history to a user vector, shared by evaluation, export and serving. `dtype=torch.bfloat16`
    runs the encoder under bf16 autocast (CUDA).
    """
    items, behavior_matrix, lengths = padded_on(model, histories, behaviors, device)
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        vectors = model.user_vectors(items, behavior_matrix, lengths)
    return vectors.float().cpu().numpy()


def save_encoder(model: SequenceEncoder, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))


def load_encoder(
    config: dict | EncoderConfig, weights_path: str | Path, device: torch.device | str = "cpu"
) -> SequenceEncoder:
    """Rebuild the encoder from its explicit config and safetensors weights, in eval mode."""
    if isinstance(config, dict):
        config = EncoderConfig(**config)
    model = build_encoder(config)
    state = load_file(str(weights_path), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_encoder_dir(run_dir: str | Path, device: torch.device | str = "cpu") -> SequenceEncoder:
    run_dir = Path(run_dir)
    return load_encoder(json.loads((run_dir / CONFIG_FILE).read_text()), run_dir / WEIGHTS_FILE, device)
