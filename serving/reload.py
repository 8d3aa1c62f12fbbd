"""Hot reload: what a model-holding replica keeps, and how `reconfigure` replaces it.

A replica (ingress, encoder, retrieval) builds everything for the new artifact first (verified load, model,
index) and then swaps one reference, so a request reads either the old or the new version, never a mix; requests
in flight keep the objects they already hold. Serve reconfigures the deployments one after another, so for a
moment the encoder may already produce v2 vectors while retrieval still searches the v1 index: each replica
therefore also keeps the version before its current one, requests name the version they need, and
`resolve` serves it or raises `VersionUnavailable` listing what it holds (the ingress then re-encodes once).

A reload that fails keeps the old version serving and fails loudly (error log with traceback, the
`seqrank_model_reloads_total{outcome="failed"}` counter); with nothing loaded yet it raises, failing the replica.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Protocol, TypeVar

from seqrank.serving.canary import in_canary
from seqrank.serving.config import ModelUserConfig
from seqrank.serving.errors import Unavailable
from seqrank.training.artifact import Artifact, load_artifact

logger = logging.getLogger(f"ray.serve.{__name__}")  # into Serve's replica logs


def _dropped(old: Loaded[ModelT] | None, current: ModelT, canary: ModelT | None) -> ModelT | None:
    """The version to keep for requests in flight: the newest one this reload stops serving (the old current,
    else the old canary), else the previous one kept before."""
    if old is None:
        return None
    serving = {current.model_version} | ({canary.model_version} if canary is not None else set())
    for model in (old.current, old.canary, old.previous):
        if model is not None and model.model_version not in serving:
            return model
    return None


class VersionUnavailable(Unavailable):
    """A stage was asked for a model version it does not hold (during a rollout); `held` is newest first."""

    def __init__(self, requested: str, held: tuple[str, ...]) -> None:
        super().__init__("model_version", f"{requested!r} is not loaded here; this replica holds {list(held)}")
        self.requested = requested
        self.held = held

    def __reduce__(self):
        return type(self), (self.requested, self.held)


class Versioned(Protocol):
    @property
    def model_version(self) -> str: ...


ModelT = TypeVar("ModelT", bound=Versioned)


@dataclass(frozen=True)
class Loaded(Generic[ModelT]):
    """What a replica serves: the current version, the canary served to `canary_percent` of the users beside it
    (serving/canary.py), and the version last dropped (None before the first reload), kept for requests in flight."""

    current: ModelT
    previous: ModelT | None
    canary: ModelT | None = None
    canary_percent: float = 0.0

    @property
    def versions(self) -> tuple[str, ...]:
        """Held model versions: the current one first, then the canary, then the previous one."""
        return tuple(model.model_version for model in (self.current, self.canary, self.previous) if model is not None)

    def for_user(self, user_id: str) -> ModelT:
        """The model that serves `user_id`: the canary for the users its percentage picks, else the current one."""
        if self.canary is not None and in_canary(user_id, self.canary_percent):
            return self.canary
        return self.current


class ModelSlot(Generic[ModelT]):
    """Holds `Loaded[ModelT]` for one replica; `reload` is called from `reconfigure` (a Serve worker thread)."""

    def __init__(
        self,
        owner: str,
        build: Callable[[Artifact], ModelT],
        on_reload: Callable[[str, str | None, str | None], None] | None = None,
    ) -> None:
        self._owner = owner
        self._build = build
        self._on_reload = on_reload  # (outcome "ok" | "failed", old version, new version): metrics
        self._loaded: Loaded[ModelT] | None = None
        self._reload_lock = threading.Lock()  # one reload at a time; readers never take it

    @property
    def loaded(self) -> Loaded[ModelT]:
        loaded = self._loaded
        if loaded is None:
            raise Unavailable("model", f"{self._owner} has not loaded an artifact yet")
        return loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def current(self) -> ModelT:
        return self.loaded.current

    def resolve(self, model_version: str | None) -> ModelT:
        """The held model of that version, or the current one for None; raises VersionUnavailable."""
        loaded = self.loaded  # one read: the rest of the request sees one consistent set
        if model_version is None or model_version == loaded.current.model_version:
            return loaded.current
        for model in (loaded.canary, loaded.previous):
            if model is not None and model.model_version == model_version:
                return model
        raise VersionUnavailable(model_version, loaded.versions)

    def reload(self, user_config: Mapping[str, Any] | None) -> None:
        """Loads and builds the artifacts named in `user_config` (current and canary), then swaps them in. A version
        this slot already holds is reused, not rebuilt: setting a canary's percentage, promoting it or rolling
        it back loads nothing."""
        with self._reload_lock:
            old = self._loaded
            try:
                config = ModelUserConfig.parse(user_config)
                new = self._load(config.artifact_path, old)
                canary = None
                if config.canary_artifact_path is not None:
                    canary = self._load(config.canary_artifact_path, old)
                    if canary.model_version == new.model_version:
                        canary = None  # the canary is the current version: one version served
            except Exception:
                if old is None:
                    raise  # nothing to keep serving: fail the replica's start, loudly
                # Any failure (bad config, corrupt artifact, model that does not load) must leave the old version
                # serving; Serve would otherwise replace this replica and retry the same bad config.
                logger.exception(
                    "%s: reload with user_config %r failed; still serving %s",
                    self._owner, user_config, old.current.model_version,
                )
                self._notify("failed", old.current.model_version, None)
                return
            loaded = Loaded(current=new, previous=_dropped(old, new, canary), canary=canary,
                            canary_percent=config.canary_percent if canary is not None else 0.0)
            self._loaded = loaded  # the swap
            logger.info("%s: serving %s (canary %s at %s %%; also holding %s)", self._owner, new.model_version,
                        canary.model_version if canary is not None else None, loaded.canary_percent,
                        loaded.previous.model_version if loaded.previous is not None else None)
            self._notify("ok", old.current.model_version if old is not None else None, new.model_version)

    def _load(self, artifact_path: str, old: Loaded[ModelT] | None) -> ModelT:
        artifact = load_artifact(artifact_path)  # verified, so a corrupted copy of a held version is still refused
        held = () if old is None else (old.current, old.canary, old.previous)
        for model in held:
            if model is not None and model.model_version == artifact.model_version:
                return model
        return self._build(artifact)

    def _notify(self, outcome: str, old_version: str | None, new_version: str | None) -> None:
        if self._on_reload is not None:
            self._on_reload(outcome, old_version, new_version)
