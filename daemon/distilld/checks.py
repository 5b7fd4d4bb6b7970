"""One monitoring check of a task: measure (accuracy against the teacher, drift against
the live version's reference), evaluate against the policy, alert once per breach, and
hand the verdicts to whoever listens (the retraining manager's breach trigger).

Called by the daemon's scheduler (wired in ``app.start_monitoring``) and by
``distilld check`` (``commands/check.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distilld.alerts import AlertSink
from distilld.log import get_logger
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.evaluate import Verdict
from distilld.monitoring.features import Reference
from distilld.monitoring.measure import CheckOutcome, run_check
from distilld.policy.model import Policy
from distilld.store.sqlite import SqliteStore

# A check's verdicts, the version it measured and when (the retraining manager
# starts nothing on a breach measured before the live version went live).
AfterCheck = Callable[[str, list[Verdict], str | None, float], None]


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
