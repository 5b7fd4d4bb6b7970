"""Monitoring end to end through the real daemon: shadow comparisons, drift, accuracy, alerts.

Real parts throughout: the session's Tansu broker, the daemon as ``distilld run``
builds it (``running_daemon``), in-process transformers students and teacher
(MiniLM fine-tuned once on gold Rotten Tomatoes labels, ``trained_sentiment_dir``),
the SQLite store and Evidently. Checks run on demand (``scheduler.run_now``) once
the shadow worker has handled every answered request; the policies' interval is
an hour so that no scheduled check runs in between.

Teacher faults need an endpoint that fails on command: ``FakeTeacherServer`` is a
stand-in, labelled so (a real HTTP server on a local socket that answers too
slowly, with a body that is not JSON, or with an answer that is no label); the
"down" teacher is a closed port.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilld.assets import minilm_dir
from distilld.demo.data import LABELS, Row, load_rows
from distilld.lifecycle import RunningDaemon, running_daemon
from distilld.monitoring.evaluate import DRIFT_METRIC, Status, Verdict
from distilld.monitoring.features import REFERENCE_FILE
from distilld.monitoring.measure import SUMMARY_JSON, CheckOutcome
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher
from distilld.traffic.broker import EmbeddedBroker
from support.daemon import answer_all, compare_all, request, settle
from support.kafka import ServedTask, sentiment_task, unique
from support.logs import Event
from support.models import sentiment_training_rows

# No scheduled check during a test: every check is run on demand.
HOUR_S = 3600


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Corpus:
    """Rotten Tomatoes rows the trained classifier never saw, shuffled once."""

    reviews: list[Row]  # every held-out review
    short_reviews: list[Row]  # at most 120 characters: the population it was trained on
    tiny_reviews: list[Row]  # at most 6 word pieces: a student cut to 8 tokens sees them whole
    long_reviews: list[Row]  # at least 150 characters
    plots: list[Row]  # plot summaries: another input population

    @classmethod
    def load(cls) -> Corpus:
        from transformers import AutoTokenizer

        trained_on = {r.id for r in sentiment_training_rows()}
        rows = [r for r in load_rows() if r.text.strip() and r.id not in trained_on]
        random.Random(23).shuffle(rows)
        reviews = [r for r in rows if r.label is not None]
        # MiniLM's tokenizer: the one every model in these tests uses.
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        candidates = [r for r in reviews if len(r.text) <= 40]
        counts = tokenizer([r.text for r in candidates], add_special_tokens=False)["input_ids"]
        tiny = [r for r, ids in zip(candidates, counts, strict=True) if len(ids) <= 6]
        tiny_ids = {r.id for r in tiny}
        return cls(
            reviews=reviews,
            short_reviews=[r for r in reviews if len(r.text) <= 120 and r.id not in tiny_ids],
            tiny_reviews=tiny,
            long_reviews=[r for r in reviews if len(r.text) >= 150],
            plots=[r for r in rows if r.category == "plot"],
        )


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.load()


# --------------------------------------------------------------------------- policies


def serve(
    tmp_path: Path,
    student: Path,
    *,
    student_options: dict[str, Any] | None = None,
    **sections: Any,
) -> ServedTask:
    """A monitored classification policy on fresh topics, written to disk and loaded.

    ``student`` is the student's model directory (absolute); ``sections`` are the
    policy's teacher / sampling / monitors / alerts sections."""
    task = unique("monitored")
    document: dict[str, Any] = {
        **sentiment_task(task),
        "student": {
            "backend": "transformers",
            "model": str(student),
            "architecture": "sequence-classification",
            "max_input_tokens": 64,
            "batch": {"max_size": 16, "max_wait_ms": 10},
            **(student_options or {}),
        },
        **sections,
    }
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir(parents=True, exist_ok=True)
    path = policies_dir / f"{task}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    return ServedTask(load_policy(path), policies_dir, student.parent, state_dir)


def transformers_teacher(model: Path, max_input_tokens: int = 128) -> dict[str, Any]:
    return {"backend": "transformers", "model": str(model), "max_input_tokens": max_input_tokens}


# --------------------------------------------------------------------------- running


def check(daemon: RunningDaemon, task: str) -> CheckOutcome:
    outcome = daemon.monitoring.scheduler.run_now(task)
    assert isinstance(outcome, CheckOutcome)
    return outcome


