"""A history store that accepts connections and never answers (a blackholed Redis) cannot stall ranking.

The real ingress class runs outside Ray, its encoder and retrieval deployments stood in for by fakes (a Serve
replica context cannot be had outside Ray). Its store is a TCP listener on loopback that accepts and never
replies. Rank with inline events never waits for it, nor does the default executor (where an in-ingress encoder
runs its forward pass); Rank from the store degrades to STORE_UNAVAILABLE, and RecordEvents answers UNAVAILABLE,
after `history.call_timeout_s`, not after the store's own socket timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs
from seqrank.serving.history import HistoryConfig
from seqrank.serving.ingress import RankingIngress
from seqrank.serving.messages import EncodedUser, RankedItem, RankedList
from seqrank.v1 import ranking_pb2 as pb
from tests.serving.artifacts import write_small_artifact
from tests.support import FakeContext

CALL_TIMEOUT_S = 0.3  # history.call_timeout_s: the deadline under test
SOCKET_TIMEOUT_S = 2.0  # history.busy_timeout_s: what a store call would wait per attempt without the deadline


class Blackhole:
    """Accepts TCP connections on a loopback port and never sends a byte; closes them at the end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


class Remote:
    """Stands in for `handle.method`: `.remote(...)` returns an awaitable, like a DeploymentResponse."""

    def __init__(self, function):
        self.function = function

    def remote(self, *args):
        async def call():
            return self.function(*args)

        return call()


class FakeEncoder:
    def __init__(self):
        self.encode = Remote(lambda requests: [EncodedUser(np.ones(4, np.float32), "small-v1") for _ in requests])


class FakeRetrieval:
    def __init__(self):
        self.rank = Remote(lambda requests: [
            RankedList("small-v1", tuple(RankedItem(f"sku-{i}", 1.0, 1.0, "", "") for i in range(1, r.k + 1)), 0.1)
            for r in requests])


@pytest.fixture
def blackholed_ingress(tmp_path):
    blackhole = Blackhole()
    history = HistoryConfig(url=f"redis://127.0.0.1:{blackhole.port}/0", busy_timeout_s=SOCKET_TIMEOUT_S,
                            call_timeout_s=CALL_TIMEOUT_S, max_concurrent_calls=2)
    ingress = RankingIngress.func_or_class(IngressArgs(history=history), EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="deployment"), FakeEncoder(), FakeRetrieval(), None)
    ingress.reconfigure({"artifact_path": str(write_small_artifact(tmp_path / "v1"))})
    yield ingress
    blackhole.close()


async def timed(call, request):
    context, started = FakeContext(), time.monotonic()
    response = await call(request, grpc_context=context)
    return response, context, time.monotonic() - started


def test_a_blackholed_store_degrades_rank_within_the_deadline_and_spares_inline_ranks(blackholed_ingress):
    ingress = blackholed_ingress
    known = [pb.Event(item_id=f"sku-{i}") for i in range(1, 4)]

    async def scenario():
        # More store-backed Ranks than the default executor has threads (min(32, cores + 4)), at once; then an
        # inline Rank and a call on the default executor behind them.
        stored = [asyncio.ensure_future(timed(ingress.Rank, pb.RankRequest(user_id=f"u{i}", k=5)))
                  for i in range(12)]
        await asyncio.sleep(0.05)
        inline = await timed(ingress.Rank, pb.RankRequest(user_id="inline", k=5, recent_events=known))
        default_executor_free = await asyncio.to_thread(lambda: not any(task.done() for task in stored))
        inline_done_first = default_executor_free and not any(task.done() for task in stored)
        record = await timed(ingress.RecordEvents, pb.RecordEventsRequest(
            users=[pb.UserEvents(user_id="u0", events=known[:1])], idempotency_key="k1"))
        return inline, inline_done_first, await asyncio.gather(*stored), record

    inline, inline_done_first, stored, record = asyncio.run(scenario())
    response, context, _ = inline
    assert context.code is None and response.history_source == pb.HISTORY_SOURCE_INLINE and len(response.items) == 5
    assert inline_done_first  # it never queued behind the hanging store calls
    for response, context, seconds in stored:
        assert context.code is None and response.history_source == pb.HISTORY_SOURCE_STORE_UNAVAILABLE
        assert len(response.items) == 5
        # The deadline answered, not the store's socket timeout (which would take SOCKET_TIMEOUT_S per attempt).
        assert seconds < SOCKET_TIMEOUT_S, seconds
    _, context, seconds = record
    assert context.code == grpc.StatusCode.UNAVAILABLE and seconds < SOCKET_TIMEOUT_S
    assert context.details.startswith("history_store: no answer within history.call_timeout_s=0.3 s")
