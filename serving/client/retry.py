"""Client-side retries: exponential backoff with full jitter, and which calls may be retried at all.

Backoff before retry n (n = 0 before the second attempt) is uniform in [0, min(max_backoff_s,
initial_backoff_s * multiplier**n)] ("full jitter", https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/):
clients rejected together by a full queue come back spread out instead of in the same instant.
What is retryable is the caller's rule, given as a predicate: `Rank` reads only, so it is always retried on
UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED; `RecordEvents` writes, so it is retried (UNAVAILABLE,
RESOURCE_EXHAUSTED) only when it carries an idempotency key, the same on every attempt (serving/client/ranking_client.py).
Pure: no gRPC here; the clock, the sleep and the random source come in as arguments. `on_retry` is how a caller
sees retries: RankingClient counts them there (`retries`, and `seqrank_client_retries_total` by method and the
status code that caused them, serving/client/metrics.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried. `max_attempts` counts the first try (1 = never retry)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"initial_backoff_s: must be in [0, max_backoff_s={self.max_backoff_s}], "
                             f"got {self.initial_backoff_s}")
        if not self.multiplier >= 1:  # false for NaN too
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier}")

    def backoff_cap_s(self, retry: int) -> float:
        """Upper bound of the wait before retry `retry` (0-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, backoff_cap_s(retry)]."""
        return rng.uniform(0.0, self.backoff_cap_s(retry))


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(
    call: Callable[[], T],
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """`call()`, tried up to `policy.max_attempts` times while it raises an error `retryable` accepts;
    `on_retry(retry, error, backoff_s)` is told before each wait. The last error is raised unchanged."""
    rng = rng or random.Random()
    retry = 0
    while True:
        try:
            return call()
        except Exception as error:
            if retry + 1 >= policy.max_attempts or not retryable(error):
                raise
            backoff_s = policy.backoff_s(retry, rng)
            if on_retry is not None:
                on_retry(retry, error, backoff_s)
            sleep(backoff_s)
            retry += 1
