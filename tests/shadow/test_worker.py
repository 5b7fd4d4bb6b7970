"""The shadow worker: reservoir, sampling, teacher batches and comparisons, off the serving path.

The real parts: a SqliteStore on disk, the in-process MiniLM teacher
(LocalTeacher) on Rotten Tomatoes reviews. Outages, slowness and garbage
answers need a teacher that fails on command: FakeTeacher (a fake, labelled
so); a wrapper store that holds its writes (BlockingStore, around the real
SqliteStore) fills the offer queue on purpose. Time-based behaviour (retry
after an outage) runs on a FakeClock, never on sleeps.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from distilld.demo.data import load_rows
from distilld.monitoring.config import SamplingConfig
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.shadow.task import ShadowTask
from distilld.shadow.worker import ShadowWorker
from distilld.store.base import StoredComparison, TrafficSample
from distilld.store.sqlite import SqliteStore
from distilld.teacher.base import TeacherAnswer, TeacherStatus, TeacherUnavailable
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher
from distilld.teacher.resilience import CallBudget
from support.logs import Event, alerts
from support.wait import wait_until

LABELS = ["fresh", "rotten"]
POLICY_YAML = """
task: reviews
kind: classification
labels: [fresh, rotten]
traffic: {requests_topic: req, responses_topic: resp, dead_letter_topic: dead}
student: {model: student}
teacher: {backend: transformers, model: teacher, max_input_tokens: 64}
sampling:
  base_rate: %(rate)s
  min_per_segment: %(min_per_segment)s
  length_buckets: [64, 256]
  segment_keys: [kind]
monitors:
  accuracy: {window: 200, min_samples: 20}