def by_segment(outcome: CheckOutcome, metric: str) -> dict[str, Verdict]:
    return {v.segment: v for v in outcome.verdicts if v.metric == metric}


def logged_alerts(entries: list[Event], task: str) -> list[Event]:
    """The alert events of ``task`` among the captured log events."""
    return [e for e in entries if e.get("alert") and e.get("task") == task]


# --------------------------------------------------------------------------- the teacher


def test_the_trained_teacher_is_clearly_better_than_chance(
    trained_sentiment_dir: Path, corpus: Corpus
) -> None:
    # The accuracy scenarios below mean something only with a capable teacher.
    rows = corpus.reviews[:300]
    teacher = LocalTeacher(
        TransformersTeacherConfig(model=str(trained_sentiment_dir), max_input_tokens=128),
        Policy.model_validate(
            {
                "task": "reviews",
                "kind": "classification",
                "labels": list(LABELS),
                "traffic": {
                    "requests_topic": "a",
                    "responses_topic": "b",
                    "dead_letter_topic": "c",
                },
                "student": {"model": "student"},
            }
        ),
        trained_sentiment_dir,
    )
    try:
        answers = [
            a
            for i in range(0, len(rows), 32)
            for a in teacher.label([r.text for r in rows[i : i + 32]])
        ]
    finally:
        teacher.close()
    accuracy = sum(a.output == r.label for a, r in zip(answers, rows, strict=True)) / len(rows)
    majority = max(LABELS, key=[r.label for r in rows].count)
    chance = sum(r.label == majority for r in rows) / len(rows)
    print(
        f"trained teacher: {accuracy:.3f} on {len(rows)} held-out reviews (majority {chance:.3f})"
    )
    assert accuracy >= chance + 0.08


# --------------------------------------------------------------------------- drift


