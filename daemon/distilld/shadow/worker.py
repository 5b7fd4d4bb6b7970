"""The shadow worker: compares sampled live requests with the teacher, off the serving path.

The serving loop calls :meth:`ShadowWorker.offer` once per answered request.
``offer`` only puts the request in a bounded queue (``put_nowait``): it never
blocks and never raises; when the queue is full the request is dropped and
counted, because serving must not slow down for monitoring.

Two background threads do the rest:

* intake: takes offered requests, adds every one to its task's traffic
  reservoir (grouped writes), asks :func:`distilld.shadow.sampler.decide`
  whether to compare it, and groups the sampled ones into per-task batches
  closed by size or age;
* labeller: sends each batch to the task's teacher, scores every answer with
  :func:`distilld.shadow.compare.compare` and stores the comparisons.

Two threads rather than one so that a slow teacher (timeouts, retries) never
holds up the reservoir: batches wait in a second bounded queue and are dropped
(counted) when it is full.

A teacher that cannot answer (breaker open, budget spent, timeouts, any batch
error) pauses its task's comparisons until the error's ``retry_after_s`` (at
least ``min_retry_s``; ``error_retry_s`` for errors that give no hint):
sampled requests are dropped and counted meanwhile, the reservoir keeps
filling. One ``teacher.unavailable`` alert marks the start of an outage and
one ``teacher.available_again`` its end (the first batch answered after it).

Answers the teacher gave for one input but that are unusable
(``TeacherAnswer.error`` set: a label outside the set, JSON failing the
schema) are counted in ``teacher_errors`` and not stored: a comparison needs
a teacher label to score against, and a stored row without a score would
take a place in the accuracy window while saying nothing about the student.
A batch where at least half the answers are unusable raises one
``teacher.bad_answers`` alert until a later batch is mostly usable again.

Per-segment comparison counts (for the sampler's minimum per segment) are
kept in memory over the last ``window`` comparisons of each task, seeded from
the store on start so a restart does not over-sample segments that already
have their share. Segments are the length bucket and the declared
``segment_keys`` only, each key with at most ``max_values_per_key`` values
(:class:`~distilld.shadow.sampler.SegmentValues`; a value unseen for
``IDLE_WINDOWS`` accuracy windows of requests gives its place up), so made-up
metadata values cannot make every request a rare segment.
"""

from __future__ import annotations

import hashlib
import math
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from distilld.log import get_logger
from distilld.monitoring.config import SamplingConfig
from distilld.monitoring.features import words
from distilld.policy.model import Policy
from distilld.serving.base import StudentBackend
from distilld.shadow.compare import CompareError, OutputSchema, compare
from distilld.shadow.sampler import SegmentValues, decide, segment_of
from distilld.store.base import AlertEvent, Output, SampleStore, StoredComparison, TrafficSample
from distilld.teacher.base import Teacher, TeacherAnswer, TeacherError, TeacherUnavailable
from distilld.telemetry.alerts import alert
from distilld.telemetry.latch import Latch
from distilld.vocabulary import LENGTH_SEGMENT_KEY, TASK_KINDS, TaskKind

Clock = Callable[[], float]

# A batch with at least this share of unusable answers means the teacher, not one
# odd input, is at fault: worth an alert.
BAD_ANSWER_SHARE = 0.5
# A tracked segment value unseen for this many accuracy windows of requests gives its
# place up to a new value (see SegmentValues).
IDLE_WINDOWS = 10
# How long the intake thread waits for an offer when no batch is due sooner: bounds
# how late a batch closes by age and how fast stop() is noticed.
_POLL_S = 0.05


