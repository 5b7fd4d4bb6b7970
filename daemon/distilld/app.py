"""The one place that builds and wires the daemon from settings and policies.

Each component receives only the values it needs (a KafkaConfig, a TaskRoute,
a model directory); nothing below this module reads the global settings.
Lifecycle: every resource is entered on an ExitStack so that SIGTERM, an error
or a normal stop closes them in reverse order (loops drained, producer
flushed, models released, embedded broker stopped).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from kafka import KafkaProducer

from distilld.alerts import AlertSink
from distilld.errors import ConfigError, MonitoringError, RegistryError
from distilld.log import alert, get_logger
from distilld.logfiles import LogRotation
from distilld.modelpaths import resolve_data_file, resolve_model_dir
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.features import (
    REFERENCE_FILE,
    Reference,
    load_reference,
    save_reference,
)
from distilld.monitoring.measure import CheckOutcome, run_check
from distilld.ops.daemon import DaemonAdmin, DaemonMetrics, readiness_probes
from distilld.ops.http import OpsConfig, OpsServer
from distilld.policy.evaluate import Verdict
from distilld.policy.model import Architecture, Policy, TaskKind, VllmPolicy
from distilld.policy.watch import PolicyWatcher
from distilld.preflight import (
    check_policies,
    check_vllm_student,
    external_student,
    preflight,
    vllm_student_api_key,
)
from distilld.registry import VERSION_PATTERN, Manifest, ModelRegistry
from distilld.retention import Retention, RetentionConfig
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.manager import ModelSlot, RetrainManager, RetrainTask
from distilld.scheduler import MonitorJob, MonitorScheduler
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.local import load_local_student
from distilld.serving.swap import (
    LocalSlot,
    NoStudentYet,
    SwappableStudent,
    TeacherAsStudent,
    VllmSlot,
)
from distilld.serving.vllm import VllmStudent, VllmTarget
from distilld.serving.vllm_deployment import VllmDeployment
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from distilld.settings import KafkaConfig, Settings
from distilld.shadow.worker import ShadowTask, ShadowWorker
from distilld.store.sqlite import SqliteStore
from distilld.teacher.base import Teacher
from distilld.teacher.build import make_teacher
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import ServingLoop, ServingStats, TaskRoute
from distilld.traffic.records import Request

_T = TypeVar("_T")


def route_for(policy: Policy) -> TaskRoute:
    return TaskRoute(
        task=policy.task,
        requests_topic=policy.traffic.requests_topic,
        responses_topic=policy.traffic.responses_topic,
        dead_letter_topic=policy.traffic.dead_letter_topic,
        max_input_chars=policy.traffic.max_input_chars,
        batch_max_size=policy.student.batch.max_size,
        batch_max_wait_ms=policy.student.batch.max_wait_ms,
    )


def all_topics(policies: dict[str, Policy], settings: Settings) -> list[str]:
    topics = {settings.fallback_dead_letter_topic}
    for p in policies.values():
        topics |= {p.traffic.requests_topic, p.traffic.responses_topic, p.traffic.dead_letter_topic}
        if p.alerts.topic:
            topics.add(p.alerts.topic)
    return sorted(topics)


def open_registries(policies: dict[str, Policy], settings: Settings) -> dict[str, ModelRegistry]:
    """The model registry of each task that retrains (a folder per task under
    DISTILLD_REGISTRY_DIR). Its policy's student becomes the first live version
    when nothing is live yet, so that the first retrained version can be rolled
    back to it."""
    registries: dict[str, ModelRegistry] = {}
    for task, policy in sorted(policies.items()):
        retraining = policy.retraining
        if retraining is None or not retraining.enabled:
            continue
        registry = ModelRegistry(
            settings.registry_root / task, keep_last=retraining.registry.keep_last
        )
        registry.repair()
        adopt_policy_student(policy, settings, registry)
        registries[task] = registry
    return registries


def adopt_policy_student(policy: Policy, settings: Settings, registry: ModelRegistry) -> None:
    if registry.live_version() is not None or policy.student.model is None:
        return
    if external_student(policy):
        return  # served elsewhere: the daemon has no files to keep
    model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
    name = model_dir.name
    taken = re.fullmatch(VERSION_PATTERN, name) is None or registry.path(name).exists()
    reference = REFERENCE_FILE if (model_dir / REFERENCE_FILE).is_file() else None
    try:
        version = registry.register(
            model_dir,
            Manifest(
                version="" if taken else name,
                task=policy.task,
                reference_distribution=reference,
                extra={"adopted_from": str(model_dir)},
            ),
            copy=True,
        )
    except RegistryError:
        # Another replica sharing the registry adopted it first.
        if registry.live_version() is not None:
            return
        if taken or not registry.path(name).is_dir():
            raise
        version = name
    registry.promote(version)  # promoting the live version again changes nothing
    get_logger("retrain").info(
        "registry.adopted",
        task=policy.task,
        version=version,
        model_dir=str(model_dir),
        note="the policy's student is the first live version of the task's registry",
    )


def served_model(
    policy: Policy, settings: Settings, registry: ModelRegistry | None
) -> tuple[Path, str] | None:
    """The model directory and version to serve: the registry's live version, else the
    policy's student.model, else None (a cold start)."""
    if registry is not None:
        live = registry.live_version()
        if live is not None:
            return registry.path(live), live
    if policy.student.model is None:
        return None
    model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
    return model_dir, model_dir.name