"""


def load(tmp_path: Path, rate: float = 1.0, min_per_segment: int = 0) -> Policy:
    path = tmp_path / "reviews.yaml"
    path.write_text(POLICY_YAML % {"rate": rate, "min_per_segment": min_per_segment})
    return load_policy(path)


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTeacher:
    """A fake teacher (the real ones cannot be made to fail on command).

    mode "ok": answers "fresh" for every input; "down": raises
    TeacherUnavailable; "garbage": every answer carries an error. With
    ``hold`` set, each call waits until ``release`` is set.
    """

    def __init__(self, mode: str = "ok", retry_after_s: float = 30.0) -> None:
        self.mode = mode
        self.retry_after_s = retry_after_s
        self.calls = 0
        self.entered = threading.Event()
        self.hold = False
        self.release = threading.Event()

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        self.calls += 1
        self.entered.set()
        if self.hold:
            self.release.wait(timeout=60)
        if self.mode == "down":
            raise TeacherUnavailable("fake teacher down", retry_after_s=self.retry_after_s)
        if self.mode == "garbage":
            return [
                TeacherAnswer(output="maybe", confidence=0.0, error="not a label") for _ in inputs
            ]
        return [TeacherAnswer(output="fresh", confidence=0.9) for _ in inputs]

    def status(self) -> TeacherStatus:
        return TeacherStatus(available=self.mode != "down")

    def close(self) -> None:
        pass


class BlockingStore(SqliteStore):
    """The real SqliteStore, whose reservoir writes wait until ``release`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.writing = threading.Event()

    def add_traffic(self, samples: Sequence[TrafficSample]) -> None:
        self.writing.set()
        self.release.wait(timeout=60)
        super().add_traffic(samples)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def offer_reviews(worker: ShadowWorker, texts: Sequence[str], kind: str = "review") -> None:
    for i, text in enumerate(texts):
        worker.offer("reviews", f"r{i}-{kind}", text, {"kind": kind}, "fresh", 0.9, "v1")


# --------------------------------------------------------------------------- real teacher


def test_sampled_requests_are_compared_with_the_in_process_teacher(
    tmp_path: Path, store: SqliteStore, minilm_sentiment_dir: Path
) -> None:
    policy = load(tmp_path, rate=0.5)
    assert isinstance(policy.teacher, TransformersTeacherConfig)
    teacher = LocalTeacher(policy.teacher, policy, minilm_sentiment_dir)
    reviews = [r for r in load_rows() if r.label is not None and r.text.strip()][:60]
    worker = ShadowWorker(
        [ShadowTask.from_policy(policy, teacher)],
        store,
        teacher_batch_size=8,
        teacher_batch_wait_s=0.05,
        rng=random.Random(0),
    )
    worker.start()
    try:
        for row in reviews:
            worker.offer(
                "reviews",
                row.id,
                row.text,
                {"kind": "review", "user": row.id},
                row.label or "",
                0.8,
                "v1",
            )
        assert worker.wait_idle(120)
    finally:
        assert worker.stop(timeout_s=60)
        teacher.close()

    stats = worker.stats.snapshot()
    assert stats["offered"] == stats["reservoir_added"] == 60
    assert stats["sampled"] > 0
    assert stats["compared"] == stats["sampled"]
    assert stats["paused"] == stats["teacher_errors"] == stats["dropped_queue_full"] == 0
    assert len(store.reservoir("reviews")) == 60

    stored = store.last_comparisons("reviews", 100)
    assert len(stored) == stats["compared"]
    gold = {r.id: r.label for r in reviews}
    for c in stored:
        assert c.teacher_output in LABELS
        assert c.teacher_probabilities is not None
        assert c.score == (1.0 if c.teacher_output == gold[c.request_id] else 0.0)
        assert c.schema_valid
        assert c.model_version == "v1"
        # Only the configured metadata key is a segment (not "user"), plus the length bucket.
        assert set(c.segment) == {"kind", "length"}
        assert c.segment["kind"] == "review"


# --------------------------------------------------------------------------- outages


def test_teacher_outage_pauses_comparisons_alerts_once_and_resumes(
    tmp_path: Path, store: SqliteStore, logs: list[Event]
) -> None:
    clock = FakeClock()
    teacher = FakeTeacher(mode="down", retry_after_s=30.0)
    worker = ShadowWorker(
        [ShadowTask.from_policy(load(tmp_path), teacher)],
        store,
        teacher_batch_size=1,
        clock=clock,
    )
    worker.start()
    try:
        offer_reviews(worker, [f"review number {i}" for i in range(5)])
        assert worker.wait_idle(30)
        stats = worker.stats.snapshot()
        # One call found the teacher down; the other sampled requests were dropped
        # without calling it, and the reservoir kept every request.
        assert teacher.calls == 1
        assert stats["paused"] == 5 and stats["compared"] == 0
        assert stats["reservoir_added"] == 5
        assert worker.paused_tasks() == {"reviews": 30.0}

        offer_reviews(worker, ["still down, still paused"])
        assert worker.wait_idle(30)
        assert teacher.calls == 1

        teacher.mode = "ok"
        clock.now += 31  # past retry_after_s
        offer_reviews(worker, [f"back again {i}" for i in range(3)])
        assert worker.wait_idle(30)
    finally:
        assert worker.stop()

    stats = worker.stats.snapshot()
    assert stats["compared"] == 3
    assert stats["paused"] == 6
    assert worker.paused_tasks() == {}
    assert [e["event"] for e in alerts(logs)] == [
        "teacher.unavailable",
        "teacher.available_again",
    ]
    kinds = [a.kind for a in store.last_alerts("reviews")]
    assert kinds == ["teacher_unavailable", "teacher_available"]


def test_a_slow_teacher_holds_up_neither_offers_nor_the_reservoir(
    tmp_path: Path, store: SqliteStore
) -> None:
    teacher = FakeTeacher()
    teacher.hold = True
    worker = ShadowWorker(
        [ShadowTask.from_policy(load(tmp_path), teacher)],
        store,
        teacher_batch_size=1,
        backlog_batches=1,
    )
    worker.start()
    try:
        offer_reviews(worker, ["the first one"])
        assert teacher.entered.wait(30)  # the labeller is now stuck in the teacher
        # Every offer returns while the teacher does not answer (a blocking offer
        # would hang here until the test's timeout).
        offer_reviews(worker, [f"more traffic {i}" for i in range(20)], kind="late")
        # One batch waits for the teacher; the others are dropped, not queued.
        wait_until(
            lambda: worker.stats.snapshot()["dropped_backlog"] == 19,
            30,
            message=lambda: f"19 batches dropped: {worker.stats.snapshot()}",
        )
        assert worker.stats.snapshot()["reservoir_added"] == 21
        teacher.release.set()
        assert worker.wait_idle(30)
    finally:
        teacher.release.set()
        assert worker.stop()
    assert worker.stats.snapshot()["compared"] == 2
    assert store.count_comparisons("reviews") == 2


def test_unusable_teacher_answers_are_counted_not_stored_and_alerted_once(
    tmp_path: Path, store: SqliteStore, logs: list[Event]
) -> None:
    teacher = FakeTeacher(mode="garbage")
    worker = ShadowWorker(
        [ShadowTask.from_policy(load(tmp_path), teacher)], store, teacher_batch_size=4
    )
    worker.start()
    try:
        offer_reviews(worker, [f"garbage in {i}" for i in range(8)])  # two batches of 4
        assert worker.wait_idle(30)
        assert worker.stats.snapshot()["teacher_errors"] == 8
        assert store.count_comparisons("reviews") == 0
        teacher.mode = "ok"
        offer_reviews(worker, [f"fine again {i}" for i in range(4)])
        assert worker.wait_idle(30)
    finally:
        assert worker.stop()
    assert worker.stats.snapshot()["compared"] == 4
    assert [e["event"] for e in alerts(logs)] == [
        "teacher.bad_answers",
        "teacher.answers_ok_again",
    ]


class FailingStore(SqliteStore):
    """The real SqliteStore, whose reservoir writes raise while ``failing`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failing = threading.Event()

    def add_traffic(self, samples: Sequence[TrafficSample]) -> None:
        if self.failing.is_set():
            raise OSError("disk full")
        super().add_traffic(samples)


