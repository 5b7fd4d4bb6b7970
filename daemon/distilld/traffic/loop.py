"""The serving loop: consume -> route -> micro-batch -> answer -> produce -> commit.

One loop per consumer group, on one thread (kafka-python consumers are not
thread-safe). At-least-once: a record's offset is committed only after the
broker acknowledged its response or dead-letter record (``acks=all``), so a
crash at any point re-delivers unanswered records and loses none. Duplicates
after a crash are bounded by what was in flight since the last commit.

A send that fails is sent again (back-off doubling to 30 s) while the error
can pass (the broker away, a timeout); a record the broker or the producer
refuses for good (too large, invalid: :func:`distilld.traffic.kafka.record_refused`)
is replaced by a minimal dead letter (``send_refused``), and if even that is
refused the request is dropped with a ``serving.record_dropped`` alert: one
record never holds its partition's offsets back. No record produced here is
larger than DISTILLD_KAFKA_MAX_MESSAGE_BYTES (a response over it is
dead-lettered as ``response_too_large``), and received values are echoed
into dead letters and log lines only clipped (:mod:`distilld.echo`).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Histogram

from distilld.echo import clip, quote
from distilld.errors import BackendUnavailable
from distilld.log import get_logger
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.batcher import MicroBatcher
from distilld.telemetry.alerts import alert
from distilld.telemetry.latch import Latch
from distilld.telemetry.metrics import latency_histogram
from distilld.traffic.kafka import record_refused
from distilld.traffic.offsets import OffsetTracker
from distilld.traffic.records import (
    DeadLetterReason,
    Rejection,
    Request,
    SourcePosition,
    dead_letter_key,
    encode_dead_letter,
    encode_response,
    parse_request,
    record_budget,
)
from distilld.vocabulary import backoff_ceiling

_IDLE_POLL_S = 0.1  # how long an idle poll blocks: bounds the reaction time to SIGTERM
_RESEND_BACKOFF_S = 1.0  # the first resend of a failed send; doubles up to the next
_RESEND_MAX_BACKOFF_S = 30.0
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
class ServingStats:
    """Counters of one loop; read by the CLI summary, the logs, /metrics and the
    benchmarks. Written by the loop thread only; readers take a consistent-enough
    copy (counters only grow)."""

    polled: int = 0
    answered: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    answered_by_task: Counter[str] = field(default_factory=Counter)
    # (task, reason); task "" when the record named no known task.
    dead_lettered_by_task: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency_by_task: dict[str, Histogram] = field(default_factory=dict)
    # (topic, partition) -> records on the broker not yet polled, every _LAG_INTERVAL_S.
    lag_by_partition: dict[tuple[str, int], int] = field(default_factory=dict)
    batches: int = 0
    batch_items: int = 0
    invalid_outputs: int = 0
    # Requests whose answer and minimal dead letter the broker both refused.
    dropped: int = 0
    commits: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.started_at)
        return {
            "polled": self.polled,
            "answered": self.answered,
            "dead_lettered": sum(self.dead_lettered.values()),
            "dead_lettered_by_reason": dict(self.dead_lettered),
            "invalid_outputs": self.invalid_outputs,
            "dropped": self.dropped,
            "batches": self.batches,
            "mean_batch_size": round(self.batch_items / self.batches, 2) if self.batches else 0.0,
            "answered_per_s": round(self.answered / elapsed, 2),
        }


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


@dataclass(frozen=True)
class _Origin:
    """The request an outgoing record answers: what its dead letter needs."""

    raw: bytes | None
    key: bytes | None
    source: SourcePosition
    dead_letter_topic: str
    request_id: str | None = None
    task: str | None = None


@dataclass
class _Outgoing:
    """A response or dead-letter record not yet acknowledged by the broker."""

    topic: str
    key: bytes | None
    value: bytes
    # "response", "dead_letter", or "refusal": the minimal dead letter sent in
    # place of a record the broker refused.
    kind: str
    origin: _Origin
    resend_at: float = 0.0
    attempts: int = 0


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
        self._producer = producer
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
        self._in_flight: dict[tuple[TopicPartition, int], _Outgoing] = {}
        self._resend: list[tuple[TopicPartition, int]] = []
        # Producer callbacks run on kafka-python's I/O thread; they only put
        # results here and the loop thread applies them.
        self._acks: queue.SimpleQueue[tuple[TopicPartition, int, BaseException | None]] = (
            queue.SimpleQueue()
        )
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
        # Set once the consumer group gave this loop its partitions (readiness).
        self.assigned = threading.Event()
        self._revoked: queue.SimpleQueue[list[TopicPartition]] = queue.SimpleQueue()
        self._log = get_logger("serving")

    # -- public ---------------------------------------------------------------

    def subscribe(self) -> None:
        topics = sorted({r.requests_topic for r in self._routes.values()})
        self._consumer.subscribe(topics, listener=_Rebalance(self._revoked, self.assigned))
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
        self._apply_acks()
        self._resend_failed()
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
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            self._apply_acks()
            self._resend_failed(wait=True)
        self._maybe_commit(force=True)
        unanswered = sum(len(batch) for batch in self._held.values())
        if self._in_flight or unanswered:
            self._log.warning(
                "serving.drain_incomplete",
                unacknowledged=len(self._in_flight),
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
        origin = _Origin(
            record.value,
            record.key,
            source,
            topic,
            request_id=request.id if request else None,
            task=request.task if request else None,
        )
        self._reject(partition, origin, rejection)

    def _reject(self, partition: TopicPartition, origin: _Origin, rejection: Rejection) -> None:
        """Count, log and send the dead letter of one request."""
        self.stats.dead_lettered[rejection.reason.value] += 1
        task_name = origin.task if origin.task in self._routes else ""
        self.stats.dead_lettered_by_task[(task_name or "", rejection.reason.value)] += 1
        self._log.info(
            "request.dead_lettered",
            reason=rejection.reason.value,
            detail=clip(rejection.detail),
            topic=origin.source.topic,
            partition=origin.source.partition,
            offset=origin.source.offset,
            dead_letter_topic=origin.dead_letter_topic,
        )
        self._send_dead_letter(partition, origin, rejection, kind="dead_letter")

    def _send_dead_letter(
        self, partition: TopicPartition, origin: _Origin, rejection: Rejection, *, kind: str
    ) -> None:
        """Send the dead letter of ``origin``, sized to fit DISTILLD_KAFKA_MAX_MESSAGE_BYTES;
        without the original bytes when it replaces a refused record (kind "refusal")."""
        key = dead_letter_key(origin.key)
        value = encode_dead_letter(
            origin.raw,
            rejection,
            origin.source,
            max_bytes=record_budget(self._max_message_bytes, key),
            request_id=origin.request_id,
            task=origin.task,
            keep_original=kind != "refusal",
        )
        outgoing = _Outgoing(origin.dead_letter_topic, key, value, kind, origin)
        self._send(partition, origin.source.offset, outgoing)

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
        if len(value) > record_budget(self._max_message_bytes, key):
            rejection = Rejection(
                DeadLetterReason.response_too_large,
                f"the response is {len(value)} bytes, its key {len(key)} bytes; a record is "
                f"at most {self._max_message_bytes} bytes (DISTILLD_KAFKA_MAX_MESSAGE_BYTES)",
            )
            self._reject(waiting.partition, origin, rejection)
            return
        self.stats.answered += 1
        self.stats.answered_by_task[route.task] += 1
        histogram = self.stats.latency_by_task.get(route.task)
        if histogram is None:
            histogram = self.stats.latency_by_task[route.task] = latency_histogram()
        histogram.observe(done_at - waiting.received_at)
        self._send(
            waiting.partition,
            waiting.offset,
            _Outgoing(route.responses_topic, key, value, "response", origin),
        )
        if self._on_answered is not None:
            self._notify(waiting.request, prediction, model_version)

    @staticmethod
    def _origin(route: TaskRoute, waiting: _Waiting) -> _Origin:
        source = SourcePosition(
            waiting.partition.topic,
            waiting.partition.partition,
            waiting.offset,
            waiting.timestamp_ms,
        )
        return _Origin(
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
        self._reject(waiting.partition, self._origin(self._routes[task], waiting), rejection)

    # -- producing and committing ---------------------------------------------

    def _send(self, partition: TopicPartition, offset: int, outgoing: _Outgoing) -> None:
        self._in_flight[(partition, offset)] = outgoing
        try:
            future = self._producer.send(outgoing.topic, value=outgoing.value, key=outgoing.key)
        except KafkaError as exc:
            self._acks.put((partition, offset, exc))
            return
        future.add_callback(lambda _meta: self._acks.put((partition, offset, None)))
        future.add_errback(lambda err: self._acks.put((partition, offset, err)))

    def _apply_acks(self) -> None:
        while True:
            try:
                partition, offset, error = self._acks.get_nowait()
            except queue.Empty:
                return
            outgoing = self._in_flight.get((partition, offset))
            if outgoing is None:
                continue  # partition revoked meanwhile
            if error is None:
                del self._in_flight[(partition, offset)]
                self._tracker.finished(partition, offset)
            elif record_refused(error):
                self._on_refused(partition, offset, outgoing, error)
            else:
                outgoing.attempts += 1
                delay = backoff_ceiling(
                    outgoing.attempts - 1, _RESEND_BACKOFF_S, _RESEND_MAX_BACKOFF_S
                )
                self._log.warning(
                    "serving.send_failed",
                    topic=outgoing.topic,
                    kind=outgoing.kind,
                    error=clip(f"{type(error).__name__}: {error}"),
                    attempts=outgoing.attempts,
                    retry_in_s=delay,
                    action="will resend; offset stays uncommitted",
                )
                outgoing.resend_at = time.monotonic() + delay
                self._resend.append((partition, offset))

    def _on_refused(
        self, partition: TopicPartition, offset: int, outgoing: _Outgoing, error: BaseException
    ) -> None:
        """The broker or the producer refused this record for good: never send it again.
        A response or dead letter is replaced by a minimal dead letter; a refused minimal
        dead letter drops the request, so that its offset (and the partition's) advances."""
        origin = outgoing.origin
        error_text = clip(f"{type(error).__name__}: {error}")
        where = {
            "source_topic": origin.source.topic,
            "partition": origin.source.partition,
            "offset": origin.source.offset,
        }
        if outgoing.kind == "refusal":
            del self._in_flight[(partition, offset)]
            self._tracker.finished(partition, offset)
            self.stats.dropped += 1
            alert(
                self._log,
                "serving.record_dropped",
                severity="error",
                task=origin.task if origin.task in self._routes else None,
                topic=outgoing.topic,
                error=error_text,
                **where,
                action="the request got neither an answer nor a dead letter; its offset is "
                "committed so that the partition moves on; the request is still at its source "
                "position: check the dead-letter topic and the broker's limits, then replay it",
            )
            return
        self._log.warning(
            "serving.send_refused",
            kind=outgoing.kind,
            topic=outgoing.topic,
            value_bytes=len(outgoing.value),
            key_bytes=len(outgoing.key or b""),
            error=error_text,
            **where,
            action="sending a minimal dead letter (send_refused) instead; the offset advances "
            "once the broker acknowledges it",
        )
        if outgoing.kind == "response":  # a dead letter was already counted as one
            task_name = origin.task if origin.task in self._routes else ""
            reason = DeadLetterReason.send_refused.value
            self.stats.dead_lettered[reason] += 1
            self.stats.dead_lettered_by_task[(task_name or "", reason)] += 1
        rejection = Rejection(
            DeadLetterReason.send_refused,
            f"the {outgoing.kind.replace('_', ' ')} record of this request "
            f"({len(outgoing.value)} bytes) was refused: {error_text}; the request is at the "
            "source position",
        )
        self._send_dead_letter(partition, origin, rejection, kind="refusal")

    def _resend_failed(self, wait: bool = False) -> None:
        if not self._resend:
            return
        now = time.monotonic()
        keep: list[tuple[TopicPartition, int]] = []
        for key in self._resend:
            outgoing = self._in_flight.get(key)
            if outgoing is None:
                continue
            if outgoing.resend_at > now and not wait:
                keep.append(key)
                continue
            self._send(key[0], key[1], outgoing)
        self._resend = keep

    def _maybe_commit(self, force: bool) -> None:
        """Commit what is acknowledged. In the loop: asynchronously, so serving never waits
        on the broker; when draining or giving partitions away: synchronously."""
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_interval_s:
            return
        self._last_commit = now
        offsets = self._tracker.committable(include_unchanged=force)
        if not offsets:
            return
        request = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        try:
            if force:
                self._consumer.commit(request)
            else:
                self._consumer.commit_async(request, callback=self._on_async_commit)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions; whoever owns them now re-reads
            # from the last committed offset (at-least-once, no loss).
            self._log.warning("serving.commit_failed", error=str(exc))
            return
        self._tracker.mark_committed(offsets)
        self.stats.commits += 1

    def _on_async_commit(self, offsets: Any, response: Any) -> None:
        if isinstance(response, Exception):
            # The next commit carries a later (or the same) point for these partitions.
            self._log.warning("serving.commit_failed", error=str(response))

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= self._stats_interval_s:
            self._last_stats = now
            self._log.info("serving.stats", **self.stats.snapshot())

    def _maybe_measure_lag(self) -> None:
        """The lag of each assigned partition: the broker's high watermark known from the
        last fetch minus the offset after the last record polled (no broker request;
        a partition is skipped until it returned a record and a fetch told its high
        watermark)."""
        now = time.monotonic()
        if now - self._last_lag < _LAG_INTERVAL_S:
            return
        self._last_lag = now
        lag: dict[tuple[str, int], int] = {}
        for partition in self._consumer.assignment():
            position = self._next_offset.get(partition)
            try:
                highwater = self._consumer.highwater(partition)
            except KafkaError:  # revoked since assignment() answered
                continue
            if position is not None and highwater is not None:
                lag[(partition.topic, partition.partition)] = max(0, highwater - position)
        self.stats.lag_by_partition = lag

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
            for key in [k for k in self._in_flight if k[0] in gone]:
                del self._in_flight[key]
            self._log.info("serving.partitions_revoked", partitions=sorted(str(tp) for tp in gone))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Rebalance callbacks. kafka-python 3 runs them on its I/O thread, where no
    blocking client call is allowed: they only hand the news to the loop thread."""

    def __init__(self, revoked: queue.SimpleQueue[list[TopicPartition]], assigned: threading.Event):
        self._revoked = revoked
        self._assigned = assigned

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            self._revoked.put(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        get_logger("serving").info(
            "serving.partitions_assigned", partitions=sorted(str(tp) for tp in assigned)
        )
        self._assigned.set()
