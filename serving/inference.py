"""How a replica runs the encoder: the same user vectors as `model.user_vectors`, by one of several paths.

A path turns right-padded histories (items (B, T) int64, behaviours (B, T) int64 or None, lengths (B,) int64, as
`pad_histories` in training/model.py makes them) into (B, D) float32 user vectors:

- `eager`: the model's own `user_vectors`, tower after tower (the reference).
- `fused`: `FusedEncoder`, the same maths over all towers at once: every tower's input vectors come from one
  gather in a table precomputed with the model's own `item_vectors`, towers of one backbone run as one stacked
  (batched-matmul) pass, and the last layer computes only what the newest position needs (keys and values
  everywhere, the query, MLP and final norm at that position alone).
- `compile`: `torch.compile(model.user_vectors, dynamic=True)`, compiled and warmed at load.
- `onnx`: `FusedEncoder` exported with `torch.onnx.export` (dynamic batch and length) at load, into a temporary
  directory, and run by onnxruntime on the replica's CPUs (needs onnxruntime, onnxscript and onnx).
- `auto`: the fastest path measured for the device that builds here: onnx, else fused, on a CPU; eager on a GPU.

Every non-eager path is checked against `eager` on random histories when it is built and refused if a user vector
differs by more than PARITY_TOLERANCE, so a transformers upgrade that changes a block cannot be served silently;
`build_inference` then logs the reason and serves `eager`. Only `eager` and `compile` run on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqrank.training.model import EncoderEnsemble, SequenceEncoder, pad_histories, padded_on

logger = logging.getLogger(f"ray.serve.{__name__}")

PATHS = ("auto", "eager", "fused", "compile", "onnx")
GPU_PATHS = ("eager", "compile")
# auto: the first of these that builds, then eager (measured: docs/benchmarks/encoder.md, "Inference paths on CPU-2")
AUTO_PATHS = {"cpu": ("onnx", "fused"), "cuda": ("eager",)}
PARITY_TOLERANCE = 1e-4  # max abs difference of a user vector from eager's, fp32, when a path is built
COMPILE_WARMUP_SHAPES = ((2, 3), (1, 3), (2, 1), (1, 1))  # dynamic=True specialises sizes 0 and 1: warm each

UserVectorFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


class UnsupportedModel(ValueError):
    """The fused forward does not cover this model's configuration (it then runs eager)."""


# ------------------------------------------------------------------------------------------------ fused forward


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).contiguous()


def _tower_list(model: SequenceEncoder | EncoderEnsemble) -> list[SequenceEncoder]:
    return list(model.towers) if isinstance(model, EncoderEnsemble) else [model]