@dataclass(frozen=True)
class ShadowTask:
    """What the worker needs to know about one task (taken from its policy).

    ``teacher`` None: the task's requests only feed the reservoir. ``window``
    is the accuracy monitor's window: the sampler's per-segment counts cover
    that many recent comparisons. ``vocabulary`` (the drift reference's) lets
    the sampler boost inputs with many unknown words.
    """

    task: str
    kind: str
    sampling: SamplingConfig
    teacher: Teacher | None
    labels: tuple[str, ...] | None = None
    schema: OutputSchema | None = None
    window: int = 1000
    vocabulary: frozenset[str] | None = None

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        teacher: Teacher | None,
        *,
        vocabulary: frozenset[str] | None = None,
    ) -> ShadowTask:
        """The task's settings from its policy; ``teacher`` built from ``policy.teacher``."""
        return cls(
            task=policy.task,
            kind=policy.kind.value,
            sampling=policy.sampling,
            teacher=teacher,
            labels=tuple(policy.labels) if policy.labels is not None else None,
            schema=OutputSchema(policy.output_schema) if policy.output_schema else None,
            window=policy.monitors.accuracy.window,
            vocabulary=vocabulary,
        )

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"task {self.task!r}: kind must be one of {list(TASK_KINDS)} (received "
                f"{self.kind!r})"
            )
        if self.kind == "generation" and self.schema is None:
            raise ValueError(
                f"task {self.task!r}: a generation task is compared on its output schema; "
                "pass schema=OutputSchema(policy.output_schema)"
            )
        if self.window < 1:
            raise ValueError(f"task {self.task!r}: window must be at least 1 ({self.window})")


@dataclass
class ShadowStats:
    """Counters of the worker, updated from the serving thread and the worker's threads.

    ``offered``: offer() calls; ``dropped_queue_full`` / ``dropped_not_running``
    / ``dropped_invalid`` / ``unknown_task``: offers not taken; ``reservoir_added``:
    rows written to the reservoir; ``sampled``: requests the sampler chose;
    ``paused``: sampled requests dropped while their teacher was unavailable;
    ``dropped_backlog``: sampled requests dropped because batches waited for the
    teacher already; ``compared``: comparisons stored; ``teacher_errors``:
    unusable answers; ``compare_errors``: answers that could not be scored;
    ``store_errors``: failed writes; ``dropped_on_stop``: left when stop() gave up;
    ``candidate_compared`` / ``candidate_errors``: answers of a candidate in shadow
    stored / lost to its errors; ``teacher_calls``: inputs sent to the teacher.
    """

    offered: int = 0
    dropped_queue_full: int = 0
    dropped_not_running: int = 0
    dropped_invalid: int = 0
    unknown_task: int = 0
    reservoir_added: int = 0
    sampled: int = 0
    paused: int = 0
    dropped_backlog: int = 0
    compared: int = 0
    teacher_errors: int = 0
    compare_errors: int = 0
    store_errors: int = 0
    dropped_on_stop: int = 0
    candidate_compared: int = 0
    candidate_errors: int = 0
    teacher_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


def in_share(request_id: str, share: float) -> bool:
    """Whether a request falls in the first ``share`` of the id space (stable across
    restarts and replicas, unlike a random draw)."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


@dataclass(frozen=True)
class _Offer:
    task: str
    request_id: str
    text: str
    metadata: dict[str, str]
    output: Output
    confidence: float | None
    model_version: str
    created_at: float  # wall-clock seconds


@dataclass(frozen=True)
class _Sampled:
    offer: _Offer
    segment: dict[str, str]


class _SegmentCounts:
    """Comparisons per (segment key, value) over the last ``window`` comparisons."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._recent: deque[tuple[tuple[str, str], ...]] = deque()
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, segment: Mapping[str, str]) -> None:
        items = tuple(segment.items())
        self._recent.append(items)
        self.counts.update(items)
        if len(self._recent) > self._window:
            for item in self._recent.popleft():
                self.counts[item] -= 1
                if self.counts[item] <= 0:
                    del self.counts[item]


@dataclass
class _Outage:
    since: float  # clock time
    failures: int = 1


