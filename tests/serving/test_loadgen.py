"""The benchmark's statistics and closed-loop generator, without Ray or gRPC."""

from __future__ import annotations

import time

import pytest

from seqrank.serving.bench.loadgen import LatencyStats, error_code, format_report, nearest_rank, ratios, run_closed_loop


def test_nearest_rank_percentiles_of_1_to_100():
    stats = LatencyStats.from_samples([float(v) for v in reversed(range(1, 101))], {"UNAVAILABLE": 2}, 4.0)
    assert (stats.p50_ms, stats.p90_ms, stats.p99_ms, stats.max_ms) == (50, 90, 99, 100)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.count == 100 and stats.errors == {"UNAVAILABLE": 2}
    assert stats.requests_per_s == pytest.approx(25.0)


def test_nearest_rank_is_an_observed_sample():
    assert nearest_rank([10.0], 99) == 10.0
    assert nearest_rank([1.0, 2.0, 3.0], 50) == 2.0  # ceil(1.5) = 2nd
    with pytest.raises(ValueError, match="no samples"):
        nearest_rank([], 50)


def test_no_samples_gives_zero_rate_and_keeps_errors():
    stats = LatencyStats.from_samples([], {"DEADLINE_EXCEEDED": 3}, 1.0)
    assert stats.count == 0 and stats.requests_per_s == 0 and stats.errors == {"DEADLINE_EXCEEDED": 3}


class FakeRpcError(Exception):
    def code(self):
        class Code:
            name = "RESOURCE_EXHAUSTED"
        return Code()


def test_error_code_names_grpc_codes_and_other_exceptions():
    assert error_code(FakeRpcError()) == "RESOURCE_EXHAUSTED"
    assert error_code(KeyError("x")) == "KeyError"


@pytest.mark.parametrize("concurrency", [1, 2])
def test_closed_loop_against_a_sleeping_call_stops_by_itself(concurrency):
    sleep_s, duration_s = 0.002, 0.5
    closed, calls_per_thread = [], []

    def new_caller():
        calls = [0]
        calls_per_thread.append(calls)

        def call(timeout_s):
            calls[0] += 1
            time.sleep(sleep_s)
            if calls[0] % 10 == 0:
                raise FakeRpcError()
            return {"encode": 1.0}

        call.close = lambda: closed.append(True)
        return call

    started = time.monotonic()
    result = run_closed_loop(new_caller, concurrency, duration_s, warmup_requests=1, observe=lambda r: r)
    assert time.monotonic() - started < duration_s + 1.0
    stats = result.stats
    assert stats.count > 0 and stats.p50_ms >= sleep_s * 1000
    assert stats.errors["RESOURCE_EXHAUSTED"] > 0
    upper = concurrency / sleep_s  # no faster than back-to-back sleeps
    assert 0.1 * upper < stats.requests_per_s <= upper
    assert result.stage_ms == {"encode": 1.0}
    assert closed == [True] * concurrency
    assert all(calls[0] > 10 for calls in calls_per_thread)  # every thread measured, not only warmed up


def test_report_ratios_rank_over_echo():
    def run(target, p50, p99, rps):
        return {"target": target, "concurrency": 1, "p50_ms": p50, "p90_ms": p50, "p99_ms": p99, "max_ms": p99,
                "requests_per_s": rps, "errors": {}, "stage_ms": {"encode": 1.0}}

    runs = [run("echo", 1.0, 2.0, 1000.0), run("relay", 3.0, 4.0, 500.0), run("rank", 5.0, 10.0, 200.0)]
    assert ratios(runs) == [{"target": "relay", "concurrency": 1, "p50_ms": 3.0, "p99_ms": 2.0, "requests_per_s": 0.5},
                            {"target": "rank", "concurrency": 1, "p50_ms": 5.0, "p99_ms": 5.0, "requests_per_s": 0.2}]
    report = format_report({"runs": runs})
    assert "encode 1.00" in report
    assert "relay           1   3.00   2.00   0.50" in report  # p50, p99 and req/s over echo's, same concurrency
