"""The encoder: histories of concurrent requests become user vectors in one batched forward pass.

`EncoderStage` does the work wherever it runs: in the Encoder deployment (each call carries the histories of one
ingress batch; `@serve.batch` merges calls that arrive together), or in the ingress replica itself
(`encoder.placement: ingress`, serving/config.py).

The model and the history -> vector step come from training/model.py (`load_encoder`, `pad_histories`),
so padding and truncation to the model's max_len are the trained ones; the forward pass runs by the path
`encoder.inference` names (serving/inference.py: eager, fused, compile, onnx; built and checked against eager
at load). A replica given a GPU (`num_gpus` in the Serve config) runs on it, with bf16 weights for a wide model
(`encoder.gpu_precision`); otherwise on CPU in fp32 with as many torch (and onnxruntime) threads as it has CPUs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray import serve

from seqrank.serving.batching import count_items, flatten, group_by_model, split
from seqrank.serving.catalogue import Catalogue
from seqrank.serving.config import EncoderArgs
from seqrank.serving.errors import Unavailable
from seqrank.serving.inference import InferencePath, build_inference, encode_with
from seqrank.serving.messages import EncodedUser, EncodeRequest
from seqrank.serving.metrics import STAGE_ENCODE, ServingMetrics
from seqrank.serving.reload import ModelSlot
from seqrank.training.artifact import Artifact
from seqrank.training.model import SequenceEncoder, load_encoder

logger = logging.getLogger(f"ray.serve.{__name__}")


BF16_MIN_WIDTH = 256  # gpu_precision auto: narrower models are launch-bound on a GPU, where bf16 only adds casts


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    gpu_precision: str  # EncoderArgs.gpu_precision on a GPU; "fp32" on a CPU


def choose_placement(cuda_available: bool, assigned_gpus: int, gpu_precision: str = "auto") -> Placement:
    """The GPU only when the replica was given one and torch can see one."""
    if cuda_available and assigned_gpus > 0:
        return Placement("cuda", gpu_precision)
    return Placement("cpu", "fp32")


def weight_dtype(placement: Placement, hidden_size: int) -> torch.dtype | None:
    """bf16 for a model's weights (and so every activation) where the placement asks for it; None = fp32."""
    if placement.gpu_precision == "bf16" or (placement.gpu_precision == "auto" and hidden_size >= BF16_MIN_WIDTH):
        return torch.bfloat16
    return None


def torch_threads(assigned_cpus: float) -> int:
    """Intra-op threads for a replica holding `assigned_cpus` (fractions round down, at least 1)."""
    return max(1, int(assigned_cpus))


@dataclass(frozen=True)
class LoadedEncoder:
    catalogue: Catalogue
    model: SequenceEncoder  # eval mode, on the replica's device
    inference: InferencePath  # how its forward pass runs (encoder.inference)

    @property
    def model_version(self) -> str:
        return self.catalogue.model_version


@dataclass(frozen=True)
class PreparedHistory:
    loaded: LoadedEncoder
    items: np.ndarray  # (n,) int64 item indices, n >= 1, oldest first
    behaviors: np.ndarray  # (n,) int64 behaviour indices


