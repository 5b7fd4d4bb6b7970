"""Kafka fixtures: a real Tansu broker for the whole session, unique topics per test."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.settings import KafkaConfig, Settings
from distilld.traffic.broker import EmbeddedBroker

_counter = itertools.count()

# Consumer-group joins with Tansu take about half the session timeout; keep it short.
TEST_SESSION_TIMEOUT_MS = 6000


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_config(broker: EmbeddedBroker) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=broker.bootstrap_servers,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
    )


def unique(prefix: str) -> str:
    """A name no other test uses (topics and groups outlive a test on the shared broker)."""
    return f"{prefix}-{next(_counter)}-{id(_counter) % 10_000}"


@dataclass(frozen=True)
class ServedTask:
    """A policy written to disk for one test, with its own topics and consumer group."""

    policy: Policy
    policies_dir: Path
    models_dir: Path
    state_dir: Path

    def settings(self, broker: EmbeddedBroker) -> Settings:
        return Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            kafka_session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            policies_dir=self.policies_dir,
            models_dir=self.models_dir,
            state_dir=self.state_dir,
        )

    def env(self, broker: EmbeddedBroker) -> dict[str, str]:
        """The same settings as environment variables, for a daemon subprocess."""
        return {
            "DISTILLD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "DISTILLD_KAFKA_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
            "DISTILLD_POLICIES_DIR": str(self.policies_dir),
            "DISTILLD_MODELS_DIR": str(self.models_dir),
            "DISTILLD_STATE_DIR": str(self.state_dir),
        }


def write_sentiment_policy(
    tmp_path: Path, model_dir: Path, *, max_input_chars: int = 2000, batch_max_size: int = 8
) -> ServedTask:
    """A classification policy (fresh / rotten) served by ``model_dir``, on fresh topics."""
    task = unique("sentiment")
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir(parents=True, exist_ok=True)
    path = policies_dir / f"{task}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            task: {task}
            kind: classification
            labels: [fresh, rotten]
            traffic:
              requests_topic: {task}.requests
              responses_topic: {task}.responses
              dead_letter_topic: {task}.dead-letter
              consumer_group: {task}-group
              max_input_chars: {max_input_chars}
            student:
              backend: transformers
              model: {model_dir.name}
              architecture: sequence-classification
              max_input_tokens: 128
              batch:
                max_size: {batch_max_size}
                max_wait_ms: 10
            """
        )
    )
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    return ServedTask(load_policy(path), policies_dir, model_dir.parent, state_dir)


def sentiment_task(task: str) -> dict[str, Any]:
    """The top of a fresh / rotten classification policy on the task's own topics and
    consumer group; tests add the student, teacher and other sections."""
    return {
        "task": task,
        "kind": "classification",
        "labels": ["fresh", "rotten"],
        "traffic": {
            "requests_topic": f"{task}.requests",
            "responses_topic": f"{task}.responses",
            "dead_letter_topic": f"{task}.dead-letter",
            "consumer_group": f"{task}-group",
        },
    }
