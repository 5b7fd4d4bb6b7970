"""Producing the serving loop's records: responses and dead letters, until the broker
acknowledges them.

A record's offset is finished (:class:`~distilld.traffic.offsets.OffsetTracker`)
only once the broker acknowledged its response or dead-letter record, so an
unacknowledged record holds its offset uncommitted. A send that fails is sent
again (back-off doubling to 30 s) while the error can pass (the broker away, a
timeout); a record the broker or the producer refuses for good (too large,
invalid: :func:`distilld.traffic.kafka.record_refused`) is replaced by a minimal
dead letter (``send_refused``), and if even that is refused the request is
dropped with a ``serving.record_dropped`` alert: one record never holds its
partition's offsets back. No record produced here is larger than
DISTILLD_KAFKA_MAX_MESSAGE_BYTES (a response over it is dead-lettered as
``response_too_large``: :func:`response_too_large`; a dead letter is cut to fit).

Used by the loop thread only; the producer's callbacks run on kafka-python's I/O
thread and only queue their results, which :meth:`Sender.apply_acks` applies.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Collection
from dataclasses import dataclass

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from distilld.echo import clip
from distilld.log import get_logger
from distilld.telemetry.alerts import alert
from distilld.traffic.kafka import record_refused
from distilld.traffic.offsets import OffsetTracker
from distilld.traffic.records import (
    DeadLetterReason,
    Rejection,
    SourcePosition,
    dead_letter_key,
    encode_dead_letter,
    record_budget,
)
from distilld.traffic.stats import ServingStats
from distilld.vocabulary import backoff_ceiling

_RESEND_BACKOFF_S = 1.0  # the first resend of a failed send; doubles up to the next
_RESEND_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Origin:
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
    origin: Origin
    resend_at: float = 0.0
    attempts: int = 0


def response_too_large(value: bytes, key: bytes, max_message_bytes: int) -> Rejection | None:
    """Why a response cannot be produced (it would exceed the record size limit), or None."""
    if len(value) <= record_budget(max_message_bytes, key):
        return None
    return Rejection(
        DeadLetterReason.response_too_large,
        f"the response is {len(value)} bytes, its key {len(key)} bytes; a record is "
        f"at most {max_message_bytes} bytes (DISTILLD_KAFKA_MAX_MESSAGE_BYTES)",
    )


class Sender:
    """Sends a loop's responses and dead letters and follows them until acknowledged."""

    def __init__(
        self,
        producer: KafkaProducer,
        tracker: OffsetTracker[TopicPartition],
        stats: ServingStats,
        *,
        max_message_bytes: int,
        known_tasks: Collection[str],
    ) -> None:
        self._producer = producer
        self._tracker = tracker
        self._stats = stats
        self._max_message_bytes = max_message_bytes
        self._known_tasks = frozenset(known_tasks)
        self._in_flight: dict[tuple[TopicPartition, int], _Outgoing] = {}
        self._resend: list[tuple[TopicPartition, int]] = []
        # Producer callbacks run on kafka-python's I/O thread; they only put
        # results here and the loop thread applies them.
        self._acks: queue.SimpleQueue[tuple[TopicPartition, int, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self._log = get_logger("serving")

    @property
    def pending(self) -> int:
        """Records sent and not yet acknowledged (or waiting to be sent again)."""
        return len(self._in_flight)

    def send_response(
        self,
        partition: TopicPartition,
        offset: int,
        topic: str,
        key: bytes,
        value: bytes,
        origin: Origin,
    ) -> None:
        self._send(partition, offset, _Outgoing(topic, key, value, "response", origin))

    def dead_letter(self, partition: TopicPartition, origin: Origin, rejection: Rejection) -> None:
        """Count, log and send the dead letter of one request."""
        self._stats.dead_lettered[rejection.reason.value] += 1
        task_name = origin.task if origin.task in self._known_tasks else ""
        self._stats.dead_lettered_by_task[(task_name or "", rejection.reason.value)] += 1
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

    def apply_acks(self) -> None:
        """Apply the broker's answers: finish acknowledged offsets, schedule resends of
        failures that can pass, replace refused records."""
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

    def resend_failed(self, wait: bool = False) -> None:
        """Send again the failed records whose back-off is over (all of them with ``wait``)."""
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

    def settle(self, deadline: float) -> None:
        """Flush, apply acks and resend until nothing is in flight or ``deadline``
        (``time.monotonic``) passes: the end of a drain."""
        while self._in_flight and time.monotonic() < deadline:
            self._producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            self.apply_acks()
            self.resend_failed(wait=True)

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Stop following the records of partitions the group took away."""
        for key in [k for k in self._in_flight if k[0] in partitions]:
            del self._in_flight[key]

    # -- internals ------------------------------------------------------------

    def _send_dead_letter(
        self, partition: TopicPartition, origin: Origin, rejection: Rejection, *, kind: str
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

    def _send(self, partition: TopicPartition, offset: int, outgoing: _Outgoing) -> None:
        self._in_flight[(partition, offset)] = outgoing
        try:
            future = self._producer.send(outgoing.topic, value=outgoing.value, key=outgoing.key)
        except KafkaError as exc:
            self._acks.put((partition, offset, exc))
            return
        future.add_callback(lambda _meta: self._acks.put((partition, offset, None)))
        future.add_errback(lambda err: self._acks.put((partition, offset, err)))

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
            self._stats.dropped += 1
            alert(
                self._log,
                "serving.record_dropped",
                severity="error",
                task=origin.task if origin.task in self._known_tasks else None,
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
            task_name = origin.task if origin.task in self._known_tasks else ""
            reason = DeadLetterReason.send_refused.value
            self._stats.dead_lettered[reason] += 1
            self._stats.dead_lettered_by_task[(task_name or "", reason)] += 1
        rejection = Rejection(
            DeadLetterReason.send_refused,
            f"the {outgoing.kind.replace('_', ' ')} record of this request "
            f"({len(outgoing.value)} bytes) was refused: {error_text}; the request is at the "
            "source position",
        )
        self._send_dead_letter(partition, origin, rejection, kind="refusal")
