"""The serving loop: consume -> route -> micro-batch -> answer -> produce -> commit.

One loop per consumer group, on one thread (kafka-python consumers are not
thread-safe). At-least-once: a record's offset is committed only after the
broker acknowledged its response or dead-letter record (``acks=all``), so a
crash at any point re-delivers unanswered records and loses none. Duplicates
after a crash are bounded by what was in flight since the last commit.

Producing the responses and dead letters (resends with back-off, records the
broker refuses, the record size limit) is :mod:`distilld.traffic.send`'s job;
rebalances, commits and the lag are :mod:`distilld.traffic.group`'s; the
counters are :class:`distilld.traffic.stats.ServingStats`. Received values are
echoed into dead letters and log lines only clipped (:mod:`distilld.echo`).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from distilld.echo import clip, quote
from distilld.errors import BackendUnavailable
from distilld.log import get_logger
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.batcher import MicroBatcher
from distilld.telemetry.alerts import alert
from distilld.telemetry.latch import Latch
from distilld.telemetry.metrics import latency_histogram
from distilld.traffic.group import Rebalance, commit, measure_lag
from distilld.traffic.offsets import OffsetTracker
from distilld.traffic.records import (
    DeadLetterReason,
    Rejection,
    Request,
    SourcePosition,
    encode_response,
    parse_request,
)
from distilld.traffic.send import Origin, Sender, response_too_large
from distilld.traffic.stats import ServingStats
from distilld.vocabulary import backoff_ceiling

_IDLE_POLL_S = 0.1  # how long an idle poll blocks: bounds the reaction time to SIGTERM
_HOLD_FIRST_RETRY_S = 0.5  # first retry of a batch whose backend is unavailable
_HOLD_MAX_RETRY_S = 30.0  # the back-off doubles up to this
_LAG_INTERVAL_S = 5.0  # how often the consumer lag per partition is measured


@dataclass(frozen=True)
class TaskRoute:
    """What the loop needs to know about one task (taken from its policy)."""

    task: str
    requests_topic: str
    responses_topic: str
    dead_letter_topic: str
    max_input_chars: int
    batch_max_size: int
    batch_max_wait_ms: int


@dataclass
class _Waiting:
    """A valid request polled and waiting for its batch."""

    partition: TopicPartition
    offset: int
    request: Request
    key: bytes | None
    received_at: float
    raw: bytes | None
    timestamp_ms: int | None


#: Called on the loop thread with each answered request, its prediction and the
#: version that answered. Must return at once (hand the work to another thread).
AnsweredHook = Callable[[Request, Prediction, str], None]


@dataclass
class _Outage:
    """A task whose backend is unavailable: when it started and when to retry."""

    retry_at: float
    attempts: int = 1
    since: float = field(default_factory=time.monotonic)


class ServingLoop:
    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        routes: list[TaskRoute],
        backends: Mapping[str, StudentBackend],
        *,
        fallback_dead_letter_topic: str,
        max_message_bytes: int,
        commit_interval_ms: int = 0,
        stats_interval_s: float = 30.0,
        max_poll_records: int | None = None,
        on_answered: AnsweredHook | None = None,
    ) -> None:
        missing = [r.task for r in routes if r.task not in backends]
        if missing:
            raise ValueError(f"no student backend for tasks {missing}")
        self._consumer = consumer
        self._routes = {r.task: r for r in routes}
        self._backends = backends
        # Where to dead-letter a record that names no known task: the dead-letter
        # topic of the (first) policy that reads the record's topic.
        self._topic_dead_letter: dict[str, str] = {}
        for route in sorted(routes, key=lambda r: r.task):
            self._topic_dead_letter.setdefault(route.requests_topic, route.dead_letter_topic)
        self._fallback_dead_letter_topic = fallback_dead_letter_topic
        self._on_answered = on_answered
        # Alert once per spell (breach and recovery edges): the answered hook failing
        # (once per loop, never cleared), a task's student failing, a task's outage.
        self._hook_failed: Latch[str, bool] = Latch()
        self._max_message_bytes = max_message_bytes
        self._commit_interval_s = commit_interval_ms / 1000.0
        self._stats_interval_s = stats_interval_s
        # Poll about one batch at a time: records wait in the consumer's fetch
        # buffer rather than in ours, so a crash re-delivers at most a batch or
        # two of already-answered records.
        self._max_poll_records = max_poll_records or max(r.batch_max_size for r in routes)
        self._batchers: dict[str, MicroBatcher[_Waiting]] = {
            r.task: MicroBatcher(r.batch_max_size, r.batch_max_wait_ms) for r in routes
        }
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._last_commit = 0.0
        self._last_stats = time.monotonic()
        self._last_lag = -_LAG_INTERVAL_S
        self._next_offset: dict[TopicPartition, int] = {}  # after the last polled record
        self._failing_tasks: Latch[str, bool] = Latch()
        # Requests held while their task's backend is unavailable, and the outages.
        self._held: dict[str, list[_Waiting]] = {}
        self._outages: Latch[str, _Outage] = Latch()
        self._paused = False
        self.stats = ServingStats()
        self._sender = Sender(
            producer,
            self._tracker,
            self.stats,
            max_message_bytes=max_message_bytes,
            known_tasks=self._routes,
        )
        # Set once the consumer group gave this loop its partitions (readiness).
        self.assigned = threading.Event()
        self._revoked: queue.SimpleQueue[list[TopicPartition]] = queue.SimpleQueue()
        self._log = get_logger("serving")

    # -- public ---------------------------------------------------------------

    def subscribe(self) -> None:
        topics = sorted({r.requests_topic for r in self._routes.values()})
        self._consumer.subscribe(topics, listener=Rebalance(self._revoked, self.assigned))
        self._log.info("serving.subscribed", topics=topics, tasks=sorted(self._routes))

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain: answer what was polled, commit, return."""
        self.subscribe()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.drain()

    def step(self) -> None:
        """One turn: poll, route, answer due batches, apply acks, commit when due."""
        polled = self._consumer.poll(
            timeout_ms=int(self._poll_timeout_s() * 1000), max_records=self._max_poll_records
        )
        self._apply_revocations()
        now = time.monotonic()
        for partition, records in polled.items():
            for record in records:
                self._accept(partition, record, now)
            if records:
                self._next_offset[partition] = records[-1].offset + 1
        self._retry_held(force=False)
        self._answer_due_batches(force=False)
        self._pause_while_held()
        self._sender.apply_acks()
        self._sender.resend_failed()
        self._maybe_commit(force=False)
        self._maybe_log_stats()
        self._maybe_measure_lag()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Answer everything already polled, wait for the broker's acks and commit.

        A batch whose backend is still unavailable gets one last try; if that
        fails its offsets stay uncommitted and the requests are re-delivered
        after the restart (never dead-lettered for an outage)."""
        self._retry_held(force=True)
        self._answer_due_batches(force=True)
        self._sender.settle(time.monotonic() + timeout_s)
        self._maybe_commit(force=True)
        unanswered = sum(len(batch) for batch in self._held.values())
        if self._sender.pending or unanswered:
            self._log.warning(
                "serving.drain_incomplete",
                unacknowledged=self._sender.pending,
                unanswered=unanswered,
                note="their offsets are not committed; they will be re-delivered",
            )
        self._log.info("serving.drained", **self.stats.snapshot())

    # -- routing --------------------------------------------------------------

    def _accept(self, partition: TopicPartition, record: Any, now: float) -> None:
        self.stats.polled += 1
        self._tracker.started(partition, record.offset)
        raw: bytes | None = record.value
        parsed = parse_request(raw, self._max_message_bytes)
        dead_letter_topic = self._topic_dead_letter.get(
            record.topic, self._fallback_dead_letter_topic
        )
        if isinstance(parsed, Rejection):
            self._dead_letter(partition, record, parsed, dead_letter_topic)
            return
        route = self._routes.get(parsed.task)
        rejection: Rejection | None = None
        if route is None:
            rejection = Rejection(
                DeadLetterReason.unknown_task,
                f"task {quote(parsed.task)} is not served here; known tasks: "
                f"{sorted(self._routes)}",
            )
        elif route.requests_topic != record.topic:
            rejection = Rejection(
                DeadLetterReason.wrong_topic,
                f"task {quote(parsed.task)} reads topic {route.requests_topic!r}, "
                f"the request came on {record.topic!r}",
            )
        elif len(parsed.input) > route.max_input_chars:
            rejection = Rejection(
                DeadLetterReason.input_too_large,
                f"input has {len(parsed.input)} characters; the policy limit "
                f"(traffic.max_input_chars) is {route.max_input_chars}",
            )
            dead_letter_topic = route.dead_letter_topic
        if rejection is not None:
            self._dead_letter(partition, record, rejection, dead_letter_topic, request=parsed)
            return
        assert route is not None
        self._batchers[route.task].add(
            _Waiting(partition, record.offset, parsed, record.key, now, raw, record.timestamp), now
        )

    def _dead_letter(
        self,
        partition: TopicPartition,
        record: Any,
        rejection: Rejection,
        topic: str,
        request: Request | None = None,
    ) -> None:
        source = SourcePosition(record.topic, record.partition, record.offset, record.timestamp)
        origin = Origin(
            record.value,
            record.key,
            source,
            topic,
            request_id=request.id if request else None,
            task=request.task if request else None,
        )
        self._sender.dead_letter(partition, origin, rejection)

    # -- answering ------------------------------------------------------------

    def _poll_timeout_s(self) -> float:
        waits = [
            w
            for b in self._batchers.values()
            if (w := b.seconds_until_due(time.monotonic())) is not None
        ]
        return min([_IDLE_POLL_S, *waits])

    def _answer_due_batches(self, force: bool) -> None:
        for task, batcher in self._batchers.items():
            while task not in self._held and (
                batcher.is_due(time.monotonic()) or (force and len(batcher))
            ):
                self._answer(task, batcher.take())

    def _answer(self, task: str, batch: list[_Waiting]) -> bool:
        """Answer one batch; False when the backend is unavailable and the batch is held."""
        backend = self._backends[task]
        try:
            predictions = backend.predict([w.request.input for w in batch])
            if len(predictions) != len(batch):
                raise RuntimeError(
                    f"backend returned {len(predictions)} predictions for {len(batch)} inputs"
                )
        except BackendUnavailable as exc:
            self._hold(task, batch, exc)
            return False
        except Exception as exc:  # any other backend failure: isolate, never stop serving
            self._on_backend_failure(task, batch, exc)
            return True
        self._release(task)
        if self._failing_tasks.clear(task):
            alert(self._log, "student.recovered", severity="info", task=task)
        self.stats.batches += 1
        self.stats.batch_items += len(batch)
        done_at = time.monotonic()
        route = self._routes[task]
        for waiting, prediction in zip(batch, predictions, strict=True):
            self._respond(route, backend.model_version, waiting, prediction, done_at)
        return True

    def unavailable_tasks(self) -> set[str]:
        """Tasks whose student is in an outage now (requests held): readiness."""
        return set(self._outages.held())

    # -- backend outages --------------------------------------------------------

    def _hold(self, task: str, batch: list[_Waiting], exc: Exception) -> None:
        self._held.setdefault(task, []).extend(batch)
        now = time.monotonic()
        if self._outages.set(task, _Outage(retry_at=now + _HOLD_FIRST_RETRY_S)):
            alert(
                self._log,
                "student.unavailable",
                severity="error",
                task=task,
                error=clip(f"{type(exc).__name__}: {exc}"),
                held_requests=len(self._held[task]),
                action="holding the requests and pausing consumption; retrying with back-off; "
                "nothing is committed or dead-lettered meanwhile",
            )
            return
        outage = self._outages.get(task)
        if outage is None:  # only the loop thread clears an outage: cannot happen
            return
        outage.attempts += 1
        delay = backoff_ceiling(outage.attempts - 1, _HOLD_FIRST_RETRY_S, _HOLD_MAX_RETRY_S)
        outage.retry_at = now + delay * random.uniform(0.8, 1.2)
        self._log.info(
            "student.retry_failed",
            task=task,
            attempts=outage.attempts,
            next_retry_s=round(outage.retry_at - now, 2),
            error=clip(str(exc)),
        )

    def _release(self, task: str) -> None:
        outage = self._outages.clear(task)
        if outage is not None:
            alert(
                self._log,
                "student.available_again",
                severity="info",
                task=task,
                attempts=outage.attempts,
                outage_s=round(time.monotonic() - outage.since, 2),
            )

    def _retry_held(self, force: bool) -> None:
        now = time.monotonic()
        for task in list(self._held):
            outage = self._outages.get(task)
            if force or outage is None or outage.retry_at <= now:
                self._answer(task, self._held.pop(task))

    def _pause_while_held(self) -> None:
        """While any backend is down, poll without fetching: the consumer stays in its
        group (no rebalance storm) and records wait in Kafka rather than in memory."""
        if self._held:
            assignment = self._consumer.assignment()
            if assignment:
                self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused:
            self._consumer.resume(*self._consumer.paused())
            self._paused = False

    def _respond(
        self,
        route: TaskRoute,
        model_version: str,
        waiting: _Waiting,
        prediction: Prediction,
        done_at: float,
    ) -> None:
        if prediction.error is not None:
            self.stats.invalid_outputs += 1
            self._log.warning(
                "student.invalid_output",
                task=route.task,
                id=clip(waiting.request.id),
                error=clip(prediction.error),
            )
        value = encode_response(
            waiting.request,
            output=prediction.output,
            confidence=prediction.confidence,
            model_version=prediction.model_version or model_version,
            latency_ms=(done_at - waiting.received_at) * 1000.0,
            probabilities=prediction.probabilities,
            error=prediction.error,
        )
        key = waiting.key if waiting.key is not None else waiting.request.id.encode("utf-8")
        origin = self._origin(route, waiting)
        rejection = response_too_large(value, key, self._max_message_bytes)
        if rejection is not None:
            self._sender.dead_letter(waiting.partition, origin, rejection)
            return
        self.stats.answered += 1
        self.stats.answered_by_task[route.task] += 1
        histogram = self.stats.latency_by_task.get(route.task)
        if histogram is None:
            histogram = self.stats.latency_by_task[route.task] = latency_histogram()
        histogram.observe(done_at - waiting.received_at)
        self._sender.send_response(
            waiting.partition, waiting.offset, route.responses_topic, key, value, origin
        )
        if self._on_answered is not None:
            self._notify(waiting.request, prediction, model_version)

    @staticmethod
    def _origin(route: TaskRoute, waiting: _Waiting) -> Origin:
        source = SourcePosition(
            waiting.partition.topic,
            waiting.partition.partition,
            waiting.offset,
            waiting.timestamp_ms,
        )
        return Origin(
            waiting.raw,
            waiting.key,
            source,
            route.dead_letter_topic,
            request_id=waiting.request.id,
            task=route.task,
        )

    def _notify(self, request: Request, prediction: Prediction, model_version: str) -> None:
        """Hand the answer to the shadow side (sampling, reservoir). The hook must not
        block; if it raises, serving goes on and the failure is reported once."""
        assert self._on_answered is not None
        try:
            self._on_answered(request, prediction, prediction.model_version or model_version)
        except Exception as exc:
            if self._hook_failed.set("answered_hook", True):
                alert(
                    self._log,
                    "shadow.hook_failed",
                    severity="error",
                    task=request.task,
                    error=clip(f"{type(exc).__name__}: {exc}"),
                    action="serving continues; answers are not sampled while this lasts",
                )

    def _on_backend_failure(self, task: str, batch: list[_Waiting], exc: Exception) -> None:
        if self._failing_tasks.set(task, True):
            alert(
                self._log,
                "student.failed",
                severity="error",
                task=task,
                error=clip(f"{type(exc).__name__}: {exc}"),
                batch_size=len(batch),
                action="retrying the requests one by one; those that still fail go to dead-letter",
            )
        if len(batch) > 1:
            # Find the input that breaks the batch instead of failing all of them.
            for index, waiting in enumerate(batch):
                if task in self._held:  # the backend went away meanwhile: hold the rest
                    self._held[task].extend(batch[index:])
                    return
                self._answer(task, [waiting])
            return
        waiting = batch[0]
        rejection = Rejection(
            DeadLetterReason.student_failed,
            f"the student failed on this input: {clip(f'{type(exc).__name__}: {exc}')}",
        )
        self._sender.dead_letter(
            waiting.partition, self._origin(self._routes[task], waiting), rejection
        )

    # -- committing and lag ------------------------------------------------------

    def _maybe_commit(self, force: bool) -> None:
        """Commit what is acknowledged, every commit interval (at once with ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_interval_s:
            return
        self._last_commit = now
        if commit(self._consumer, self._tracker, force=force, log=self._log):
            self.stats.commits += 1

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= self._stats_interval_s:
            self._last_stats = now
            self._log.info("serving.stats", **self.stats.snapshot())

    def _maybe_measure_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < _LAG_INTERVAL_S:
            return
        self._last_lag = now
        self.stats.lag_by_partition = measure_lag(self._consumer, self._next_offset)

    # -- rebalance --------------------------------------------------------------

    def _apply_revocations(self) -> None:
        """Forget partitions the group took away (reported by the listener during poll).

        Called right after poll returns and before its records are accepted,
        so state from the old assignment never mixes with records fetched
        under the new one. What was answered but not yet committed on those
        partitions is re-delivered to their new owner: duplicates, never loss.
        """
        while True:
            try:
                revoked = self._revoked.get_nowait()
            except queue.Empty:
                return
            gone = set(revoked)
            self._tracker.forget(list(gone))
            for partition in gone:
                self._next_offset.pop(partition, None)
            self._sender.forget(gone)
            self._log.info("serving.partitions_revoked", partitions=sorted(str(tp) for tp in gone))