def _check_supported(towers: list[SequenceEncoder]) -> None:
    config = towers[0].config
    if not config.causal:
        raise UnsupportedModel(f"backbone {config.backbone!r}: only causal backbones (gpt2, llama) are fused")
    if config.frequency_mix:
        raise UnsupportedModel("frequency_mix: the low-pass path is not fused")
    for tower in towers:
        hf = tower.backbone.config
        if tower.config.backbone == "gpt2":
            if hf.scale_attn_by_inverse_layer_idx or hf.reorder_and_upcast_attn or hf.add_cross_attention:
                raise UnsupportedModel("gpt2: only the plain attention block is fused")
        else:
            if hf.num_key_value_heads != hf.num_attention_heads or hf.attention_bias or hf.mlp_bias:
                raise UnsupportedModel("llama: grouped-query attention and projection biases are not fused")


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """nn.LayerNorm with per-tower affine parameters: x (G, ..., D), weight and bias (G, D)."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.view(shape) + bias.view(shape)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm with per-tower weights: x (G, ..., D), weight (G, D)."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    x32 = x.float()
    return weight.view(shape) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (G, N, In) @ weight (G, In, Out) (+ bias (G, Out)): one batched matmul for G towers."""
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(G, B, T, H*d) -> (G*B, H, T, d)."""
    G, B, T, width = x.shape
    return x.reshape(G * B, T, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """(G*B, H, T, d) -> (G, B*T, H*d)."""
    GB, H, T, d = x.shape
    return x.transpose(1, 2).reshape(G, (GB // G) * T, H * d)


class _Gpt2Group(nn.Module):
    """G GPT-2 towers of one architecture as one stacked pass (transformers GPT2Model, pre-norm blocks)."""

    def __init__(self, backbones: list[nn.Module]):
        super().__init__()
        first = backbones[0]
        self.heads, self.eps = first.config.n_head, first.ln_f.eps
        self.scaling = [block.attn.scaling for block in first.h]
        self.act = first.h[0].mlp.act  # the backbone's own activation module (stateless)
        self.register_buffer("wpe", _stack([b.wpe.weight for b in backbones]))  # (G, P, D)
        self.register_buffer("ln_f_w", _stack([b.ln_f.weight for b in backbones]))
        self.register_buffer("ln_f_b", _stack([b.ln_f.bias for b in backbones]))
        self.layers = nn.ModuleList()
        for i in range(len(first.h)):
            blocks = [b.h[i] for b in backbones]
            layer = nn.Module()
            for name, get in {
                "ln1_w": lambda k: k.ln_1.weight, "ln1_b": lambda k: k.ln_1.bias,
                "ln2_w": lambda k: k.ln_2.weight, "ln2_b": lambda k: k.ln_2.bias,
                "qkv_w": lambda k: k.attn.c_attn.weight, "qkv_b": lambda k: k.attn.c_attn.bias,  # Conv1D: (In, Out)
                "proj_w": lambda k: k.attn.c_proj.weight, "proj_b": lambda k: k.attn.c_proj.bias,
                "fc_w": lambda k: k.mlp.c_fc.weight, "fc_b": lambda k: k.mlp.c_fc.bias,
                "out_w": lambda k: k.mlp.c_proj.weight, "out_b": lambda k: k.mlp.c_proj.bias,
            }.items():
                layer.register_buffer(name, _stack([get(k) for k in blocks]))
            self.layers.append(layer)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, visible: torch.Tensor):
        """x (G, B, T, D) input vectors -> (G, B, D) last hidden state at each row's newest position."""
        G, B, T, D = x.shape
        h = (x + self.wpe[:, positions]).reshape(G, B * T, D)  # (G, B*T, D)
        rows = torch.arange(B, device=x.device)
        for i, layer in enumerate(self.layers):
            normed = _layer_norm(h, layer.ln1_w, layer.ln1_b, self.eps)
            if i < len(self.layers) - 1:
                q, k, v = _linear(normed, layer.qkv_w, layer.qkv_b).view(G, B, T, 3 * D).split(D, dim=-1)
                attended = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads),
                                                          _heads(v, self.heads), is_causal=True, scale=self.scaling[i])
                h = h + _linear(_merge_heads(attended, G), layer.proj_w, layer.proj_b)
                h = h + _linear(self.act(_linear(_layer_norm(h, layer.ln2_w, layer.ln2_b, self.eps),
                                                 layer.fc_w, layer.fc_b)), layer.out_w, layer.out_b)
                continue
            # last layer: keys and values at every position, everything else at the newest one only
            k, v = _linear(normed, layer.qkv_w[:, :, D:], layer.qkv_b[:, D:]).view(G, B, T, 2 * D).split(D, dim=-1)
            residual = h.view(G, B, T, D)[:, rows, last]  # (G, B, D)
            q = _linear(normed.view(G, B, T, D)[:, rows, last], layer.qkv_w[:, :, :D], layer.qkv_b[:, :D])
            attended = F.scaled_dot_product_attention(_heads(q.unsqueeze(2), self.heads), _heads(k, self.heads),
                                                      _heads(v, self.heads), attn_mask=visible, scale=self.scaling[i])
            h = residual + _linear(_merge_heads(attended, G), layer.proj_w, layer.proj_b)
            h = h + _linear(self.act(_linear(_layer_norm(h, layer.ln2_w, layer.ln2_b, self.eps),
                                             layer.fc_w, layer.fc_b)), layer.out_w, layer.out_b)
        return _layer_norm(h, self.ln_f_w, self.ln_f_b, self.eps)


