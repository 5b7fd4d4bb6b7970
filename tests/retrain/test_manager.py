"""The retraining manager's loop on a real registry and a real SQLite store, with
stand-ins (labelled) for the parts whose behaviour is not under test: a slot that
records switches instead of loading models, a scripted teacher.

What is under test: failures alert once and leave the live version serving; the
watch after a promotion rolls a worse version back; a shadow run decides on the
stored pairs; the served version follows the registry (``distilld promote``), and
a version that cannot be served is refused once, with the registry rolled back;
after a failed gate the next automatic attempt waits for the cooldown and for new
inputs, at the grown size (the job itself is a stand-in there: what is under test
is when the manager starts one, and with what size); a breach answered by a
promotion starts nothing more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from distilld.alerts import AlertSink
from distilld.monitoring.evaluate import Status, Verdict
from distilld.policy.model import Policy
from distilld.registry import Manifest, ModelRegistry
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.decide import first_size
from distilld.retrain.gate_report import GateCheck, GateReport
from distilld.retrain.manager import RetrainManager
from distilld.retrain.requests import request_retraining
from distilld.retrain.rollout import RolloutState, rollout_state
from distilld.retrain.run import (
    JobInputs,
    JobResult,
    RetrainCancelled,
    RetrainError,
    run_retraining,
)
from distilld.retrain.task import RetrainTask
from distilld.serving.base import Prediction
from distilld.serving.swap import COLD_START_VERSION
from distilld.shadow.task import ShadowTask
from distilld.shadow.worker import ShadowWorker
from distilld.store.base import StoredComparison, TrafficSample
from distilld.store.sqlite import SqliteStore
from distilld.teacher.base import TeacherAnswer, TeacherStatus
from support.records import comparison

LABELS = ["fresh", "rotten"]


class RecordingSlotFake:
    """Stand-in for the serving slot: records switches; can refuse a version."""

    def __init__(self, version: str, refuse: str | None = None) -> None:
        self.version = version
        self.refuse = refuse
        self.switches: list[str] = []

    @property
    def model_version(self) -> str:
        return self.version

    def switch(self, model_dir: Path, version: str) -> None:
        if version == self.refuse:
            raise RuntimeError(f"fake load failure of {model_dir.name}")
        self.switches.append(version)
        self.version = version


class ScriptedTeacherFake:
    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        return [TeacherAnswer("fresh", 0.9) for _ in inputs]

    def status(self) -> TeacherStatus:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConstantCandidateFake:
    """Stand-in for a candidate model loaded for the shadow run."""

    def __init__(self, version: str) -> None:
        self.model_version = version
        self.closed = False

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        return [Prediction("fresh", 0.9) for _ in inputs]

    def close(self) -> None:
        self.closed = True


def policy(**retraining: object) -> Policy:
    return Policy.model_validate(
        {
            "task": "reviews",
            "kind": "classification",
            "labels": LABELS,
            "traffic": {
                "requests_topic": "r.requests",
                "responses_topic": "r.responses",
                "dead_letter_topic": "r.dead-letter",
            },
            "student": {"model": "student"},
            "teacher": {"backend": "transformers", "model": "teacher"},
            "monitors": {"accuracy": {"window": 50, "min_samples": 10}},
            "retraining": retraining,
        }
    )


def registry_with(tmp_path: Path, *versions: str) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    for name in versions:
        model = tmp_path / "models" / name
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        registry.register(model, Manifest(version=name))
    return registry


def manager_for(
    tmp_path: Path,
    pol: Policy,
    registry: ModelRegistry,
    slot: RecordingSlotFake,
    store: SqliteStore,
    base_model: Path | None = None,
    candidates: list[ConstantCandidateFake] | None = None,
    clock: Callable[[], float] = time.time,
) -> RetrainManager:
    assert pol.retraining is not None
    loaded = candidates if candidates is not None else []

    def load_candidate(model_dir: Path, version: str) -> ConstantCandidateFake:
        loaded.append(ConstantCandidateFake(version))
        return loaded[-1]

    task = RetrainTask(
        policy=pol,
        config=pol.retraining,
        teacher=ScriptedTeacherFake(),
        registry=registry,
        slot=slot,
        sink=AlertSink(store, tasks=["reviews"]),
        base_model_dir=base_model or tmp_path / "base",
        load_candidate=load_candidate,  # type: ignore[arg-type]
    )
    # A real shadow worker, not started: the test stores the comparisons itself.
    shadow = ShadowWorker([ShadowTask.from_policy(pol, task.teacher)], store)
    return RetrainManager(
        [task],
        store=store,
        shadow=shadow,
        requests_dir=tmp_path / "requests",
        work_dir=tmp_path / "work",
        clock=clock,
    )


def fill_traffic(store: SqliteStore, count: int) -> None:
    store.add_traffic(
        [
            TrafficSample("reviews", f"review number {i} " * 3, {}, "fresh", 0.9, f"id{i}")
            for i in range(count)
        ]
    )


def kinds(store: SqliteStore) -> list[str]:
    return [a.kind for a in store.last_alerts("reviews", limit=100)]  # oldest first


def compared(
    version: str, scores: list[float], start: float, prefix: str
) -> list[StoredComparison]:
    return [
        comparison(f"{prefix}{i}", version, score, at=start + i * 0.001)
        for i, score in enumerate(scores)
    ]


def test_a_failed_job_alerts_once_and_the_live_version_keeps_serving(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    fill_traffic(store, 300)
    registry = registry_with(tmp_path, "v-live")
    registry.promote("v-live")
    slot = RecordingSlotFake("v-live")
    (tmp_path / "base").mkdir()  # an empty directory: no model to train from
    manager = manager_for(tmp_path, policy(gate={"min_test_examples": 10}), registry, slot, store)

    assert manager.request("reviews", "manual").start
    assert manager.wait_idle("reviews", 120)

    assert kinds(store) == ["retrain.started", "retrain.failed"]
    assert manager.outcomes("reviews") == {"started": 1, "failed": 1}
    failed = store.last_alerts("reviews", limit=1)[0]
    assert "TrainingError" in failed.payload["error"]
    assert "live student keeps serving" in failed.payload["action"]
    assert slot.switches == [] and registry.live_version() == "v-live"
    assert [m.version for m in registry.list()] == ["v-live"]
    assert not list((tmp_path / "work").glob("reviews/job-*"))  # scratch space removed


def test_too_few_inputs_is_a_failure_with_what_to_do(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    registry = registry_with(tmp_path, "v-live")
    registry.promote("v-live")
    manager = manager_for(tmp_path, policy(), registry, RecordingSlotFake("v-live"), store)

    manager.request("reviews", "manual")
    manager.wait_idle("reviews", 60)

    failed = store.last_alerts("reviews", limit=1)[0]
    assert failed.kind == "retrain.failed"
    assert "0 candidate inputs" in failed.payload["error"]
    assert "add retraining.seed_files" in failed.payload["error"]


def test_a_promoted_version_that_does_worse_is_rolled_back(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    registry = registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    store.add_comparisons(compared("v1", [1.0] * 40, time.time() - 100, "old"))
    registry.promote("v2")
    slot = RecordingSlotFake("v2")
    pol = policy(rollback={"min_comparisons": 20, "tolerance": 0.05})
    manager = manager_for(tmp_path, pol, registry, slot, store)

    store.add_comparisons(compared("v2", [1.0] * 10, time.time(), "a"))
    manager.tick()
    assert registry.live_version() == "v2"  # 10 of 20 comparisons: still watching

    store.add_comparisons(compared("v2", [0.0] * 15, time.time(), "b"))
    manager.tick()

    assert registry.live_version() == "v1"
    assert slot.switches == ["v1"]
    assert registry.get("v2").state == "rolled_back"
    rolled = store.last_alerts("reviews", limit=1)[0]
    assert rolled.kind == "retrain.rolled_back"
    assert rolled.value == pytest.approx(10 / 25)
    assert rolled.threshold == pytest.approx(1.0)
    assert manager.state("reviews") is RolloutState.idle  # a rollback is not watched
    manager.tick()  # the rollback itself is not watched: nothing more happens
    assert kinds(store).count("retrain.rolled_back") == 1


def test_a_shadow_run_promotes_on_the_stored_pairs(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    registry = registry_with(tmp_path, "v1", "v2")
    registry.promote("v1")
    registry.set_state("v2", "shadow")
    slot = RecordingSlotFake("v1")
    loaded: list[ConstantCandidateFake] = []
    pol = policy(shadow={"min_comparisons": 5, "tolerance": 0.0})
    manager = manager_for(tmp_path, pol, registry, slot, store, candidates=loaded)

    assert manager.state("reviews") is RolloutState.shadow
    manager.tick()
    assert [c.model_version for c in loaded] == ["v2"]
    assert "retrain.shadow_started" in kinds(store)
    now = time.time()
    store.add_comparisons(compared("v1", [1.0, 0.0, 0.0, 1.0, 0.0], now, "r"))
    store.add_comparisons(compared("v2", [1.0, 1.0, 0.0, 1.0, 1.0], now, "r"))
    manager.tick()

    assert registry.live_version() == "v2" and slot.switches == ["v2"]
    assert manager.state("reviews") is RolloutState.watching
    assert loaded[0].closed
    promoted = store.last_alerts("reviews", limit=1)[0]
    assert promoted.kind == "retrain.promoted"
    assert "candidate 0.8000 vs live 0.4000 on 5" in promoted.payload["why"]


def test_the_daemon_follows_the_registry_and_refuses_an_unservable_version_once(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    registry = registry_with(tmp_path, "v1", "v2", "v3")
    registry.promote("v1")
    slot = RecordingSlotFake("v1", refuse="v3")
    manager = manager_for(tmp_path, policy(), registry, slot, store)

    assert manager.state("reviews") is RolloutState.idle
    registry.promote("v2")  # as `distilld promote reviews v2` does
    assert manager.state("reviews") is RolloutState.promoting
    manager.tick()
    assert slot.switches == ["v2"]

    registry.promote("v3")
    manager.tick()
    manager.tick()

    assert slot.version == "v2"
    assert registry.live_version() == "v2"  # rolled back to what is served
    assert kinds(store).count("retrain.switch_failed") == 1
    failed = store.last_alerts("reviews", limit=1)[0]
    assert "fake load failure" in failed.payload["error"]


def test_a_request_file_starts_a_retraining_and_is_consumed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    registry = registry_with(tmp_path, "v1")
    registry.promote("v1")
    manager = manager_for(
        tmp_path,
        policy(triggers={"manual": {"enabled": False}}),
        registry,
        RecordingSlotFake("v1"),
        store,
    )

    path = request_retraining(tmp_path / "requests", "reviews")
    manager.tick()

    assert not path.exists()
    requested = store.last_alerts("reviews", limit=1)[0]
    assert requested.kind == "retrain.requested"
    assert requested.payload["started"] is False  # the policy forbids it by hand
    assert requested.payload["why"] == "retraining by hand is disabled in the policy"


def test_retraining_config_defaults_match_the_readme() -> None:
    config = RetrainingConfig()

    assert config.triggers.schedule.cron == "0 3 1 */3 *"
    assert config.gate.margin == 0.02
    assert config.size.bounds("classification", 2) == (1000, 5000)
    assert config.size.bounds("extraction") == (5000, 20000)
    assert config.cold_start.serve == "teacher"


def test_a_cancelled_job_stops_at_its_next_step_and_registers_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    fill_traffic(store, 300)
    registry = registry_with(tmp_path, "v-live")
    pol = policy(gate={"min_test_examples": 10})
    assert pol.retraining is not None
    cancel = threading.Event()
    cancel.set()  # as RetrainManager.stop() does when the daemon stops
    job = JobInputs(
        policy=pol,
        config=pol.retraining,
        teacher=ScriptedTeacherFake(),
        store=store,
        registry=registry,
        base_model_dir=tmp_path / "base",
        cancel=cancel,
    )

    with pytest.raises(RetrainCancelled, match="stopped before: attempt 1"):
        run_retraining(job, work_dir=tmp_path / "work")
    assert [m.version for m in registry.list()] == ["v-live"]


def test_the_first_attempt_selects_what_the_gate_needs_not_min_examples(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    fill_traffic(store, 450)
    # 300 inputs would hold out 30 examples, fewer than the 40 the gate requires.
    pol = policy(size={"min_examples": 300, "max_examples": 5000}, gate={"min_test_examples": 40})
    assert pol.retraining is not None
    cancel = threading.Event()
    cancel.set()  # the job stops at its first step, which names its size
    job = JobInputs(
        policy=pol,
        config=pol.retraining,
        teacher=ScriptedTeacherFake(),
        store=store,
        registry=registry_with(tmp_path),
        base_model_dir=tmp_path / "base",
        cancel=cancel,
    )

    with pytest.raises(RetrainCancelled, match="attempt 1: selecting 400 inputs"):
        run_retraining(job, work_dir=tmp_path / "work")


class GarbageTeacherFake:
    """A teacher stand-in whose answers all fail validation, or give nothing."""

    def label(self, inputs: Sequence[str]) -> list[TeacherAnswer]:
        return [
            TeacherAnswer("maybe", 0.9, error="'maybe' is not a label")
            if i % 2
            else TeacherAnswer("", 0.0, error="the endpoint refused the input")
            for i, _ in enumerate(inputs)
        ]

    def status(self) -> TeacherStatus:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_a_filter_that_drops_everything_says_why_per_reason(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    fill_traffic(store, 300)
    pol = policy(gate={"min_test_examples": 10}, size={"min_examples": 100, "max_examples": 100})
    assert pol.retraining is not None
    job = JobInputs(
        policy=pol,
        config=pol.retraining,
        teacher=GarbageTeacherFake(),
        store=store,
        registry=registry_with(tmp_path),
        base_model_dir=tmp_path / "base",
    )

    with pytest.raises(RetrainError, match="dropped all 100 teacher answers") as dropped:
        run_retraining(job, work_dir=tmp_path / "work")
    # Answers outside the label set are invalid outputs; empty ones teacher errors.
    assert "'invalid_output': 50" in str(dropped.value)
    assert "'teacher_error': 50" in str(dropped.value)


# --------------------------------------------------------------------------- retries


class ClockFake:
    """The manager's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class JobFake:
    """Stand-in for run_retraining: records each job's inputs and answers with a gate
    that failed for lack of held-out examples, or (``register``) registers a version.
    ``release`` lets a job run until the test sets it."""

    def __init__(self, register: bool = False) -> None:
        self.jobs: list[JobInputs] = []
        self.register = register
        self.release = threading.Event()
        self.release.set()

    def __call__(self, job: JobInputs, *, work_dir: Path) -> JobResult:
        self.jobs.append(job)
        assert self.release.wait(30)
        size = job.start_size or first_size(job.config, "classification", 2)
        failed = GateCheck(
            "test_set_size", "examples", 30.0, 40.0, False, "30, fewer than the 40 required", 30
        )
        gate = GateReport("classification", "accuracy", "teacher", 0.02, 30, {}, (failed,))
        attempt = {
            "attempt": 1,
            "size": size,
            "selection": {"selected": size, "eligible": size},
            "filtering": {"total": size, "kept": size * 3 // 4},
            "split": {"sizes": {"train": 240, "validation": 30, "test": 30}},
        }
        if not self.register:
            return JobResult("gate_failed", None, gate, attempts=[attempt], data=attempt)
        model = work_dir / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        version = job.registry.register(model, Manifest(task="reviews"))
        passed = GateReport("classification", "accuracy", "teacher", 0.02, 30, {}, ())
        return JobResult("registered", version, passed, attempts=[attempt], data=attempt)


def add_traffic_at(store: SqliteStore, count: int, at: float, prefix: str) -> None:
    store.add_traffic(
        [
            TrafficSample(
                "reviews", f"{prefix} review {i}", {}, "fresh", 0.9, f"{prefix}{i}", None, at
            )
            for i in range(count)
        ]
    )


def started(store: SqliteStore) -> list[str]:
    return [
        a.payload["trigger"]
        for a in store.last_alerts("reviews", 200)
        if a.kind == "retrain.started"
    ]


def test_a_failed_cold_start_waits_for_the_cooldown_and_new_inputs_then_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = JobFake()
    monkeypatch.setattr("distilld.retrain.jobs.run_retraining", fake)
    clock = ClockFake(10_000.0)
    store = SqliteStore(tmp_path / "store.sqlite")
    add_traffic_at(store, 400, clock.now - 100, "old")
    registry = registry_with(tmp_path)  # nothing live: the teacher answers (cold start)
    slot = RecordingSlotFake(COLD_START_VERSION)
    pol = policy(
        size={"min_examples": 300, "max_examples": 5000, "growth_factor": 2.0},
        gate={"min_test_examples": 40},
        cold_start={"retry_s": 60},
    )
    manager = manager_for(tmp_path, pol, registry, slot, store, clock=clock)

    manager.tick()  # 400 inputs are what the gate needs: the first student is trained
    assert manager.wait_idle("reviews", 30)
    assert started(store) == ["cold_start"]
    failed = store.last_alerts("reviews", limit=1)[0]
    assert failed.kind == "retrain.gate_failed"
    # Nothing was live: the message says who answers, not "the live student".
    assert "live student" not in failed.payload["action"]
    assert "no student is live: the teacher keeps answering requests" in failed.payload["action"]
    assert "with at least 800 inputs, 400 of them new" in failed.payload["action"]
    assert failed.payload["next_attempt"]["size"] == 800

    # The cooldown passes; no new traffic: no second job on the same inputs.
    clock.now += 61
    manager.tick()
    manager.tick()
    assert manager.wait_idle("reviews", 30)
    assert len(fake.jobs) == 1 and started(store) == ["cold_start"]
    # Nor after a restart: the wait is in the failure's alert.
    restarted = manager_for(tmp_path, pol, registry, slot, store, clock=clock)
    restarted.tick()
    assert restarted.wait_idle("reviews", 30) and len(fake.jobs) == 1

    # 399 new inputs are not enough; 400 are, and the next job selects the grown size.
    add_traffic_at(store, 399, clock.now + 1, "new")
    clock.now += 61
    manager.tick()
    assert manager.wait_idle("reviews", 30) and len(fake.jobs) == 1
    add_traffic_at(store, 1, clock.now + 1, "newer")
    clock.now += 61
    manager.tick()
    assert manager.wait_idle("reviews", 30)
    assert len(fake.jobs) == 2 and started(store) == ["cold_start", "cold_start"]
    assert fake.jobs[1].start_size == 800


def test_a_failed_breach_retraining_waits_for_new_inputs_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = JobFake()
    monkeypatch.setattr("distilld.retrain.jobs.run_retraining", fake)
    registry = registry_with(tmp_path, "v1")
    registry.promote("v1")
    clock = ClockFake(time.time() + 1)  # after v1 went live
    store = SqliteStore(tmp_path / "store.sqlite")
    add_traffic_at(store, 1000, clock.now - 100, "old")
    pol = policy(
        size={"min_examples": 1000, "max_examples": 5000},
        triggers={"on_breach": {"cooldown_s": 600}},
    )
    manager = manager_for(tmp_path, pol, registry, RecordingSlotFake("v1"), store, clock=clock)
    breach = [Verdict("reviews", "accuracy", "", Status.breach, 0.5, 0.8, 50, 50)]

    manager.after_check("reviews", breach, "v1", clock.now)
    assert manager.wait_idle("reviews", 30) and len(fake.jobs) == 1
    failed = store.last_alerts("reviews", limit=1)[0]
    assert "the live student keeps serving (v1)" in failed.payload["action"]

    clock.now += 601  # the cooldown is over, the breach persists, no new input
    manager.after_check("reviews", breach, "v1", clock.now)
    assert manager.wait_idle("reviews", 30) and len(fake.jobs) == 1

    add_traffic_at(store, 1000, clock.now + 1, "new")
    clock.now += 601
    manager.after_check("reviews", breach, "v1", clock.now)
    assert manager.wait_idle("reviews", 30) and len(fake.jobs) == 2
    assert fake.jobs[1].start_size == 2000


def test_a_breach_answered_by_a_promotion_starts_no_second_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = JobFake(register=True)
    monkeypatch.setattr("distilld.retrain.jobs.run_retraining", fake)
    store = SqliteStore(tmp_path / "store.sqlite")
    add_traffic_at(store, 1000, time.time() - 100, "old")
    registry = registry_with(tmp_path, "v1")
    registry.promote("v1")
    slot = RecordingSlotFake("v1")
    pol = policy(shadow={"enabled": False}, triggers={"on_breach": {"cooldown_s": 0}})
    manager = manager_for(tmp_path, pol, registry, slot, store)
    breach = [Verdict("reviews", "accuracy", "", Status.breach, 0.5, 0.8, 50, 50)]

    fake.release.clear()
    manager.after_check("reviews", breach, "v1", time.time())
    checked_while_running = time.time()
    manager.after_check("reviews", breach, "v1", checked_while_running)  # skipped: running
    fake.release.set()
    assert manager.wait_idle("reviews", 30)
    assert slot.version == registry.live_version() != "v1"

    # A check that measured v1 while the job ran hands its breach over after the promotion.
    manager.after_check("reviews", breach, "v1", checked_while_running)
    assert manager.wait_idle("reviews", 30)
    assert started(store) == ["breach"] and len(fake.jobs) == 1

    # A breach measured on the new live version does start one.
    manager.after_check("reviews", breach, slot.version, time.time())
    assert manager.wait_idle("reviews", 30)
    assert started(store) == ["breach", "breach"]


def test_the_rollout_state_names_the_later_step_first() -> None:
    def state(**holds: bool) -> RolloutState:
        flags = {"training": False, "in_shadow": False, "promoting": False, "watching": False}
        return rollout_state(**{**flags, **holds})

    assert state() is RolloutState.idle
    assert state(training=True) is RolloutState.training
    # a request by hand trains during a shadow run or a watch
    assert state(training=True, in_shadow=True) is RolloutState.shadow
    assert state(training=True, watching=True) is RolloutState.watching
    assert state(in_shadow=True, watching=True, promoting=True) is RolloutState.promoting
