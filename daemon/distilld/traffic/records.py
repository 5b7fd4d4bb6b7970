"""The message contract: request bytes in, response / dead-letter bytes out.

Pure functions only (no Kafka here), so every rule about what a valid request
is can be tested on bytes.

Request (JSON object, UTF-8)::

    {"id": "r-1", "task": "rotten-tomatoes", "input": "a fine film",
     "metadata": {"channel": "web", "language": "en"}}

``metadata`` is optional; its values are strings (segment keys used by the
monitors). Other top-level fields are ignored so producers can add their own.

Every record this module encodes stays within a byte budget (the caller's
``DISTILLD_KAFKA_MAX_MESSAGE_BYTES`` less the record key and Kafka's own
framing, :func:`record_budget`): a dead letter echoes received fields only
clipped (:mod:`distilld.echo`) and keeps as much of the original bytes as
fits, with their length and SHA-256 always.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from distilld.echo import ECHO_CHARS, clip, quote

MAX_ID_CHARS = 256
MAX_METADATA_ENTRIES = 32
# A metadata key or value is a segment label: short. Responses echo metadata,
# so this also bounds a response's size.
MAX_METADATA_CHARS = 256
# A dead-letter record keeps at most this much of the original bytes (less
# when the record budget is smaller).
MAX_DEAD_LETTER_ORIGINAL_BYTES = 256 * 1024
# A dead letter's detail is cut to this many characters.
DEAD_LETTER_DETAIL_CHARS = 1_000
# What Kafka adds around a record's key and value (record and batch headers,
# with room to spare): a record whose value and key fit the budget that
# record_budget leaves fits a broker limit of max_message_bytes.
RECORD_OVERHEAD_BYTES = 128
# A dead letter carries the request's key only up to this size (a larger key
# would eat the room of the record; the dead letter goes unkeyed then).
MAX_DEAD_LETTER_KEY_BYTES = 1_024


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
    response_too_large = "response_too_large"
    send_refused = "send_refused"


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
        return Rejection(DeadLetterReason.invalid_json, f"not decodable JSON: {clip(str(exc))}")
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
                f"metadata[{quote(key)}] must be a string, received {_type_name(value)}",
            )
        if len(key) > MAX_METADATA_CHARS or len(value) > MAX_METADATA_CHARS:
            return Rejection(
                DeadLetterReason.wrong_type,
                f"metadata key {quote(key)} or its value has over {MAX_METADATA_CHARS} "
                f"characters (key {len(key)}, value {len(value)}); metadata holds short "
                "segment labels",
            )
    # JSON "\\ud800" escapes decode to unpaired surrogates, which cannot be
    # encoded back to UTF-8: echoing such an id/task/metadata would crash
    # encode_response / encode_dead_letter, so reject them here.
    strings = [(f"field {name!r}", doc[name]) for name in ("id", "task", "input")]
    for key, value in metadata.items():
        strings += [(f"metadata key {quote(key)}", key), (f"metadata[{quote(key)}]", value)]
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


def record_budget(max_message_bytes: int, key: bytes | None) -> int:
    """How many bytes a record value may have, next to ``key``, for the whole
    record to fit ``max_message_bytes`` (DISTILLD_KAFKA_MAX_MESSAGE_BYTES)."""
    return max_message_bytes - len(key or b"") - RECORD_OVERHEAD_BYTES


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The key of a dead letter: the request's key, unless it is over
    :data:`MAX_DEAD_LETTER_KEY_BYTES` (then none)."""
    return key if key is not None and len(key) <= MAX_DEAD_LETTER_KEY_BYTES else None


# How hard encode_dead_letter clips, in turn, until the record fits its budget:
# (detail characters, id / task characters).
_CLIP_STEPS = ((DEAD_LETTER_DETAIL_CHARS, ECHO_CHARS), (ECHO_CHARS, 64), (64, 16))


def encode_dead_letter(
    raw: bytes | None,
    rejection: Rejection,
    source: SourcePosition,
    *,
    max_bytes: int,
    request_id: str | None = None,
    task: str | None = None,
    keep_original: bool = True,
) -> bytes:
    """The dead-letter record value: reason, detail, source position, the original
    bytes' length and SHA-256, and as much of the original bytes (base64) as fits.

    The value stays within ``max_bytes`` (see :func:`record_budget`): the detail,
    id and task are clipped, the original bytes are kept up to
    :data:`MAX_DEAD_LETTER_ORIGINAL_BYTES` and the room left (``original_truncated``
    says when they were cut), none with ``keep_original=False`` (the minimal
    dead letter of a record the broker refused). Only a budget too small for
    the fields themselves (under about 600 bytes) can make it longer."""
    original = raw or b""
    digest = hashlib.sha256(original).hexdigest()
    doc: dict[str, Any] = {}
    for detail_chars, field_chars in _CLIP_STEPS:
        doc = {
            "reason": rejection.reason.value,
            "detail": clip(rejection.detail, detail_chars),
            "source": {
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
                "timestamp_ms": source.timestamp_ms,
            },
            "original_base64": "",
            "original_bytes": len(original),
            "original_sha256": digest,
            "original_truncated": False,  # the longer of the two, for the sizing
        }
        if request_id is not None:
            doc["id"] = clip(request_id, field_chars)
        if task is not None:
            doc["task"] = clip(task, field_chars)
        room = max_bytes - len(_dump(doc))  # base64 characters that still fit
        if room < 0:
            continue
        kept = min(len(original), MAX_DEAD_LETTER_ORIGINAL_BYTES, room // 4 * 3)
        kept = kept if keep_original else 0
        doc["original_base64"] = base64.b64encode(original[:kept]).decode("ascii")
        doc["original_truncated"] = kept < len(original)
        return _dump(doc)
    return _dump(doc)  # the smallest clipping; over the budget, the caller's send says so


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")
