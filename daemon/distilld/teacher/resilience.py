"""Retries with back-off, a circuit breaker and an hourly call budget.

Small building blocks for clients of slow or costly services (the teacher).
Time and randomness are parameters (``clock``, ``rng``, ``sleep``) so tests
drive them with a fake clock instead of waiting. The breaker and the budget
are thread-safe: the teacher's worker thread asks them for admission while
the client's event loop thread records outcomes.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from distilld.vocabulary import backoff_ceiling

T = TypeVar("T")
Clock = Callable[[], float]


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter.

    Retry ``attempt`` (0 for the first retry) waits a uniform random time in
    [0, min(max_s, base_s * 2**attempt)]. Full jitter rather than a fixed
    delay: many clients that failed together do not retry together.
    """

    base_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(
                f"Backoff needs 0 < base_s <= max_s (received base_s={self.base_s}, "
                f"max_s={self.max_s})"
            )

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry ``attempt``."""
        return backoff_ceiling(attempt, self.base_s, self.max_s)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A random wait before retry ``attempt`` (0-based)."""
        return rng.uniform(0.0, self.ceiling(attempt))


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    retries: int,
    backoff: Backoff,
    retryable: Callable[[BaseException], bool],
    rng: random.Random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Await ``operation()``; when it raises an error that ``retryable`` accepts,
    wait and try again, at most ``retries`` more times. The last error is raised
    as is. ``on_retry(attempt, error, delay)`` is called before each wait."""
    attempt = 0
    while True:
        try:
            return await operation()
        except Exception as exc:
            if attempt >= retries or not retryable(exc):
                raise
            delay = backoff.delay(attempt, rng)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await sleep(delay)
            attempt += 1


# --------------------------------------------------------------------------- circuit breaker


class BreakerState(StrEnum):
    closed = "closed"  # calls go through; failures are counted
    open = "open"  # calls are refused until the reset time
    half_open = "half-open"  # one probe call goes through; its outcome decides


class CircuitBreaker:
    """Stops calling a service that keeps failing, and probes it now and then.

    ``failure_threshold`` consecutive failures open the breaker. After
    ``reset_after_s`` seconds it is half-open: :meth:`allow` admits exactly one
    probe; a success closes the breaker, a failure opens it for another
    ``reset_after_s``. A probe that never reports back (the caller gave up
    before calling) is returned with :meth:`release`.
    """

    def __init__(
        self, failure_threshold: int, reset_after_s: float, clock: Clock = time.monotonic
    ) -> None:
        if failure_threshold < 1 or reset_after_s <= 0:
            raise ValueError(
                "CircuitBreaker needs failure_threshold >= 1 and reset_after_s > 0 "
                f"(received {failure_threshold} and {reset_after_s})"
            )
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_out = False  # half-open: the one admitted probe has not reported yet

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state()

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    def retry_after(self) -> float:
        """Seconds until :meth:`allow` may admit a call (0 when it would now). While a
        half-open probe is out the wait depends on the probe: one reset period is
        the hint then."""
        with self._lock:
            state = self._state()
            if state is BreakerState.closed:
                return 0.0
            if state is BreakerState.half_open:
                return self._reset_after_s if self._probe_out else 0.0
            assert self._opened_at is not None
            return max(0.0, self._opened_at + self._reset_after_s - self._clock())

    def allow(self) -> bool:
        """Whether a call may go out now. In the half-open state this takes the probe."""
        with self._lock:
            state = self._state()
            if state is BreakerState.closed:
                return True
            if state is BreakerState.half_open and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            if self._state() is BreakerState.open:
                # A call that started before the breaker opened: the reset timer decides.
                return
            self._failures = 0
            self._opened_at = None
            self._probe_out = False

    def record_failure(self) -> None:
        with self._lock:
            state = self._state()
            self._failures += 1
            if state is BreakerState.half_open or (
                state is BreakerState.closed and self._failures >= self._threshold
            ):
                self._opened_at = self._clock()
            self._probe_out = False

    def release(self) -> None:
        """Give back a probe admitted by :meth:`allow` that made no call."""
        with self._lock:
            self._probe_out = False

    def _state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.closed
        if self._clock() - self._opened_at >= self._reset_after_s:
            return BreakerState.half_open
        return BreakerState.open


# --------------------------------------------------------------------------- budget


class CallBudget:
    """At most ``max_calls`` calls in any sliding window of ``window_s`` seconds.

    A sliding window rather than calendar hours: a fixed window allows twice
    the budget around each boundary. Memory is one entry per acquisition, at
    most ``max_calls`` entries.
    """

    def __init__(self, max_calls: int, window_s: float = 3600.0, clock: Clock = time.monotonic):
        if max_calls < 1 or window_s <= 0:
            raise ValueError(
                "CallBudget needs max_calls >= 1 and window_s > 0 "
                f"(received {max_calls} and {window_s})"
            )
        self.max_calls = max_calls
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._spent: deque[tuple[float, int]] = deque()  # (time, calls), oldest first
        self._used = 0

    @property
    def remaining(self) -> int:
        with self._lock:
            self._expire()
            return self.max_calls - self._used

    def try_acquire(self, calls: int = 1) -> bool:
        """Take ``calls`` calls from the budget, all or none."""
        if calls < 0:
            raise ValueError(f"cannot acquire a negative number of calls ({calls})")
        with self._lock:
            self._expire()
            if self._used + calls > self.max_calls:
                return False
            if calls:
                self._spent.append((self._clock(), calls))
                self._used += calls
            return True

    def retry_after(self, calls: int = 1) -> float:
        """Seconds until ``calls`` calls fit (0: now; inf: never, more than max_calls)."""
        if calls > self.max_calls:
            return math.inf
        with self._lock:
            self._expire()
            missing = self._used + calls - self.max_calls
            if missing <= 0:
                return 0.0
            freed = 0
            for when, count in self._spent:
                freed += count
                if freed >= missing:
                    return max(0.0, when + self.window_s - self._clock())
            return math.inf  # unreachable: the entries add up to _used

    def _expire(self) -> None:
        horizon = self._clock() - self.window_s
        while self._spent and self._spent[0][0] <= horizon:
            _, count = self._spent.popleft()
            self._used -= count
