"""The monitor scheduler: interval runs with the real APScheduler, failures, checks on demand.

Intervals of 1 s (the policy's minimum); tests wait on events set by the
checks, never assert on how long anything took.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from distilld.scheduler import MonitorJob, MonitorScheduler
from support.logs import Event, named


class Calls:
    """A check that counts its runs, fails on the runs listed, and signals a target."""

    def __init__(self, fail_on: set[int], target: int) -> None:
        self.count = 0
        self.fail_on = fail_on
        self.target = target
        self.reached = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.count += 1
            run = self.count
        if run >= self.target:
            self.reached.set()
        if run in self.fail_on:
            raise RuntimeError(f"check {run} failed")
        return f"outcome {run}"


@pytest.fixture
def scheduler_factory() -> Iterator[list[MonitorScheduler]]:
    made: list[MonitorScheduler] = []
    yield made
    for scheduler in made:
        scheduler.stop()


def test_checks_run_on_their_interval_and_survive_a_failure(
    scheduler_factory: list[MonitorScheduler], logs: list[Event]
) -> None:
    failing = Calls(fail_on={1}, target=3)
    healthy = Calls(fail_on=set(), target=2)
    scheduler = MonitorScheduler(
        [MonitorJob("reviews", 1.0, failing), MonitorJob("addresses", 1.0, healthy)]
    )
    scheduler_factory.append(scheduler)
    scheduler.start()
    assert scheduler.running
    assert failing.reached.wait(60), "the job stopped after its first failure"
    assert healthy.reached.wait(60)
    scheduler.stop()
    assert not scheduler.running

    stats = scheduler.stats()
    assert stats["reviews"]["failures"] == 1
    assert stats["reviews"]["runs"] >= 3
    assert stats["reviews"]["consecutive_failures"] == 0
    assert stats["reviews"]["last_error"] == "RuntimeError: check 1 failed"
    assert stats["addresses"]["failures"] == 0

    failed = named(logs, "monitor.check_failed")
    assert len(failed) == 1
    assert failed[0]["alert"] is True
    assert failed[0]["task"] == "reviews"
    assert failed[0]["trigger"] == "interval"
    assert failed[0]["error"] == "RuntimeError: check 1 failed"


def test_run_now_returns_the_outcome_and_raises_a_failure(
    scheduler_factory: list[MonitorScheduler], logs: list[Event]
) -> None:
    check = Calls(fail_on={2}, target=1)
    # A long interval: only the on-demand runs happen during this test.
    scheduler = MonitorScheduler([MonitorJob("reviews", 3600.0, check)])
    scheduler_factory.append(scheduler)
    scheduler.start()
    assert scheduler.run_now("reviews") == "outcome 1"
    with pytest.raises(RuntimeError, match="check 2 failed"):
        scheduler.run_now("reviews")
    assert scheduler.run_now("reviews") == "outcome 3"
    with pytest.raises(KeyError, match="no monitor job"):
        scheduler.run_now("unknown")
    failed = named(logs, "monitor.check_failed")
    assert [line["trigger"] for line in failed] == ["on_demand"]


def test_jobs_are_checked() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MonitorJob("reviews", 0.0, lambda: None)
    with pytest.raises(ValueError, match="repeated"):
        MonitorScheduler(
            [MonitorJob("reviews", 5.0, lambda: None), MonitorJob("reviews", 9.0, lambda: None)]
        )
    # Stopping a scheduler that never started is harmless.
    MonitorScheduler([MonitorJob("reviews", 5.0, lambda: None)]).stop()


def test_housekeeping_jobs_run_on_their_interval_and_survive_a_failure(
    scheduler_factory: list[MonitorScheduler], logs: list[Event]
) -> None:
    sweep = Calls(fail_on={1}, target=3)
    scheduler = MonitorScheduler([])
    scheduler_factory.append(scheduler)
    scheduler.every("retention", 0.2, sweep)
    with pytest.raises(ValueError, match="interval_s must be positive"):
        scheduler.every("never", 0.0, sweep)
    scheduler.start()
    assert sweep.reached.wait(60), "the job stopped after its first failure"
    scheduler.stop()
    failed = named(logs, "scheduler.job_failed")
    assert [(line["job"], line["error"]) for line in failed] == [
        ("retention", "RuntimeError: check 1 failed")
    ]
