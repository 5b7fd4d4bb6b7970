"""kafka-python clients built from a KafkaConfig; kafka errors wrapped here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    AuthorizationError,
    BrokerResponseError,
    KafkaError,
    TopicAlreadyExistsError,
)

from distilld.errors import BrokerError
from distilld.settings import KafkaConfig


def make_producer(config: KafkaConfig, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas: an ack means the record is durable."""
    options: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 2,
        "retries": 2_147_483_647,
        "max_in_flight_requests_per_connection": 5,
        # Not idempotent: a broker that loses its producer state (a restart of
        # a memory-only broker; measured with Tansu) answers the producer's
        # InitProducerId with an error that kafka-python treats as fatal, and
        # that producer never sends again. Delivery is at-least-once anyway
        # (answers can repeat after a crash; consumers deduplicate by id).
        "enable_idempotence": False,
        "max_request_size": max(1_048_576, config.max_message_bytes * 2),
        **config.client_kwargs(),
        **overrides,
    }
    try:
        return KafkaProducer(**options)
    except KafkaError as exc:
        raise BrokerError(
            f"cannot connect a producer to {config.bootstrap_servers}: {exc}; "
            "check DISTILLD_KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
        ) from exc


def record_refused(error: BaseException) -> bool:
    """True when sending this record again can never succeed, so it must not be retried.

    That is the broker's (or the producer's own) answer about the record itself,
    which kafka-python marks as not ``retriable``: too large
    (MessageSizeTooLargeError, also raised by ``send()`` over ``max_request_size``),
    invalid, corrupt, a bad timestamp; and any error that is not Kafka's (the same
    bytes fail the same way). Retriable errors (the broker away, a leader moving, a
    timeout), authorization failures (an operator grants the right; the record is
    not at fault) and the client's own states (a closed producer) are not refusals:
    the record waits and is sent again, its offset uncommitted meanwhile."""
    if not isinstance(error, KafkaError):
        return True
    if isinstance(error, AuthorizationError) or getattr(error, "retriable", False):
        return False
    return isinstance(error, BrokerResponseError)


def make_consumer(
    config: KafkaConfig, group_id: str | None, topics: Iterable[str] = (), **overrides: Any
) -> KafkaConsumer:
    """A consumer in ``group_id`` that never commits by itself (we commit after acks)."""
    options: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, config.session_timeout_ms // 3),
        "max_partition_fetch_bytes": max(1_048_576, config.max_message_bytes * 2),
        **config.client_kwargs(),
        **overrides,
    }
    try:
        consumer = KafkaConsumer(**options)
    except KafkaError as exc:
        raise BrokerError(
            f"cannot connect a consumer to {config.bootstrap_servers}: {exc}; "
            "check DISTILLD_KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
        ) from exc
    topic_list = sorted(set(topics))
    if topic_list:
        consumer.subscribe(topic_list)
    return consumer


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 3) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    wanted = sorted(set(topics))
    try:
        admin = KafkaAdminClient(**config.client_kwargs())
    except KafkaError as exc:
        raise BrokerError(f"cannot reach the broker at {config.bootstrap_servers}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created: list[str] = []
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another replica created it first
        return created
    except KafkaError as exc:
        raise BrokerError(
            f"cannot create topics {wanted} on {config.bootstrap_servers}: {exc}; "
            "create them by hand or give distilld the right to (DISTILLD_KAFKA_CREATE_TOPICS)"
        ) from exc
    finally:
        admin.close()