@dataclass
class Students:
    """What serves each task: the backends the loops call, and the slots the
    retraining manager switches (one per task)."""

    backends: dict[str, StudentBackend]
    slots: dict[str, ModelSlot]
    vllm: dict[str, VllmDeployment]


def load_students(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    stop: threading.Event,
    registries: dict[str, ModelRegistry],
    teachers: dict[str, Teacher],
) -> Students:
    """One backend per task, closed by ``stack``. vLLM tasks also get a deployment
    (version switches; managed servers started and watched)."""
    log = get_logger("app")
    students = Students(backends={}, slots={}, vllm={})
    for task, policy in sorted(policies.items()):
        # An external vLLM server serves its own files: nothing to find here.
        served = (
            None
            if external_student(policy)
            else served_model(policy, settings, registries.get(task))
        )
        if policy.student.backend == "vllm":
            deployment = vllm_deployment(policy, settings, stack, stop, served)
            students.vllm[task] = deployment
            students.backends[task] = deployment.student
            students.slots[task] = VllmSlot(deployment)
        else:
            initial: StudentBackend
            if served is not None:
                initial = load_local_student(policy, served[0], model_version=served[1])
            else:
                teacher = teachers.get(task)
                cold = policy.retraining.cold_start if policy.retraining else None
                if cold is not None and cold.serve == "teacher" and teacher is not None:
                    initial = TeacherAsStudent(teacher)
                else:
                    initial = NoStudentYet(task)
                log.info(
                    "student.cold_start",
                    task=task,
                    serving=initial.model_version,
                    note="no student yet: the first one is trained from retraining.base_model",
                )
            swappable = SwappableStudent(initial)
            stack.callback(swappable.close)
            students.backends[task] = swappable
            students.slots[task] = LocalSlot(swappable, functools.partial(_load_version, policy))
        log.info(
            "student.loaded",
            task=task,
            backend=policy.student.backend,
            architecture=policy.student.architecture.value,
            model_version=students.backends[task].model_version,
        )
    return students


def _load_version(policy: Policy, model_dir: Path, version: str) -> StudentBackend:
    return load_local_student(policy, model_dir, model_version=version)


def vllm_deployment(
    policy: Policy,
    settings: Settings,
    stack: ExitStack,
    stop: threading.Event,
    served: tuple[Path, str] | None,
) -> VllmDeployment:
    """The vLLM student of a task: an external server, or one the daemon starts and watches
    on ``served`` (the model directory and its version)."""
    options = policy.student.vllm or VllmPolicy()
    server: ManagedVllmServer | None = None
    check_vllm_student(policy, settings.vllm_python, cold_start=served is None)
    # A managed server without a configured key gets one of its own: no other
    # process on the machine may load adapters into it or query it.
    api_key = vllm_student_api_key(policy, settings.secrets_dir)
    if options.base_url:
        base_url = options.base_url.rstrip("/")
        name = options.served_model_name or policy.student.model
        assert name is not None  # check_vllm_student refuses an external server without one
        version = name
    else:
        assert settings.vllm_python is not None and served is not None  # checked above
        model_dir, version = served
        name = options.served_model_name or model_dir.name
        log_dir = settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        server = ManagedVllmServer(
            VllmServerConfig(
                python=settings.vllm_python,
                model_dir=model_dir,
                served_model_name=name,
                log_path=log_dir / f"vllm-{policy.task}.log",
                max_model_len=options.max_model_len,
                enforce_eager=options.enforce_eager,
                dtype=options.dtype,
                ready_timeout_s=options.start_timeout_s,
                log_rotation=log_rotation(settings),
                api_key=api_key or secrets.token_urlsafe(32),
            )
        )
        api_key = server.config.api_key
        stack.enter_context(server)
        base_url = server.base_url
    if policy.student.architecture is Architecture.sequence_classification:
        kind = "classify"
    else:
        kind = "choice" if policy.kind is TaskKind.classification else "json"
    target = VllmTarget(
        base_url=base_url,
        model=name,
        kind=kind,
        labels=tuple(policy.labels or ()),
        schema=policy.output_schema,
        prompt=policy.prompt,
        max_new_tokens=policy.student.max_new_tokens,
        max_input_tokens=policy.student.max_input_tokens,
        truncation_side=policy.student.truncation_side,
        top_logprobs=options.top_logprobs,
        concurrency=options.concurrency,
        timeout_s=options.timeout_s,
    )
    deployment = VllmDeployment(
        policy.task, VllmStudent(target, model_version=version, api_key=api_key), server
    )
    stack.callback(deployment.close)
    if server is not None:
        watchdog = threading.Thread(
            target=deployment.watch,
            args=(stop,),
            name=f"vllm-watchdog-{policy.task}",
            daemon=True,
        )
        watchdog.start()
    return deployment


