"""Dynamic micro-batching: collect up to ``max_size`` items or until the oldest
has waited ``max_wait_ms``, then hand the batch to one forward pass.

Time is passed in (monotonic seconds) rather than read here, so the rule is a
pure, testable function of the calls made.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_size: int, max_wait_ms: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, received {max_size}")
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._items: list[T] = []
        self._oldest_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        if not self._items:
            self._oldest_at = now
        self._items.append(item)

    def is_due(self, now: float) -> bool:
        """A batch is due when full, or when its oldest item has waited long enough."""
        if not self._items:
            return False
        if len(self._items) >= self.max_size:
            return True
        assert self._oldest_at is not None
        return now - self._oldest_at >= self.max_wait_s

    def seconds_until_due(self, now: float) -> float | None:
        """How long the caller may block before this batcher needs attention (None: empty)."""
        if not self._items:
            return None
        if len(self._items) >= self.max_size:
            return 0.0
        assert self._oldest_at is not None
        return max(0.0, self._oldest_at + self.max_wait_s - now)

    def take(self) -> list[T]:
        """Remove and return up to max_size items (the oldest first)."""
        batch, self._items = self._items[: self.max_size], self._items[self.max_size :]
        # Items left behind keep the old start time: they can only have waited
        # less than it says, so at worst they leave a little early.
        self._oldest_at = self._oldest_at if self._items else None
        return batch