class _LlamaGroup(nn.Module):
    """G Llama towers of one architecture as one stacked pass (transformers LlamaModel, RMSNorm, RoPE, SwiGLU)."""

    def __init__(self, backbones: list[nn.Module]):
        super().__init__()
        first = backbones[0]
        self.heads, self.eps = first.config.num_attention_heads, first.norm.variance_epsilon
        self.scaling = [layer.self_attn.scaling for layer in first.layers]
        self.act = first.layers[0].mlp.act_fn
        self.rotary = first.rotary_emb  # the backbone's own RoPE (identical across towers: same config)
        self.register_buffer("norm_w", _stack([b.norm.weight for b in backbones]))
        self.layers = nn.ModuleList()
        for i in range(len(first.layers)):
            blocks = [b.layers[i] for b in backbones]
            layer = nn.Module()
            layer.register_buffer("in_w", _stack([k.input_layernorm.weight for k in blocks]))
            layer.register_buffer("post_w", _stack([k.post_attention_layernorm.weight for k in blocks]))
            layer.register_buffer("q_w", _stack([k.self_attn.q_proj.weight.T for k in blocks]))  # (G, In, Out)
            layer.register_buffer("kv_w", _stack([torch.cat([k.self_attn.k_proj.weight, k.self_attn.v_proj.weight]).T
                                                  for k in blocks]))
            layer.register_buffer("o_w", _stack([k.self_attn.o_proj.weight.T for k in blocks]))
            layer.register_buffer("gate_up_w", _stack([torch.cat([k.mlp.gate_proj.weight, k.mlp.up_proj.weight]).T
                                                       for k in blocks]))
            layer.register_buffer("down_w", _stack([k.mlp.down_proj.weight.T for k in blocks]))
            self.layers.append(layer)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers' apply_rotary_pos_emb on (G*B, H, T, d) with cos, sin (G*B, 1, T, d)."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _mlp(self, h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        gate, up = _linear(_rms_norm(h, layer.post_w, self.eps), layer.gate_up_w).chunk(2, dim=-1)
        return _linear(self.act(gate) * up, layer.down_w)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, visible: torch.Tensor):
        G, B, T, D = x.shape
        cos, sin = (c.unsqueeze(1).repeat(G, 1, 1, 1) for c in self.rotary(x, positions))  # (G*B, 1, T, d)
        # the newest position's angle (position 0) for the last layer's one query
        cos0, sin0 = (c.unsqueeze(1).repeat(G, 1, 1, 1) for c in self.rotary(x, torch.zeros_like(positions[:, :1])))
        rows = torch.arange(B, device=x.device)
        h = x.reshape(G, B * T, D)
        for i, layer in enumerate(self.layers):
            normed = _rms_norm(h, layer.in_w, self.eps)
            k, v = _linear(normed, layer.kv_w).view(G, B, T, 2 * D).split(D, dim=-1)
            k, v = self._rope(_heads(k, self.heads), cos, sin), _heads(v, self.heads)
            if i < len(self.layers) - 1:
                q = self._rope(_heads(_linear(normed, layer.q_w).view(G, B, T, D), self.heads), cos, sin)
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling[i])
                h = h + _linear(_merge_heads(attended, G), layer.o_w)
                h = h + self._mlp(h, layer)
                continue
            # last layer: the query, MLP and norm at the newest position only
            residual = h.view(G, B, T, D)[:, rows, last]  # (G, B, D)
            q = _linear(normed.view(G, B, T, D)[:, rows, last], layer.q_w).unsqueeze(2)  # (G, B, 1, D)
            q = self._rope(_heads(q, self.heads), cos0, sin0)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scaling[i])
            h = residual + _linear(_merge_heads(attended, G), layer.o_w)
            h = h + self._mlp(h, layer)
        return _rms_norm(h, self.norm_w, self.eps)