# A check's verdicts, the version it measured and when (the retraining manager
# starts nothing on a breach measured before the live version went live).
AfterCheck = Callable[[str, list[Verdict], str | None, float], None]


@dataclass
class CheckHooks:
    """Who hears each check's verdicts (the retraining manager, once it exists)."""

    after_check: list[AfterCheck] = field(default_factory=list)

    def __call__(
        self, task: str, verdicts: list[Verdict], measured_on: str | None, checked_at: float
    ) -> None:
        for hook in self.after_check:
            hook(task, verdicts, measured_on, checked_at)


@dataclass
class Monitoring:
    """The watching side of the daemon: sample store, shadow comparisons with the
    teacher, alert sinks and the scheduled checks."""

    store: SqliteStore
    shadow: ShadowWorker
    scheduler: MonitorScheduler
    sinks: dict[str, AlertSink]
    hooks: CheckHooks

    def on_answered(self, request: Request, prediction: Prediction, model_version: str) -> None:
        """The serving loop's hook: hand the answer over; returns at once."""
        self.shadow.offer(
            request.task,
            request.id,
            request.input,
            request.metadata,
            prediction.output,
            prediction.confidence,
            model_version,
        )


def drift_reference(model_dir: Path | None, pinned: Path | None = None) -> Reference | None:
    """The drift reference saved with a student (in its model directory), else the one
    pinned for its version outside it (``pinned``); None: none yet (one is pinned from
    the first requests the version answers)."""
    candidates = [model_dir / REFERENCE_FILE] if model_dir is not None else []
    candidates += [pinned] if pinned is not None else []
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        get_logger("monitoring").info(
            "monitoring.no_saved_reference",
            model_dir=str(model_dir) if model_dir is not None else None,
            expected=[str(p) for p in candidates],
            action="a drift reference is pinned from the first requests this version answers; "
            "drift is measured from then on",
        )
        return None
    for path in existing:
        try:
            return load_reference(path)
        except MonitoringError as exc:  # serving matters more than one monitor's reference
            alert(
                get_logger("monitoring"),
                "monitoring.reference_unreadable",
                severity="error",
                path=str(path),
                error=str(exc),
                action="serving anyway; drift is measured against a reference pinned from "
                "the first requests this version answers",
            )
    return None


#: Pinned drift references of versions outside a registry, under the state directory.
PINNED_REFERENCES_DIR = "drift-references"


@dataclass(frozen=True)
class ReferencePins:
    """Where the drift reference pinned for a version of one task is saved: in the
    version's registry directory (named in its manifest, as a trained version's is)
    when the task's registry has the version, else under the state directory."""

    task: str
    state_dir: Path
    registry: ModelRegistry | None = None

    def outside(self, version: str) -> Path:
        """The state-directory file of ``version`` (a registry version's is in it)."""
        name = version if re.fullmatch(VERSION_PATTERN, version) else _digest(version)
        return self.state_dir / PINNED_REFERENCES_DIR / self.task / name / REFERENCE_FILE

    def save(self, version: str, reference: Reference) -> Path:
        """Save ``reference`` for ``version``; returns the file written."""
        if self.registry is not None:
            try:
                version_dir = self.registry.path(version)
                if version_dir.is_dir():
                    save_reference(reference, version_dir / REFERENCE_FILE)
                    self.registry.update(version, reference_distribution=REFERENCE_FILE)
                    return version_dir / REFERENCE_FILE
            except (OSError, RegistryError) as exc:
                get_logger("monitoring").warning(
                    "drift.reference_not_in_registry",
                    task=self.task,
                    version=version,
                    error=str(exc),
                    action="saved under the state directory instead",
                )
        path = self.outside(version)
        save_reference(reference, path)
        return path


