"""Bounded closed-loop load over real gRPC for the fault tests: each worker thread has its own client (channel,
retry policy) and sends its next call as soon as the previous one returns, until stopped or until its deadline;
every call's outcome is kept (status code, response, attempts), so a test can count failures and check every
response it got."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.message import Message

from seqrank.serving.client.ranking_client import RankingClient

OK = "OK"


@dataclass(frozen=True)
class Outcome:
    worker: int
    sequence: int  # the worker's call number, from 0
    started: float  # time.monotonic()
    finished: float
    code: str  # "OK" or the gRPC status code's name
    details: str
    response: Message | None
    attempts: int  # 1 + the client's retries during the call


class ClosedLoop:
    """`workers` threads each calling `call(client, worker, sequence)` back to back until `stop()` or `max_s`.

    Use as a context manager; on exit the workers stop and are joined (a call in flight ends by its timeout).
    """

    def __init__(self, new_client: Callable[[], RankingClient], call: Callable[[RankingClient, int, int], Message],
                 workers: int, max_s: float) -> None:
        self._new_client, self._call = new_client, call
        self._deadline = time.monotonic() + max_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(workers)]

    def _run(self, worker: int) -> None:
        with self._new_client() as client:
            sequence = 0
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                started, retries_before = time.monotonic(), client.retries
                try:
                    response, code, details = self._call(client, worker, sequence), OK, ""
                except grpc.RpcError as error:
                    response, code, details = None, error.code().name, error.details() or ""
                with self._lock:
                    self.outcomes.append(Outcome(worker, sequence, started, time.monotonic(), code, details,
                                                 response, 1 + client.retries - retries_before))
                sequence += 1

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def count(self, code: str = OK, after: float = 0.0) -> int:
        """Calls that ended with `code` and started after `after` (time.monotonic())."""
        return sum(1 for o in self.snapshot() if o.code == code and o.started > after)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.code != OK]

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s; failures so far: "
                                     f"{[(o.code, o.details[:120]) for o in self.failures()[:5]]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def __enter__(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
