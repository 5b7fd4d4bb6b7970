"""Micro-batching rule: due when full or when the oldest item has waited max_wait.

Time is passed in explicitly, so these tests never sleep.
"""

from __future__ import annotations

import pytest

from distilld.serving.batcher import MicroBatcher


def test_empty_batcher() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=4, max_wait_ms=10)
    assert len(batcher) == 0
    assert batcher.is_due(1_000.0) is False
    assert batcher.seconds_until_due(1_000.0) is None
    assert batcher.take() == []


def test_due_when_full() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=3, max_wait_ms=1_000)
    batcher.add(1, now=5.0)
    batcher.add(2, now=5.0)
    assert batcher.is_due(5.0) is False
    batcher.add(3, now=5.0)
    assert batcher.is_due(5.0) is True
    assert batcher.seconds_until_due(5.0) == 0.0


def test_due_when_over_full() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_ms=1_000)
    for i in range(5):
        batcher.add(i, now=0.0)
    assert batcher.is_due(0.0) is True
    assert batcher.seconds_until_due(0.0) == 0.0


def test_not_due_before_max_wait() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=250)
    batcher.add("a", now=10.0)
    assert batcher.is_due(10.0) is False
    assert batcher.is_due(10.24) is False
    assert batcher.seconds_until_due(10.0) == 0.25


def test_due_at_and_after_max_wait() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=250)
    batcher.add("a", now=10.0)
    assert batcher.is_due(10.25) is True  # exactly max_wait: due
    assert batcher.seconds_until_due(10.25) == 0.0
    assert batcher.is_due(11.0) is True


def test_wait_counts_from_the_oldest_item() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=100)
    batcher.add("a", now=0.0)
    batcher.add("b", now=0.09)  # a later item does not restart the clock
    assert batcher.is_due(0.099) is False
    assert batcher.is_due(0.1) is True
    assert batcher.seconds_until_due(0.09) == pytest.approx(0.01)


def test_seconds_until_due_counts_down_and_floors_at_zero() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=200)
    batcher.add("a", now=100.0)
    assert batcher.seconds_until_due(100.0) == pytest.approx(0.2)
    assert batcher.seconds_until_due(100.05) == pytest.approx(0.15)
    assert batcher.seconds_until_due(100.2) == pytest.approx(0.0)
    assert batcher.seconds_until_due(105.0) == 0.0


def test_seconds_until_due_never_negative_when_clock_is_earlier() -> None:
    # The caller may read the clock before adding; the answer is still sensible.
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=200)
    batcher.add("a", now=100.0)
    assert batcher.seconds_until_due(99.9) == pytest.approx(0.3)


def test_take_returns_at_most_max_size_in_fifo_order() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=3, max_wait_ms=10)
    for i in range(7):
        batcher.add(i, now=float(i))
    assert batcher.take() == [0, 1, 2]
    assert len(batcher) == 4
    assert batcher.take() == [3, 4, 5]
    assert len(batcher) == 1
    assert batcher.take() == [6]
    assert len(batcher) == 0
    assert batcher.take() == []


def test_take_of_a_partial_batch_takes_everything() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=10, max_wait_ms=10)
    batcher.add("a", now=0.0)
    batcher.add("b", now=0.0)
    assert batcher.take() == ["a", "b"]
    assert len(batcher) == 0
    assert batcher.is_due(100.0) is False
    assert batcher.seconds_until_due(100.0) is None


def test_leftovers_stay_due_when_still_full_or_old() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_wait_ms=100)
    for i in range(5):
        batcher.add(i, now=0.0)
    assert batcher.take() == [0, 1]
    # Still a full batch left.
    assert batcher.is_due(0.0) is True
    assert batcher.take() == [2, 3]
    # One left; it keeps the old start time, so it is due by 0.1.
    assert batcher.is_due(0.05) is False
    assert batcher.is_due(0.1) is True
    assert batcher.take() == [4]


def test_clock_restarts_after_batcher_empties() -> None:
    # Binary-exact times (0.25, 0.125) keep the boundary checks free of rounding.
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=250)
    batcher.add("a", now=0.0)
    assert batcher.take() == ["a"]
    batcher.add("b", now=5.0)
    assert batcher.is_due(5.125) is False
    assert batcher.seconds_until_due(5.125) == 0.125
    assert batcher.is_due(5.25) is True


def test_max_wait_zero_is_immediately_due() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_wait_ms=0)
    assert batcher.is_due(0.0) is False  # nothing to send yet
    batcher.add("a", now=3.0)
    assert batcher.is_due(3.0) is True
    assert batcher.seconds_until_due(3.0) == 0.0


def test_max_size_one_is_due_on_every_item() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=1, max_wait_ms=1_000)
    batcher.add("a", now=0.0)
    batcher.add("b", now=0.0)
    assert batcher.is_due(0.0) is True
    assert batcher.take() == ["a"]
    assert batcher.is_due(0.0) is True
    assert batcher.take() == ["b"]


def test_max_wait_is_stored_in_seconds() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=4, max_wait_ms=250)
    assert batcher.max_size == 4
    assert batcher.max_wait_s == pytest.approx(0.25)


@pytest.mark.parametrize("max_size", [0, -1, -100])
def test_invalid_max_size_raises(max_size: int) -> None:
    with pytest.raises(ValueError, match=f"max_size must be at least 1, received {max_size}"):
        MicroBatcher(max_size=max_size, max_wait_ms=10)
