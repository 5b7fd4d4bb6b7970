"""The message contract on bytes: what parses, what is rejected and why, and what we emit.

Every rejection must carry the stable reason code and a detail that says what
was received, so an operator reading a dead-letter record knows what to fix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from typing import Any

import pytest

from distilld.echo import ECHO_CHARS
from distilld.traffic.records import (
    MAX_DEAD_LETTER_KEY_BYTES,
    MAX_DEAD_LETTER_ORIGINAL_BYTES,
    MAX_ID_CHARS,
    MAX_METADATA_CHARS,
    MAX_METADATA_ENTRIES,
    RECORD_OVERHEAD_BYTES,
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

LIMIT = 1_000_000


def raw_of(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def valid_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "r-1", "task": "reviews", "input": "a fine film"}
    doc.update(changes)
    return doc


def rejected(raw: bytes | None, limit: int = LIMIT) -> Rejection:
    result = parse_request(raw, limit)
    assert isinstance(result, Rejection), f"expected a rejection, got {result!r}"
    return result


# -- parse_request: accepted -----------------------------------------------------


def test_valid_request_without_metadata() -> None:
    result = parse_request(raw_of(valid_doc()), LIMIT)
    assert result == Request(id="r-1", task="reviews", input="a fine film", metadata={})


def test_valid_request_with_metadata() -> None:
    raw = raw_of(valid_doc(metadata={"channel": "web", "language": "en"}))
    result = parse_request(raw, LIMIT)
    assert isinstance(result, Request)
    assert result.metadata == {"channel": "web", "language": "en"}
    assert (result.id, result.task, result.input) == ("r-1", "reviews", "a fine film")


def test_null_metadata_means_no_metadata() -> None:
    result = parse_request(raw_of(valid_doc(metadata=None)), LIMIT)
    assert result == Request(id="r-1", task="reviews", input="a fine film", metadata={})


def test_empty_metadata_object_is_accepted() -> None:
    result = parse_request(raw_of(valid_doc(metadata={})), LIMIT)
    assert isinstance(result, Request)
    assert result.metadata == {}


def test_extra_top_level_fields_are_ignored() -> None:
    raw = raw_of(valid_doc(trace_id="abc", priority=3, nested={"x": [1, 2]}, flag=None))
    result = parse_request(raw, LIMIT)
    assert result == Request(id="r-1", task="reviews", input="a fine film", metadata={})


def test_unicode_input_is_decoded() -> None:
    doc = valid_doc(id="é-1", input="très bon film 🎬 日本語", metadata={"langue": "français"})
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    result = parse_request(raw, LIMIT)
    assert isinstance(result, Request)
    assert result.id == "é-1"
    assert result.input == "très bon film 🎬 日本語"
    assert result.metadata == {"langue": "français"}


def test_escaped_unicode_and_surrogate_pairs_are_decoded() -> None:
    raw = b'{"id": "r-1", "task": "reviews", "input": "caf\\u00e9 \\ud83c\\udfac"}'
    result = parse_request(raw, LIMIT)
    assert isinstance(result, Request)
    assert result.input == "café 🎬"


def test_utf8_bom_is_not_json() -> None:
    # json.loads refuses a BOM in a str; the request must be rejected, not crash.
    rejection = rejected(b"\xef\xbb\xbf" + raw_of(valid_doc()))
    assert rejection.reason is DeadLetterReason.invalid_json
    assert rejection.detail.startswith("not JSON: ")


def test_empty_input_string_is_accepted() -> None:
    result = parse_request(raw_of(valid_doc(input="")), LIMIT)
    assert isinstance(result, Request)
    assert result.input == ""


def test_id_of_exactly_max_chars_is_accepted() -> None:
    result = parse_request(raw_of(valid_doc(id="x" * MAX_ID_CHARS)), LIMIT)
    assert isinstance(result, Request)
    assert len(result.id) == MAX_ID_CHARS


def test_exactly_max_metadata_entries_is_accepted() -> None:
    metadata = {f"k{i}": str(i) for i in range(MAX_METADATA_ENTRIES)}
    result = parse_request(raw_of(valid_doc(metadata=metadata)), LIMIT)
    assert isinstance(result, Request)
    assert result.metadata == metadata


def test_message_of_exactly_the_limit_is_accepted() -> None:
    raw = raw_of(valid_doc())
    result = parse_request(raw, len(raw))
    assert isinstance(result, Request)


# -- parse_request: rejected -----------------------------------------------------


def test_null_value_is_missing_field() -> None:
    rejection = rejected(None)
    assert rejection.reason is DeadLetterReason.missing_field
    assert "null payload" in rejection.detail


def test_oversized_message() -> None:
    raw = raw_of(valid_doc(input="x" * 2_000))
    rejection = rejected(raw, limit=1_024)
    assert rejection.reason is DeadLetterReason.message_too_large
    assert f"record is {len(raw)} bytes" in rejection.detail
    assert "the limit is 1024" in rejection.detail
    assert "DISTILLD_KAFKA_MAX_MESSAGE_BYTES" in rejection.detail


def test_one_byte_over_the_limit_is_too_large() -> None:
    raw = raw_of(valid_doc())
    rejection = rejected(raw, limit=len(raw) - 1)
    assert rejection.reason is DeadLetterReason.message_too_large


def test_size_is_checked_before_decoding() -> None:
    # Oversized and not UTF-8: the size is the reported problem.
    rejection = rejected(b"\xff" * 100, limit=10)
    assert rejection.reason is DeadLetterReason.message_too_large


def test_invalid_utf8() -> None:
    raw = b'{"id": "r-1", "task": "reviews", "input": "caf\xe9"}'
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.invalid_utf8
    assert rejection.detail.startswith("not UTF-8: ")
    bad_at = raw.index(b"\xe9")
    assert f"at byte {bad_at}" in rejection.detail


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"id": "r-1",}', b"not json", b"{'id': 'r-1'}", b'{"id": "r-1"} trailing'],
)
def test_invalid_json(raw: bytes) -> None:
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.invalid_json
    assert rejection.detail.startswith("not JSON: ")
    assert "line 1 column" in rejection.detail


def test_invalid_json_detail_names_line_and_column() -> None:
    rejection = rejected(b'{\n  "id": "r-1",\n  "task": ]\n}')
    assert rejection.reason is DeadLetterReason.invalid_json
    assert "at line 3 column 11" in rejection.detail


def test_integer_over_the_digit_limit_is_invalid_json_not_a_crash() -> None:
    # json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits.
    raw = b'{"id": "r-1", "task": "reviews", "input": "x", "n": ' + b"9" * 5_000 + b"}"
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.invalid_json
    assert "4300 digits" in rejection.detail


def test_deep_nesting_is_invalid_json_not_a_crash() -> None:
    # json.loads raises RecursionError here; 100 kB is well under the default limit.
    rejection = rejected(b"[" * 100_000)
    assert rejection.reason is DeadLetterReason.invalid_json
    assert "recursion" in rejection.detail


@pytest.mark.parametrize(
    ("raw", "received"),
    [
        (b"[1, 2]", "list"),
        (b"[]", "list"),
        (b'"a string"', "str"),
        (b"42", "int"),
        (b"4.5", "float"),
        (b"true", "bool"),
        (b"null", "null"),
    ],
)
def test_not_an_object(raw: bytes, received: str) -> None:
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.not_an_object
    assert rejection.detail == f"expected a JSON object, received {received}"


@pytest.mark.parametrize("name", ["id", "task", "input"])
def test_missing_required_field(name: str) -> None:
    doc = valid_doc()
    del doc[name]
    rejection = rejected(raw_of(doc))
    assert rejection.reason is DeadLetterReason.missing_field
    assert f"field '{name}' is missing" in rejection.detail


def test_missing_fields_are_reported_in_order() -> None:
    rejection = rejected(b"{}")
    assert rejection.reason is DeadLetterReason.missing_field
    assert "field 'id' is missing" in rejection.detail


@pytest.mark.parametrize("name", ["id", "task", "input"])
@pytest.mark.parametrize(
    ("value", "received"),
    [(7, "int"), (1.5, "float"), (None, "null"), (["a"], "list"), (True, "bool"), ({}, "dict")],
)
def test_wrongly_typed_required_field(name: str, value: Any, received: str) -> None:
    rejection = rejected(raw_of(valid_doc(**{name: value})))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert rejection.detail == f"field '{name}' must be a string, received {received}"


def test_empty_id() -> None:
    rejection = rejected(raw_of(valid_doc(id="")))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert "field 'id'" in rejection.detail
    assert f"1 to {MAX_ID_CHARS} characters" in rejection.detail
    assert rejection.detail.endswith("received 0")


def test_id_over_max_chars() -> None:
    rejection = rejected(raw_of(valid_doc(id="x" * (MAX_ID_CHARS + 1))))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert "field 'id'" in rejection.detail
    assert rejection.detail.endswith(f"received {MAX_ID_CHARS + 1}")


@pytest.mark.parametrize(
    ("metadata", "received"),
    [(["a", "b"], "list"), ("web", "str"), (3, "int"), (True, "bool")],
)
def test_metadata_not_an_object(metadata: Any, received: str) -> None:
    rejection = rejected(raw_of(valid_doc(metadata=metadata)))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert rejection.detail == (
        f"field 'metadata' must be an object of strings, received {received}"
    )


@pytest.mark.parametrize(
    ("value", "received"),
    [(1, "int"), (None, "null"), (["web"], "list"), ({"a": "b"}, "dict"), (False, "bool")],
)
def test_metadata_with_non_string_value(value: Any, received: str) -> None:
    rejection = rejected(raw_of(valid_doc(metadata={"channel": "web", "count": value})))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert rejection.detail == f"metadata['count'] must be a string, received {received}"


def test_too_many_metadata_entries() -> None:
    metadata = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}
    rejection = rejected(raw_of(valid_doc(metadata=metadata)))
    assert rejection.reason is DeadLetterReason.wrong_type
    assert (
        f"has {MAX_METADATA_ENTRIES + 1} entries; at most {MAX_METADATA_ENTRIES}"
        in rejection.detail
    )
    assert "'metadata'" in rejection.detail


@pytest.mark.parametrize(
    "metadata",
    [
        {"k": "v" * (MAX_METADATA_CHARS + 1)},
        {"k" * (MAX_METADATA_CHARS + 1): "v"},
        {"k": "\u0085" * 400_000},
    ],
)
def test_metadata_keys_and_values_are_short_labels(metadata: dict[str, str]) -> None:
    # Responses echo metadata: an unbounded value made responses as large as requests.
    raw = json.dumps(valid_doc(metadata=metadata), ensure_ascii=False).encode()
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.wrong_type
    assert f"over {MAX_METADATA_CHARS} characters" in rejection.detail
    assert len(rejection.detail) < 1_000


def test_metadata_of_exactly_max_chars_is_accepted() -> None:
    label = "x" * MAX_METADATA_CHARS
    result = parse_request(raw_of(valid_doc(metadata={label: label})), LIMIT)
    assert isinstance(result, Request)


def test_a_rejection_detail_quotes_a_huge_metadata_key_only_clipped() -> None:
    key = "\u0085" * 400_000  # repr writes each as 4 characters
    rejection = rejected(json.dumps(valid_doc(metadata={key: 1}), ensure_ascii=False).encode())
    assert rejection.reason is DeadLetterReason.wrong_type
    assert len(rejection.detail) < 10 * ECHO_CHARS + 100


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"id": "r-\\ud800", "task": "t", "input": "x"}', "field 'id'"),
        (b'{"id": "r-1", "task": "\\udc00", "input": "x"}', "field 'task'"),
        (b'{"id": "r-1", "task": "t", "input": "ab\\ud83c"}', "field 'input'"),
        (
            b'{"id": "r-1", "task": "t", "input": "x", "metadata": {"\\ud800": "v"}}',
            "metadata key '\\ud800'",
        ),
        (
            b'{"id": "r-1", "task": "t", "input": "x", "metadata": {"k": "\\ud800"}}',
            "metadata['k']",
        ),
    ],
)
def test_unpaired_surrogate_escape_is_rejected(raw: bytes, where: str) -> None:
    # Such strings cannot be encoded back to UTF-8, so a response or dead-letter
    # record echoing them could not be produced.
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.invalid_utf8
    assert rejection.detail.startswith(f"{where} contains an unpaired surrogate")
    # The detail itself must be encodable (it goes into the dead-letter record).
    rejection.detail.encode("utf-8")


def test_every_rejection_detail_is_nonempty_and_encodable() -> None:
    samples: list[bytes | None] = [
        None,
        b"\xff",
        b"{",
        b"[]",
        b"{}",
        raw_of(valid_doc(id=1)),
        raw_of(valid_doc(id="")),
        raw_of(valid_doc(metadata=[])),
    ]
    for raw in samples:
        rejection = rejected(raw)
        assert rejection.detail
        rejection.detail.encode("utf-8")


# -- parse_request: robustness ---------------------------------------------------


def _fuzz_samples(rng: random.Random, count: int) -> list[bytes]:
    valid = raw_of(valid_doc(metadata={"channel": "web"}))
    pieces = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\u", b"\\ud800", b"null", b"1e999"]
    samples: list[bytes] = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:  # random bytes
            samples.append(rng.randbytes(rng.randrange(0, 64)))
        elif kind == 1:  # a valid request with a few bytes flipped
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            samples.append(bytes(mutated))
        else:  # JSON-ish fragments
            samples.append(b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 20))))
    return samples


def test_parse_request_never_raises_on_random_bytes() -> None:
    rng = random.Random(20240611)
    outcomes: set[str] = set()
    for raw in _fuzz_samples(rng, 3_000):
        result = parse_request(raw, LIMIT)
        assert isinstance(result, Request | Rejection)
        if isinstance(result, Rejection):
            assert isinstance(result.reason, DeadLetterReason)
            outcomes.add(result.reason.value)
        else:
            outcomes.add("accepted")
    # The samples reach past the decoding steps, so the later checks run too.
    assert {"accepted", "invalid_utf8", "invalid_json", "not_an_object"} <= outcomes


def test_parse_request_never_raises_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.given(raw=st.binary(max_size=512), limit=st.integers(min_value=0, max_value=1024))
    @hypothesis.settings(max_examples=300, deadline=None)
    def check(raw: bytes, limit: int) -> None:
        result = parse_request(raw, limit)
        assert isinstance(result, Request | Rejection)

    check()


# -- encode_response --------------------------------------------------------------


def test_encode_response_with_all_fields() -> None:
    request = Request(id="r-1", task="reviews", input="a fine film", metadata={"channel": "web"})
    raw = encode_response(
        request,
        output="fresh",
        confidence=0.123456789,
        model_version="reviews-minilm@3",
        latency_ms=12.34567,
        probabilities={"fresh": 0.912345678, "rotten": 0.087654321},
        error="output was coerced",
    )
    assert json.loads(raw) == {
        "id": "r-1",
        "task": "reviews",
        "output": "fresh",
        "confidence": 0.123457,
        "model_version": "reviews-minilm@3",
        "latency_ms": 12.346,
        "probabilities": {"fresh": 0.912346, "rotten": 0.087654},
        "error": "output was coerced",
        "metadata": {"channel": "web"},
    }


def test_encode_response_minimal_omits_optional_fields() -> None:
    request = Request(id="r-2", task="reviews", input="meh")
    doc = json.loads(
        encode_response(request, output="rotten", confidence=0.5, model_version="v1", latency_ms=3)
    )
    assert doc == {
        "id": "r-2",
        "task": "reviews",
        "output": "rotten",
        "confidence": 0.5,
        "model_version": "v1",
        "latency_ms": 3,
    }
    assert "error" not in doc
    assert "metadata" not in doc
    assert "probabilities" not in doc


def test_encode_response_dict_output() -> None:
    request = Request(id="r-3", task="address", input="1 Main St, Springfield")
    output = {"street": "1 Main St", "city": "Springfield", "lines": ["1 Main St"], "zip": None}
    doc = json.loads(
        encode_response(request, output=output, confidence=0.9, model_version="v2", latency_ms=1.0)
    )
    assert doc["output"] == output
    assert isinstance(doc["output"], dict)


def test_encode_response_empty_probabilities_are_kept() -> None:
    request = Request(id="r-4", task="reviews", input="x")
    doc = json.loads(
        encode_response(
            request, output="x", confidence=1.0, model_version="v", latency_ms=0.0, probabilities={}
        )
    )
    assert doc["probabilities"] == {}


def test_encode_response_is_utf8_not_ascii_escaped() -> None:
    request = Request(id="é-1", task="reviews", input="x", metadata={"langue": "français"})
    raw = encode_response(
        request, output="très 🎬", confidence=0.5, model_version="v", latency_ms=1
    )
    assert "très 🎬".encode() in raw
    doc = json.loads(raw.decode("utf-8"))
    assert doc["id"] == "é-1"
    assert doc["output"] == "très 🎬"
    assert doc["metadata"] == {"langue": "français"}


def test_parsed_request_round_trips_into_a_response() -> None:
    raw = json.dumps(
        valid_doc(id="r-\u00e9", metadata={"channel": "web"}), ensure_ascii=False
    ).encode("utf-8")
    request = parse_request(raw, LIMIT)
    assert isinstance(request, Request)
    doc = json.loads(
        encode_response(request, output="fresh", confidence=0.7, model_version="v", latency_ms=2)
    )
    assert doc["id"] == "r-\u00e9"
    assert doc["task"] == "reviews"
    assert doc["metadata"] == {"channel": "web"}


# -- encode_dead_letter ------------------------------------------------------------

SOURCE = SourcePosition(topic="reviews.requests", partition=3, offset=1_234, timestamp_ms=1_700)


def test_dead_letter_fields() -> None:
    raw = b'{"id": 1}'
    rejection = Rejection(DeadLetterReason.wrong_type, "field 'id' must be a string, received int")
    doc = json.loads(encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT))
    assert doc == {
        "reason": "wrong_type",
        "detail": "field 'id' must be a string, received int",
        "source": {
            "topic": "reviews.requests",
            "partition": 3,
            "offset": 1_234,
            "timestamp_ms": 1_700,
        },
        "original_base64": base64.b64encode(raw).decode("ascii"),
        "original_bytes": len(raw),
        "original_sha256": hashlib.sha256(raw).hexdigest(),
        "original_truncated": False,
    }
    assert base64.b64decode(doc["original_base64"]) == raw
    assert "id" not in doc
    assert "task" not in doc


def test_dead_letter_keeps_invalid_utf8_bytes_exactly() -> None:
    raw = b'{"input": "caf\xe9 \xff\xfe\x00"}'
    rejection = rejected(raw)
    assert rejection.reason is DeadLetterReason.invalid_utf8
    out = encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT)
    doc = json.loads(out.decode("utf-8"))
    assert doc["reason"] == "invalid_utf8"
    assert base64.b64decode(doc["original_base64"]) == raw
    assert doc["original_bytes"] == len(raw)


def test_dead_letter_of_null_value() -> None:
    rejection = rejected(None)
    doc = json.loads(encode_dead_letter(None, rejection, SOURCE, max_bytes=LIMIT))
    assert doc["reason"] == "missing_field"
    assert doc["original_base64"] == ""
    assert doc["original_bytes"] == 0
    assert doc["original_truncated"] is False


def test_dead_letter_without_timestamp() -> None:
    source = SourcePosition(topic="t", partition=0, offset=0)
    rejection = Rejection(DeadLetterReason.invalid_json, "not JSON")
    doc = json.loads(encode_dead_letter(b"{", rejection, source, max_bytes=LIMIT))
    assert doc["source"] == {"topic": "t", "partition": 0, "offset": 0, "timestamp_ms": None}


def test_dead_letter_at_the_size_limit_is_not_truncated() -> None:
    raw = bytes(range(256)) * (MAX_DEAD_LETTER_ORIGINAL_BYTES // 256)
    assert len(raw) == MAX_DEAD_LETTER_ORIGINAL_BYTES
    rejection = Rejection(DeadLetterReason.message_too_large, "too big")
    doc = json.loads(encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT))
    assert doc["original_truncated"] is False
    assert doc["original_bytes"] == MAX_DEAD_LETTER_ORIGINAL_BYTES
    assert base64.b64decode(doc["original_base64"]) == raw


def test_dead_letter_truncates_large_originals() -> None:
    size = MAX_DEAD_LETTER_ORIGINAL_BYTES + 1_000
    raw = bytes(i % 251 for i in range(size))
    rejection = Rejection(DeadLetterReason.message_too_large, "too big")
    doc = json.loads(encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT))
    assert doc["original_truncated"] is True
    assert doc["original_bytes"] == size
    kept = base64.b64decode(doc["original_base64"])
    assert len(kept) == MAX_DEAD_LETTER_ORIGINAL_BYTES
    assert kept == raw[:MAX_DEAD_LETTER_ORIGINAL_BYTES]


def test_dead_letter_one_byte_over_is_truncated() -> None:
    raw = b"x" * (MAX_DEAD_LETTER_ORIGINAL_BYTES + 1)
    rejection = Rejection(DeadLetterReason.message_too_large, "too big")
    doc = json.loads(encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT))
    assert doc["original_truncated"] is True
    assert doc["original_bytes"] == MAX_DEAD_LETTER_ORIGINAL_BYTES + 1
    assert len(base64.b64decode(doc["original_base64"])) == MAX_DEAD_LETTER_ORIGINAL_BYTES


def test_dead_letter_keeps_the_length_and_hash_of_an_original_it_cuts() -> None:
    raw = bytes(i % 251 for i in range(MAX_DEAD_LETTER_ORIGINAL_BYTES * 3))
    rejection = Rejection(DeadLetterReason.message_too_large, "too big")
    doc = json.loads(encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT))
    assert doc["original_bytes"] == len(raw)
    assert doc["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert doc["original_truncated"] is True


@pytest.mark.parametrize(
    "task",
    ["t" * 600_000, "\u0085" * 400_000, "\U0001f3ac" * 250_000, "\x00" * 160_000],
)
@pytest.mark.parametrize("budget", [LIMIT, 100_000, 4_096, 1_024])
def test_a_dead_letter_echoing_a_huge_task_fits_its_budget(task: str, budget: int) -> None:
    # The review's case: the task was repeated in the detail and in "task", plus
    # the original in base64: 1.55 MB (3.1 MB with U+0085) for a 1 MB limit.
    raw = json.dumps({"id": "a", "task": task, "input": "hi"}, ensure_ascii=False).encode()
    rejection = Rejection(DeadLetterReason.unknown_task, f"task {task!r} is not served here")
    value = encode_dead_letter(raw, rejection, SOURCE, max_bytes=budget, request_id="a", task=task)
    assert len(value) <= budget
    doc = json.loads(value)
    assert doc["original_bytes"] == len(raw)
    assert doc["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert doc["original_truncated"] is True
    kept = base64.b64decode(doc["original_base64"])
    assert raw.startswith(kept)
    assert len(doc["task"]) <= ECHO_CHARS + 3
    assert doc["task"].endswith("...")
    assert doc["id"] == "a"


def test_a_dead_letter_keeps_as_much_of_the_original_as_fits() -> None:
    raw = b"x" * 50_000
    rejection = Rejection(DeadLetterReason.invalid_json, "not JSON")
    value = encode_dead_letter(raw, rejection, SOURCE, max_bytes=10_000)
    assert 10_000 - 4 <= len(value) <= 10_000
    kept = base64.b64decode(json.loads(value)["original_base64"])
    assert kept == raw[: len(kept)]


def test_dead_letters_fit_every_budget_property() -> None:
    rng = random.Random(11)
    alphabet = ["a", "\u0085", "\x00", "é", "\U0001f3ac", '"', "\\"]
    for _ in range(300):
        size = rng.choice([0, 10, 1_000, 100_000, 600_000])
        text = "".join(rng.choice(alphabet) for _ in range(min(size, 2_000))) * max(
            1, size // 2_000
        )
        raw = text.encode("utf-8")[: rng.choice([0, 50, 1_000_000])]
        budget = rng.randint(700, 1_100_000)
        value = encode_dead_letter(
            raw,
            Rejection(DeadLetterReason.unknown_task, f"task {text!r}"),
            SOURCE,
            max_bytes=budget,
            request_id=text[:256] or None,
            task=text or None,
            keep_original=rng.random() < 0.8,
        )
        assert len(value) <= budget, (size, budget)
        doc = json.loads(value)
        assert doc["original_bytes"] == len(raw)


def test_a_minimal_dead_letter_has_no_original_bytes_but_their_length_and_hash() -> None:
    raw = b'{"id": "a", "task": "t", "input": "hi"}'
    rejection = Rejection(DeadLetterReason.send_refused, "the response record was refused")
    doc = json.loads(
        encode_dead_letter(raw, rejection, SOURCE, max_bytes=LIMIT, keep_original=False)
    )
    assert doc["original_base64"] == ""
    assert doc["original_truncated"] is True
    assert doc["original_bytes"] == len(raw)
    assert doc["original_sha256"] == hashlib.sha256(raw).hexdigest()


def test_the_record_budget_leaves_room_for_the_key_and_kafka_framing() -> None:
    assert record_budget(10_000, None) == 10_000 - RECORD_OVERHEAD_BYTES
    assert record_budget(10_000, b"k" * 100) == 10_000 - 100 - RECORD_OVERHEAD_BYTES


def test_a_dead_letter_drops_an_oversized_key() -> None:
    assert dead_letter_key(None) is None
    assert dead_letter_key(b"r-1") == b"r-1"
    assert dead_letter_key(b"k" * MAX_DEAD_LETTER_KEY_BYTES) == b"k" * MAX_DEAD_LETTER_KEY_BYTES
    assert dead_letter_key(b"k" * (MAX_DEAD_LETTER_KEY_BYTES + 1)) is None


def test_dead_letter_with_request_id_and_task() -> None:
    rejection = Rejection(DeadLetterReason.unknown_task, "task 'x' is not served here")
    doc = json.loads(
        encode_dead_letter(
            b"{}", rejection, SOURCE, max_bytes=LIMIT, request_id="r-9", task="reviews"
        )
    )
    assert doc["id"] == "r-9"
    assert doc["task"] == "reviews"
    assert doc["reason"] == "unknown_task"


def test_dead_letter_with_only_request_id() -> None:
    rejection = Rejection(DeadLetterReason.student_failed, "boom")
    doc = json.loads(
        encode_dead_letter(b"{}", rejection, SOURCE, max_bytes=LIMIT, request_id="r-9")
    )
    assert doc["id"] == "r-9"
    assert "task" not in doc


def test_dead_letter_with_only_task() -> None:
    rejection = Rejection(DeadLetterReason.student_failed, "boom")
    doc = json.loads(encode_dead_letter(b"{}", rejection, SOURCE, max_bytes=LIMIT, task="reviews"))
    assert doc["task"] == "reviews"
    assert "id" not in doc


def test_dead_letter_unicode_detail_is_utf8() -> None:
    rejection = Rejection(DeadLetterReason.unknown_task, "task 'critiqué' is not served here")
    out = encode_dead_letter(b"{}", rejection, SOURCE, max_bytes=LIMIT, task="critiqué")
    assert "critiqué".encode() in out
    doc = json.loads(out.decode("utf-8"))
    assert doc["detail"] == "task 'critiqué' is not served here"
    assert doc["task"] == "critiqué"


def test_dead_letter_reason_codes_are_stable() -> None:
    # Consumers of the dead-letter topic match on these strings.
    assert [r.value for r in DeadLetterReason] == [
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "unknown_task",
        "wrong_topic",
        "input_too_large",
        "message_too_large",
        "student_failed",
        "response_too_large",
        "send_refused",
    ]
    doc = json.loads(
        encode_dead_letter(
            b"x", Rejection(DeadLetterReason.wrong_topic, "d"), SOURCE, max_bytes=LIMIT
        )
    )
    assert doc["reason"] == "wrong_topic"


def test_every_accepted_request_can_be_answered_and_dead_lettered() -> None:
    # Whatever parse_request accepts must be echoable by both encoders.
    rng = random.Random(7)
    handmade = [
        b'{"id": "\\ud83c\\udfac", "task": "t", "input": "x", "metadata": {"k": "\\u00e9"}}',
        b'{"id": "\\ud800", "task": "t", "input": "x"}',
        b'{"id": "r", "task": "t", "input": "x", "metadata": {"k": "\\udfff"}}',
    ]
    accepted = 0
    for raw in [*_fuzz_samples(rng, 2_000), *handmade]:
        result = parse_request(raw, LIMIT)
        if not isinstance(result, Request):
            continue
        json.loads(
            encode_response(result, output="o", confidence=0.5, model_version="v", latency_ms=1)
        )
        rejection = Rejection(DeadLetterReason.unknown_task, f"task {result.task!r}")
        json.loads(
            encode_dead_letter(
                raw, rejection, SOURCE, max_bytes=LIMIT, request_id=result.id, task=result.task
            )
        )
        accepted += 1
    assert accepted > 10


def test_a_broken_model_s_nan_confidence_becomes_null_not_invalid_json() -> None:
    from distilld.traffic.records import Request, encode_response

    value = encode_response(
        Request(id="n", task="t", input="x"),
        output="fresh",
        confidence=float("nan"),
        model_version="v",
        latency_ms=1.0,
        probabilities={"fresh": float("inf"), "rotten": 0.25},
    )
    doc = json.loads(value, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert doc["confidence"] is None
    assert doc["probabilities"] == {"fresh": None, "rotten": 0.25}