class ShadowWorker:
    """Feeds the reservoir and compares sampled requests with the teacher, in the background.

    The worker does not own the teachers or the store: ``stop`` leaves them
    open for their owner to close.
    """

    def __init__(
        self,
        tasks: Sequence[ShadowTask],
        store: SampleStore,
        *,
        queue_size: int = 10_000,
        write_batch: int = 256,
        teacher_batch_size: int = 16,
        teacher_batch_wait_s: float = 1.0,
        backlog_batches: int = 8,
        min_retry_s: float = 1.0,
        error_retry_s: float = 60.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        names = [t.task for t in tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each task needs exactly one ShadowTask (repeated: {repeated})")
        if queue_size < 1 or write_batch < 1 or teacher_batch_size < 1 or backlog_batches < 1:
            raise ValueError(
                "queue_size, write_batch, teacher_batch_size and backlog_batches must be at "
                f"least 1 (received {queue_size}, {write_batch}, {teacher_batch_size}, "
                f"{backlog_batches})"
            )
        if teacher_batch_wait_s < 0 or min_retry_s < 0 or error_retry_s < 0:
            raise ValueError("teacher_batch_wait_s, min_retry_s and error_retry_s must be >= 0")
        self._tasks = {t.task: t for t in tasks}
        self._store = store
        self._write_batch = write_batch
        self._batch_size = teacher_batch_size
        self._batch_wait_s = teacher_batch_wait_s
        self._min_retry_s = min_retry_s
        self._error_retry_s = error_retry_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()  # used on the intake thread only
        self._log = get_logger("shadow")
        self.stats = ShadowStats()

        self._offers: queue.Queue[_Offer] = queue.Queue(maxsize=queue_size)
        self._labelling: queue.Queue[tuple[str, list[_Sampled]]] = queue.Queue(
            maxsize=backlog_batches
        )
        # Intake thread only: sampled requests waiting for their batch to close.
        self._pending: dict[str, list[_Sampled]] = {}
        self._pending_since: dict[str, float] = {}

        # Shared by the intake and labeller threads, guarded by _lock.
        self._lock = threading.Lock()
        self._counts = {t.task: _SegmentCounts(t.window) for t in tasks if t.teacher is not None}
        self._values = {
            t.task: SegmentValues(t.sampling.max_values_per_key, IDLE_WINDOWS * t.window)
            for t in tasks
            if t.teacher is not None
        }
        self._retry_at: dict[str, float] = {}
        # Alert once per spell (breach and recovery edges): a task's teacher outage,
        # a task's teacher giving unusable answers, the store refusing writes.
        self._outages: Latch[str, _Outage] = Latch()
        self._bad_answers: Latch[str, bool] = Latch()
        self._store_failing: Latch[str, bool] = Latch()
        self._teacher_calls: Counter[str] = Counter()  # inputs sent to the teacher, per task
        # task -> (candidate backend, share of compared requests it answers)
        self._candidates: dict[str, tuple[StudentBackend, float]] = {}

        # Offers taken but not yet fully handled (stored, compared or dropped).
        self._idle = threading.Condition()
        self._unfinished = 0

        self._running = False
        self._stopping = threading.Event()
        self._abandon = threading.Event()  # stop() ran out of time: drop what is left
        self._intake_done = threading.Event()
        self._threads: list[threading.Thread] = []

    def task_teacher_calls(self) -> dict[str, int]:
        """Inputs sent to each task's teacher since the start (/metrics)."""
        with self._lock:
            return dict(self._teacher_calls)

    # -- candidates in shadow -----------------------------------------------------

    def set_candidate(self, task: str, backend: StudentBackend | None, share: float = 1.0) -> None:
        """Let ``backend`` (a candidate version) answer ``share`` of the task's compared
        requests beside the live student; None ends it. Its answers are scored against
        the same teacher answers and stored under its own model version; they never go
        out. The worker does not close the backend."""
        if task not in self._tasks:
            raise ValueError(f"no shadow task {task!r} (known: {sorted(self._tasks)})")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must lie in (0, 1] (received {share})")
        with self._lock:
            if backend is None:
                self._candidates.pop(task, None)
            else:
                self._candidates[task] = (backend, share)

    # -- the serving side ---------------------------------------------------------

    def offer(
        self,
        task: str,
        request_id: str,
        text: str,
        metadata: Mapping[str, str] | None,
        output: Output,
        confidence: float | None,
        model_version: str,
    ) -> None:
        """Hand one answered request to the worker. Never blocks, never raises."""
        # Everything is inside the try: whatever goes wrong here must not reach
        # the serving loop, which would otherwise treat it as a serving failure.
        try:
            self.stats.add("offered")
            if not self._running:
                self.stats.add("dropped_not_running")
                return
            if task not in self._tasks:
                self.stats.add("unknown_task")
                return
            item = _Offer(
                task=task,
                request_id=request_id,
                text=text,
                metadata=dict(metadata) if metadata else {},
                output=output,
                confidence=confidence,
                model_version=model_version,
                created_at=self._wall_clock(),
            )
            with self._idle:
                self._offers.put_nowait(item)
                self._unfinished += 1
        except queue.Full:
            self.stats.add("dropped_queue_full")
        except Exception:
            self.stats.add("dropped_invalid")

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Seed the per-segment counts from the store and start the two threads."""
        if self._running or self._threads:
            raise RuntimeError("the shadow worker was started already; build a new one")
        for task, counts in self._counts.items():
            window = self._tasks[task].window
            keys = {*(self._tasks[task].sampling.segment_keys or ()), LENGTH_SEGMENT_KEY}
            try:
                for stored in self._store.last_comparisons(task, window):
                    # Only the declared keys, pooled as new comparisons are (rows may
                    # predate a change of segment_keys).
                    declared = {k: v for k, v in stored.segment.items() if k in keys}
                    counts.add(self._values[task].admit(declared))
            except Exception as exc:
                # Counts only steer sampling: start with none rather than not at all.
                self._log.warning(
                    "shadow.counts_not_seeded", task=task, error=f"{type(exc).__name__}: {exc}"
                )
        self._threads = [
            threading.Thread(target=self._intake_loop, name="shadow-intake", daemon=True),
            threading.Thread(target=self._label_loop, name="shadow-labeller", daemon=True),
        ]
        self._running = True
        for thread in self._threads:
            thread.start()
        self._log.info(
            "shadow.started",
            tasks=sorted(self._tasks),
            compared=sorted(self._counts),
        )

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop taking offers, handle what was offered (reservoir, pending batches,
        teacher calls) for up to ``timeout_s``, then drop the rest (counted).

        Returns True when everything offered was handled. A teacher call in
        progress is not interrupted: a thread still in one is left behind (a
        daemon thread) and drops every batch after it."""
        self._running = False
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        clean = not any(thread.is_alive() for thread in self._threads)
        if not clean:
            self._abandon.set()
            for thread in self._threads:
                thread.join(1.0)
        self._log.info("shadow.stopped", drained=clean, **self.stats.snapshot())
        return clean

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every offer so far is fully handled (for tests and benchmarks).

        A sampled request counts as handled once its batch was labelled or
        dropped, so this waits for batches to close by size or age too."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout=timeout_s)

    def paused_tasks(self) -> dict[str, float]:
        """Tasks whose comparisons are paused, with the seconds until the next try."""
        now = self._clock()
        with self._lock:
            return {
                task: max(0.0, at - now)
                for task, at in self._retry_at.items()
                if task in self._outages
            }

    # -- intake thread ------------------------------------------------------------

    def _intake_loop(self) -> None:
        try:
            while not (self._stopping.is_set() and self._offers.empty()):
                if self._abandon.is_set():
                    break
                group = self._next_offers()
                if group:
                    self._take(group)
                self._close_batches(force=self._stopping.is_set())
            self._close_batches(force=True)
            # Offers that raced with stop() (or were left when it gave up) are dropped.
            self._drop_left_offers()
        except Exception as exc:  # a bug here must be visible, and must not hang stop()
            alert(
                self._log,
                "shadow.worker_failed",
                severity="error",
                thread="intake",
                error=f"{type(exc).__name__}: {exc}",
                action="comparisons and the traffic reservoir stopped; restart the daemon",
            )
        finally:
            self._intake_done.set()

    def _next_offers(self) -> list[_Offer]:
        """Up to write_batch offers: waits for the first, takes the rest that are there."""
        try:
            first = self._offers.get(timeout=self._wait_s())
        except queue.Empty:
            return []
        group = [first]
        while len(group) < self._write_batch:
            try:
                group.append(self._offers.get_nowait())
            except queue.Empty:
                break
        return group

    def _wait_s(self) -> float:
        if not self._pending_since:
            return _POLL_S
        due = min(self._pending_since.values()) + self._batch_wait_s
        return min(_POLL_S, max(0.0, due - self._clock()))

    def _take(self, group: list[_Offer]) -> None:
        samples = [
            TrafficSample(
                task=o.task,
                input_text=o.text,
                metadata=dict(o.metadata),
                student_output=o.output,
                student_confidence=o.confidence if o.confidence is not None else 0.0,
                request_id=o.request_id,
                model_version=o.model_version,
                created_at=o.created_at,
            )
            for o in group
        ]
        if self._write("add_traffic", samples):
            self.stats.add("reservoir_added", len(samples))
        finished = 0
        for item in group:
            if not self._consider(item):
                finished += 1
        self._finish(finished)

    def _consider(self, item: _Offer) -> bool:
        """Sample one offer; True when it now waits in a batch (not finished yet)."""
        task = self._tasks[item.task]
        if task.teacher is None:
            return False
        oov_share = None
        if task.vocabulary is not None:
            tokens = words(item.text)
            unknown = sum(1 for t in tokens if t not in task.vocabulary)
            oov_share = unknown / len(tokens) if tokens else 0.0
        segment = segment_of(item.text, item.metadata, task.sampling, task.sampling.segment_keys)
        with self._lock:
            decision = decide(
                item.text,
                item.metadata,
                item.confidence,
                task.sampling,
                self._counts[task.task].counts,
                self._rng,
                oov_share=oov_share,
                segment=self._values[task.task].admit(segment),
            )
        if not decision.sample:
            return False
        self.stats.add("sampled")
        if self._is_paused(task.task):
            self.stats.add("paused")
            return False
        pending = self._pending.setdefault(task.task, [])
        if not pending:
            self._pending_since[task.task] = self._clock()
        pending.append(_Sampled(item, decision.segment))
        if len(pending) >= self._batch_size:
            self._hand_over(task.task)
        return True

    def _close_batches(self, force: bool) -> None:
        now = self._clock()
        for task, since in list(self._pending_since.items()):
            if force or now - since >= self._batch_wait_s:
                self._hand_over(task)

    def _hand_over(self, task: str) -> None:
        batch = self._pending.pop(task, [])
        self._pending_since.pop(task, None)
        if not batch:
            return
        try:
            self._labelling.put_nowait((task, batch))
        except queue.Full:
            # The teacher is slower than the sampling rate: drop rather than queue
            # without bound; the sampler keeps choosing fresh requests.
            self.stats.add("dropped_backlog", len(batch))
            self._finish(len(batch))

    def _drop_left_offers(self) -> None:
        left = 0
        while True:
            try:
                self._offers.get_nowait()
            except queue.Empty:
                break
            left += 1
        self.stats.add("dropped_on_stop", left)
        self._finish(left)

    # -- labeller thread ----------------------------------------------------------

    def _label_loop(self) -> None:
        try:
            while True:
                try:
                    task, batch = self._labelling.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._intake_done.is_set() and self._labelling.empty():
                        return
                    continue
                if self._abandon.is_set():
                    self.stats.add("dropped_on_stop", len(batch))
                    self._finish(len(batch))
                    continue
                try:
                    self._label(self._tasks[task], batch)
                finally:
                    self._finish(len(batch))
        except Exception as exc:  # a bug here must be visible, and must not hang stop()
            alert(
                self._log,
                "shadow.worker_failed",
                severity="error",
                thread="labeller",
                error=f"{type(exc).__name__}: {exc}",
                action="comparisons stopped; restart the daemon",
            )

    def _label(self, task: ShadowTask, batch: list[_Sampled]) -> None:
        assert task.teacher is not None  # only tasks with a teacher are batched
        if self._is_paused(task.task):  # the outage began while this batch waited
            self.stats.add("paused", len(batch))
            return
        self.stats.add("teacher_calls", len(batch))
        with self._lock:
            self._teacher_calls[task.task] += len(batch)
        try:
            answers = task.teacher.label([s.offer.text for s in batch])
            if len(answers) != len(batch):
                raise TeacherError(
                    f"the teacher returned {len(answers)} answers for {len(batch)} inputs"
                )
        except TeacherUnavailable as exc:
            self._on_outage(task.task, exc, exc.retry_after_s, len(batch))
            return
        except Exception as exc:
            # TeacherError (bad key, closed teacher) or a bug in a teacher: pause as
            # for an outage, longer, instead of calling a broken teacher for every batch.
            self._on_outage(task.task, exc, self._error_retry_s, len(batch))
            return
        self._on_answered(task.task)
        self._store_comparisons(task, batch, answers)
        with self._lock:
            candidate = self._candidates.get(task.task)
        if candidate is not None:
            self._shadow_candidate(task, batch, answers, *candidate)

    def _shadow_candidate(
        self,
        task: ShadowTask,
        batch: list[_Sampled],
        answers: list[TeacherAnswer],
        backend: StudentBackend,
        share: float,
    ) -> None:
        chosen = [
            i
            for i, s in enumerate(batch)
            if answers[i].error is None and in_share(s.offer.request_id, share)
        ]
        if not chosen:
            return
        try:
            predictions = backend.predict([batch[i].offer.text for i in chosen])
        except Exception as exc:  # a broken candidate must not stop the comparisons
            self.stats.add("candidate_errors", len(chosen))
            self._log.warning(
                "shadow.candidate_failed",
                task=task.task,
                candidate=backend.model_version,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        version = backend.model_version
        shadowed = [
            _Sampled(
                offer=replace(
                    batch[i].offer,
                    # An invalid JSON answer scores as an empty object.
                    output=p.output if p.error is None or task.kind == "classification" else {},
                    confidence=p.confidence,
                    model_version=version,
                ),
                segment=batch[i].segment,
            )
            for i, p in zip(chosen, predictions, strict=True)
        ]
        self._store_comparisons(task, shadowed, [answers[i] for i in chosen], candidate=True)

    def _store_comparisons(
        self,
        task: ShadowTask,
        batch: list[_Sampled],
        answers: list[TeacherAnswer],
        candidate: bool = False,
    ) -> None:
        records: list[StoredComparison] = []
        unusable = 0
        for sampled, answer in zip(batch, answers, strict=True):
            if answer.error is not None:
                unusable += 1
                continue
            item = sampled.offer
            try:
                result = compare(
                    TaskKind(task.kind),
                    item.output,
                    answer.output,
                    labels=task.labels,
                    schema=task.schema,
                )
            except CompareError as exc:
                self.stats.add("compare_errors")
                self._log.info(
                    "shadow.compare_failed", task=task.task, id=item.request_id, error=str(exc)
                )
                continue
            records.append(
                StoredComparison(
                    task=task.task,
                    request_id=item.request_id,
                    segment=sampled.segment,
                    input_text=item.text,
                    student_output=item.output,
                    student_confidence=item.confidence if item.confidence is not None else 0.0,
                    model_version=item.model_version,
                    teacher_output=answer.output,
                    teacher_confidence=answer.confidence,
                    teacher_probabilities=answer.probabilities,
                    score=result.score,
                    # None: the task has no label set or schema, nothing to fail.
                    schema_valid=result.schema_valid is not False,
                    created_at=self._wall_clock(),
                )
            )
        if candidate:
            if records and self._write("add_comparisons", records):
                self.stats.add("candidate_compared", len(records))
            return
        if unusable:
            self.stats.add("teacher_errors", unusable)
        self._note_answer_quality(task.task, unusable, len(batch))
        if records and self._write("add_comparisons", records):
            self.stats.add("compared", len(records))
            with self._lock:
                counts = self._counts[task.task]
                for record in records:
                    counts.add(record.segment)

    # -- teacher outages and answer quality ---------------------------------------

    def _is_paused(self, task: str) -> bool:
        with self._lock:
            return self._clock() < self._retry_at.get(task, -math.inf)

    def _on_outage(self, task: str, exc: Exception, retry_after_s: float, lost: int) -> None:
        wait = retry_after_s if math.isfinite(retry_after_s) else self._error_retry_s
        wait = max(self._min_retry_s, wait)
        now = self._clock()
        with self._lock:
            self._retry_at[task] = now + wait
            started = self._outages.set(task, _Outage(since=now))
            outage = self._outages.get(task)
            if not started and outage is not None:
                outage.failures += 1
        self.stats.add("paused", lost)
        error = f"{type(exc).__name__}: {exc}"
        if not started:
            self._log.info("teacher.still_unavailable", task=task, error=error, retry_in_s=wait)
            return
        alert(
            self._log,
            "teacher.unavailable",
            severity="warning",
            task=task,
            error=error,
            retry_in_s=round(wait, 3),
            action="comparisons of this task are paused and sampled requests dropped until "
            "the teacher answers again; serving and the traffic reservoir are unaffected",
        )
        self._record_alert(task, "teacher_unavailable", {"error": error, "retry_in_s": wait})

    def _on_answered(self, task: str) -> None:
        with self._lock:
            self._retry_at.pop(task, None)
            outage = self._outages.clear(task)
        if outage is None:
            return
        outage_s = round(self._clock() - outage.since, 3)
        alert(
            self._log,
            "teacher.available_again",
            severity="info",
            task=task,
            failed_calls=outage.failures,
            outage_s=outage_s,
            action="comparisons resumed",
        )
        self._record_alert(
            task, "teacher_available", {"failed_calls": outage.failures, "outage_s": outage_s}
        )

    def _note_answer_quality(self, task: str, unusable: int, total: int) -> None:
        bad = total > 0 and unusable / total >= BAD_ANSWER_SHARE
        if bad:
            edge = self._bad_answers.set(task, True)
        else:
            edge = self._bad_answers.clear(task) is not None
        if bad and edge:
            alert(
                self._log,
                "teacher.bad_answers",
                severity="warning",
                task=task,
                unusable=unusable,
                batch=total,
                action="unusable teacher answers are not compared; check the teacher's prompt, "
                "label set or schema",
            )
            self._record_alert(task, "teacher_bad_answers", {"unusable": unusable, "batch": total})
        elif edge:
            alert(
                self._log,
                "teacher.answers_ok_again",
                severity="info",
                task=task,
                unusable=unusable,
                batch=total,
            )
            self._record_alert(task, "teacher_answers_ok", {"unusable": unusable, "batch": total})

    def _record_alert(self, task: str, kind: str, payload: dict[str, Any]) -> None:
        # Stored so that `distilld status` lists teacher outages among the last alerts.
        self._write(
            "add_alert",
            AlertEvent(task=task, kind=kind, metric="teacher", payload=payload),
        )

    # -- store writes -------------------------------------------------------------

    def _write(self, method: str, payload: Any) -> bool:
        """One store write; a failure is counted and alerted once per failing spell."""
        try:
            getattr(self._store, method)(payload)
        except Exception as exc:
            self.stats.add("store_errors")
            if self._store_failing.set("store", True):
                alert(
                    self._log,
                    "shadow.store_failed",
                    severity="error",
                    operation=method,
                    error=f"{type(exc).__name__}: {exc}",
                    action="reservoir rows and comparisons are lost until the store accepts "
                    "writes again; serving is unaffected",
                )
            return False
        if self._store_failing.clear("store") is not None:
            self._log.info("shadow.store_ok_again", operation=method)
        return True

    def _finish(self, count: int) -> None:
        if count <= 0:
            return
        with self._idle:
            self._unfinished -= count
            if self._unfinished <= 0:
                self._idle.notify_all()
