"""A history store's calls on threads of their own, each with one total deadline.

A store that hangs (a blackholed Redis accepts the connection and never answers; redis-py then waits its socket
timeout on every retry) must not hold the threads the encoder's forward pass runs on, nor make a Rank wait past
its budget. Calls run on a small executor owned by this wrapper; `asyncio.wait_for` gives up on the call after
`history.call_timeout_s` and answers Unavailable, which Rank turns into HISTORY_SOURCE_STORE_UNAVAILABLE and
RecordEvents into UNAVAILABLE (retry with the same idempotency key). A call given up on keeps its thread until the
store's own timeout ends it; `max_concurrent_calls` bounds how many threads that can cost.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from seqrank.serving.errors import Unavailable
from seqrank.serving.history.events import (
    AppendResult,
    CatalogueWrite,
    HistoryStore,
    ItemChange,
    ItemState,
    StoredEvent,
    UserEvents,
)

T = TypeVar("T")


class DeadlineStore:
    """The async face of a HistoryStore for the ingress: same calls, bounded in time and in threads."""

    def __init__(self, store: HistoryStore, timeout_s: float, max_threads: int) -> None:
        self.store = store
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="history-store")

    async def _call(self, function: Callable[..., T], *args) -> T:
        call = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable("history_store", f"no answer within history.call_timeout_s={self._timeout_s} s; "
                                               "retry (writes: with the same idempotency key)") from None

    async def append(self, user_events: Sequence[UserEvents], idempotency_key: str | None) -> AppendResult:
        return await self._call(self.store.append, user_events, idempotency_key)

    async def recent(self, user_id: str, limit: int) -> list[StoredEvent]:
        return await self._call(self.store.recent, user_id, limit)

    async def write_items(self, changes: Sequence[ItemChange], idempotency_key: str | None) -> CatalogueWrite:
        return await self._call(self.store.write_items, changes, idempotency_key)

    async def items_since(self, version: int) -> tuple[list[ItemState], int]:
        return await self._call(self.store.items_since, version)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()
