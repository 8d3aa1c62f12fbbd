"""Typed arguments of the Serve application: one section per deployment, parsed once in `build_app`.

They arrive as `applications[].args` of `serving/serve_config.yaml`. Deployment options (replicas, autoscaling,
queue limits, resources) stay in Serve's own `deployments:` list, and each model-holding deployment's
`user_config: {artifact_path}` is parsed by `ModelUserConfig` in `reconfigure`. Unknown keys and wrong types are
errors: sections validate in pydantic's strict mode from JSON, the one input form in which strict mode also turns
the mappings of the dataclass sections (`Limits`, `HistoryConfig`) into their dataclasses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from seqrank.serving.auth import AuthConfig
from seqrank.serving.history.events import HistoryConfig
from seqrank.serving.validation import Limits

SERVE_CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")  # the one Serve config
# Topology. Where the encoder and retrieval run: inside the ingress replica (a function call) or as their own
# deployments (a hop each); where the MMR re-ranker runs: inside retrieval (a function call) or as its own deployment.
RERANK_IN_RETRIEVAL = "retrieval"
OWN_DEPLOYMENT = "deployment"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# Downstream batching: calls from the ingress each carry a whole Rank batch (see serving/batching.py), and
# `@serve.batch` merges calls that arrive within batch_wait_timeout_s of each other, a delay every call then
# pays; hence 0. Batch sizes count histories or queries and must hold one ingress batch.


class EncoderArgs(Section):
    # deployment: its own replica pool, scaled and placed apart from the ingress (autoscaling, GPU, bf16: the
    # choice for Kubernetes and for any model bigger than a toy); ingress: the forward pass in the ingress replica,
    # on its CPUs, one hop fewer (a hop costs more than a small model's forward pass on a small machine: docs/benchmarks/serving.md). Batch options below apply to the deployment; in the ingress, its own batches are the encoder's.
    placement: Literal["ingress", "deployment"] = OWN_DEPLOYMENT
    max_batch_size: int = Field(64, ge=1)  # >= ingress.max_batch_size: one ingress batch always fits
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)
    # A replica given a GPU runs the model with bf16 weights (every activation bf16, no autocast), in fp32, or
    # (auto) in bf16 from a width of 256 up. Measured on an H200 (docs/benchmarks/encoder.md, "Encoder speed on the H200"): 8 layers of width 512 run 5.7x
    # faster in bf16 than in fp32 at batch 1024 and 1.2x faster than under bf16 autocast; width 64 is bound by
    # kernel launches, where bf16 only adds casts (fp32 1.7x faster). CPU replicas always run fp32.
    gpu_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # How the forward pass runs (serving/inference.py): eager (the model's own forward, tower after tower), fused
    # (all towers in one stacked pass, the last layer at the newest position only), compile (torch.compile, ~30 s+ per
    # replica start), onnx (the fused pass in onnxruntime on the replica's CPUs). auto: onnx on a CPU (fused where
    # onnxruntime is missing), eager on a GPU, where only eager and compile run. Measured on the committed recipe
    # (docs/benchmarks/encoder.md, "Inference paths on CPU-2"): batch 1 6.4x faster in onnx than eager. A path
    # that fails to build, or whose vectors differ from eager's, is logged and the replica serves eager.
    inference: Literal["auto", "eager", "fused", "compile", "onnx"] = "auto"


class RetrievalArgs(Section):
    # deployment: its own replicas (scaled apart from the ingress); ingress: a function call in the ingress replica,
    # one hop fewer (measured on 2 cores: Rank p50 -30 %, throughput +10 %), the index then in every ingress replica.
    placement: Literal["ingress", "deployment"] = OWN_DEPLOYMENT
    ef: int | None = Field(None, ge=1)  # hnswlib query beam; None = the artifact's ef_search (manifest)
    # How the unfiltered top-k over the trained items is found: exact (one float32 matrix product over every item
    # vector, then argpartition: recall 1), hnsw (the artifact's hnswlib index at `ef`), or auto: exact up to
    # seqrank.serving.retrieval.EXACT_SEARCH_MAX_ITEMS items, where it is as fast as the beam or faster
    # (docs/benchmarks/retrieval.md, "Exact search against HNSW by catalogue size"), hnsw beyond and with shards.
    search: Literal["auto", "exact", "hnsw"] = "auto"
    # With an artifact that has an item-to-item transition prior (training/transitions.py): how many of the newest
    # history item's most frequent successors join the index's candidates before the prior re-scores them all.
    transition_candidates: int = Field(50, ge=0)
    max_batch_size: int = Field(64, ge=1)  # own deployment only; >= ingress.max_batch_size
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)
    # Sharding (serving/shards.py), own deployment only: > 1 splits the index over that many RetrievalShard<s>
    # deployments (item i in shard (i - 1) % num_shards), each with its own replicas; Retrieval merges their top-k.
    num_shards: int = Field(1, ge=1)
    # MiB one shard replica may spend on its index (vectors included); `seqrank serve` and `seqrank deploy` raise
    # num_shards until the artifact's index fits (serving/ops/deploy.py `plan_shards`). None: no budget.
    shard_memory_budget_mb: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _shards_need_own_deployment(self) -> "RetrievalArgs":
        if self.num_shards > 1 and self.placement != OWN_DEPLOYMENT:
            raise ValueError(f"retrieval.num_shards: {self.num_shards} shards need retrieval.placement "
                             f"{OWN_DEPLOYMENT!r}, got {self.placement!r}")
        return self


class RerankArgs(Section):
    placement: Literal["retrieval", "deployment"] = RERANK_IN_RETRIEVAL
    max_batch_size: int = Field(64, ge=1)  # its own deployment only; >= ingress.max_batch_size
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0)


class AttributionArgs(Section):
    # Online quality (serving/attribution.py): each ingress replica remembers which items every Rank list showed,
    # at which positions, under which model version, keyed by the response's request_id, so that a RecordEvents
    # event naming that id (Event.list_request_id) counts as a hit at its position or a miss. Bounded both ways:
    # a list is forgotten after ttl_s or when max_lists newer ones arrived (least recently shown first). About
    # 1.5 KB per list of 10 items: 100000 lists ~ 150 MB at worst. max_lists 0 turns attribution off.
    ttl_s: float = Field(1800.0, gt=0.0, le=86_400.0)
    max_lists: int = Field(100_000, ge=0, le=10_000_000)


class IngressArgs(Section):
    # A user with neither stored history nor inline events gets the artifact's most popular items minus the
    # exclusions (history_source FALLBACK) under "popular", NOT_FOUND naming user_id under "not_found".
    cold_start: Literal["popular", "not_found"] = "popular"
    # Concurrent Rank requests share one encoder call and one retrieval call per batch (serving/batching.py):
    # a batch starts when one of max_concurrent_batches slots is free, with what queued meanwhile.
    max_batch_size: int = Field(16, ge=1)
    max_concurrent_batches: int = Field(2, ge=1)
    limits: Limits = Limits()
    history: HistoryConfig = HistoryConfig()
    # Bearer tokens required on every RankingService call (Health Check exempt): "" = off, `env:NAME` or
    # `file:/path` (serving/auth.py), resolved in the replica so the tokens never enter the Serve config.
    auth: AuthConfig = AuthConfig()
    attribution: AttributionArgs = AttributionArgs()


class LocalArgs(Section):
    """Read only by `seqrank serve`, which starts Ray itself; a cluster's operator sets these on `ray start`."""

    metrics_export_port: int = Field(8080, ge=1, le=65535)  # Prometheus scrape port of Ray's metrics agent
    dashboard_port: int = Field(8265, ge=1, le=65535)  # Serve's REST API, which applies configs in place
    # Ray's documented high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 on every Ray process: gRPC between
    # replicas, user code on the replica's main loop). Measured on 2 cores (docs/benchmarks/serving.md): it helps while
    # deployment hops remain (Rank p50 4.8x -> 3.7x the echo with the Encoder and Retrieval deployments), not with
    # both stages in the ingress (2.6x either way). Cluster-wide, so off unless asked for; on Kubernetes it is the
    # containers' environment.
    throughput_optimized: bool = False
    # Largest request or response message the gRPC proxy accepts (Ray's RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, 2 GiB by
    # default); larger ones are refused RESOURCE_EXHAUSTED before any replica sees them. 1 MiB holds the largest
    # request `ingress.limits` allows (about 0.6 MiB with 4-byte UTF-8 ids). Kubernetes: the pods' environment.
    grpc_max_message_bytes: int = Field(1024 * 1024, ge=64 * 1024, le=2**31 - 1)


