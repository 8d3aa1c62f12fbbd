"""The typed messages the deployments pass each other, in the order a Rank request produces them.

ingress --EncodeRequest--> encoder --EncodedUser--> ingress --RetrievalRequest--> retrieval
    --RankedList--> ingress                      (re-ranker inside retrieval, the default), or
    --CandidateSet--> ingress --RerankRequest--> re-ranker --RankedList--> ingress   (re-ranker deployment).
Ids travel raw and every message that depends on a model names its version (see serving/reload.py).
Torch-free, so the ingress never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seqrank.serving.catalogue import History


@dataclass(frozen=True)
class EncodeRequest:
    history: History  # non-empty; items the model version does not know are dropped by the encoder
    model_version: str | None = None  # None = the encoder's current version


@dataclass(frozen=True)
class EncodedUser:
    user_vector: np.ndarray  # (D,) float32; score = user_vector . item_vector
    model_version: str


@dataclass(frozen=True)
class RetrievalRequest:
    user: EncodedUser
    history: History  # the full (bounded) history: exclude_seen and explanations read it
    exclude_item_ids: tuple[str, ...]  # raw ids the caller excludes
    exclude_seen: bool
    num_candidates: int  # >= k: fetched after filtering, then re-ranked
    k: int
    diversity: float  # MMR lambda in [0, 1]
    candidate_item_ids: tuple[str, ...] = ()  # the caller's candidates (search re-ranking); () = retrieve
    include_any: tuple[str, ...] = ()  # attribute filter; () = any item
    exclude_any: tuple[str, ...] = ()
    catalogue_version: int = 0  # the live catalogue version the ingress saw: retrieval catches up to it first


@dataclass(frozen=True)
class CandidateSet:
    """Filtered candidates, best first, with what the re-ranker needs from the index's model version."""

    model_version: str
    item_ids: np.ndarray  # (C,) object raw ids
    relevance: np.ndarray  # (C,) float64 model scores: inner products, plus the transition prior's term if any
    item_vectors: np.ndarray  # (C, D) float32
    history: History  # events whose items the version knows
    history_vectors: np.ndarray  # (H, D) float32, row h = item vector of history event h


@dataclass(frozen=True)
class RerankRequest:
    candidates: CandidateSet
    k: int
    diversity: float


@dataclass(frozen=True)
class RankedItem:
    item_id: str
    score: float  # MMR score at pick time
    relevance: float  # model score: inner product of user and item vectors (+ the transition prior's term)
    because_item_id: str  # most similar history item; "" for the fallback list
    explanation: str


@dataclass(frozen=True)
class RankedList:
    model_version: str
    items: tuple[RankedItem, ...]  # best first
    rerank_ms: float  # MMR compute time, wherever it ran