def _digest(text: str) -> str:
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def active_monitors(policy: Policy) -> MonitorsConfig:
    """The policy's monitors, less accuracy when there is no teacher to compare with
    (it could never reach a verdict; drift needs no teacher)."""
    monitors = policy.monitors
    if policy.teacher is None and monitors.accuracy.enabled:
        accuracy = monitors.accuracy.model_copy(update={"enabled": False})
        monitors = monitors.model_copy(update={"accuracy": accuracy})
    return monitors


class LiveReference:
    """The drift reference of the version being served, reloaded when a promotion or a
    rollback changes the version. With ``pins``, a reference pinned for a version
    that came without one (:meth:`pin`, called by the check that fitted it) is saved
    with the version and found again after a restart."""

    def __init__(
        self,
        model_dir: Callable[[], Path | None],
        version: Callable[[], str | None] | None = None,
        pins: ReferencePins | None = None,
    ) -> None:
        self._model_dir = model_dir
        self._version = version
        self._pins = pins
        self._loaded_for: tuple[Path | None, str | None] | None = None
        self._reference: Reference | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Reference | None:
        model_dir = self._model_dir()
        version = self._version() if self._version is not None else None
        with self._lock:
            if (model_dir, version) != self._loaded_for:
                pinned = (
                    self._pins.outside(version)
                    if self._pins is not None and version is not None
                    else None
                )
                self._reference = drift_reference(model_dir, pinned)
                self._loaded_for = (model_dir, version)
            return self._reference

    def pin(self, version: str, reference: Reference) -> None:
        """Keep ``reference``, fitted on the first requests ``version`` answered, as that
        version's reference, and save it with the version (see run_check's ``pin``)."""
        log = get_logger("monitoring")
        path: Path | None = None
        if self._pins is not None:
            try:
                path = self._pins.save(version, reference)
            except OSError as exc:
                alert(
                    log,
                    "drift.reference_not_saved",
                    severity="warning",
                    task=self._pins.task,
                    version=version,
                    error=str(exc),
                    action="drift is measured against it until the daemon stops; a restart "
                    "pins a new one; check that the state directory is writable",
                )
        log.info(
            "drift.reference_pinned",
            task=self._pins.task if self._pins is not None else None,
            version=version,
            rows=len(reference.frame),
            path=str(path) if path is not None else None,
            note="this version came without a drift reference: its first requests are its "
            "reference until another version is live",
        )
        with self._lock:
            if self._loaded_for is not None and self._loaded_for[1] == version:
                self._reference = reference


def check_task(
    policy: Policy,
    store: SqliteStore,
    sink: AlertSink,
    reports_dir: Path,
    reference: Callable[[], Reference | None],
    model_version: Callable[[], str | None],
    after: AfterCheck | None = None,
    *,
    pin: Callable[[str, Reference], None] | None = None,
) -> CheckOutcome:
    """One monitoring check of a task: measure, evaluate, alert (once per breach), then
    hand the verdicts to ``after`` (the retraining manager's breach trigger). A live
    version without a drift reference gets one from its first requests, handed to
    ``pin`` (LiveReference.pin) to be saved with it."""
    version = model_version()  # read once: the verdicts are tied to it
    outcome = run_check(
        policy.task,
        kind=policy.kind.value,
        monitors=active_monitors(policy),
        store=store,
        reference=reference(),
        reports_dir=reports_dir if policy.monitors.save_reports else None,
        model_version=version,
        pin=pin,
        # The version's first requests must still be in the bounded reservoir.
        pin_size=min(policy.monitors.drift.reference_size, store.reservoir_per_task),
        max_values_per_key=policy.sampling.max_values_per_key,
    )
    sink.handle(policy.task, outcome.verdicts)
    get_logger("monitoring").info(
        "monitor.checked",
        task=policy.task,
        verdicts={f"{v.metric}:{v.segment or 'overall'}": v.status.value for v in outcome.verdicts},
        report_dir=str(outcome.report_dir) if outcome.report_dir else None,
    )
    if after is not None:
        after(policy.task, list(outcome.verdicts), version, outcome.checked_at)
    return outcome


