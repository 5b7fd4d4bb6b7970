"""At-least-once bookkeeping: the commit point never passes an unanswered record."""

from __future__ import annotations

import random

from distilld.traffic.offsets import OffsetTracker

P0 = ("reviews.requests", 0)
P1 = ("reviews.requests", 1)
P2 = ("address.requests", 0)


def commit(tracker: OffsetTracker[tuple[str, int]]) -> dict[tuple[str, int], int]:
    offsets = tracker.committable()
    tracker.mark_committed(offsets)
    return offsets


def test_empty_tracker_has_nothing_to_commit() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    assert tracker.committable() == {}
    assert tracker.committable(include_unchanged=True) == {}
    assert tracker.outstanding_count() == 0


def test_commit_point_is_smallest_outstanding_offset() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.started(P0, offset)
    assert tracker.committable() == {P0: 10}


def test_commit_point_is_one_past_highest_when_all_finished() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.started(P0, offset)
    for offset in (10, 11, 12):
        tracker.finished(P0, offset)
    assert tracker.committable() == {P0: 13}


def test_out_of_order_finishing_holds_the_commit_point() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in range(5):
        tracker.started(P0, offset)
    tracker.finished(P0, 3)
    tracker.finished(P0, 1)
    tracker.finished(P0, 4)
    # 0 is still outstanding: nothing past it may be committed.
    assert tracker.committable() == {P0: 0}
    tracker.finished(P0, 0)
    # 2 is the next gap.
    assert tracker.committable() == {P0: 2}
    tracker.finished(P0, 2)
    assert tracker.committable() == {P0: 5}


def test_sparse_offsets_commit_one_past_the_highest() -> None:
    # Compacted topics and transactions leave gaps in offsets.
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 3)
    tracker.started(P0, 7)
    tracker.finished(P0, 3)
    assert tracker.committable() == {P0: 7}
    tracker.finished(P0, 7)
    assert tracker.committable() == {P0: 8}


def test_unchanged_point_is_not_committable_twice() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.started(P0, 1)
    assert commit(tracker) == {P0: 0}
    assert tracker.committable() == {}
    tracker.finished(P0, 1)  # 0 still outstanding: point unchanged
    assert tracker.committable() == {}
    tracker.finished(P0, 0)
    assert commit(tracker) == {P0: 2}
    assert tracker.committable() == {}


def test_include_unchanged_repeats_the_last_point() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.finished(P0, 0)
    tracker.started(P1, 5)
    assert commit(tracker) == {P0: 1, P1: 5}
    assert tracker.committable() == {}
    assert tracker.committable(include_unchanged=True) == {P0: 1, P1: 5}


def test_uncommitted_point_stays_committable() -> None:
    # If a commit failed (mark_committed not called), the point is offered again.
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.finished(P0, 0)
    assert tracker.committable() == {P0: 1}
    assert tracker.committable() == {P0: 1}


def test_mark_committed_with_an_older_point_offers_the_newer_one() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in range(3):
        tracker.started(P0, offset)
    tracker.finished(P0, 0)
    stale = tracker.committable()
    assert stale == {P0: 1}
    tracker.finished(P0, 1)
    tracker.finished(P0, 2)
    tracker.mark_committed(stale)  # the commit of 1 completes late
    assert tracker.committable() == {P0: 3}


def test_partitions_are_independent() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 100)
    tracker.started(P0, 101)
    tracker.started(P1, 7)
    tracker.started(P2, 0)
    tracker.finished(P1, 7)
    tracker.finished(P0, 101)
    assert tracker.committable() == {P0: 100, P1: 8, P2: 0}
    commit(tracker)
    tracker.finished(P2, 0)
    # Only P2 moved.
    assert tracker.committable() == {P2: 1}


def test_same_offset_on_different_partitions_is_distinct() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 5)
    tracker.started(P1, 5)
    tracker.finished(P0, 5)
    assert tracker.committable() == {P0: 6, P1: 5}
    assert tracker.outstanding_count() == 1


def test_forget_drops_a_partition() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.started(P0, 1)
    tracker.started(P1, 0)
    tracker.forget([P0])
    assert tracker.outstanding_count() == 1
    assert tracker.committable() == {P1: 0}
    assert tracker.committable(include_unchanged=True) == {P1: 0}


def test_forget_unknown_partition_is_harmless() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.forget([P1, P2])
    assert tracker.committable() == {P0: 0}


def test_late_finish_after_forget_is_ignored() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 4)
    tracker.forget([P0])
    tracker.finished(P0, 4)  # the ack arrives after the rebalance
    assert tracker.committable() == {}
    tracker.mark_committed({P0: 5})  # also ignored: no state is recreated
    assert tracker.committable(include_unchanged=True) == {}


