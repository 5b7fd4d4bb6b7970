"""The one place that builds and wires the daemon from settings and policies.

Each component receives only the values it needs (a KafkaConfig, a TaskRoute,
a model directory); nothing below this module reads the global settings. Every
resource is entered on the caller's ExitStack, so that closing it closes them in
reverse order; starting, draining, reloading and stopping are
:mod:`distilld.lifecycle`'s job.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaProducer

from distilld.adoption import adopt_policy_student, current_model_dir
from distilld.alerts import AlertSink
from distilld.checks import AfterCheck, active_monitors, check_task
from distilld.errors import RegistryError
from distilld.log import get_logger
from distilld.modelpaths import resolve_data_file, resolve_model_dir
from distilld.monitoring.evaluate import Verdict
from distilld.monitoring.references import LiveReference, ReferencePins
from distilld.ops.daemon import DaemonAdmin, DaemonMetrics, readiness_probes
from distilld.ops.http import OpsConfig, OpsServer
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.retention import Retention, RetentionConfig
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.manager import RetrainManager
from distilld.retrain.task import RetrainTask
from distilld.scheduler import MonitorJob, MonitorScheduler
from distilld.serving.base import Prediction, StudentBackend
from distilld.settings import KafkaConfig, Settings
from distilld.shadow.task import ShadowTask
from distilld.shadow.worker import ShadowWorker
from distilld.store.sqlite import SqliteStore
from distilld.students import Students, load_students, load_version, log_rotation
from distilld.teacher.base import Teacher
from distilld.teacher.build import make_teacher
from distilld.telemetry.metrics import DaemonTelemetry
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import ServingLoop, TaskRoute
from distilld.traffic.records import Request


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
                load_candidate=functools.partial(load_version, policy),
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
        metrics=DaemonTelemetry(
            DaemonMetrics(
                policies,
                loops,
                students.backends,
                teachers,
                monitoring.store,
                monitoring.shadow,
                retraining,
                monitoring.sinks,
            )
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
class Parts:
    """Everything a daemon is made of, built and entered on one ExitStack: the serving
    loops are built (one per consumer group) but not running yet (see
    :func:`distilld.lifecycle.running_daemon`)."""

    teachers: dict[str, Teacher]
    registries: dict[str, ModelRegistry]
    students: Students
    monitoring: Monitoring
    retraining: RetrainManager | None
    loops: dict[str, ServingLoop]  # by consumer group, sorted


def build_parts(
    settings: Settings,
    policies: dict[str, Policy],
    kafka: KafkaConfig,
    stack: ExitStack,
    stop: threading.Event,
) -> Parts:
    """Build every part of the daemon on ``stack`` (closed in reverse order): topics,
    teachers, registries, students, the producer, monitoring, retraining and a serving
    loop per consumer group."""
    log = get_logger("app")
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
    loops: dict[str, ServingLoop] = {}
    for group, members in sorted(groups.items()):
        consumer = make_consumer(kafka, group_id=group)
        stack.callback(consumer.close, autocommit=False)
        loops[group] = ServingLoop(
            consumer,
            producer,
            [route_for(p) for p in members],
            {p.task: backends[p.task] for p in members},
            fallback_dead_letter_topic=settings.fallback_dead_letter_topic,
            max_message_bytes=kafka.max_message_bytes,
            commit_interval_ms=settings.commit_interval_ms,
            on_answered=monitoring.on_answered,
        )
    return Parts(
        teachers=teachers,
        registries=registries,
        students=students,
        monitoring=monitoring,
        retraining=retraining,
        loops=loops,
    )


def _send_alert(producer: KafkaProducer, topic: str, value: bytes) -> None:
    producer.send(topic, value=value)