def existing_store(settings: Settings) -> SqliteStore:
    """The store a daemon wrote (for `check` and `status`), never a new empty one."""
    if not settings.store_path.is_file():
        raise ConfigError(
            f"no sample store at {settings.store_path}: the daemon has not run with "
            f"DISTILLD_STATE_DIR={settings.state_dir} yet (set it to the daemon's state directory)"
        )
    return SqliteStore(settings.store_path)


def check_once(
    settings: Settings, policies: dict[str, Policy], tasks: list[str] | None = None
) -> list[CheckOutcome]:
    """``distilld check``: one check of each task now, on the daemon's store.

    Alerts are logged and stored (once per breach: the state is shared with the
    daemon through the store); they are not produced to the alerts topic. The
    live version is the one that answered the newest request."""
    unknown = sorted(set(tasks or []) - set(policies))
    if unknown:
        raise ConfigError(
            f"no policy for task(s) {unknown}; the policies directory defines {sorted(policies)}"
        )
    store = existing_store(settings)
    try:
        outcomes = []
        for task in tasks or sorted(policies):
            policy = policies[task]
            newest = store.reservoir(task, limit=1)
            version = newest[0].model_version if newest else None
            reference = LiveReference(
                functools.partial(_same, current_model_dir(policy, settings)),
                functools.partial(_same, version),
                ReferencePins(task, settings.state_dir, _existing_registry(policy, settings)),
            )
            sink = AlertSink(store, tasks=[task])
            outcomes.append(
                check_task(
                    policy,
                    store,
                    sink,
                    settings.reports_dir,
                    reference,
                    functools.partial(_same, version),
                    pin=reference.pin,
                )
            )
        return outcomes
    finally:
        store.close()


def build_teachers(
    policies: dict[str, Policy], settings: Settings, stack: ExitStack
) -> dict[str, Teacher]:
    """The teacher of each task that has one, closed by ``stack``."""
    teachers: dict[str, Teacher] = {}
    for task, policy in sorted(policies.items()):
        teacher = make_teacher(policy, settings.models_dir, secrets_dir=settings.secrets_dir)
        if teacher is not None:
            stack.callback(teacher.close)
            teachers[task] = teacher
    return teachers