def test_reassigned_partition_starts_fresh() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 50)
    tracker.finished(P0, 50)
    commit(tracker)
    tracker.forget([P0])
    tracker.started(P0, 20)  # re-assigned and re-delivered from an older commit
    assert tracker.committable() == {P0: 20}


def test_finished_on_unknown_partition_is_harmless() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.finished(P0, 3)
    assert tracker.committable() == {}
    assert tracker.outstanding_count() == 0
    tracker.started(P1, 1)
    tracker.finished(P0, 1)
    assert tracker.committable() == {P1: 1}
    assert tracker.outstanding_count() == 1


def test_finished_twice_or_unknown_offset_is_harmless() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 0)
    tracker.started(P0, 1)
    tracker.finished(P0, 0)
    tracker.finished(P0, 0)
    tracker.finished(P0, 99)
    assert tracker.outstanding_count() == 1
    assert tracker.committable() == {P0: 1}


def test_mark_committed_unknown_partition_is_harmless() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.mark_committed({P0: 10})
    assert tracker.committable(include_unchanged=True) == {}


def test_outstanding_count() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    for offset in range(4):
        tracker.started(P0, offset)
    tracker.started(P1, 0)
    assert tracker.outstanding_count() == 5
    tracker.finished(P0, 2)
    assert tracker.outstanding_count() == 4
    tracker.finished(P1, 0)
    assert tracker.outstanding_count() == 3
    tracker.forget([P0])
    assert tracker.outstanding_count() == 0


def test_started_twice_counts_once() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 3)
    tracker.started(P0, 3)
    assert tracker.outstanding_count() == 1
    tracker.finished(P0, 3)
    assert tracker.committable() == {P0: 4}


def test_lower_offset_started_later_pulls_the_point_back() -> None:
    # A re-delivered older record (after a seek) must hold the commit point.
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.started(P0, 10)
    tracker.finished(P0, 10)
    tracker.started(P0, 4)
    assert tracker.committable() == {P0: 4}
    tracker.finished(P0, 4)
    # next_offset stays one past the highest offset seen.
    assert tracker.committable() == {P0: 11}


def test_any_hashable_partition_key() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.started("a", 0)
    tracker.started("b", 1)
    tracker.finished("a", 0)
    assert tracker.committable() == {"a": 1, "b": 1}


def test_randomized_out_of_order_completion_never_skips_an_unfinished_record() -> None:
    rng = random.Random(1234)
    partitions = [P0, P1, P2]
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    next_offset = dict.fromkeys(partitions, 0)
    started: dict[tuple[str, int], set[int]] = {p: set() for p in partitions}
    done: dict[tuple[str, int], set[int]] = {p: set() for p in partitions}
    in_flight: list[tuple[tuple[str, int], int]] = []
    committed: dict[tuple[str, int], int] = {}

    for _ in range(5_000):
        action = rng.random()
        if action < 0.45:
            partition = rng.choice(partitions)
            offset = next_offset[partition]
            # Offsets usually increase by one, sometimes skip (compaction).
            next_offset[partition] += rng.choice([1, 1, 1, 2, 5])
            tracker.started(partition, offset)
            started[partition].add(offset)
            in_flight.append((partition, offset))
        elif action < 0.85 and in_flight:
            # Finish a random outstanding record, not necessarily the oldest.
            partition, offset = in_flight.pop(rng.randrange(len(in_flight)))
            tracker.finished(partition, offset)
            done[partition].add(offset)
        else:
            offsets = tracker.committable()
            for partition, point in offsets.items():
                # A commit point only ever moves forward ...
                assert point > committed.get(partition, -1)
            tracker.mark_committed(offsets)
            committed.update(offsets)
            # ... and nothing is offered twice.
            assert tracker.committable() == {}

        assert tracker.outstanding_count() == len(in_flight)
        for partition, point in tracker.committable(include_unchanged=True).items():
            below = {o for o in started[partition] if o < point}
            # Every record below the commit point has finished ...
            assert below <= done[partition], (partition, point, below - done[partition])
            # ... and the point does not stop short of an unfinished-free prefix.
            unfinished = started[partition] - done[partition]
            assert point == (min(unfinished) if unfinished else max(started[partition]) + 1)

    # Drain: finish everything; every partition commits past its last offset.
    for partition, offset in in_flight:
        tracker.finished(partition, offset)
    final = tracker.committable(include_unchanged=True)
    assert final == {p: max(started[p]) + 1 for p in partitions if started[p]}
