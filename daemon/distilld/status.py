"""`distilld status`: what the daemon's records say about each task, right now.

Read-only: everything comes from the sample store the daemon writes (the
store is SQLite in WAL mode, so this can run beside a live daemon). Per task:
the live model version (the version that answered the newest request), the
traffic rate over the last minutes, how many comparisons with the teacher are
stored, the current agreement (or task metric) with its interval, the last
check's drift verdict and the last alerts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from distilld.monitoring.evaluate import DRIFT_METRIC
from distilld.monitoring.measure import current_accuracy
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.store.base import AlertEvent, SampleStore
from distilld.vocabulary import joined_segment_label

#: The traffic rate is averaged over this many seconds.
RATE_WINDOW_S = 300.0
#: Newest reservoir rows read for the rate (a higher rate is measured over fewer seconds).
RATE_SAMPLE_ROWS = 2000


@dataclass(frozen=True)
class TaskStatus:
    task: str
    model_version: str | None
    requests_per_s: float
    comparisons: int
    metric: str | None
    value: float | None
    low: float | None
    high: float | None
    samples: int
    enough_samples: bool
    drift: str  # "ok", "breach", "insufficient_data", "disabled" or "not checked yet"
    drift_share: float | None
    last_check: str | None
    alerts: list[AlertEvent]
    registry_live: str | None = None  # the registry's LIVE version (None: no registry)
    in_shadow: str | None = None  # a candidate running in shadow
    versions: int = 0  # versions kept in the registry


def task_status(
    policy: Policy,
    store: SampleStore,
    now: float | None = None,
    registry: ModelRegistry | None = None,
) -> TaskStatus:
    now = time.time() if now is None else now
    recent = store.reservoir(policy.task, limit=RATE_SAMPLE_ROWS)
    model_version = recent[-1].model_version if recent else None
    in_window = [r for r in recent if r.created_at >= now - RATE_WINDOW_S]
    if len(in_window) >= RATE_SAMPLE_ROWS:  # more traffic than rows read: measure over them
        span = max(now - in_window[0].created_at, 1e-3)
    else:
        span = RATE_WINDOW_S
    metric = value = low = high = None
    samples = 0
    enough = False
    if policy.monitors.accuracy.enabled and policy.teacher is not None:
        accuracy = current_accuracy(
            policy.task,
            kind=policy.kind.value,
            monitors=policy.monitors,
            store=store,
            model_version=model_version,
        )
        metric = accuracy.metric
        overall = accuracy.overall
        value, samples, enough = overall.value, overall.samples, overall.sufficient
        if samples:
            low, high = overall.low, overall.high
    drift, drift_share, last_check = _drift_of(policy, store)
    return TaskStatus(
        task=policy.task,
        model_version=model_version,
        requests_per_s=len(in_window) / span,
        comparisons=store.count_comparisons(policy.task),
        metric=metric,
        value=value,
        low=low,
        high=high,
        samples=samples,
        enough_samples=enough,
        drift=drift,
        drift_share=drift_share,
        last_check=last_check,
        alerts=store.last_alerts(policy.task, limit=5),
        **_registry_fields(registry),
    )


def _registry_fields(registry: ModelRegistry | None) -> dict[str, Any]:
    if registry is None:
        return {}
    manifests = registry.list()
    shadow = [m.version for m in manifests if m.state == "shadow"]
    return {
        "registry_live": registry.live_version(),
        "in_shadow": shadow[-1] if shadow else None,
        "versions": len(manifests),
    }


def _drift_of(policy: Policy, store: SampleStore) -> tuple[str, float | None, str | None]:
    if not policy.monitors.drift.enabled:
        return "disabled", None, None
    check = store.last_check(policy.task)
    if check is None:
        return "not checked yet", None, None
    summary: dict[str, Any] = check.summary
    verdict = next(
        (v for v in summary.get("verdicts", []) if v.get("metric") == DRIFT_METRIC),
        None,
    )
    drift = summary.get("drift") or {}
    share = drift.get("drift_share")
    status = str(verdict.get("status")) if verdict else "not checked yet"
    return status, share if isinstance(share, int | float) else None, summary.get("checked_at")


def format_status(status: TaskStatus) -> str:
    lines = [f"task {status.task}"]
    lines.append(f"  live model version   {status.model_version or '(no traffic yet)'}")
    if status.versions:
        shadow = f", {status.in_shadow} in shadow" if status.in_shadow else ""
        lines.append(
            f"  registry             {status.versions} versions, live {status.registry_live}"
            f"{shadow}"
        )
    lines.append(f"  traffic              {status.requests_per_s:.2f} requests/s (last 5 min)")
    lines.append(f"  comparisons stored   {status.comparisons}")
    if status.metric is None:
        lines.append("  accuracy             not measured (monitor disabled, or no teacher)")
    elif status.value is None:
        lines.append(f"  {status.metric:<20} no comparisons yet (needs a teacher and traffic)")
    else:
        note = "" if status.enough_samples else " (below min_samples: no verdict yet)"
        lines.append(
            f"  {status.metric:<20} {status.value:.3f} "
            f"[{status.low:.3f}, {status.high:.3f}] over {status.samples}{note}"
        )
    share = f", drift share {status.drift_share:.2f}" if status.drift_share is not None else ""
    checked = f" (checked {status.last_check})" if status.last_check else ""
    lines.append(f"  drift                {status.drift}{share}{checked}")
    if not status.alerts:
        lines.append("  last alerts          none")
    else:
        lines.append("  last alerts")
        for event in status.alerts:
            when = datetime.fromtimestamp(event.created_at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
            value = f" value={event.value:.3f}" if event.value is not None else ""
            threshold = f" threshold={event.threshold:.3f}" if event.threshold is not None else ""
            segment = " segment=" + joined_segment_label(event.segment) if event.segment else ""
            lines.append(f"    {when}Z {event.kind} {event.metric}{segment}{value}{threshold}")
    return "\n".join(lines)
