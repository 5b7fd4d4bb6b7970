"""Which offsets may be committed: the at-least-once bookkeeping, without Kafka.

A record is *outstanding* from the moment it is polled until the broker has
acknowledged its response or dead-letter record. Records of one partition can
finish out of order (different tasks batch separately), so the committable
offset of a partition is the smallest outstanding offset, or one past the
highest seen offset when nothing is outstanding. Committing that never skips
an unanswered record.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


@dataclass
class _PartitionState:
    outstanding: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class OffsetTracker(Generic[P]):
    """Tracks outstanding offsets per partition and says what can be committed."""

    def __init__(self) -> None:
        self._partitions: dict[P, _PartitionState] = {}

    def started(self, partition: P, offset: int) -> None:
        state = self._partitions.setdefault(partition, _PartitionState())
        state.outstanding.add(offset)
        if state.next_offset is None or offset + 1 > state.next_offset:
            state.next_offset = offset + 1

    def finished(self, partition: P, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is not None:
            state.outstanding.discard(offset)

    def outstanding_count(self) -> int:
        return sum(len(s.outstanding) for s in self._partitions.values())

    def committable(self, include_unchanged: bool = False) -> dict[P, int]:
        """Offsets to commit now: partitions whose commit point moved forward (or all
        known partitions with ``include_unchanged``, to repeat a commit that may have failed)."""
        result: dict[P, int] = {}
        for partition, state in self._partitions.items():
            if state.next_offset is None:
                continue
            point = min(state.outstanding) if state.outstanding else state.next_offset
            if include_unchanged or state.committed is None or point > state.committed:
                result[partition] = point
        return result

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is not None:
                state.committed = offset

    def forget(self, partitions: list[P]) -> None:
        """Drop partitions this consumer no longer owns (after a rebalance)."""
        for partition in partitions:
            self._partitions.pop(partition, None)