def start_monitoring(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    students: Students,
    teachers: dict[str, Teacher],
    registries: dict[str, ModelRegistry],
    send: Callable[[str, bytes], None] | None,
) -> Monitoring:
    """Open the store, start the shadow worker and the scheduler."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(settings.store_path)
    stack.callback(store.close)
    hooks = CheckHooks()
    sinks: dict[str, AlertSink] = {}
    shadow_tasks: list[ShadowTask] = []
    jobs: list[MonitorJob] = []
    for task, policy in sorted(policies.items()):
        backend = students.backends[task]
        model_dir = functools.partial(_served_dir, policy, settings, registries.get(task), backend)
        reference = LiveReference(
            model_dir,
            _version_of(backend),
            ReferencePins(task, settings.state_dir, registries.get(task)),
        )
        first = reference()
        vocabulary = first.profile.vocabulary if first is not None else None
        shadow_tasks.append(
            ShadowTask.from_policy(policy, teachers.get(task), vocabulary=vocabulary)
        )
        topic = policy.alerts.topic
        sinks[task] = AlertSink(store, send=send if topic else None, topic=topic, tasks=[task])
        monitors = active_monitors(policy)
        if monitors.accuracy.enabled or monitors.drift.enabled:
            check = functools.partial(
                check_task,
                policy,
                store,
                sinks[task],
                settings.reports_dir,
                reference,
                _version_of(backend),
                hooks,
                pin=reference.pin,
            )
            jobs.append(MonitorJob(task, policy.monitors.interval_s, check))
    retention = Retention(
        retention_config(settings),
        store,
        settings.reports_dir,
        settings.retraining_dir,
        list(policies.values()),
    )
    retention.run()  # once now, then every interval on the scheduler
    shadow = ShadowWorker(shadow_tasks, store)
    shadow.start()
    scheduler = MonitorScheduler(jobs)
    scheduler.every("retention", retention.config.interval_s, retention.run)
    # Stop order (reverse of registration): scheduler, then the shadow worker,
    # then the teachers and the store registered before.
    stack.callback(shadow.stop)
    scheduler.start()
    stack.callback(scheduler.stop)
    return Monitoring(store=store, shadow=shadow, scheduler=scheduler, sinks=sinks, hooks=hooks)


def start_retraining(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    students: Students,
    teachers: dict[str, Teacher],
    registries: dict[str, ModelRegistry],
    monitoring: Monitoring,
) -> RetrainManager | None:
    """The retraining manager of the tasks whose policy has retraining enabled."""
    tasks: list[RetrainTask] = []
    for task, registry in sorted(registries.items()):
        policy = policies[task]
        config = policy.retraining
        teacher = teachers.get(task)
        if config is None or teacher is None:
            continue
        base = config.base_model or policy.student.model
        assert base is not None  # the policy refuses a task with neither
        tasks.append(
            RetrainTask(
                policy=policy,
                config=config,
                teacher=teacher,
                registry=registry,
                slot=students.slots[task],
                sink=monitoring.sinks[task],
                base_model_dir=resolve_model_dir(
                    settings.models_dir, base, field="retraining.base_model"
                ),
                seed_files=_seed_files(config, settings),
                flags_file=_flags_file(config, settings),
                load_candidate=functools.partial(_load_version, policy),
            )
        )
    if not tasks:
        return None
    manager = RetrainManager(
        tasks,
        store=monitoring.store,
        shadow=monitoring.shadow,
        requests_dir=settings.requests_dir,
        work_dir=settings.retraining_dir,
        tick_s=settings.retrain_tick_s,
        reservoir_size=monitoring.store.reservoir_per_task,
    )
    monitoring.hooks.after_check.append(manager.after_check)
    manager.start()
    stack.callback(manager.stop)
    manager.tick()  # finish a promotion a crash interrupted before serving starts
    return manager


def start_ops(
    settings: Settings,
    stack: ExitStack,
    policies: dict[str, Policy],
    loops: list[ServingLoop],
    students: Students,
    teachers: dict[str, Teacher],
    registries: dict[str, ModelRegistry],
    monitoring: Monitoring,
    retraining: RetrainManager | None,
) -> OpsServer | None:
    """The HTTP endpoints (health, readiness, metrics, admin API), unless disabled."""
    if not settings.http_enabled:
        return None
    config = OpsConfig(
        host=settings.http_host,
        port=settings.http_port,
        admin_token=settings.admin_secret(),
        public_status=settings.http_public_status,
        max_connections=settings.http_max_connections,
        request_timeout_s=settings.http_request_timeout_s,
    )
    server = OpsServer(
        config,
        probes=readiness_probes(loops, students.backends),
        collect=DaemonMetrics(
            policies,
            loops,
            students.backends,
            teachers,
            monitoring.store,
            monitoring.shadow,
            retraining,
        ),
        admin=DaemonAdmin(policies, monitoring.store, registries, retraining),
    )
    stack.enter_context(server)
    get_logger("ops").info(
        "ops.listening",
        url=server.url,
        admin="enabled" if config.token is not None else "read-only (no DISTILLD_ADMIN_TOKEN)",
    )
    return server


def _seed_files(config: RetrainingConfig, settings: Settings) -> list[Path]:
    """``retraining.seed_files``, each relative to the policies directory and confined
    to it or DISTILLD_DATA_DIR (a ConfigError names the one that is not)."""
    return [
        resolve_data_file(
            name,
            settings.policies_dir,
            settings.data_dir,
            field=f"retraining.seed_files[{index}]",
        )
        for index, name in enumerate(config.seed_files)
    ]


def _flags_file(config: RetrainingConfig, settings: Settings) -> Path | None:
    """``retraining.filtering.flags_file``, confined like the seed files."""
    name = config.filtering.flags_file
    if name is None:
        return None
    return resolve_data_file(
        name, settings.policies_dir, settings.data_dir, field="retraining.filtering.flags_file"
    )


def log_rotation(settings: Settings) -> LogRotation:
    """How the logs of the child processes (vLLM, Tansu) are capped."""
    return LogRotation(max_bytes=settings.log_max_bytes, backups=settings.log_backups)


def retention_config(settings: Settings) -> RetentionConfig:
    """What the retention sweeps keep (reports per task, rows by age)."""
    return RetentionConfig(
        max_age_s=settings.retention_days * 86_400.0,
        reports_per_task=settings.retention_reports_per_task,
        interval_s=settings.retention_interval_s,
    )


def _served_dir(
    policy: Policy, settings: Settings, registry: ModelRegistry | None, backend: StudentBackend
) -> Path | None:
    """The directory of the version being served (None: not readable here)."""
    version = backend.model_version
    if registry is not None:
        try:
            path = registry.path(version)
        except RegistryError:
            path = None
        if path is not None and path.is_dir():
            return path
    return current_model_dir(policy, settings)


def _existing_registry(policy: Policy, settings: Settings) -> ModelRegistry | None:
    """The task's registry when it retrains and its directory exists (for commands)."""
    root = settings.registry_root / policy.task
    retraining = policy.retraining
    if retraining is None or not retraining.enabled or not root.is_dir():
        return None
    return ModelRegistry(root)


