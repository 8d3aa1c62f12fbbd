"""A real `redis-server` for the history-store tests (free loopback port, temp dir, fsynced AOF, no RDB snapshots),
a fresh store of each backend by URL, three small artifacts v1-v3 for the model-slot tests, and the scripted local
gRPC server the client tests call."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.serving.artifacts import write_small_artifact
from tests.serving.test_client import Scripted, serve
from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 15.0


class RedisServer:
    """One redis-server process persisting to `directory`; start() again after kill() reuses port and data."""

    def __init__(self, directory: Path, *extra_args: str) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> RedisServer:
        # The production settings the README asks for: AOF fsynced before every reply, no RDB snapshots.
        command = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"), *self.extra_args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with self.client() as client:
                    if client.ping():
                        return self
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                time.sleep(0.05)
        log = (self.directory / "redis.log").read_text()[-2_000:] if (self.directory / "redis.log").exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, so only what the AOF already holds survives."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


class FakeClock:
    """A store clock the test sets (`now`, seconds)."""

    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def require_redis_server() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; scripts/setup.sh does it)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One server for the session; tests that need a clean database use `redis_url`."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def new_redis_server(tmp_path):
    """Starts servers of the test's own (kill, restart, replicas); all stopped afterwards."""
    require_redis_server()
    servers: list[RedisServer] = []

    def start(name: str = "redis", *extra_args: str) -> RedisServer:
        servers.append(RedisServer(tmp_path / name, *extra_args).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "history.db"


@pytest.fixture(params=["sqlite", "redis"])
def history_url(request, db_path):
    """A fresh, empty store's URL for each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{db_path}"
    server = request.getfixturevalue("redis_server")
    with server.client() as client:
        client.flushall()
    return server.url()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {version: str(write_small_artifact(root / version, version=version)) for version in ("v1", "v2", "v3")}


@pytest.fixture
def scripted():
    servicer = Scripted()
    server, target = serve(servicer)
    yield servicer, target
    server.stop(None)
