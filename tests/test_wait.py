"""The tests' one way of waiting: poll a condition until a deadline."""

from __future__ import annotations

import itertools

import pytest

from support.wait import wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: next(calls) >= 3 and "ready", 5, interval=0.001) == "ready"


def test_wait_until_fails_with_what_it_waited_for_and_what_it_saw() -> None:
    seen = {"offered": 2}
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for 5 offered"):
        wait_until(lambda: seen["offered"] >= 5, 0.05, interval=0.01, message="5 offered")
    with pytest.raises(AssertionError, match=r"waiting for 5 offered \(last: 2\)"):
        wait_until(
            lambda: seen["offered"] >= 5,
            0.05,
            interval=0.01,
            message=lambda: f"5 offered (last: {seen['offered']})",
        )
