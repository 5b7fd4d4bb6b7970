"""The OpenAI-compatible teacher against a stand-in HTTP server.

``FakeOpenAIServer`` is a stand-in, labelled so: a real HTTP server on a local
socket (http.server in a thread) answering from a script, because outages,
timeouts, garbage bodies and rejected keys cannot be produced on demand with
a real model server. The real vLLM server is exercised by the serving tests.
Time for the breaker and the budget comes from a fake clock; retry waits are
real but a few milliseconds long.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from distilld.credentials import EXCERPT_CHARS
from distilld.errors import BackendError, BackendUnavailable, ConfigError, PolicyError
from distilld.policy.model import Policy
from distilld.teacher.base import (
    Teacher,
    TeacherBudgetExhausted,
    TeacherCircuitOpen,
    TeacherError,
    TeacherUnavailable,
)
from distilld.teacher.config import OpenAITeacherConfig
from distilld.teacher.openai import OpenAITeacher, match_label
from support.logs import Event, named, rendered

LABELS = ["fresh", "rotten"]
TRAFFIC = {"requests_topic": "req", "responses_topic": "resp", "dead_letter_topic": "dead"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["title", "year"],
    "additionalProperties": False,
}
SECRET = "sk-test-0123456789abcdef"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # dict/list: sent as JSON; str: sent as is
    delay_s: float = 0.0


def completion(content: str, tokens: list[dict[str, Any]] | None = None) -> Reply:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}}
    if tokens is not None:
        choice["logprobs"] = {"content": tokens}
    return Reply(body={"id": "c", "object": "chat.completion", "choices": [choice]})


def label_tokens(first: str, logprobs: dict[str, float]) -> list[dict[str, Any]]:
    """One answer token with its top-k alternatives."""
    return [
        {
            "token": first,
            "logprob": logprobs[first],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in logprobs.items()],
        }
    ]


class FakeOpenAIServer:
    """Stand-in for an OpenAI-compatible endpoint: a real local HTTP server whose
    answers come from a script (one Reply per request, then ``default``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: deque[Reply] = deque()
        self.default = completion("fresh")
        # Replies by input: the prompt's text decides, whatever order the
        # concurrent requests arrive in.
        self.by_input: dict[str, Reply] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with server._lock:
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    reply = server._reply_for(body)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    self._answer(reply)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, reply: Reply) -> None:
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = (
                    reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                ).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def _reply_for(self, body: Any) -> Reply:
        prompt = json.dumps(body.get("messages") if isinstance(body, dict) else None)
        for text, reply in self.by_input.items():
            if text in prompt:
                return reply
        return self.script.popleft() if self.script else self.default

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    yield fake
    fake.close()


def classification_policy(prompt: str | None = "Review: {input}\nfresh or rotten?") -> Policy:
    document: dict[str, Any] = {
        "task": "reviews",
        "kind": "classification",
        "labels": LABELS,
        "traffic": TRAFFIC,
        "student": {"model": "student"},
    }
    if prompt is not None:
        document["student"]["architecture"] = "causal-lm"
        document["prompt"] = prompt
    return Policy.model_validate(document)


def extraction_policy() -> Policy:
    return Policy.model_validate(
        {
            "task": "movies",
            "kind": "extraction",
            "output_schema": SCHEMA,
            "prompt": "Extract title and year as JSON.\nText: {input}",
            "traffic": TRAFFIC,
            "student": {"model": "student", "architecture": "causal-lm"},
        }
    )


def make_teacher(
    server: FakeOpenAIServer,
    policy: Policy | None = None,
    clock: FakeClock | None = None,
    environ: dict[str, str] | None = None,
    secrets_dir: Path | None = None,
    **settings: Any,
) -> OpenAITeacher:
    options: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "teacher-model",
        "max_retries": 0,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.005,
        "timeout_s": 5.0,
    }
    options.update(settings)
    return OpenAITeacher(
        OpenAITeacherConfig(**options),
        policy or classification_policy(),
        environ=environ or {},
        secrets_dir=secrets_dir,
        clock=clock or FakeClock(),
    )


@pytest.fixture
def teachers() -> Iterator[list[OpenAITeacher]]:
    made: list[OpenAITeacher] = []
    yield made
    for teacher in made:
        teacher.close()


# --------------------------------------------------------------------------- answers