def test_a_failing_store_is_alerted_once_per_failing_spell(
    tmp_path: Path, logs: list[Event]
) -> None:
    store = FailingStore(tmp_path / "state.db")
    worker = ShadowWorker([ShadowTask.from_policy(load(tmp_path, rate=0.0), FakeTeacher())], store)
    worker.start()
    try:
        store.failing.set()
        for i in range(3):  # three failed writes, one at a time
            offer_reviews(worker, [f"lost {i}"])
            assert worker.wait_idle(30)
        store.failing.clear()
        offer_reviews(worker, ["kept"])
        assert worker.wait_idle(30)
        store.failing.set()
        offer_reviews(worker, ["lost again"])
        assert worker.wait_idle(30)
    finally:
        assert worker.stop()
        store.close()
    assert worker.stats.snapshot()["store_errors"] >= 4
    events = [e["event"] for e in logs if e["event"].startswith("shadow.store_")]
    assert events == ["shadow.store_failed", "shadow.store_ok_again", "shadow.store_failed"]


def test_a_full_queue_drops_offers_and_counts_them(tmp_path: Path) -> None:
    store = BlockingStore(tmp_path / "state.db")
    worker = ShadowWorker(
        [ShadowTask.from_policy(load(tmp_path), FakeTeacher())],
        store,
        queue_size=10,
        teacher_batch_size=1,
    )
    worker.start()
    try:
        offer_reviews(worker, ["taken by the intake thread"])
        assert store.writing.wait(30)  # the intake thread now waits on the store
        offer_reviews(worker, [f"offer {i}" for i in range(50)])
        assert worker.stats.snapshot()["dropped_queue_full"] == 40
        store.release.set()
        assert worker.wait_idle(30)
    finally:
        store.release.set()
        assert worker.stop()
        store.close()
    stats = worker.stats.snapshot()
    assert stats["offered"] == 51
    assert stats["reservoir_added"] == 11


# --------------------------------------------------------------------------- lifecycle


def test_stop_drains_pending_batches_and_later_offers_are_dropped(
    tmp_path: Path, store: SqliteStore
) -> None:
    worker = ShadowWorker(
        [ShadowTask.from_policy(load(tmp_path), FakeTeacher())],
        store,
        teacher_batch_size=100,
        teacher_batch_wait_s=3600,  # the batch would never close by itself
    )
    worker.offer("reviews", "early", "before start", None, "fresh", 0.9, "v1")
    worker.start()
    offer_reviews(worker, [f"pending {i}" for i in range(5)])
    worker.offer("other-task", "x", "text", None, "fresh", 0.9, "v1")
    assert worker.stop(timeout_s=30)
    worker.offer("reviews", "late", "after stop", None, "fresh", 0.9, "v1")
    stats = worker.stats.snapshot()
    assert stats["compared"] == 5
    assert stats["unknown_task"] == 1
    assert stats["dropped_not_running"] == 2
    assert store.count_comparisons("reviews") == 5


def test_segment_counts_are_seeded_from_the_store(tmp_path: Path, store: SqliteStore) -> None:
    # base rate 0: only segments below min_per_segment are sampled.
    policy = load(tmp_path, rate=0.0, min_per_segment=3)
    store.add_comparisons(
        [
            StoredComparison(
                task="reviews",
                request_id=f"old{i}",
                segment={"kind": "review", "length": "<64"},
                input_text="an older review",
                student_output="fresh",
                student_confidence=0.9,
                model_version="v1",
                teacher_output="fresh",
                teacher_confidence=0.9,
                teacher_probabilities=None,
                score=1.0,
                schema_valid=True,
            )
            for i in range(3)
        ]
    )
    worker = ShadowWorker(
        [ShadowTask.from_policy(policy, FakeTeacher())], store, teacher_batch_size=1
    )
    worker.start()
    try:
        offer_reviews(worker, ["a short review"], kind="review")  # both segments full
        assert worker.wait_idle(30)
        assert worker.stats.snapshot()["sampled"] == 0
        offer_reviews(worker, ["a short plot"], kind="plot")  # kind=plot has none yet
        assert worker.wait_idle(30)
    finally:
        assert worker.stop()
    assert worker.stats.snapshot()["sampled"] == 1
    assert store.last_comparisons("reviews", 1)[0].segment == {"kind": "plot", "length": "<64"}