def current_model_dir(policy: Policy, settings: Settings) -> Path | None:
    """The live model directory when the daemon can read it: the registry's live version,
    else the policy's student (None: an external server, or no student yet)."""
    if external_student(policy):
        return None
    root = settings.registry_root / policy.task
    retraining = policy.retraining
    retrains = retraining is not None and retraining.enabled and root.is_dir()
    try:
        served = served_model(policy, settings, ModelRegistry(root) if retrains else None)
    except ConfigError:
        return None
    return served[0] if served is not None else None


def _same(value: _T) -> _T:
    return value


def _version_of(backend: StudentBackend) -> Callable[[], str]:
    # Read at each check: a promotion changes the live version.
    return lambda: backend.model_version


@contextmanager
def kafka_connection(settings: Settings, log_dir: Path | None = None) -> Iterator[KafkaConfig]:
    """The configured cluster, or an embedded Tansu broker for as long as the block runs."""
    if settings.kafka_bootstrap_servers:
        yield settings.kafka()
        return
    log_path = (log_dir / "tansu.log") if log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(
        binary=settings.tansu_binary, log_path=log_path, log_rotation=log_rotation(settings)
    ) as broker:
        yield settings.kafka(broker.bootstrap_servers)


@dataclass
class RunningDaemon:
    """Handle on a running daemon: its Kafka config, its loops' stats, its vLLM
    deployments (model version switches) and a stop switch."""

    kafka: KafkaConfig
    stop_event: threading.Event
    loops: list[ServingLoop]
    vllm: dict[str, VllmDeployment]
    monitoring: Monitoring
    retraining: RetrainManager | None = None
    students: Students | None = None
    ops: OpsServer | None = None

    def stats(self) -> list[ServingStats]:
        return [loop.stats for loop in self.loops]

    def stop(self) -> None:
        self.stop_event.set()

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until every loop has joined its consumer group (partitions assigned)."""
        deadline = time.monotonic() + timeout_s
        return all(loop.assigned.wait(max(0.0, deadline - time.monotonic())) for loop in self.loops)


@contextmanager
def running_daemon(
    settings: Settings, policies: dict[str, Policy], stop_event: threading.Event | None = None
) -> Iterator[RunningDaemon]:
    """Start every part, yield while the loops serve on their threads, then shut down.
    Raises ConfigError before starting anything when the policies cannot start here
    (see :func:`distilld.preflight.check_policies`)."""
    log = get_logger("app")
    stop = stop_event or threading.Event()
    preflight(settings, policies)
    with ExitStack() as stack:
        kafka = stack.enter_context(kafka_connection(settings, settings.state_dir / "logs"))
        created = ensure_topics(kafka, all_topics(policies, settings))
        if created:
            log.info("kafka.topics_created", topics=created)
        teachers = build_teachers(policies, settings, stack)
        registries = open_registries(policies, settings)
        students = load_students(policies, settings, stack, stop, registries, teachers)
        backends = students.backends
        producer = make_producer(kafka)
        stack.callback(producer.close)
        # Before the loops: closed after they are joined, so every answer is offered.
        monitoring = start_monitoring(
            policies,
            settings,
            stack,
            students,
            teachers,
            registries,
            send=lambda topic, value: _send_alert(producer, topic, value),
        )
        retraining = start_retraining(
            policies, settings, stack, students, teachers, registries, monitoring
        )

        groups: dict[str, list[Policy]] = {}
        for policy in policies.values():
            groups.setdefault(policy.traffic.consumer_group, []).append(policy)
        loops: list[ServingLoop] = []
        threads: list[threading.Thread] = []
        for group, members in sorted(groups.items()):
            consumer = make_consumer(kafka, group_id=group)
            stack.callback(consumer.close, autocommit=False)
            loop = ServingLoop(
                consumer,
                producer,
                [route_for(p) for p in members],
                {p.task: backends[p.task] for p in members},
                fallback_dead_letter_topic=settings.fallback_dead_letter_topic,
                max_message_bytes=kafka.max_message_bytes,
                commit_interval_ms=settings.commit_interval_ms,
                on_answered=monitoring.on_answered,
            )
            loops.append(loop)
            threads.append(
                threading.Thread(
                    target=_run_loop, args=(loop, stop, group), name=f"serve-{group}", daemon=True
                )
            )
        # Threads are joined before anything on the stack is closed: the loops
        # drain through the producer and consumers that the stack closes.
        stack.callback(_join, threads)
        stack.callback(stop.set)
        for thread in threads:
            thread.start()
        ops = start_ops(
            settings,
            stack,
            policies,
            loops,
            students,
            teachers,
            registries,
            monitoring,
            retraining,
        )
        log.info(
            "daemon.started",
            tasks=sorted(policies),
            consumer_groups=sorted(groups),
            bootstrap_servers=kafka.bootstrap_servers,
            http=ops.url if ops is not None else None,
        )
        yield RunningDaemon(
            kafka=kafka,
            stop_event=stop,
            loops=loops,
            vllm=students.vllm,
            monitoring=monitoring,
            retraining=retraining,
            students=students,
            ops=ops,
        )
    log.info("daemon.stopped")


def _send_alert(producer: KafkaProducer, topic: str, value: bytes) -> None:
    producer.send(topic, value=value)


def _run_loop(loop: ServingLoop, stop: threading.Event, group: str) -> None:
    try:
        loop.run(stop)
    except Exception as exc:  # a dead loop must stop the daemon, not leave it half-alive
        alert(
            get_logger("serving"),
            "serving.loop_crashed",
            severity="critical",
            consumer_group=group,
            error=f"{type(exc).__name__}: {exc}",
            action="stopping the daemon; uncommitted requests are re-delivered on restart",
        )
        stop.set()
        raise


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=60)


def install_stop_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM / SIGINT set ``stop`` (drain, then exit); returns a function that restores
    the previous handlers."""
    log = get_logger("app")

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def run_forever(
    settings: Settings, policies: dict[str, Policy], policies_dir: Path | None = None
) -> list[ServingStats]:
    """``distilld run``: serve until SIGTERM / SIGINT, then drain and return the stats."""
    stop = threading.Event()
    restore = install_stop_signals(stop)
    try:
        return serve(settings, policies, stop, policies_dir or settings.policies_dir)
    finally:
        restore()


