"""The shadow worker: compares sampled live requests with the teacher, off the serving path.

The serving loop calls :meth:`ShadowWorker.offer` once per answered request.
``offer`` only puts the request in a bounded queue (``put_nowait``): it never
blocks and never raises; when the queue is full the request is dropped and
counted, because serving must not slow down for monitoring.

Two background threads do the rest:

* intake: takes offered requests, adds every one to its task's traffic
  reservoir (grouped writes), asks the task's
  :class:`~distilld.shadow.sampler.TaskSampling` whether to compare it, and
  groups the sampled ones into per-task batches closed by size or age;
* labeller: sends each batch to the task's teacher, scores the answers
  (:func:`distilld.shadow.scoring.score_batch`) and stores the comparisons.

Two threads rather than one so that a slow teacher (timeouts, retries) never
holds up the reservoir: batches wait in a second bounded queue and are dropped
(counted) when it is full.

This module keeps the threads and queues; the teacher's pauses and alerts are
in :mod:`~distilld.shadow.health`, the store writes and their failure latch in
:mod:`~distilld.shadow.recorder`, the per-segment counts in
:mod:`~distilld.shadow.sampler`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from distilld.log import get_logger
from distilld.monitoring.features import words
from distilld.serving.base import StudentBackend
from distilld.shadow.health import TeacherHealth
from distilld.shadow.recorder import ShadowRecorder
from distilld.shadow.sampler import TaskSampling
from distilld.shadow.scoring import as_candidate, candidate_inputs, score_batch
from distilld.shadow.stats import ShadowStats
from distilld.shadow.task import Offer, Sampled, ShadowTask
from distilld.store.base import Output, SampleStore
from distilld.teacher.base import TeacherAnswer, TeacherError, TeacherUnavailable
from distilld.telemetry.alerts import alert

Clock = Callable[[], float]

# How long the intake thread waits for an offer when no batch is due sooner: bounds
# how late a batch closes by age and how fast stop() is noticed.
_POLL_S = 0.05


def oov_share(text: str, vocabulary: frozenset[str]) -> float:
    """The share of the input's words outside ``vocabulary`` (0.0 without words)."""
    tokens = words(text)
    unknown = sum(1 for t in tokens if t not in vocabulary)
    return unknown / len(tokens) if tokens else 0.0