def test_classification_request_and_label_distribution(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, top_logprobs=3)
    teachers.append(teacher)
    assert isinstance(teacher, Teacher)
    server.by_input = {
        "Dull and too long.": completion(
            "rotten", label_tokens("rotten", {"rotten": -0.2, "fresh": -1.8, "meh": -5})
        ),
        "A delight.": completion("fresh", label_tokens("fresh", {"fresh": -0.05, "rotten": -3.0})),
    }
    answers = teacher.label(["Dull and too long.", "A delight."])

    assert [a.output for a in answers] == ["rotten", "fresh"]
    assert all(a.error is None for a in answers)
    first = answers[0]
    assert first.probabilities is not None
    assert sum(first.probabilities.values()) == pytest.approx(1.0)
    assert first.probabilities["rotten"] > first.probabilities["fresh"]
    assert first.confidence == first.probabilities["rotten"]
    # The per-token top-k, for distribution matching of causal-LM students.
    assert first.top_logprobs == ({"rotten": -0.2, "fresh": -1.8, "meh": -5.0},)

    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert body["model"] == "teacher-model"
    assert body["structured_outputs"] == {"choice": LABELS}
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 3
    assert body["temperature"] == 0.0
    prompts = sorted(r["body"]["messages"][0]["content"] for r in server.requests)
    assert prompts == sorted(
        [f"Review: {t}\nfresh or rotten?" for t in ["Dull and too long.", "A delight."]]
    )
    assert "Authorization" not in request["headers"]  # no api_key_env: no header


def test_unconstrained_answers_are_matched_to_labels(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, constraint="none", logprobs=False)
    teachers.append(teacher)
    server.by_input = {
        "first review": completion(" Fresh."),
        "second review": completion("It is not fresh at all"),
    }
    fresh, unclear = teacher.label(["first review", "second review"])
    assert "structured_outputs" not in server.requests[0]["body"]
    assert "logprobs" not in server.requests[0]["body"]
    assert fresh.output == "fresh"
    assert fresh.error is None
    assert fresh.confidence == 1.0  # no logprobs asked: unknown, not low
    assert unclear.error is not None
    assert "not one of the labels" in unclear.error
    assert unclear.output == "It is not fresh at all"


def test_answer_outside_the_labels_under_a_constraint_says_it_was_ignored(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server)
    teachers.append(teacher)
    server.push(completion("positive"))
    (answer,) = teacher.label(["x"])
    assert answer.error is not None
    assert "ignored structured_outputs" in answer.error


def test_match_label() -> None:
    assert match_label("fresh", LABELS) == "fresh"
    assert match_label('  "Rotten"!', LABELS) == "rotten"
    assert match_label("fresh and rotten", LABELS) is None
    assert match_label("", LABELS) is None


def test_extraction_validates_json_and_reports_bad_answers(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, policy=extraction_policy())
    teachers.append(teacher)
    token = {"token": "x", "logprob": -0.1}
    server.by_input = {
        "good one": completion('{"title": "Heat", "year": 1995}', [token, token]),
        "wrong type": completion('{"title": "Heat", "year": "nineteen"}'),
        "cut short": completion('{"title": "Heat", "ye'),
    }
    good, wrong_type, cut = teacher.label(["good one", "wrong type", "cut short"])
    assert server.requests[0]["body"]["structured_outputs"] == {"json": SCHEMA}
    assert "top_logprobs" not in server.requests[0]["body"]
    assert good.output == {"title": "Heat", "year": 1995}
    assert good.error is None
    assert good.confidence == pytest.approx(0.904837, abs=1e-5)  # exp(-0.1)
    assert wrong_type.error is not None and "year" in wrong_type.error
    assert cut.error is not None and "not valid JSON" in cut.error
    assert cut.output == '{"title": "Heat", "ye'


def test_response_format_mode_for_hosted_apis(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, policy=extraction_policy(), constraint="response_format")
    teachers.append(teacher)
    server.push(completion('```json\n{"title": "Heat", "year": 1995}\n```'))
    (answer,) = teacher.label(["a"])
    body = server.requests[0]["body"]
    assert "structured_outputs" not in body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": SCHEMA},
    }
    assert answer.output == {"title": "Heat", "year": 1995}


def test_a_refused_input_is_an_answer_error_not_a_batch_failure(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, breaker_failure_threshold=1)
    teachers.append(teacher)
    server.push(Reply(status=400, body={"error": {"message": "prompt too long"}}))
    (answer,) = teacher.label(["very long"])
    assert answer.error is not None
    assert "HTTP 400" in answer.error and "prompt too long" in answer.error
    assert teacher.status().available  # the server answered: not a failure