def serve(
    settings: Settings,
    policies: dict[str, Policy],
    stop: threading.Event,
    policies_dir: Path,
    on_start: Callable[[RunningDaemon], None] | None = None,
) -> list[ServingStats]:
    """Serve until ``stop`` is set. Every ``DISTILLD_POLICY_RELOAD_S`` the policies
    directory is checked: a valid change that passes the preflight (secrets, model
    directories, vLLM settings) drains the daemon and starts it again on the new
    policies (offsets committed first: nothing lost, nothing answered twice); an invalid
    one, or one that cannot start here, is alerted and ignored. A new set that still
    fails to start after the drain is alerted and the previous set started again: a
    reload never stops the process. ``on_start`` sees each daemon once it started."""
    preflight(settings, policies)  # before the embedded broker starts
    if settings.http_enabled:
        settings.admin_secret()  # an unreadable or short admin token stops the start here
    watcher = (
        PolicyWatcher(
            policies_dir,
            policies,
            check=lambda candidate: check_policies(settings, candidate).problems,
        )
        if settings.policy_reload_s > 0
        else None
    )
    poll_s = settings.policy_reload_s if watcher is not None else 0.5
    # An embedded broker must outlive a reload (it keeps its topics in memory).
    with kafka_connection(settings, settings.state_dir / "logs") as kafka:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": kafka.bootstrap_servers})
        return _serve_reloading(settings, policies, stop, watcher, poll_s, on_start)


def _serve_reloading(
    settings: Settings,
    policies: dict[str, Policy],
    stop: threading.Event,
    watcher: PolicyWatcher | None,
    poll_s: float,
    on_start: Callable[[RunningDaemon], None] | None,
) -> list[ServingStats]:
    current = policies
    # The set that served before a reload: started again if ``current`` cannot start.
    previous: dict[str, Policy] | None = None
    while True:
        instance_stop = threading.Event()
        reloaded: dict[str, Policy] | None = None
        started = False
        try:
            with running_daemon(settings, current, instance_stop) as daemon:
                started = True
                previous = None
                if on_start is not None:
                    on_start(daemon)
                # instance_stop is also set by the daemon itself when a loop dies.
                while not instance_stop.is_set() and not stop.wait(poll_s):
                    reloaded = watcher.poll() if watcher is not None else None
                    if reloaded is not None:
                        break
                stats = daemon.stats()
        except Exception as exc:
            # Only a reloaded set that failed to start falls back; anything else (the
            # first start, a failure while serving or draining) stops the process.
            if started or previous is None or watcher is None:
                raise
            watcher.revert(previous, f"{type(exc).__name__}: {exc}")
            current, previous = previous, None
            continue
        if reloaded is None:
            return stats
        previous, current = current, reloaded
