"""``distilld check``: one monitoring check of each task now, on the daemon's records."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TypeVar

from distilld.adoption import current_model_dir, existing_registry
from distilld.alerts import AlertSink
from distilld.checks import check_task
from distilld.commands.common import existing_store
from distilld.errors import ConfigError
from distilld.monitoring.measure import CheckOutcome
from distilld.monitoring.references import LiveReference, ReferencePins
from distilld.policy.load import load_policies
from distilld.policy.model import Policy
from distilld.settings import Settings

_T = TypeVar("_T")


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
                ReferencePins(task, settings.state_dir, existing_registry(policy, settings)),
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


def _same(value: _T) -> _T:
    return value


def check(settings: Settings, policies_dir: Path, tasks: list[str]) -> int:
    """Print each verdict; exit 0 when every verdict is ok or has too little data, 3
    when something is breached."""
    policies = load_policies(policies_dir)
    outcomes = check_once(settings, policies, tasks or None)
    breached = False
    for outcome in outcomes:
        for verdict in outcome.verdicts:
            breached |= verdict.status.value == "breach"
            value = "-" if verdict.value is None else f"{verdict.value:.3f}"
            print(
                f"{outcome.task}: {verdict.metric} {verdict.segment}: "
                f"{verdict.status.value} (value {value}, threshold {verdict.threshold})"
            )
        if outcome.drift_note:
            print(f"{outcome.task}: drift: {outcome.drift_note}")
        if outcome.report_dir is not None:
            print(f"{outcome.task}: report {outcome.report_dir}")
    return 3 if breached else 0