def test_empty_batch_sends_nothing(server: FakeOpenAIServer, teachers: list[OpenAITeacher]) -> None:
    teacher = make_teacher(server)
    teachers.append(teacher)
    assert teacher.label([]) == []
    assert server.requests == []


def test_a_prompt_is_required(server: FakeOpenAIServer) -> None:
    config = OpenAITeacherConfig(base_url=server.base_url, model="m")
    with pytest.raises(PolicyError, match=r"teacher\.prompt"):
        OpenAITeacher(config, classification_policy(prompt=None), environ={})


# --------------------------------------------------------------------------- failures


def test_server_errors_are_retried_until_success(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, max_retries=3)
    teachers.append(teacher)
    server.push(
        Reply(status=503, body="overloaded"),
        Reply(status=500, body={"error": "boom"}),
        Reply(status=429, body={"error": "slow down"}),
        completion("rotten"),
    )
    (answer,) = teacher.label(["x"])
    assert answer.output == "rotten"
    assert len(server.requests) == 4


def test_retries_exhausted_raise_teacher_unavailable(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, max_retries=1)
    teachers.append(teacher)
    server.default = Reply(status=502, body="bad gateway")
    with pytest.raises(TeacherUnavailable) as info:
        teacher.label(["x"])
    assert isinstance(info.value, BackendUnavailable)  # the daemon's one error tree
    assert "HTTP 502" in str(info.value)
    assert "after 2 attempts" in str(info.value)
    assert len(server.requests) == 2


def test_timeout_raises_teacher_unavailable(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, timeout_s=0.2)
    teachers.append(teacher)
    server.push(Reply(delay_s=2.0, body={"choices": []}))
    # The slow answer would be a garbage body: the error shows the client gave up first.
    with pytest.raises(TeacherUnavailable, match=r"timeout_s=0\.2"):
        teacher.label(["x"])


def test_garbage_bodies_raise_teacher_unavailable(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server)
    teachers.append(teacher)
    server.push(Reply(body="<html>proxy error</html>"))
    with pytest.raises(TeacherUnavailable, match="not JSON"):
        teacher.label(["x"])
    server.push(Reply(body={"object": "chat.completion", "choices": []}))
    with pytest.raises(TeacherUnavailable, match="without choices"):
        teacher.label(["x"])
    server.push(Reply(body=[1, 2, 3]))
    with pytest.raises(TeacherUnavailable, match="without choices"):
        teacher.label(["x"])


def test_garbage_then_valid_body_is_retried(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, max_retries=1)
    teachers.append(teacher)
    server.push(Reply(body="{not json"), completion("fresh"))
    assert teacher.label(["x"])[0].output == "fresh"


def test_connection_refused_raises_teacher_unavailable(teachers: list[OpenAITeacher]) -> None:
    closed = FakeOpenAIServer()
    closed.close()  # nothing listens on its port any more
    teacher = make_teacher(closed)
    teachers.append(teacher)
    with pytest.raises(TeacherUnavailable, match="did not answer"):
        teacher.label(["x"])


