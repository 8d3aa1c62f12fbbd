"""Client-side balancing over real local gRPC servers: one name that resolves to two servers (what a headless
Service's DNS gives) spreads calls with round_robin and pins one server with pick_first; max_connection_age_s
re-creates the channel between calls, so a name that now points elsewhere gets the calls, and a call in flight on
the old channel finishes before that channel is closed."""

from __future__ import annotations

import itertools
import json
import threading
from concurrent import futures

import grpc
import pytest

from seqrank.serving.client.ranking_client import PICK_FIRST, ROUND_ROBIN, RankingClient, channel_options
from seqrank.serving.client.retry import RetryPolicy
from seqrank.v1 import ranking_pb2 as pb
from seqrank.v1 import ranking_pb2_grpc

FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.01)
CALLS = 20


class Named(ranking_pb2_grpc.RankingServiceServicer):
    """Answers Rank with its own name; `gate`, when set, holds each call until it opens."""

    def __init__(self, name: str, gate: threading.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.calls = 0
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def Rank(self, request, context):
        with self.lock:
            self.calls += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return pb.RankResponse(request_id=self.name)


class Servers:
    """Starts servers and stops every one of them at teardown."""

    def __init__(self) -> None:
        self.started: list[grpc.Server] = []

    def start(self, servicer: Named, address: str = "127.0.0.1:0") -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port(address)
        assert port, address
        server.start()
        self.started.append(server)
        return port

    def stop(self) -> None:
        for server in self.started:
            server.stop(None)


@pytest.fixture
def servers():
    held = Servers()
    yield held
    held.stop()


@pytest.fixture
def two_behind_one_name(servers):
    """`ipv4:127.0.0.1:A,127.0.0.1:B`: one target resolving to two servers, as a headless Service's name does."""
    a, b = Named("server-a"), Named("server-b")
    ports = [servers.start(a), servers.start(b)]
    return f"ipv4:{','.join(f'127.0.0.1:{port}' for port in ports)}"


def answered_by(client: RankingClient, calls: int) -> list[str]:
    return [client.rank("u1").request_id for _ in range(calls)]


def test_round_robin_spreads_calls_over_every_address_of_the_name(two_behind_one_name):
    with RankingClient(two_behind_one_name, load_balancing=ROUND_ROBIN, retry=FAST, timeout_s=5) as client:
        # round_robin is READY as soon as one subchannel connects: call until the second one has answered too.
        warm_up = []
        while len(set(warm_up)) < 2 and len(warm_up) < 200:
            warm_up += answered_by(client, 1)
        names = answered_by(client, CALLS)
    assert set(names) == {"server-a", "server-b"}, names
    assert abs(names.count("server-a") - names.count("server-b")) <= 2, names
    alternations = sum(first != second for first, second in itertools.pairwise(names))
    assert alternations >= CALLS - 3, names  # in turn, not in runs


@pytest.mark.parametrize("load_balancing", [None, PICK_FIRST])
def test_pick_first_sends_every_call_to_one_server(two_behind_one_name, load_balancing):
    """The default for a non-dns: target (None), and pick_first named explicitly."""
    with RankingClient(two_behind_one_name, load_balancing=load_balancing, retry=FAST, timeout_s=5) as client:
        names = answered_by(client, CALLS)
    assert len(set(names)) == 1, names


def test_dns_targets_default_to_round_robin_and_plain_targets_keep_grpcs_defaults():
    with RankingClient("dns:///seqrank-serve-grpc-headless.ns.svc.cluster.local:9000") as headless:
        assert headless.load_balancing == ROUND_ROBIN
    with RankingClient("127.0.0.1:9000") as plain:
        assert plain.load_balancing is None and plain._options == []  # today's plain channel
    with RankingClient("dns:///x:9000", load_balancing=PICK_FIRST) as opted_out:
        assert opted_out.load_balancing == PICK_FIRST


def test_channel_options_use_grpcs_names():
    options = dict(channel_options(ROUND_ROBIN, keepalive_time_s=30, keepalive_timeout_s=5,
                                   keepalive_permit_without_calls=True))
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1 and options["grpc.http2.max_pings_without_data"] == 0
    assert dict(channel_options(None, keepalive_time_s=60)) == {"grpc.keepalive_time_ms": 60_000,
                                                                "grpc.keepalive_permit_without_calls": 0}
    for bad in ({"load_balancing": "least_request"}, {"keepalive_time_s": 0},
                {"keepalive_timeout_s": 5}, {"keepalive_permit_without_calls": True}):
        with pytest.raises(ValueError):
            channel_options(**{"load_balancing": None, **bad})
    with pytest.raises(ValueError, match="max_connection_age_s"):
        RankingClient("127.0.0.1:9000", max_connection_age_s=0)


def test_keepalive_options_reach_a_working_channel(two_behind_one_name):
    with RankingClient(two_behind_one_name, load_balancing=ROUND_ROBIN, keepalive_time_s=30, keepalive_timeout_s=5,
                       retry=FAST, timeout_s=5) as client:
        assert set(answered_by(client, 4)) <= {"server-a", "server-b"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_connection_age_reconnects_so_a_name_that_now_points_elsewhere_gets_the_calls(servers, tmp_path):
    """A unix socket path is the name: server A listens on it, then server B takes the path over while A keeps
    running (gRPC unlinks the old socket file before binding). The open connection stays on A, as a connection to a
    ClusterIP Service stays on its pod; only a new channel resolves the name again and reaches B."""
    name = f"unix:{tmp_path / 'serve.sock'}"
    a, b = Named("server-a"), Named("server-b")
    servers.start(a, name)
    clock = Clock()
    with RankingClient(name, max_connection_age_s=60, clock=clock, retry=FAST, timeout_s=5) as pinned, \
            RankingClient(name, clock=clock, retry=FAST, timeout_s=5) as never_reconnects:
        assert answered_by(pinned, 3) == answered_by(never_reconnects, 3) == ["server-a"] * 3
        servers.start(b, name)
        assert answered_by(pinned, 3) == ["server-a"] * 3  # still younger than its age
        first = pinned._channel
        clock.now += 61
        assert answered_by(pinned, 3) == ["server-b"] * 3
        assert answered_by(never_reconnects, 3) == ["server-a"] * 3
        assert pinned.channels_opened == 2 and never_reconnects.channels_opened == 1
        with pytest.raises(ValueError):  # the old channel was idle, so it was closed at once
            ranking_pb2_grpc.RankingServiceStub(first).Rank(pb.RankRequest(user_id="u1"), timeout=1)
        clock.now += 61
        answered_by(pinned, 1)
        assert pinned.channels_opened == 3


def test_a_call_in_flight_finishes_on_the_old_channel_which_is_closed_after_it(servers):
    gate = threading.Event()
    slow = Named("server-a", gate)
    target = f"127.0.0.1:{servers.start(slow)}"
    clock = Clock()
    with RankingClient(target, max_connection_age_s=60, clock=clock, retry=FAST, timeout_s=10) as client:
        results: list[str] = []
        first = client._current
        worker = threading.Thread(target=lambda: results.append(client.rank("u1").request_id))
        worker.start()
        assert slow.entered.wait(5)
        clock.now += 61
        slow.gate = None  # the next call answers at once
        assert client.rank("u1").request_id == "server-a"  # on a new channel
        assert client.channels_opened == 2 and first.retired and first in client._retired  # kept: a call in flight
        gate.set()
        worker.join(10)
        assert results == ["server-a"]  # the call in flight was not cancelled
        assert first not in client._retired  # closed once idle
        with pytest.raises(ValueError):
            ranking_pb2_grpc.RankingServiceStub(first.channel).Rank(pb.RankRequest(user_id="u1"), timeout=1)