class AppArgs(Section):
    encoder: EncoderArgs = EncoderArgs()
    retrieval: RetrievalArgs = RetrievalArgs()
    rerank: RerankArgs = RerankArgs()
    ingress: IngressArgs = IngressArgs()
    local: LocalArgs = LocalArgs()

    @classmethod
    def parse(cls, args: Mapping[str, Any] | AppArgs) -> AppArgs:
        """Validates a config's `args` mapping; raises pydantic.ValidationError naming each bad key."""
        if isinstance(args, AppArgs):
            return args
        return cls.model_validate_json(json.dumps(dict(args)))


class ModelUserConfig(Section):
    """`user_config` of every deployment that serves the model; changing it reloads in place (`reconfigure`)."""

    artifact_path: str = Field(min_length=1)  # a local directory written by `seqrank export`
    # Canary (serving/canary.py): a second artifact served next to artifact_path to canary_percent of the users,
    # chosen by a stable hash of the user id (a user stays on one version). None: one version. `seqrank canary`
    # edits these three fields; 100 serves everyone the canary, `promote` then makes it the artifact_path.
    canary_artifact_path: str | None = Field(None, min_length=1)
    canary_percent: float = Field(0.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _percent_needs_canary(self) -> "ModelUserConfig":
        if self.canary_percent > 0 and self.canary_artifact_path is None:
            raise ValueError(f"canary_percent: {self.canary_percent} needs canary_artifact_path")
        return self

    @classmethod
    def parse(cls, user_config: Mapping[str, Any] | None) -> ModelUserConfig:
        if user_config is None:
            raise ValueError("user_config: missing; set user_config.artifact_path on this deployment")
        return cls.model_validate_json(json.dumps(dict(user_config)))
