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

from seqrank.serving.config import ModelUserConfig
from seqrank.serving.errors import Unavailable
from seqrank.training.artifact import Artifact, load_artifact

logger = logging.getLogger(f"ray.serve.{__name__}")  # into Serve's replica logs


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
    """What a replica serves: the current version and the one it replaced (None before the first reload)."""

    current: ModelT
    previous: ModelT | None

    @property
    def versions(self) -> tuple[str, ...]:
        """Held model versions, newest first."""
        if self.previous is None:
            return (self.current.model_version,)
        return self.current.model_version, self.previous.model_version


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
        loaded = self.loaded  # one read: the rest of the request sees one consistent pair
        if model_version is None or model_version == loaded.current.model_version:
            return loaded.current
        if loaded.previous is not None and loaded.previous.model_version == model_version:
            return loaded.previous
        raise VersionUnavailable(model_version, loaded.versions)

    def reload(self, user_config: Mapping[str, Any] | None) -> None:
        """Loads and builds the artifact named in `user_config`, then swaps it in."""
        with self._reload_lock:
            old = self._loaded
            try:
                config = ModelUserConfig.parse(user_config)
                new = self._build(load_artifact(config.artifact_path))
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
            if old is not None and old.current.model_version == new.model_version:
                loaded = Loaded(current=new, previous=old.previous)  # same version re-applied: no rollout
            else:
                loaded = Loaded(current=new, previous=old.current if old is not None else None)
            self._loaded = loaded  # the swap
            logger.info("%s: serving %s (also holding %s)", self._owner, new.model_version, loaded.versions[1:])
            self._notify("ok", old.current.model_version if old is not None else None, new.model_version)

    def _notify(self, outcome: str, old_version: str | None, new_version: str | None) -> None:
        if self._on_reload is not None:
            self._on_reload(outcome, old_version, new_version)
