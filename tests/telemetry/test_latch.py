"""The alert-once latch: edges only."""

from __future__ import annotations

import threading

from distilld.telemetry.latch import Latch


def test_set_reports_only_the_rising_edge_and_keeps_the_first_payload() -> None:
    latch: Latch[str, float] = Latch()
    assert latch.set("teacher", 1.0) is True  # the condition starts: alert
    assert latch.set("teacher", 2.0) is False  # it lasts: no alert
    assert latch.get("teacher") == 1.0
    assert "teacher" in latch
    assert latch.held() == {"teacher"}


def test_clear_reports_only_the_falling_edge_with_the_payload() -> None:
    latch: Latch[str, float] = Latch()
    assert latch.clear("teacher") is None  # never held: no recovery
    latch.set("teacher", 1.0)
    assert latch.clear("teacher") == 1.0  # it ended: recovery, with when it started
    assert latch.clear("teacher") is None
    assert "teacher" not in latch
    assert latch.set("teacher", 3.0) is True  # a new spell starts again


def test_keys_are_independent() -> None:
    latch: Latch[tuple[str, str], bool] = Latch()
    assert latch.set(("a", "x"), True)
    assert latch.set(("b", "x"), True)
    assert latch.clear(("a", "x"))
    assert latch.held() == {("b", "x")}


def test_one_rising_edge_among_threads() -> None:
    latch: Latch[str, int] = Latch()
    edges: list[int] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        if latch.set("store", n):
            edges.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(edges) == 1
    assert latch.get("store") == edges[0]
