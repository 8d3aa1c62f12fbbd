"""The retry policy: the backoff schedule (seeded full jitter), the attempt budget, what is never retried."""

from __future__ import annotations

import random
import statistics

import pytest

from seqrank.serving.client.retry import NO_RETRY, RetryPolicy, call_with_retry

POLICY = RetryPolicy(max_attempts=7, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)


class Transient(Exception):
    pass


def failing(times: int, error: type[Exception] = Transient):
    calls = []

    def call():
        calls.append(len(calls))
        if len(calls) <= times:
            raise error(f"attempt {len(calls)}")
        return "done"

    return call, calls


def test_backoff_caps_grow_exponentially_up_to_the_maximum():
    assert [POLICY.backoff_cap_s(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_seeded_jitter_gives_one_schedule_each_wait_within_its_cap():
    schedule = [POLICY.backoff_s(n, random.Random(42)) for n in range(6)]
    assert schedule == [POLICY.backoff_s(n, random.Random(42)) for n in range(6)]  # reproducible
    assert all(0.0 <= wait <= POLICY.backoff_cap_s(n) for n, wait in enumerate(schedule))
    rng = random.Random(42)
    assert [POLICY.backoff_s(n, rng) for n in range(6)] != [POLICY.backoff_s(n, rng) for n in range(6)]


def test_full_jitter_spreads_waits_over_the_whole_interval():
    rng = random.Random(0)
    waits = [POLICY.backoff_s(3, rng) for _ in range(4000)]  # cap 0.8
    assert min(waits) < 0.02 and max(waits) > 0.78  # from ~0 to ~cap, not cap/2..cap (equal jitter)
    assert statistics.fmean(waits) == pytest.approx(0.4, abs=0.02)


def test_retries_until_success_sleeping_the_seeded_schedule():
    call, calls = failing(3)
    slept, told = [], []
    result = call_with_retry(call, POLICY, lambda error: isinstance(error, Transient), random.Random(5),
                             sleep=slept.append, on_retry=lambda n, error, wait: told.append((n, str(error), wait)))
    assert result == "done" and len(calls) == 4
    rng = random.Random(5)
    assert slept == [POLICY.backoff_s(n, rng) for n in range(3)]
    assert [(n, message) for n, message, _ in told] == [(0, "attempt 1"), (1, "attempt 2"), (2, "attempt 3")]


def test_the_attempt_budget_ends_with_the_last_error():
    call, calls = failing(100)
    with pytest.raises(Transient, match="attempt 7"):
        call_with_retry(call, POLICY, lambda error: True, random.Random(0), sleep=lambda s: None)
    assert len(calls) == POLICY.max_attempts


def test_errors_the_predicate_refuses_are_raised_at_once():
    call, calls = failing(1, ValueError)
    with pytest.raises(ValueError):
        call_with_retry(call, POLICY, lambda error: isinstance(error, Transient), sleep=lambda s: None)
    assert len(calls) == 1
    call, calls = failing(1)
    with pytest.raises(Transient):
        call_with_retry(call, NO_RETRY, lambda error: True, sleep=lambda s: None)
    assert len(calls) == 1


@pytest.mark.parametrize("fields, fragment", [
    ({"max_attempts": 0}, "max_attempts"),
    ({"initial_backoff_s": -1.0}, "initial_backoff_s"),
    ({"initial_backoff_s": 3.0, "max_backoff_s": 2.0}, "initial_backoff_s"),
    ({"multiplier": 0.5}, "multiplier"),
    ({"multiplier": float("nan")}, "multiplier"),
])
def test_bad_policies_are_refused_naming_the_field(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        RetryPolicy(**fields)
