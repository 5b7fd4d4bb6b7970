"""The daemon's lifecycle: start, serve, drain, reload, stop.

``running_daemon`` builds the parts (:func:`distilld.app.build_parts`) on one
ExitStack, runs a serving loop per consumer group on its own thread and starts the
HTTP endpoints; leaving it sets the stop switch, joins the loops (each drains and
commits) and closes every part in reverse order (producer flushed, models
released, embedded broker stopped). ``serve`` (``distilld run``) restarts it on a
reloaded policies directory; ``run_forever`` adds the SIGTERM / SIGINT handlers.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from distilld.app import Monitoring, build_parts, kafka_connection, start_ops
from distilld.log import get_logger
from distilld.ops.http import OpsServer
from distilld.policy.model import Policy
from distilld.policy.watch import PolicyWatcher
from distilld.preflight import check_policies, preflight
from distilld.retrain.manager import RetrainManager
from distilld.serving.vllm_deployment import VllmDeployment
from distilld.settings import KafkaConfig, Settings
from distilld.students import Students
from distilld.telemetry.alerts import alert
from distilld.traffic.loop import ServingLoop
from distilld.traffic.stats import ServingStats


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
        parts = build_parts(settings, policies, kafka, stack, stop)
        loops = list(parts.loops.values())
        threads = [
            threading.Thread(
                target=_run_loop, args=(loop, stop, group), name=f"serve-{group}", daemon=True
            )
            for group, loop in parts.loops.items()
        ]
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
            parts.students,
            parts.teachers,
            parts.registries,
            parts.monitoring,
            parts.retraining,
        )
        log.info(
            "daemon.started",
            tasks=sorted(policies),
            consumer_groups=sorted(parts.loops),
            bootstrap_servers=kafka.bootstrap_servers,
            http=ops.url if ops is not None else None,
        )
        yield RunningDaemon(
            kafka=kafka,
            stop_event=stop,
            loops=loops,
            vllm=parts.students.vllm,
            monitoring=parts.monitoring,
            retraining=parts.retraining,
            students=parts.students,
            ops=ops,
        )
    log.info("daemon.stopped")


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