def test_task_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        ShadowTask(task="t", kind="summaries", sampling=SamplingConfig(), teacher=None)
    with pytest.raises(ValueError, match="schema"):
        ShadowTask(task="t", kind="generation", sampling=SamplingConfig(), teacher=None)


# --------------------------------------------------------------------------- budget drain


class BudgetedTeacher(FakeTeacher):
    """The fake teacher behind the real CallBudget (``max_calls_per_hour``), counted per
    input as the OpenAI teacher does; the budget's clock stands still."""

    def __init__(self, max_calls: int) -> None:
        super().__init__()
        self.budget = CallBudget(max_calls, clock=lambda: 0.0)

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        if not self.budget.try_acquire(len(inputs)):
            raise TeacherUnavailable("teacher budget spent", retry_after_s=3600.0)
        return super().label(inputs)


def offer_with_made_up_metadata(
    worker: ShadowWorker, requests: int, chunk: int = 100
) -> tuple[set[str], set[str]]:
    """Every 10th request is ordinary (source "app"); the others carry a new id and a new
    source each. Offered in chunks, each handled before the next, so that every sampled
    request reaches the teacher (none is lost to a full backlog). Returns the ids of the
    ordinary and of the made-up requests."""
    ordinary: set[str] = set()
    made_up: set[str] = set()
    for start in range(0, requests, chunk):
        for i in range(start, start + chunk):
            # 64-255 characters: the middle length bucket, no edge-case boost.
            text = f"an ordinary review of a film, number {i:05d}, neither short nor long"
            if i % 10 == 0:
                request_id, metadata = f"ordinary-{i}", {"source": "app"}
                ordinary.add(request_id)
            else:
                request_id, metadata = f"made-up-{i}", {"id": f"id-{i}", "source": f"s-{i}"}
                made_up.add(request_id)
            worker.offer("reviews", request_id, text, metadata, "fresh", 0.9, "v1")
        assert worker.wait_idle(60)
    return ordinary, made_up


@pytest.mark.parametrize("segment_keys", [None, ["source"]])
def test_made_up_metadata_values_do_not_drain_the_teacher_budget(
    store: SqliteStore, segment_keys: list[str] | None
) -> None:
    # A producer sets a unique metadata value on every request. Without segment_keys
    # metadata is no segment at all; with source declared, at most max_values_per_key
    # sources are tracked and the rest pool as "other". Either way the teacher is asked
    # about roughly base_rate of the requests, not about every one.
    requests, base_rate, budget = 10_000, 0.05, 2_000
    sampling = SamplingConfig(
        base_rate=base_rate,
        min_per_segment=10,
        segment_keys=segment_keys,
        max_values_per_key=20,
    )
    teacher = BudgetedTeacher(budget)
    task = ShadowTask(
        task="reviews", kind="classification", sampling=sampling, teacher=teacher, window=1000
    )
    worker = ShadowWorker(
        [task], store, teacher_batch_size=16, teacher_batch_wait_s=0.01, rng=random.Random(3)
    )
    worker.start()
    try:
        ordinary, _ = offer_with_made_up_metadata(worker, requests)
    finally:
        assert worker.stop()

    stats = worker.stats.snapshot()
    assert stats["offered"] == stats["reservoir_added"] == requests
    # The base rate (500 expected), plus the first chunk sampled while the length
    # bucket, "other" and the 20 tracked sources were below their minimum (at most
    # 100 + 20): far from the 10,000 requests the made-up values would have drawn.
    assert stats["sampled"] < 900, stats
    assert stats["teacher_calls"] == stats["compared"] == stats["sampled"]
    assert stats["paused"] == 0, "the teacher budget ran out"
    assert teacher.budget.remaining > budget - 900
    # Ordinary requests are still compared at about the base rate (50 expected).
    compared = store.last_comparisons("reviews", requests)
    assert sum(c.request_id in ordinary for c in compared) >= 20
    sources = {c.segment.get("source") for c in compared}
    if segment_keys is None:
        assert all(set(c.segment) == {"length"} for c in compared)
    else:
        assert "app" in sources and "other" in sources
        assert len(sources) <= 1 + 20 + 1  # app, the 20 tracked places, other