class EncoderStage:
    """The encoder of one replica, wherever it runs: the versioned model, per-request checks, the forward pass.

    The Encoder deployment wraps it; with `encoder.placement: ingress` the ingress replica holds one itself. Torch
    threads follow the replica's CPUs, and a replica given a GPU uses it.
    """

    def __init__(self, metrics: ServingMetrics, owner: str = "encoder", gpu_precision: str = "auto",
                 inference: str = "auto") -> None:
        resources = ray.get_runtime_context().get_assigned_resources()
        self._threads = torch_threads(resources.get("CPU", 1.0))
        torch.set_num_threads(self._threads)
        self._inference = inference
        self._placement = choose_placement(torch.cuda.is_available(), len(ray.get_gpu_ids()), gpu_precision)
        logger.info("%s on %s (precision %s), %d torch threads",
                    owner, self._placement.device, self._placement.gpu_precision, torch.get_num_threads())
        self._metrics = metrics
        self.models: ModelSlot[LoadedEncoder] = ModelSlot(owner, self._load, metrics.observe_reload)

    def _load(self, artifact: Artifact) -> LoadedEncoder:
        model = load_encoder(artifact.encoder_config, artifact.encoder_weights_path, self._placement.device)
        dtype = weight_dtype(self._placement, model.config.hidden_size)
        if dtype is not None:
            model = model.to(dtype)
        inference = build_inference(model, self._inference, self._threads)  # falls back to eager, logged
        return LoadedEncoder(catalogue=Catalogue.from_artifact(artifact), model=model, inference=inference)

    def prepare(self, request: EncodeRequest) -> PreparedHistory:
        """Resolves the model version (VersionUnavailable) and the history's indices; runs before batching."""
        loaded = self.models.resolve(request.model_version)
        items, behaviors = loaded.catalogue.history_indices(request.history)
        if items.size == 0:  # only mid-rollout: the ingress checked the history against its own version
            raise Unavailable("model_version", f"{loaded.model_version} knows none of the history's items")
        return PreparedHistory(loaded, items, behaviors)

    async def user_vectors(self, batch: list[PreparedHistory]) -> list[np.ndarray]:
        """(D,) float32 vectors of prepared histories, in order: one forward pass per model version in the batch,
        in a worker thread, so the event loop keeps serving (and batching) meanwhile."""
        self._metrics.observe_batch(STAGE_ENCODE, len(batch))
        return await asyncio.to_thread(self._forward, batch)

    async def encode(self, requests: list[EncodeRequest]) -> list[EncodedUser]:
        """`prepare` and `user_vectors` for a caller that already holds the whole batch (the ingress)."""
        prepared = [self.prepare(request) for request in requests]
        return encoded_users(prepared, await self.user_vectors(prepared))

    def _forward(self, batch: list[PreparedHistory]) -> list[np.ndarray]:
        vectors: list[np.ndarray] = [None] * len(batch)  # type: ignore[list-item]
        for loaded, positions in group_by_model(batch, lambda prepared: prepared.loaded):
            user_vectors = encode_with(
                loaded.inference.user_vectors,
                loaded.model,
                [batch[p].items for p in positions],
                [batch[p].behaviors for p in positions],
                self._placement.device,
            )  # (b, D) float32, whatever the weights' dtype
            for row, position in enumerate(positions):
                vectors[position] = user_vectors[row]
        return vectors


def encoded_users(prepared: list[PreparedHistory], vectors: list[np.ndarray]) -> list[EncodedUser]:
    return [EncodedUser(user_vector=vector, model_version=p.loaded.model_version)
            for vector, p in zip(vectors, prepared)]


@serve.deployment(max_ongoing_requests=64)
class Encoder:
    """The encoder as its own deployment (`encoder.placement: deployment`): its own pool, autoscaled, GPU-capable;
    `@serve.batch` merges the calls (each an ingress batch) that arrive together."""

    def __init__(self, args: EncoderArgs) -> None:
        self._stage = EncoderStage(ServingMetrics(), gpu_precision=args.gpu_precision, inference=args.inference)
        self._encode_batch.set_max_batch_size(args.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        self._stage.models.reload(user_config)  # sync: Serve runs it in a worker thread while requests continue

    def check_health(self) -> None:
        self._stage.models.loaded  # raises until an artifact is loaded

    async def encode(self, requests: list[EncodeRequest]) -> list[EncodedUser]:
        """User vectors of the requests' histories, each under its requested (or the current) model version."""
        prepared = [self._stage.prepare(request) for request in requests]  # every check runs before batching
        return encoded_users(prepared, await self._encode_batch(prepared))

    @serve.batch(batch_size_fn=count_items)
    async def _encode_batch(self, calls: list[list[PreparedHistory]]) -> list[list[np.ndarray]]:
        return split(await self._stage.user_vectors(flatten(calls)), calls)
