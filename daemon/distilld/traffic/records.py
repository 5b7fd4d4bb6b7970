"""The message contract: request bytes in, response / dead-letter bytes out.

Pure functions only (no Kafka here), so every rule about what a valid request
is can be tested on bytes.

Request (JSON object, UTF-8)::

    {"id": "r-1", "task": "rotten-tomatoes", "input": "a fine film",
     "metadata": {"channel": "web", "language": "en"}}

``metadata`` is optional; its values are strings (segment keys used by the
monitors). Other top-level fields are ignored so producers can add their own.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_ID_CHARS = 256
MAX_METADATA_ENTRIES = 32
# A dead-letter record keeps at most this much of the original bytes, so that
# a huge request still fits in one Kafka record once base64-encoded.
MAX_DEAD_LETTER_ORIGINAL_BYTES = 256 * 1024


class DeadLetterReason(StrEnum):
    """Why a record went to the dead-letter topic (a stable, documented code)."""

    invalid_utf8 = "invalid_utf8"
    invalid_json = "invalid_json"
    not_an_object = "not_an_object"
    missing_field = "missing_field"
    wrong_type = "wrong_type"
    unknown_task = "unknown_task"
    wrong_topic = "wrong_topic"
    input_too_large = "input_too_large"
    message_too_large = "message_too_large"
    student_failed = "student_failed"


@dataclass(frozen=True)
class Request:
    id: str
    task: str
    input: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A record that is not a valid request, with a reason code and a human detail."""

    reason: DeadLetterReason
    detail: str


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_request(raw: bytes | None, max_message_bytes: int) -> Request | Rejection:
    """Decode one record value into a Request, or say precisely why it is not one."""
    if raw is None:
        return Rejection(DeadLetterReason.missing_field, "record has no value (null payload)")
    if len(raw) > max_message_bytes:
        return Rejection(
            DeadLetterReason.message_too_large,
            f"record is {len(raw)} bytes; the limit is {max_message_bytes} "
            "(DISTILLD_KAFKA_MAX_MESSAGE_BYTES)",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(
            DeadLetterReason.invalid_utf8, f"not UTF-8: {exc.reason} at byte {exc.start}"
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejection(
            DeadLetterReason.invalid_json,
            f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        )
    except (ValueError, RecursionError) as exc:
        # Valid JSON syntax the decoder still refuses: an integer over Python's
        # digit limit, or nesting deeper than the recursion limit. One such record
        # must go to dead-letter, not crash the loop (and again on re-delivery).
        return Rejection(DeadLetterReason.invalid_json, f"not decodable JSON: {exc}")
    if not isinstance(doc, dict):
        return Rejection(
            DeadLetterReason.not_an_object, f"expected a JSON object, received {_type_name(doc)}"
        )
    for name in ("id", "task", "input"):
        if name not in doc:
            return Rejection(
                DeadLetterReason.missing_field,
                f"field {name!r} is missing; a request needs id, task and input",
            )
        if not isinstance(doc[name], str):
            return Rejection(
                DeadLetterReason.wrong_type,
                f"field {name!r} must be a string, received {_type_name(doc[name])}",
            )
    if not doc["id"] or len(doc["id"]) > MAX_ID_CHARS:
        return Rejection(
            DeadLetterReason.wrong_type,
            f"field 'id' must have 1 to {MAX_ID_CHARS} characters, received {len(doc['id'])}",
        )
    metadata = doc.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        return Rejection(
            DeadLetterReason.wrong_type,
            f"field 'metadata' must be an object of strings, received {_type_name(metadata)}",
        )
    if len(metadata) > MAX_METADATA_ENTRIES:
        return Rejection(
            DeadLetterReason.wrong_type,
            f"field 'metadata' has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}",
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            return Rejection(
                DeadLetterReason.wrong_type,
                f"metadata[{key!r}] must be a string, received {_type_name(value)}",
            )
    # JSON "\\ud800" escapes decode to unpaired surrogates, which cannot be
    # encoded back to UTF-8: echoing such an id/task/metadata would crash
    # encode_response / encode_dead_letter, so reject them here.
    strings = [(f"field {name!r}", doc[name]) for name in ("id", "task", "input")]
    for key, value in metadata.items():
        strings += [(f"metadata key {key!r}", key), (f"metadata[{key!r}]", value)]
    for where, value in strings:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return Rejection(
                DeadLetterReason.invalid_utf8,
                f"{where} contains an unpaired surrogate {exc.object[exc.start]!r} "
                f"at character {exc.start}",
            )
    return Request(id=doc["id"], task=doc["task"], input=doc["input"], metadata=dict(metadata))


def encode_response(
    request: Request,
    *,
    output: str | dict[str, Any],
    confidence: float,
    model_version: str,
    latency_ms: float,
    probabilities: dict[str, float] | None = None,
    error: str | None = None,
) -> bytes:
    """The response record value (JSON, UTF-8)."""
    doc: dict[str, Any] = {
        "id": request.id,
        "task": request.task,
        "output": output,
        "confidence": _finite(confidence),
        "model_version": model_version,
        "latency_ms": round(latency_ms, 3),
    }
    if probabilities is not None:
        doc["probabilities"] = {k: _finite(v) for k, v in probabilities.items()}
    if error is not None:
        doc["error"] = error
    if request.metadata:
        doc["metadata"] = request.metadata
    return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _finite(value: float) -> float | None:
    """A probability as JSON can carry it: NaN or infinity (a broken model) become null."""
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class SourcePosition:
    """Where a record came from, so an operator can find it again."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


def encode_dead_letter(
    raw: bytes | None,
    rejection: Rejection,
    source: SourcePosition,
    *,
    request_id: str | None = None,
    task: str | None = None,
) -> bytes:
    """The dead-letter record value: reason, detail, source position and the original bytes."""
    original = raw or b""
    truncated = len(original) > MAX_DEAD_LETTER_ORIGINAL_BYTES
    kept = original[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
    doc: dict[str, Any] = {
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "source": {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "timestamp_ms": source.timestamp_ms,
        },
        "original_base64": base64.b64encode(kept).decode("ascii"),
        "original_bytes": len(original),
        "original_truncated": truncated,
    }
    if request_id is not None:
        doc["id"] = request_id
    if task is not None:
        doc["task"] = task
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")
