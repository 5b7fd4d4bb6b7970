"""One retraining job end to end on real parts: the SQLite store's reservoir and
comparisons, the MiniLM teacher fine-tuned on gold labels (``trained_sentiment_dir``),
real training of a MiniLM student, the gate, the registry.

Also: a job killed with SIGKILL in the middle of training leaves the registry as
it was (one live version, nothing half-registered).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilld.demo.data import LABELS, Row, load_rows
from distilld.monitoring.features import REFERENCE_FILE, load_reference
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.registry import Manifest, ModelRegistry
from distilld.retrain.run import (
    GATE_HTML,
    GATE_JSON,
    JobInputs,
    RetrainError,
    read_seed_inputs,
    run_retraining,
)
from distilld.store.base import TrafficSample
from distilld.store.sqlite import SqliteStore
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher
from support.models import sentiment_training_rows
from support.wait import wait_until

SIZE = 240  # examples per job: small enough for a test, large enough for a 24-example test set


def short_reviews(count: int, seed: int = 5) -> list[Row]:
    trained_on = {r.id for r in sentiment_training_rows()}
    rows = [
        r
        for r in load_rows()
        if r.label is not None and 10 <= len(r.text) <= 120 and r.id not in trained_on
    ]
    random.Random(seed).shuffle(rows)
    return rows[:count]


def write_policy(
    tmp_path: Path, student: Path, teacher: Path, retraining: dict[str, Any]
) -> Policy:
    document = {
        "task": "reviews",
        "kind": "classification",
        "labels": list(LABELS),
        "traffic": {
            "requests_topic": "reviews.requests",
            "responses_topic": "reviews.responses",
            "dead_letter_topic": "reviews.dead-letter",
        },
        "student": {
            "model": str(student),
            "architecture": "sequence-classification",
            "max_input_tokens": 48,
        },
        "teacher": {"backend": "transformers", "model": str(teacher), "max_input_tokens": 64},
        "retraining": retraining,
    }
    path = tmp_path / "reviews.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_policy(path)


def small_retraining(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "size": {"min_examples": SIZE, "max_examples": SIZE},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-4, "max_tokens": 48},
        "gate": {"min_test_examples": 20, "margin": 0.4, "live_tolerance": 1.0},
        # A binary teacher's confidence is at least 0.5: nothing is dropped for it,
        # so that the few examples of a test all train the student.
        "filtering": {"min_teacher_confidence": 0.5},
    }
    base.update(changes)
    return base


def filled_store(path: Path, rows: list[Row]) -> SqliteStore:
    store = SqliteStore(path)
    rng = random.Random(3)
    store.add_traffic(
        [
            TrafficSample(
                task="reviews",
                input_text=r.text,
                metadata={},
                student_output=rng.choice(LABELS),
                student_confidence=rng.uniform(0.5, 1.0),
                request_id=r.id,
                model_version="live",
            )
            for r in rows
        ]
    )
    return store


def job_inputs(
    policy: Policy,
    store: SqliteStore,
    registry: ModelRegistry,
    base: Path,
    teacher: Path,
    **kw: Any,
) -> JobInputs:
    assert policy.retraining is not None and policy.teacher is not None
    teacher_config = TransformersTeacherConfig(model=str(teacher), max_input_tokens=64)
    return JobInputs(
        policy=policy,
        config=policy.retraining,
        teacher=LocalTeacher(teacher_config, policy, teacher),
        store=store,
        registry=registry,
        base_model_dir=base,
        **kw,
    )


@pytest.fixture(scope="module")
def reviews() -> list[Row]:
    return short_reviews(SIZE + 60)


@pytest.mark.slow
def test_a_job_labels_filters_trains_gates_and_registers_a_candidate(
    tmp_path: Path, minilm_sentiment_dir: Path, trained_sentiment_dir: Path, reviews: list[Row]
) -> None:
    flagged = [r.id for r in reviews[:30]]
    flags = tmp_path / "flags.txt"
    flags.write_text("\n".join(flagged) + "\n")
    # min_examples 120 cannot hold out 20 test examples: the first attempt selects the
    # 200 the gate needs. The filter drops the flagged ones among them, which leaves
    # fewer than 20 held out: the gate fails for lack of data and the job grows to 240.
    policy = write_policy(
        tmp_path,
        minilm_sentiment_dir,
        trained_sentiment_dir,
        small_retraining(size={"min_examples": SIZE // 2, "max_examples": SIZE}),
    )
    # As many candidates as the job selects: every one is labelled, flagged ones too.
    store = filled_store(tmp_path / "store.sqlite", reviews[:SIZE])
    registry = ModelRegistry(tmp_path / "registry")
    live = registry.register(minilm_sentiment_dir, Manifest(version="live"), copy=True)
    registry.promote(live)

    result = run_retraining(
        job_inputs(
            policy,
            store,
            registry,
            minilm_sentiment_dir,
            trained_sentiment_dir,
            flags_file=flags,
            live_version=live,
            live_model_dir=registry.path(live),
            reason="manual",
        ),
        work_dir=tmp_path / "work",
    )

    assert result.status == "registered", result.gate.summary
    assert result.version is not None
    version_dir = registry.path(result.version)
    manifest = registry.get(result.version)
    assert manifest.state == "candidate"
    assert manifest.parent == live
    assert registry.live_version() == live  # the job never touches the live version
    # The model, its gate report and its drift reference travel together.
    assert (version_dir / "model.safetensors").is_file()
    gate = json.loads((version_dir / GATE_JSON).read_text())
    assert gate["passed"] is True
    assert (version_dir / GATE_HTML).read_text().startswith("<!DOCTYPE html>")
    reference = load_reference(version_dir / REFERENCE_FILE)
    assert len(reference.frame) > 0
    first, attempt = manifest.data["attempts"]
    assert (first["size"], attempt["size"]) == (200, SIZE)
    assert first["gate"].startswith("failed: test_set_size")
    # Every input selected was either kept or dropped with a reason; flagged ones dropped.
    filtering = attempt["filtering"]
    selected = attempt["selection"]["selected"]
    assert selected == attempt["selection"]["eligible"] > SIZE * 0.9
    assert filtering["kept"] + filtering["dropped_total"] == selected
    assert filtering["dropped"]["flagged"] == len(flagged)
    sizes = attempt["split"]["sizes"]
    assert sum(sizes.values()) == filtering["kept"]
    assert attempt["training"]["examples"] == sizes["train"]
    assert result.gate.n == sizes["test"] >= 20
    # The candidate was judged against the teacher and the live student.
    assert set(result.gate.metrics) >= {"candidate", "live"}


@pytest.mark.slow
def test_a_job_whose_gate_fails_registers_nothing_and_keeps_the_report(
    tmp_path: Path, minilm_sentiment_dir: Path, trained_sentiment_dir: Path, reviews: list[Row]
) -> None:
    # A held-out set can never reach 500 examples out of 240: the gate must refuse.
    policy = write_policy(
        tmp_path,
        minilm_sentiment_dir,
        trained_sentiment_dir,
        small_retraining(gate={"min_test_examples": 25}, training={"epochs": 1}),
    )
    store = filled_store(tmp_path / "store.sqlite", reviews)
    registry = ModelRegistry(tmp_path / "registry")
    strict = policy.model_copy(
        update={
            "retraining": policy.retraining.model_copy(  # type: ignore[union-attr]
                update={
                    "gate": policy.retraining.gate.model_copy(  # type: ignore[union-attr]
                        update={"min_test_examples": 200}
                    )
                }
            )
        }
    )
    # min_test_examples 200 needs 2,000 candidates at a 10 % test share: refused up front.
    with pytest.raises(RetrainError, match="fewer than the 2000 needed"):
        run_retraining(
            job_inputs(strict, store, registry, minilm_sentiment_dir, trained_sentiment_dir),
            work_dir=tmp_path / "work-strict",
        )

    # With enough candidates but a margin of 0 the candidate must match the teacher
    # on every held-out example, which one epoch on 200 examples does not.
    exact = write_policy(
        tmp_path,
        minilm_sentiment_dir,
        trained_sentiment_dir,
        small_retraining(
            gate={"min_test_examples": 20, "margin": 0.0, "live_tolerance": 1.0},
            training={"epochs": 1, "max_tokens": 48},
        ),
    )
    result = run_retraining(
        job_inputs(exact, store, registry, minilm_sentiment_dir, trained_sentiment_dir),
        work_dir=tmp_path / "work",
    )

    assert result.status == "gate_failed"
    assert result.version is None
    assert registry.list() == []
    assert result.gate_report_path is not None and result.gate_report_path.is_file()
    report = json.loads(result.gate_report_path.read_text())
    assert report["passed"] is False
    assert any(c["name"] == "primary_vs_teacher" and c["passed"] is False for c in report["checks"])
    assert len(result.attempts) == 1  # already at the maximum size: no growth


def test_seed_files_accept_plain_lines_and_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "seeds.txt"
    path.write_text('plain review\n\n{"text": "from json"}\n{"input": "other key"}\n')

    assert read_seed_inputs(path) == ["plain review", "from json", "other key"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": "x"}\n')
    with pytest.raises(RetrainError, match=r"bad.jsonl:1: a JSON line needs a string 'text'"):
        read_seed_inputs(bad)
    with pytest.raises(RetrainError, match="cannot read the seed file"):
        read_seed_inputs(tmp_path / "missing.txt")


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_run as t
from distilld.registry import ModelRegistry
from distilld.retrain.run import run_retraining
from distilld.store.sqlite import SqliteStore

tmp = Path(sys.argv[2])
policy = t.write_policy(tmp, Path(sys.argv[3]), Path(sys.argv[4]),
                        t.small_retraining(training={"epochs": 50, "max_tokens": 48}))
registry = ModelRegistry(tmp / "registry")
store = SqliteStore(tmp / "store.sqlite")
run_retraining(t.job_inputs(policy, store, registry, Path(sys.argv[3]), Path(sys.argv[4]),
               live_version="live", live_model_dir=registry.path("live")),
               work_dir=tmp / "work")
"""


@pytest.mark.slow
def test_sigkill_during_training_leaves_the_registry_as_it_was(
    tmp_path: Path, minilm_sentiment_dir: Path, trained_sentiment_dir: Path, reviews: list[Row]
) -> None:
    filled_store(tmp_path / "store.sqlite", reviews).close()
    registry = ModelRegistry(tmp_path / "registry")
    live = registry.register(minilm_sentiment_dir, Manifest(version="live"), copy=True)
    registry.promote(live)
    work = tmp_path / "work"
    tests_dir = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), *sys.path])}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILL_SCRIPT,
            str(Path(__file__).parent),
            str(tmp_path),
            str(minilm_sentiment_dir),
            str(trained_sentiment_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Training has begun once the trainer's private directory exists.
        def training() -> bool:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"the job ended early: {process.stderr.read().decode()[-3000:]}")
            return bool(list(work.glob(".attempt-1.training-*")))

        wait_until(training, 600, interval=0.2, message="the start of training")
        time.sleep(3)  # the kill lands a while into training (50 epochs: far from its end)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()

    registry.repair()
    assert [m.version for m in registry.list()] == [live]
    assert registry.live_version() == live
    assert registry.get(live).state == "live"
