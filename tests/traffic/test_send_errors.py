"""Which failed sends are retried and which records the broker refuses for good."""

from __future__ import annotations

import pytest
from kafka import errors

from distilld.traffic.kafka import record_refused


@pytest.mark.parametrize(
    "error",
    [
        errors.MessageSizeTooLargeError("over max_request_size"),
        errors.RecordListTooLargeError(),
        errors.InvalidRecordError(),
        errors.CorruptRecordError(),
        errors.InvalidTimestampError(),
        errors.InvalidTopicError(),
        ValueError("not a Kafka error: the same bytes fail the same way"),
    ],
)
def test_errors_about_the_record_are_refusals(error: BaseException) -> None:
    assert record_refused(error)


@pytest.mark.parametrize(
    "error",
    [
        errors.KafkaTimeoutError(),
        errors.KafkaConnectionError(),
        errors.NotLeaderForPartitionError(),
        errors.UnknownTopicOrPartitionError(),
        errors.RequestTimedOutError(),
        errors.NotEnoughReplicasError(),
        errors.TopicAuthorizationFailedError(),  # an operator grants the right
        errors.IllegalStateError("KafkaProducer already closed!"),  # not the record's fault
    ],
)
def test_errors_that_can_pass_are_retried(error: BaseException) -> None:
    assert not record_refused(error)
