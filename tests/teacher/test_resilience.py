"""Retries, circuit breaker and call budget, driven by a fake clock (no waiting)."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from distilld.teacher.resilience import (
    Backoff,
    BreakerState,
    CallBudget,
    CircuitBreaker,
    retry_async,
)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class HighestRandom(random.Random):
    """uniform() returns its upper bound: the back-off ceiling becomes observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --------------------------------------------------------------------------- backoff


def test_backoff_ceiling_doubles_then_caps() -> None:
    backoff = Backoff(base_s=0.5, max_s=3.0)
    assert [backoff.ceiling(a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.ceiling(10_000) == 3.0  # no float overflow


def test_backoff_delay_is_full_jitter_within_the_ceiling() -> None:
    backoff = Backoff(base_s=0.5, max_s=3.0)
    rng = random.Random(7)
    delays = [backoff.delay(2, rng) for _ in range(500)]
    assert all(0.0 <= d <= 2.0 for d in delays)
    # Full jitter spreads over the whole interval, not just near the ceiling.
    assert min(delays) < 0.2
    assert max(delays) > 1.8
    assert [backoff.delay(a, HighestRandom()) for a in range(3)] == [0.5, 1.0, 2.0]


def test_backoff_refuses_inverted_bounds() -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(base_s=2.0, max_s=1.0)


class Flaky:
    """Fails ``failures`` times with ``error``, then returns "ok"."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def _retry(
    operation: Flaky, retries: int, retryable: type[Exception] = ConnectionError
) -> tuple[str, list[float], list[tuple[int, str, float]]]:
    slept: list[float] = []
    retried: list[tuple[int, str, float]] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> str:
        return await retry_async(
            operation,
            retries=retries,
            backoff=Backoff(0.5, 3.0),
            retryable=lambda exc: isinstance(exc, retryable),
            rng=HighestRandom(),
            sleep=fake_sleep,
            on_retry=lambda attempt, exc, delay: retried.append((attempt, str(exc), delay)),
        )

    return asyncio.run(run()), slept, retried


def test_retry_succeeds_after_transient_failures_with_growing_waits() -> None:
    operation = Flaky(3, ConnectionError("down"))
    result, slept, retried = _retry(operation, retries=3)
    assert result == "ok"
    assert operation.calls == 4
    assert slept == [0.5, 1.0, 2.0]
    assert retried == [(0, "down", 0.5), (1, "down", 1.0), (2, "down", 2.0)]


def test_retry_gives_up_after_the_last_retry_with_the_last_error() -> None:
    operation = Flaky(10, ConnectionError("still down"))
    with pytest.raises(ConnectionError, match="still down"):
        _retry(operation, retries=2)
    assert operation.calls == 3


def test_retry_does_not_retry_other_errors() -> None:
    operation = Flaky(1, ValueError("bad request"))
    with pytest.raises(ValueError, match="bad request"):
        _retry(operation, retries=5)
    assert operation.calls == 1


def test_zero_retries_means_one_attempt() -> None:
    operation = Flaky(1, ConnectionError("down"))
    with pytest.raises(ConnectionError):
        _retry(operation, retries=0)
    assert operation.calls == 1


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=30.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.closed
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.open
    assert not breaker.allow()
    assert breaker.retry_after() == 30.0
    clock.advance(10.0)
    assert breaker.retry_after() == 20.0
    assert not breaker.allow()


def test_breaker_half_open_admits_one_probe_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=30.0, clock=clock)
    breaker.record_failure()
    clock.advance(30.0)
    assert breaker.state is BreakerState.half_open
    assert breaker.retry_after() == 0.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.closed
    assert breaker.consecutive_failures == 0
    assert breaker.allow()
    assert breaker.allow()


def test_breaker_half_open_failure_reopens_for_a_new_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=30.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(31.0)
    assert breaker.allow()
    breaker.record_failure()  # one failure is enough in half-open
    assert breaker.state is BreakerState.open
    assert breaker.retry_after() == 30.0
    clock.advance(29.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_breaker_released_probe_can_be_taken_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=5.0, clock=clock)
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    breaker.release()  # the caller gave up before calling
    assert breaker.state is BreakerState.half_open
    assert breaker.allow()


def test_breaker_ignores_a_late_success_while_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=5.0, clock=clock)
    breaker.record_failure()
    breaker.record_success()  # a request that started before the breaker opened
    assert breaker.state is BreakerState.open


def test_breaker_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0, reset_after_s=1.0)


# --------------------------------------------------------------------------- budget


def test_budget_is_all_or_nothing_and_counts_down() -> None:
    budget = CallBudget(max_calls=10, window_s=3600.0, clock=FakeClock())
    assert budget.remaining == 10
    assert budget.try_acquire(4)
    assert budget.try_acquire(6)
    assert budget.remaining == 0
    assert not budget.try_acquire(1)
    assert budget.try_acquire(0)  # nothing asked, nothing refused
    assert budget.remaining == 0


def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = CallBudget(max_calls=10, window_s=3600.0, clock=clock)
    assert budget.try_acquire(6)
    clock.advance(1800.0)
    assert budget.try_acquire(4)
    assert not budget.try_acquire(1)
    # The first 6 calls leave the window an hour after they were made.
    assert budget.retry_after(1) == 1800.0
    assert budget.retry_after(7) == 3600.0  # needs the second batch to expire too
    clock.advance(1799.0)
    assert budget.remaining == 0
    clock.advance(1.0)
    assert budget.remaining == 6
    assert budget.retry_after(6) == 0.0
    assert budget.try_acquire(6)
    assert not budget.try_acquire(1)


def test_budget_never_fits_more_than_its_maximum() -> None:
    budget = CallBudget(max_calls=3, clock=FakeClock())
    assert not budget.try_acquire(4)
    assert budget.retry_after(4) == math.inf
    assert budget.remaining == 3


def test_budget_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        CallBudget(max_calls=0)
    with pytest.raises(ValueError, match="negative"):
        CallBudget(max_calls=1).try_acquire(-1)