def test_breaker_opens_then_recovers_through_a_half_open_probe(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    clock = FakeClock()
    teacher = make_teacher(server, clock=clock, breaker_failure_threshold=2, breaker_reset_s=60.0)
    teachers.append(teacher)
    server.default = Reply(status=500, body="down")
    for _ in range(2):
        with pytest.raises(TeacherUnavailable):
            teacher.label(["x"])
    assert len(server.requests) == 2

    # Open: refused at once, nothing sent.
    with pytest.raises(TeacherCircuitOpen) as info:
        teacher.label(["x"])
    assert info.value.retry_after_s == 60.0
    assert len(server.requests) == 2
    status = teacher.status()
    assert not status.available
    assert status.reason is not None and "circuit breaker open" in status.reason

    # Half-open, server still down: the probe fails and the breaker opens again.
    clock.now += 60.0
    with pytest.raises(TeacherUnavailable):
        teacher.label(["x"])
    assert len(server.requests) == 3
    with pytest.raises(TeacherCircuitOpen):
        teacher.label(["x"])
    assert len(server.requests) == 3

    # Half-open, server back: the probe succeeds and calls flow again.
    clock.now += 60.0
    server.default = completion("fresh")
    assert teacher.label(["x"])[0].output == "fresh"
    assert teacher.status().available
    assert [a.output for a in teacher.label(["y", "z"])] == ["fresh", "fresh"]
    assert len(server.requests) == 6


def test_rejected_credentials_raise_teacher_error_and_open_the_breaker(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    teacher = make_teacher(server, breaker_failure_threshold=1)
    teachers.append(teacher)
    server.default = Reply(status=401, body={"error": "invalid key"})
    with pytest.raises(TeacherError) as info:
        teacher.label(["x"])
    assert not isinstance(info.value, TeacherUnavailable)
    assert isinstance(info.value, BackendError)
    assert "HTTP 401" in str(info.value)
    with pytest.raises(TeacherCircuitOpen):  # not hammered with a bad key
        teacher.label(["x"])
    assert len(server.requests) == 1


def test_budget_exhaustion_pauses_calls_until_the_hour_slides(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    clock = FakeClock()
    teacher = make_teacher(server, clock=clock, max_calls_per_hour=3, max_retries=2)
    teachers.append(teacher)
    server.push(Reply(status=500, body="blip"))  # a retry does not cost budget
    assert len(teacher.label(["a", "b"])) == 2
    assert teacher.status().calls_left == 1
    with pytest.raises(TeacherBudgetExhausted) as info:
        teacher.label(["c", "d"])
    assert "max_calls_per_hour=3" in str(info.value)
    assert info.value.retry_after_s == 3600.0
    assert len(server.requests) == 3  # the refused batch sent nothing
    assert len(teacher.label(["c"])) == 1
    status = teacher.status()
    assert not status.available and status.calls_left == 0
    assert status.reason is not None and "budget" in status.reason

    clock.now += 3600.0
    assert teacher.status().available
    assert len(teacher.label(["e", "f", "g"])) == 3


def test_budget_refusal_does_not_strand_a_half_open_probe(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    clock = FakeClock()
    teacher = make_teacher(server, clock=clock, max_calls_per_hour=2, breaker_failure_threshold=1)
    teachers.append(teacher)
    server.push(Reply(status=500, body="down"))
    with pytest.raises(TeacherUnavailable):
        teacher.label(["a"])
    clock.now += 60.0  # half-open
    with pytest.raises(TeacherBudgetExhausted):
        teacher.label(["a", "b"])  # the probe was admitted, then the budget refused
    assert teacher.label(["c"])[0].output == "fresh"  # a later probe still goes out


def test_closed_teacher_refuses_work(server: FakeOpenAIServer) -> None:
    teacher = make_teacher(server)
    teacher.close()
    teacher.close()  # twice is fine
    with pytest.raises(TeacherError, match="closed"):
        teacher.label(["x"])
    assert not teacher.status().available


# --------------------------------------------------------------------------- the API key


def test_api_key_is_sent_but_never_shown(
    server: FakeOpenAIServer,
    teachers: list[OpenAITeacher],
    debug_logs: list[Event],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx / httpcore debug logging too
    teacher = make_teacher(
        server,
        environ={"TEACHER_KEY": SECRET},
        api_key_env="TEACHER_KEY",
        max_retries=1,
    )
    teachers.append(teacher)

    server.push(Reply(status=503, body=f"upstream rejected {SECRET}"), completion("fresh"))
    assert teacher.label(["x"])[0].output == "fresh"
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in server.requests)

    # An endpoint that echoes the rejected key back in its error body.
    server.default = Reply(status=401, body={"error": f"Incorrect API key provided: {SECRET}"})
    with pytest.raises(TeacherError) as refused:
        teacher.label(["x"])
    server.default = Reply(status=500, body=f"key {SECRET} is over quota")
    teacher2 = make_teacher(server, environ={"TEACHER_KEY": SECRET}, api_key_env="TEACHER_KEY")
    teachers.append(teacher2)
    with pytest.raises(TeacherUnavailable) as unavailable:
        teacher2.label(["x"])

    events = rendered(debug_logs)
    shown = [
        str(refused.value),
        str(unavailable.value),
        repr(teacher),
        str(teacher.__dict__),
        repr(teacher.status()),
        events,
        capsys.readouterr().out,  # whatever else wrote to stdout
        caplog.text,
    ]
    # The logs did record the failures (with the bodies that held the key) and requests.
    assert named(debug_logs, "teacher.retry") and named(debug_logs, "teacher.request_failed")
    assert "[redacted]" in events
    assert "chat/completions" in caplog.text
    assert "[redacted]" in str(refused.value)
    assert "TEACHER_KEY" in repr(teacher)
    for text in shown:
        assert SECRET not in text
        assert SECRET[3:12] not in text


def test_a_key_straddling_the_excerpt_cut_never_leaks_a_prefix(
    server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    # Error bodies are quoted up to EXCERPT_CHARS characters. The key is masked
    # before the cut: cutting first left the start of a key that straddles it.
    teacher = make_teacher(
        server,
        environ={"TEACHER_KEY": SECRET},
        api_key_env="TEACHER_KEY",
        breaker_failure_threshold=1000,
    )
    teachers.append(teacher)
    # Where the body sits in each message: after "... answered HTTP 500: " etc.
    for offset in range(EXCERPT_CHARS - len(SECRET) - 1, EXCERPT_CHARS + 2):
        body = "x" * offset + SECRET + "y" * EXCERPT_CHARS
        shown: list[str] = []
        for status, error in ((500, TeacherUnavailable), (401, TeacherError)):
            server.push(Reply(status=status, body=body))
            with pytest.raises(error) as caught:
                teacher.label(["x"])
            shown.append(str(caught.value))
        server.push(Reply(status=400, body=body))  # refuses this input: an answer error
        answer_error = teacher.label(["x"])[0].error
        assert answer_error is not None
        shown.append(answer_error)
        server.push(Reply(status=200, body=body))  # a body that is not JSON
        with pytest.raises(TeacherUnavailable) as garbage:
            teacher.label(["x"])
        shown.append(str(garbage.value))
        server.push(Reply(status=200, body={"unexpected": body}))  # JSON, not a completion
        with pytest.raises(TeacherUnavailable) as malformed:
            teacher.label(["x"])
        shown.append(str(malformed.value))
        for text in shown:
            for length in range(3, len(SECRET) + 1):
                assert SECRET[:length] not in text, (offset, length, text)
        assert "x" * 20 in shown[0]  # the body was quoted


def test_missing_key_variable_is_a_config_error_naming_it(server: FakeOpenAIServer) -> None:
    config = OpenAITeacherConfig(base_url=server.base_url, model="m", api_key_env="NOPE_KEY")
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        OpenAITeacher(config, classification_policy(), environ={})
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        OpenAITeacher(config, classification_policy(), environ={"NOPE_KEY": ""})


def test_concurrency_is_bounded(server: FakeOpenAIServer, teachers: list[OpenAITeacher]) -> None:
    teacher = make_teacher(server, concurrency=2)
    teachers.append(teacher)
    # Hold every answer a little so that requests overlap on the server.
    server.default = Reply(body=server.default.body, delay_s=0.05)
    answers = teacher.label([f"r{i}" for i in range(8)])
    assert len(answers) == 8
    assert 1 <= server.most_in_flight <= 2


def test_the_key_can_come_from_a_file_and_is_never_shown(
    tmp_path: Path, server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    key_file = tmp_path / "teacher-key"
    key_file.write_text(SECRET + "\n")
    teacher = make_teacher(server, api_key_file=str(key_file), secrets_dir=tmp_path)
    teachers.append(teacher)

    assert teacher.label(["x"])[0].error is None
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(teacher)

    with pytest.raises(ValidationError, match="not both"):
        OpenAITeacherConfig(
            base_url=server.base_url, model="m", api_key_env="K", api_key_file=str(key_file)
        )
    key_file.unlink()
    with pytest.raises(ConfigError, match="cannot read the API key file") as missing:
        make_teacher(server, api_key_file=str(key_file), secrets_dir=tmp_path)
    assert "teacher.api_key_file" in str(missing.value)
    assert SECRET not in str(missing.value)


def test_the_key_file_must_lie_in_the_secrets_directory(
    tmp_path: Path, server: FakeOpenAIServer, teachers: list[OpenAITeacher]
) -> None:
    # A policy must not send any file the daemon can read as a bearer key.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "teacher_key").write_text(SECRET)
    elsewhere = tmp_path / "daemon-only.txt"
    elsewhere.write_text("not a key\n")
    (secrets / "link").symlink_to(elsewhere)

    relative = make_teacher(server, api_key_file="teacher_key", secrets_dir=secrets)
    teachers.append(relative)
    relative.label(["x"])
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"

    for value in (str(elsewhere), "../daemon-only.txt", "link"):
        with pytest.raises(ConfigError) as refused:
            make_teacher(server, api_key_file=value, secrets_dir=secrets)
        message = str(refused.value)
        assert "teacher.api_key_file" in message and repr(value) in message
        assert f"DISTILLD_SECRETS_DIR={secrets}" in message
        assert "not a key" not in message
    with pytest.raises(ConfigError, match="no secrets directory is configured"):
        make_teacher(server, api_key_file=str(secrets / "teacher_key"))
    assert len(server.requests) == 1  # nothing was sent with a refused file
