"""The alert sink: where the policy evaluation's breach and recovery events go.

Each check's verdicts go through :func:`distilld.monitoring.evaluate.transition`
with the task's current alert state; every event it returns is

1. logged as one structlog JSON alert line (``monitor.breach`` or
   ``monitor.recovered``, with the task, metric, value, threshold, window,
   segment, severity and the action it calls for);
2. stored in the sample store (``distilld status`` lists the last alerts, and
   a restart restores the state from them);
3. optionally produced as JSON to a Kafka alerts topic, through a ``send(topic,
   value)`` callable so this module does not depend on a Kafka client.

A breach is reported once, when it starts, not at every check while it lasts.
The state (the open breaches per task) lives in memory and is rebuilt from the
store's last alerts when the sink is built, so a restart during a breach does
not report it again. Limits of that restore: only the ``restore_limit`` most
recent alerts of a task are read (an open breach older than that many later
alerts is forgotten and reported again), and an event whose store write
failed is not known after a restart.

Logging comes first and storing and producing are best effort: an operator
reading the alert log never misses an event because the store or Kafka is
down; those failures are logged as errors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from distilld.log import get_logger
from distilld.monitoring.evaluate import (
    DRIFT_METRIC,
    AlertKey,
    AlertState,
    EventKind,
    Verdict,
    transition,
)
from distilld.monitoring.evaluate import AlertEvent as Event
from distilld.store.base import AlertEvent as StoredAlert
from distilld.store.base import SampleStore
from distilld.telemetry.alerts import alert
from distilld.vocabulary import OVERALL, joined_segment_label, split_segment_label

Send = Callable[[str, bytes], None]
"""Produces one record: ``send(topic, value)``; e.g. a KafkaProducer's send, wrapped."""

BREACH_EVENT = "monitor.breach"
RECOVERED_EVENT = "monitor.recovered"
DEFAULT_RESTORE_LIMIT = 1000
_LOG_NAME = {EventKind.breach: BREACH_EVENT, EventKind.recovered: RECOVERED_EVENT}


def action_for(event: Event) -> str:
    """What the event calls for, in words, for the operator reading the alert log."""
    if event.kind is EventKind.recovered:
        return "none: the measurement is back within the policy"
    if event.metric == DRIFT_METRIC:
        return (
            "inputs no longer look like the student's training inputs; read the drift report "
            "and retrain on recent traffic if the accuracy monitor confirms it"
        )
    if event.segment == OVERALL:
        return "the student falls below the policy's bar against the teacher; retrain it"
    return (
        f"the student falls below the policy's bar on segment {event.segment}; retrain with "
        "that segment over-sampled"
    )


def segment_dict(segment: str) -> dict[str, str] | None:
    """A verdict's segment label as the store keeps it: "all" -> None, "k=v" -> {k: v}."""
    if segment == OVERALL:
        return None
    key, value = split_segment_label(segment) or (segment, "")
    return {key: value}


def segment_label(segment: dict[str, str] | None) -> str:
    """The inverse of :func:`segment_dict`."""
    if not segment:
        return OVERALL
    return joined_segment_label(segment)


def event_fields(event: Event) -> dict[str, Any]:
    """The fields of one event, as logged and produced (JSON-ready)."""
    return {
        "task": event.task,
        "metric": event.metric,
        "segment": event.segment,
        "value": event.value,
        "threshold": event.threshold,
        "window": event.window,
        "samples": event.samples,
        "interval": list(event.interval) if event.interval is not None else None,
        "severity": event.severity.value,
        "action": action_for(event),
    }


