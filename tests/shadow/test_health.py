"""The teacher health decisions: how long to pause, when answers point at the teacher."""

from __future__ import annotations

import math

from distilld.shadow.health import mostly_unusable, retry_wait


def test_retry_wait_uses_the_hint_at_least_the_minimum() -> None:
    assert retry_wait(30.0, min_retry_s=1.0, error_retry_s=60.0) == 30.0
    assert retry_wait(0.0, min_retry_s=1.0, error_retry_s=60.0) == 1.0
    assert retry_wait(None, min_retry_s=1.0, error_retry_s=60.0) == 60.0
    assert retry_wait(math.inf, min_retry_s=1.0, error_retry_s=60.0) == 60.0


def test_a_batch_is_mostly_unusable_from_half_on() -> None:
    assert mostly_unusable(2, 4)
    assert not mostly_unusable(1, 4)
    assert not mostly_unusable(0, 0)