@pytest.mark.slow
def test_drift_alert_fires_once_when_plot_summaries_replace_reviews(
    tmp_path: Path,
    broker: EmbeddedBroker,
    trained_sentiment_dir: Path,
    corpus: Corpus,
    logs: list[Event],
) -> None:
    # The trained student ships with its drift reference: its training reviews,
    # described, with its own answers on them (distilld.demo.student).
    assert (trained_sentiment_dir / REFERENCE_FILE).is_file()
    window = 240
    served = serve(
        tmp_path,
        trained_sentiment_dir,
        # No teacher: the accuracy monitor is off, drift needs none.
        monitors={"interval_s": HOUR_S, "drift": {"window": window, "min_samples": 200}},
    )
    task = served.policy.task
    settings = served.settings(broker)
    stationary = corpus.short_reviews[:window]
    shifted = corpus.plots[:window]
    with running_daemon(settings, {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        store = daemon.monitoring.store

        answer_all(
            daemon,
            served,
            [request(r.id, task, r.text) for r in stationary],
            {r.id for r in stationary},
        )
        settle(daemon, offered=len(stationary))
        calm = check(daemon, task)
        assert calm.reference_source == "model"
        assert calm.drift is not None, calm.drift_note
        assert calm.drift.current_rows == window
        (calm_verdict,) = calm.verdicts
        assert calm_verdict.status is Status.ok, calm.drift.features
        assert store.last_alerts(task) == []

        answer_all(
            daemon,
            served,
            [request(r.id, task, r.text) for r in shifted],
            {r.id for r in shifted},
        )
        settle(daemon, offered=len(stationary) + len(shifted))
        shift = check(daemon, task)
        again = check(daemon, task)
        alerts = store.last_alerts(task)
        running = not daemon.stop_event.is_set()

    assert running
    assert shift.drift is not None and shift.drift.current_rows == window
    (verdict,) = shift.verdicts
    assert verdict.metric == DRIFT_METRIC
    assert verdict.status is Status.breach, shift.drift.features
    assert verdict.value is not None and verdict.value >= 0.5
    assert shift.drift.feature("char_length").drifted
    # Still drifted at the next check, but the breach is reported once.
    assert [v.status for v in again.verdicts] == [Status.breach]
    assert [(a.kind, a.metric, a.segment) for a in alerts] == [("breach", DRIFT_METRIC, None)]
    logged = logged_alerts(logs, task)
    assert [(e["event"], e["metric"], e["segment"]) for e in logged] == [
        ("monitor.breach", DRIFT_METRIC, "all")
    ]
    assert logged[0]["value"] == verdict.value and logged[0]["threshold"] == 0.5

    # Each check left Evidently's HTML report and the JSON summaries behind.
    for outcome in (calm, shift, again):
        assert outcome.report_dir is not None and outcome.drift is not None
        assert outcome.report_dir.parent == settings.reports_dir / task
        assert (outcome.report_dir / "drift.html").stat().st_size > 0
        summary = json.loads((outcome.report_dir / SUMMARY_JSON).read_text())
        assert summary["reference_source"] == "model"
        assert summary["drift"]["drift_share"] == outcome.drift.drift_share
    print(
        f"drift share: stationary {calm.drift.drift_share:.3f}, "
        f"plot summaries {shift.drift.drift_share:.3f}"
    )


# --------------------------------------------------------------------------- accuracy


def accuracy_sections(
    window: int, min_samples: int, threshold: float, **segments: Any
) -> dict[str, Any]:
    return {
        "interval_s": HOUR_S,
        "drift": {"enabled": False},
        "accuracy": {
            "window": window,
            "min_samples": min_samples,
            "threshold": threshold,
            "segments": {"min_samples": 30, **segments},
        },
    }


def test_accuracy_alert_fires_for_a_student_that_cannot_do_the_task(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    trained_sentiment_dir: Path,
    corpus: Corpus,
    logs: list[Event],
) -> None:
    count = 100
    served = serve(
        tmp_path,
        minilm_sentiment_dir,  # an untrained classification head
        teacher=transformers_teacher(trained_sentiment_dir),
        sampling={"base_rate": 1.0},
        monitors=accuracy_sections(window=count, min_samples=60, threshold=0.8),
    )
    task = served.policy.task
    rows = corpus.short_reviews[:count]
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        stats = compare_all(daemon, served, rows)
        outcome = check(daemon, task)
        alerts = daemon.monitoring.store.last_alerts(task)

    assert stats["compared"] == count, stats
    overall = by_segment(outcome, "agreement")["all"]
    assert overall.samples == count
    assert overall.status is Status.breach, overall
    assert [(a.kind, a.metric, a.segment) for a in alerts if a.segment is None] == [
        ("breach", "agreement", None)
    ]
    logged = [e for e in logged_alerts(logs, task) if e["segment"] == "all"]
    assert [(e["event"], e["metric"], e["severity"]) for e in logged] == [
        ("monitor.breach", "agreement", "critical")
    ]
    print(f"untrained student vs trained teacher: agreement {overall.value:.3f} over {count}")


def test_a_segment_only_failure_is_caught_while_overall_agreement_passes(
    tmp_path: Path,
    broker: EmbeddedBroker,
    trained_sentiment_dir: Path,
    corpus: Corpus,
    logs: list[Event],
) -> None:
    # The same trained model as student and teacher, but the student reads only
    # the first 6 word pieces: it matches the teacher on tiny reviews, which it
    # sees whole, and falls behind on long ones.
    tiny, long = corpus.tiny_reviews[:150], corpus.long_reviews[:90]
    threshold = 0.85
    served = serve(
        tmp_path,
        trained_sentiment_dir,
        student_options={"max_input_tokens": 8, "truncation_side": "right"},
        teacher=transformers_teacher(trained_sentiment_dir, max_input_tokens=128),
        sampling={"base_rate": 1.0, "length_buckets": [100]},
        monitors=accuracy_sections(
            window=len(tiny) + len(long), min_samples=100, threshold=threshold, keys=["length"]
        ),
    )
    task = served.policy.task
    rows = [*tiny, *long]
    random.Random(3).shuffle(rows)
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        stats = compare_all(daemon, served, rows)
        outcome = check(daemon, task)
        alerts = daemon.monitoring.store.last_alerts(task)
    logged = logged_alerts(logs, task)

    assert stats["compared"] == len(rows), stats
    verdicts = by_segment(outcome, "agreement")
    summary = {s: (v.status.value, v.value, v.samples) for s, v in verdicts.items()}
    print(f"agreement by segment: {summary}")
    assert set(verdicts) == {"all", "length=<100", "length=>=100"}
    assert verdicts["length=<100"].samples == len(tiny)
    assert verdicts["length=>=100"].samples == len(long)
    assert verdicts["all"].status is Status.ok, summary
    assert verdicts["length=<100"].status is Status.ok, summary
    assert verdicts["length=>=100"].status is Status.breach, summary
    assert [(a.kind, a.metric, a.segment) for a in alerts] == [
        ("breach", "agreement", {"length": ">=100"})
    ]
    assert [(e["event"], e["segment"], e["severity"]) for e in logged] == [
        ("monitor.breach", "length=>=100", "warning")
    ]


# --------------------------------------------------------------------------- teacher faults


class FakeTeacherServer:
    """Stand-in for an OpenAI-compatible teacher that misbehaves, labelled so: a real
    HTTP server on a local socket. ``mode`` "slow" answers after ``delay_s`` (longer
    than the policy's timeout), "not_json" answers a body that is not JSON, and
    "not_a_label" a well-formed chat completion whose answer is no label."""

    def __init__(self, mode: str, delay_s: float = 3.0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if mode == "slow":
                    time.sleep(delay_s)
                if mode == "not_json":
                    payload = b'{"choices": [{"message": {"content": "fre'
                else:
                    message = {"role": "assistant", "content": "a banana, probably"}
                    payload = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

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

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port_url() -> str:
    """An address where nothing listens (a port the OS just handed out, closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def teacher_url(request: pytest.FixtureRequest) -> Iterator[str]:
    mode = request.param
    if mode == "down":
        yield closed_port_url()
        return
    fake = FakeTeacherServer(mode)
    try:
        yield fake.base_url
    finally:
        fake.close()


@pytest.mark.parametrize(
    ("teacher_url", "alert_event", "alert_kind"),
    [
        pytest.param("down", "teacher.unavailable", "teacher_unavailable", id="down"),
        pytest.param("slow", "teacher.unavailable", "teacher_unavailable", id="slow"),
        pytest.param("not_json", "teacher.unavailable", "teacher_unavailable", id="not-json"),
        pytest.param("not_a_label", "teacher.bad_answers", "teacher_bad_answers", id="no-label"),
    ],
    indirect=["teacher_url"],
)
def test_a_failing_teacher_never_costs_an_answer(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_sentiment_dir: Path,
    corpus: Corpus,
    logs: list[Event],
    teacher_url: str,
    alert_event: str,
    alert_kind: str,
) -> None:
    count = 80
    served = serve(
        tmp_path,
        minilm_sentiment_dir,
        teacher={
            "backend": "openai",
            "base_url": teacher_url,
            "model": "teacher",
            "prompt": "Is this review fresh or rotten?\n{input}",
            "constraint": "none",
            "logprobs": False,
            "timeout_s": 0.5,
            "max_retries": 1,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.02,
            "breaker_failure_threshold": 4,
            "breaker_reset_s": 60,
        },
        sampling={"base_rate": 1.0},
        monitors={"interval_s": HOUR_S, "drift": {"enabled": False}},
    )
    task = served.policy.task
    rows = corpus.short_reviews[:count]
    ids = {r.id for r in rows}
    with running_daemon(served.settings(broker), {task: served.policy}) as daemon:
        assert daemon.wait_ready(60)
        responses = answer_all(daemon, served, [request(r.id, task, r.text) for r in rows], ids)
        stats = settle(daemon, offered=count)
        serving = daemon.stats()[0].snapshot()
        alerts = daemon.monitoring.store.last_alerts(task)
        reservoir = daemon.monitoring.store.reservoir(task)
        running = not daemon.stop_event.is_set()

    # Every request answered once by the student, nothing dead-lettered, no crash.
    assert running
    assert sorted(r["id"] for r in responses) == sorted(ids)
    assert all(r["output"] in LABELS for r in responses)
    assert serving["dead_lettered"] == 0
    assert len(reservoir) == count  # the reservoir kept filling
    # Nothing was compared, and the teacher's trouble was reported once.
    assert stats["compared"] == 0, stats
    assert [a.kind for a in alerts] == [alert_kind]
    events = [e["event"] for e in logged_alerts(logs, task)]
    assert events == [alert_event]
    if alert_kind == "teacher_unavailable":
        assert stats["paused"] > 0, stats
    else:
        assert stats["teacher_errors"] > 0, stats