class FusedEncoder(nn.Module):
    """`user_vectors` of a SequenceEncoder or EncoderEnsemble with every tower in one pass; buffers only.

    Built from the model's own modules and weights (the input table is the model's `item_vectors`, RoPE and the
    activations are the backbones' modules); eval-mode maths only (no dropout). Raises UnsupportedModel for
    configurations it does not cover.
    """

    def __init__(self, model: SequenceEncoder | EncoderEnsemble):
        super().__init__()
        towers = _tower_list(model)
        _check_supported(towers)
        config = towers[0].config
        self.similarity, self.temperature = config.similarity, config.temperature
        self.tower_dim = config.hidden_size
        with torch.no_grad():  # every tower's input vectors in one (I+2, K*D) table: one gather per batch
            self.register_buffer("item_table", torch.cat([t.item_vectors() for t in towers], -1).detach().contiguous())
            behaviors = [t.behavior_embedding for t in towers]
            self.register_buffer("behavior_table", None if behaviors[0] is None else
                                 torch.cat([b.weight for b in behaviors], -1).detach().contiguous())
        backbones = [t.config.backbone for t in towers]
        self.kinds = sorted(set(backbones), key=backbones.index)
        self.members = [[k for k, b in enumerate(backbones) if b == kind] for kind in self.kinds]
        group_order = [k for members in self.members for k in members]
        self.register_buffer("tower_order", torch.tensor([group_order.index(k) for k in range(len(towers))]))
        self.groups = nn.ModuleList(
            (_Gpt2Group if kind == "gpt2" else _LlamaGroup)([towers[k].backbone for k in members])
            for kind, members in zip(self.kinds, self.members))
        self.num_towers = len(towers)

    def forward(self, items: torch.Tensor, behaviors: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
        """items (B, T), behaviours (B, T) or None, lengths (B,) -> (B, K*D) user vectors."""
        B, T = items.shape
        K, D = self.num_towers, self.tower_dim
        x = F.embedding(items, self.item_table)  # (B, T, K*D)
        if self.behavior_table is not None and behaviors is not None:
            x = x + F.embedding(behaviors, self.behavior_table)
        x = x.view(B, T, K, D).permute(2, 0, 1, 3)  # (K, B, T, D)
        steps = torch.arange(T, device=items.device).unsqueeze(0)  # (1, T)
        positions = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # newest event is position 0, as in the model
        last = lengths - 1
        visible = (steps < lengths.unsqueeze(1)).view(B, 1, 1, T)  # the newest position's query sees its history
        outputs = []
        for group, members in zip(self.groups, self.members):
            xs = x[members[0]:members[0] + 1] if len(members) == 1 else x[members]  # (G, B, T, D)
            G = xs.shape[0]
            outputs.append(group(xs, positions, last, visible.repeat(G, 1, 1, 1)))  # (G, B, D)
        hidden = torch.cat(outputs)[self.tower_order]  # (K, B, D) in tower order
        if self.similarity == "cosine":
            hidden = F.normalize(hidden, dim=-1) / self.temperature
        return hidden.permute(1, 0, 2).reshape(B, K * D)


# ------------------------------------------------------------------------------------------------------- paths


def _parity_inputs(model, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """A few padded batches of random histories: a single event, mixed lengths, and longer than max_len."""
    config = model.config
    rng = np.random.default_rng(seed)
    batches = []
    for lengths in ([1], [3, 1, config.max_len + 5], [2, 7]):
        histories = [rng.integers(1, config.num_items + 1, n) for n in lengths]
        behaviors = [rng.integers(1, config.num_behaviors + 1, n) for n in lengths] if config.num_behaviors else None
        batches.append(pad_histories(histories, behaviors if model.behavior_embedding is not None else None, config))
    return batches


def check_parity(model, fn: UserVectorFn, device: str = "cpu") -> float:
    """Max abs difference of `fn`'s user vectors from the model's own over `_parity_inputs`."""
    worst = 0.0
    with torch.no_grad():
        for items, behaviors, lengths in _parity_inputs(model):
            items, lengths = items.to(device), lengths.to(device)
            behaviors = behaviors.to(device) if behaviors is not None else None
            reference = model.user_vectors(items, behaviors, lengths).float()
            worst = max(worst, (fn(items, behaviors, lengths).float() - reference).abs().max().item())
    return worst


def _eager(model) -> UserVectorFn:
    return model.user_vectors


def _fused(model) -> UserVectorFn:
    return FusedEncoder(model).to(next(model.parameters()).device).eval()


def _compile(model) -> UserVectorFn:
    compiled = torch.compile(model.user_vectors, dynamic=True)
    device = next(model.parameters()).device
    behaviors = model.behavior_embedding is not None
    with torch.no_grad():
        for B, T in COMPILE_WARMUP_SHAPES:  # compiled now, not on a request
            items = torch.ones(B, T, dtype=torch.long, device=device)
            compiled(items, torch.ones_like(items) if behaviors else None,
                     torch.full((B,), T, dtype=torch.long, device=device))
    return compiled


class _WithBehaviors(nn.Module):  # the exported signatures: behaviours only where the model has them
    def __init__(self, fused: FusedEncoder):
        super().__init__()
        self.fused = fused

    def forward(self, items, behaviors, lengths):
        return self.fused(items, behaviors, lengths)


class _WithoutBehaviors(_WithBehaviors):
    def forward(self, items, lengths):
        return self.fused(items, None, lengths)


@contextlib.contextmanager
def _quiet_export():
    """The exporter's progress lines, optimiser logs and axis-naming warnings stay out of the replica's log."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class OnnxEncoder:
    """FusedEncoder exported to ONNX (dynamic batch and length) and run by an onnxruntime CPU session."""

    def __init__(self, model, threads: int):
        import onnxruntime  # ImportError where it is not installed: the path is then unavailable

        fused = self.fused = FusedEncoder(model).eval()
        self.behaviors = fused.behavior_table is not None
        example = _parity_inputs(model)[1]
        names = ["items", "behaviors", "lengths"] if self.behaviors else ["items", "lengths"]
        batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=1,
                                                                                    max=model.config.max_len)
        shapes = {"items": {0: batch, 1: length}, "lengths": {0: batch}}
        if self.behaviors:
            shapes["behaviors"] = {0: batch, 1: length}

        wrapper = _WithBehaviors(fused) if self.behaviors else _WithoutBehaviors(fused)
        args = (example[0], example[1], example[2]) if self.behaviors else (example[0], example[2])
        with tempfile.TemporaryDirectory(prefix="seqrank-onnx-") as tmp, _quiet_export():
            path = Path(tmp) / "encoder.onnx"
            torch.onnx.export(wrapper.eval(), args, str(path), dynamo=True, input_names=names,
                              output_names=["user_vectors"], dynamic_shapes=tuple(shapes[n] for n in names),
                              verbose=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            # no busy-waiting between calls: the replica's other stages (retrieval, re-ranking) share its CPUs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = names

    def __call__(self, items, behaviors, lengths) -> torch.Tensor:
        if self.behaviors and behaviors is None:  # the graph always adds a behaviour; no behaviours adds none
            return self.fused(items, None, lengths)
        feed = {"items": items.numpy(), "lengths": lengths.numpy()}
        if self.behaviors:
            feed["behaviors"] = behaviors.numpy()
        return torch.from_numpy(self.session.run(None, feed)[0])


BUILDERS = {"eager": _eager, "fused": _fused, "compile": _compile,
            "onnx": lambda model, threads=1: OnnxEncoder(model, threads)}


@dataclass(frozen=True)
class InferencePath:
    """The path a replica serves with: what was asked for, what runs, and why if they differ."""

    requested: str
    name: str  # the path that runs
    user_vectors: UserVectorFn
    fallback_reason: str = ""
    build_seconds: float = 0.0
    parity_max_diff: float = 0.0


def candidate_paths(requested: str, device: str) -> tuple[str, ...]:
    """The paths to try in order for `requested` on `device` ("cpu", "cuda"); eager is always the last resort."""
    if requested not in PATHS:
        raise ValueError(f"encoder.inference: {requested!r} is not one of {', '.join(PATHS)}")
    return AUTO_PATHS[torch.device(device).type] if requested == "auto" else (requested,)


def build_path(model, name: str, threads: int = 1) -> UserVectorFn:
    """The callable of one path (no parity check, no fallback): raises when it cannot be built."""
    device = next(model.parameters()).device.type
    if device != "cpu" and name not in GPU_PATHS:
        raise UnsupportedModel(f"encoder.inference {name!r} runs on CPU only; on {device}: {', '.join(GPU_PATHS)}")
    return BUILDERS[name](model, threads) if name == "onnx" else BUILDERS[name](model)


def build_inference(model, requested: str = "auto", threads: int = 1) -> InferencePath:
    """The requested path for an eval-mode model, checked against eager; eager (logged loudly) when it cannot be
    built or fails the parity check. Only fp32 models are parity-checked (bf16 weights differ from fp32 by design)."""
    device = next(model.parameters()).device.type
    reasons = []
    for name in candidate_paths(requested, device):
        if name == "eager":
            break
        started = time.perf_counter()
        try:
            fn = build_path(model, name, threads)
            diff = check_parity(model, fn, device) if next(model.parameters()).dtype == torch.float32 else 0.0
            if not diff <= PARITY_TOLERANCE:  # also catches NaN
                raise UnsupportedModel(f"user vectors differ from eager's by {diff:.3g} > {PARITY_TOLERANCE}")
        except Exception as error:  # noqa: BLE001 - any failure to build a fast path serves the next, loudly
            reasons.append(f"{name}: {type(error).__name__}: {error}")
            logger.error("encoder.inference %r: path unavailable: %s", requested, reasons[-1])
            continue
        seconds = time.perf_counter() - started
        logger.info("encoder.inference %r: path %s built in %.1f s, parity max diff %.2g", requested, name, seconds,
                    diff)
        return InferencePath(requested, name, fn, "; ".join(reasons), seconds, diff)
    if reasons:
        logger.error("encoder.inference %r: serving eager instead (%s)", requested, "; ".join(reasons))
    return InferencePath(requested, "eager", _eager(model), "; ".join(reasons))


@torch.no_grad()
def encode_with(path: UserVectorFn, model, histories: list[np.ndarray], behaviors: list[np.ndarray] | None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """`encode_histories` (training/model.py) through `path`: the same padding and truncation, (B, D) float32."""
    items, behavior_matrix, lengths = padded_on(model, histories, behaviors, device)
    return path(items, behavior_matrix, lengths).float().cpu().numpy()