def next_wait_s(pending_since: Mapping[str, float], batch_wait_s: float, now: float) -> float:
    """How long the intake thread may wait for an offer: until the oldest pending
    batch is due, at most ``_POLL_S``."""
    if not pending_since:
        return _POLL_S
    due = min(pending_since.values()) + batch_wait_s
    return min(_POLL_S, max(0.0, due - now))


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
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()  # used on the intake thread only
        self._log = get_logger("shadow")
        self.stats = ShadowStats()
        self._recorder = ShadowRecorder(store, self.stats, self._log)
        self._health = TeacherHealth(
            self._recorder,
            self.stats,
            self._log,
            min_retry_s=min_retry_s,
            error_retry_s=error_retry_s,
            clock=clock,
        )

        self._offers: queue.Queue[Offer] = queue.Queue(maxsize=queue_size)
        self._labelling: queue.Queue[tuple[str, list[Sampled]]] = queue.Queue(
            maxsize=backlog_batches
        )
        # Intake thread only: sampled requests waiting for their batch to close.
        self._pending: dict[str, list[Sampled]] = {}
        self._pending_since: dict[str, float] = {}

        # Shared by the intake and labeller threads, guarded by _lock.
        self._lock = threading.Lock()
        self._sampling = {
            t.task: TaskSampling(t.sampling, t.window) for t in tasks if t.teacher is not None
        }
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

    def paused_tasks(self) -> dict[str, float]:
        """Tasks whose comparisons are paused, with the seconds until the next try."""
        return self._health.paused_tasks()

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
            item = Offer(
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
        for task, sampling in self._sampling.items():
            try:
                stored = self._store.last_comparisons(task, self._tasks[task].window)
                sampling.seed(c.segment for c in stored)
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
            compared=sorted(self._sampling),
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

    def _next_offers(self) -> list[Offer]:
        """Up to write_batch offers: waits for the first, takes the rest that are there."""
        try:
            wait_s = next_wait_s(self._pending_since, self._batch_wait_s, self._clock())
            first = self._offers.get(timeout=wait_s)
        except queue.Empty:
            return []
        group = [first]
        while len(group) < self._write_batch:
            try:
                group.append(self._offers.get_nowait())
            except queue.Empty:
                break
        return group

    def _take(self, group: list[Offer]) -> None:
        samples = [o.traffic_sample() for o in group]
        if self._recorder.add_traffic(samples):
            self.stats.add("reservoir_added", len(samples))
        finished = 0
        for item in group:
            if not self._consider(item):
                finished += 1
        self._finish(finished)

    def _consider(self, item: Offer) -> bool:
        """Sample one offer; True when it now waits in a batch (not finished yet)."""
        task = self._tasks[item.task]
        if task.teacher is None:
            return False
        share = oov_share(item.text, task.vocabulary) if task.vocabulary is not None else None
        with self._lock:
            decision = self._sampling[task.task].decide(
                item.text, item.metadata, item.confidence, self._rng, oov_share=share
            )
        if not decision.sample:
            return False
        self.stats.add("sampled")
        if self._health.is_paused(task.task):
            self.stats.add("paused")
            return False
        pending = self._pending.setdefault(task.task, [])
        if not pending:
            self._pending_since[task.task] = self._clock()
        pending.append(Sampled(item, decision.segment))
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

    def _label(self, task: ShadowTask, batch: list[Sampled]) -> None:
        assert task.teacher is not None  # only tasks with a teacher are batched
        if self._health.is_paused(task.task):  # the outage began while this batch waited
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
            self._health.failed(task.task, exc, exc.retry_after_s, len(batch))
            return
        except Exception as exc:
            # TeacherError (bad key, closed teacher) or a bug in a teacher: pause as
            # for an outage, longer, instead of calling a broken teacher for every batch.
            self._health.failed(task.task, exc, None, len(batch))
            return
        self._health.answered(task.task)
        self._store_comparisons(task, batch, answers)
        with self._lock:
            candidate = self._candidates.get(task.task)
        if candidate is not None:
            self._shadow_candidate(task, batch, answers, *candidate)

    def _shadow_candidate(
        self,
        task: ShadowTask,
        batch: list[Sampled],
        answers: list[TeacherAnswer],
        backend: StudentBackend,
        share: float,
    ) -> None:
        chosen = candidate_inputs(batch, answers, share)
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
            as_candidate(task.kind, batch[i], p, version)
            for i, p in zip(chosen, predictions, strict=True)
        ]
        self._store_comparisons(task, shadowed, [answers[i] for i in chosen], candidate=True)

    def _store_comparisons(
        self,
        task: ShadowTask,
        batch: list[Sampled],
        answers: list[TeacherAnswer],
        candidate: bool = False,
    ) -> None:
        scored = score_batch(task, batch, answers, created_at=self._wall_clock())
        for request_id, error in scored.failures:
            self.stats.add("compare_errors")
            self._log.info("shadow.compare_failed", task=task.task, id=request_id, error=error)
        records = scored.records
        if candidate:
            if records and self._recorder.add_comparisons(records):
                self.stats.add("candidate_compared", len(records))
            return
        if scored.unusable:
            self.stats.add("teacher_errors", scored.unusable)
        self._health.answer_quality(task.task, scored.unusable, len(batch))
        if records and self._recorder.add_comparisons(records):
            self.stats.add("compared", len(records))
            with self._lock:
                sampling = self._sampling[task.task]
                for record in records:
                    sampling.count(record.segment)

    def _finish(self, count: int) -> None:
        if count <= 0:
            return
        with self._idle:
            self._unfinished -= count
            if self._unfinished <= 0:
                self._idle.notify_all()