class AlertSink:
    """Turns verdicts into alert events, once per breach, and sends them out.

    Thread-safe: checks of several tasks may report at once.
    """

    def __init__(
        self,
        store: SampleStore,
        *,
        send: Send | None = None,
        topic: str | None = None,
        tasks: Iterable[str] = (),
        restore_limit: int = DEFAULT_RESTORE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if send is not None and topic is None:
            raise ValueError("a producer was given but no alerts topic to send to")
        self._store = store
        self._send = send
        self._topic = topic
        self._restore_limit = restore_limit
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, AlertState] = {}
        # Keys that recovered in this process (the breach gauge reports them as 0).
        self._recovered: dict[str, set[AlertKey]] = {}
        self._log = get_logger("alerts")
        for task in tasks:
            self._states[task] = self._restore(task)

    def state(self, task: str) -> AlertState:
        """The task's open breaches (restored from the store on first use)."""
        with self._lock:
            return self._state(task)

    def breaches(self, task: str) -> dict[tuple[str, str], bool]:
        """The task's breach states by (metric, segment): True while open, False for
        those that recovered since the daemon started (``distilld_policy_breach``)."""
        with self._lock:
            open_keys = self._state(task).breached
            recovered = set(self._recovered.get(task, ()))
        states = {(k.metric, k.segment): False for k in recovered}
        states.update({(k.metric, k.segment): True for k in open_keys})
        return states

    def handle(self, task: str, verdicts: Sequence[Verdict]) -> list[Event]:
        """Apply one check's verdicts; emit and return the events (new breaches, recoveries)."""
        others = sorted({v.task for v in verdicts if v.task != task})
        if others:
            raise ValueError(f"verdicts of tasks {others} were handed in for task {task!r}")
        with self._lock:
            state, events = transition(self._state(task), verdicts)
            self._states[task] = state
            recovered = self._recovered.setdefault(task, set())
            recovered.update(
                AlertKey(e.task, e.metric, e.segment)
                for e in events
                if e.kind is EventKind.recovered
            )
            recovered.difference_update(state.breached)
        for event in events:
            self._emit(event)
        return events

    def decision(
        self,
        task: str,
        name: str,
        *,
        severity: str,
        action: str,
        metric: str = "retraining",
        value: float | None = None,
        threshold: float | None = None,
        **details: Any,
    ) -> None:
        """Log, store and send a decision of the daemon that is not a monitor verdict
        (retraining started, gate failed, promoted, rolled back...)."""
        alert(self._log, name, severity=severity, task=task, action=action, **details)
        created_at = self._clock()
        payload = {"event": name, "severity": severity, "action": action, **details}
        try:
            self._store.add_alert(
                StoredAlert(
                    task=task,
                    kind=name,
                    metric=metric,
                    value=value,
                    threshold=threshold,
                    payload=json.loads(json.dumps(payload, default=str)),
                    created_at=created_at,
                )
            )
        except Exception as exc:
            self._log.error(
                "alerts.store_failed",
                task=task,
                alert_event=name,
                error=f"{type(exc).__name__}: {exc}",
                note="the alert was logged",
            )
        if self._send is not None and self._topic is not None:
            record = {"task": task, **payload, "created_at": created_at}
            try:
                self._send(self._topic, json.dumps(record, default=str).encode("utf-8"))
            except Exception as exc:
                self._log.error(
                    "alerts.produce_failed",
                    task=task,
                    alert_event=name,
                    topic=self._topic,
                    error=f"{type(exc).__name__}: {exc}",
                    note="the alert was logged and stored",
                )

    # -- internals ----------------------------------------------------------------

    def _state(self, task: str) -> AlertState:
        state = self._states.get(task)
        if state is None:
            state = self._states[task] = self._restore(task)
        return state

    def _restore(self, task: str) -> AlertState:
        """Replay the task's last breach / recovery alerts, oldest first."""
        try:
            stored = self._store.last_alerts(task, limit=self._restore_limit)
        except Exception as exc:
            self._log.error(
                "alerts.restore_failed",
                task=task,
                error=f"{type(exc).__name__}: {exc}",
                note="open breaches are not known; an ongoing breach will be reported again",
            )
            return AlertState()
        open_keys: set[AlertKey] = set()
        for item in stored:
            key = AlertKey(item.task, item.metric, segment_label(item.segment))
            if item.kind == EventKind.breach:
                open_keys.add(key)
            elif item.kind == EventKind.recovered:
                open_keys.discard(key)
        if open_keys:
            self._log.info(
                "alerts.restored",
                task=task,
                open_breaches=[f"{k.metric}/{k.segment}" for k in sorted(open_keys)],
            )
        return AlertState(frozenset(open_keys))

    def _emit(self, event: Event) -> None:
        fields = event_fields(event)
        severity = fields.pop("severity")
        name = _LOG_NAME[event.kind]
        alert(self._log, name, severity=severity, **fields)
        created_at = self._clock()
        try:
            self._store.add_alert(
                StoredAlert(
                    task=event.task,
                    kind=event.kind.value,
                    metric=event.metric,
                    segment=segment_dict(event.segment),
                    value=event.value,
                    threshold=event.threshold,
                    payload={
                        "event": name,
                        "severity": severity,
                        "window": event.window,
                        "samples": event.samples,
                        "interval": fields["interval"],
                        "action": fields["action"],
                    },
                    created_at=created_at,
                )
            )
        except Exception as exc:
            self._log.error(
                "alerts.store_failed",
                task=event.task,
                alert_event=name,
                error=f"{type(exc).__name__}: {exc}",
                note="the alert was logged; after a restart it may be reported again",
            )
        if self._send is not None and self._topic is not None:
            record = {"event": name, "severity": severity, **fields, "created_at": created_at}
            try:
                self._send(self._topic, json.dumps(record, allow_nan=False).encode("utf-8"))
            except Exception as exc:
                self._log.error(
                    "alerts.produce_failed",
                    task=event.task,
                    alert_event=name,
                    topic=self._topic,
                    error=f"{type(exc).__name__}: {exc}",
                    note="the alert was logged and stored",
                )
