"""Prometheus metrics of one daemon, through prometheus_client.

Each daemon builds one :class:`DaemonTelemetry`: its own ``CollectorRegistry``
(never the process-global default one, so several daemons in one process do not
clash) with

* the process_* and python_* collectors (``ProcessCollector``,
  ``PlatformCollector``, ``GCCollector``);
* ``distilld_build_info{version}`` (value 1);
* ``distilld_alerts_total{event,severity}``: every alert of the process
  (:mod:`distilld.telemetry.alerts`);
* the daemon's own families, read at each scrape from a :class:`MetricsSnapshot`
  that a ``collect`` callable builds from counters the daemon keeps anyway
  (:class:`distilld.ops.daemon.DaemonMetrics`); nothing is computed for it.

Families of the snapshot (prefix ``distilld_``), labelled with ``task`` unless said:

=================================== ========= =====================================
name                                type      extra labels
=================================== ========= =====================================
``requests_total``                  counter
``request_latency_seconds``         histogram ``le``
``dead_letters_total``              counter   ``reason``
``teacher_calls_total``             counter
``teacher_budget_left``             gauge     (omitted when unknown)
``agreement_ratio``                 gauge     (omitted when not measured)
``drift_share_ratio``               gauge     (omitted when not measured)
``agreement``, ``drift_share``      gauge     the same values, names kept from 0.1
``retrainings_total``               counter   ``outcome``
``live_version_info``               gauge     ``version`` (value 1)
``policy_breach``                   gauge     ``metric``, ``segment``: 1 open, 0 recovered
``consumer_lag_records``            gauge     ``topic``, ``partition`` (no ``task``)
=================================== ========= =====================================

:meth:`DaemonTelemetry.exposition` is what ``/metrics`` serves (``generate_latest``).
The serving loops observe request latencies into a :func:`latency_histogram`
each (a prometheus_client ``Histogram`` in no registry); the snapshot carries
them and they are exposed summed per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from distilld import __version__
from distilld.telemetry.alerts import ALERTS, AlertTally

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "LATENCY_METRIC",
    "DaemonTelemetry",
    "MetricsSnapshot",
    "TaskMetrics",
    "latency_histogram",
]

#: The Content-Type of :meth:`DaemonTelemetry.exposition` (text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_METRIC = "distilld_request_latency_seconds"
_LATENCY_HELP = "Seconds from receiving a request to producing its answer."
#: Upper bounds (seconds) of the request latency buckets; ``+Inf`` is implicit.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def latency_histogram(buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> Histogram:
    """A request latency histogram in no registry (a daemon's snapshot exposes it)."""
    return Histogram(LATENCY_METRIC, _LATENCY_HELP, buckets=buckets, registry=None)


@dataclass(frozen=True)
class TaskMetrics:
    """One task's numbers at scrape time. Counters are totals since the daemon started.

    ``latency``: the histograms the task's requests were observed into (one per
    serving loop that serves it; exposed summed). ``dead_letters``: by reason.
    ``retrainings``: finished retrainings by outcome (``promoted``,
    ``gate_failed``, ...). ``breaches``: by ``(metric, segment)``, True while the
    breach is open, False once it recovered. ``None`` for a gauge means unknown:
    the sample is left out rather than reported as 0.
    """

    requests: int = 0
    latency: Sequence[Histogram] = ()
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    teacher_calls: int = 0
    teacher_budget_left: float | None = None
    agreement: float | None = None
    drift_share: float | None = None
    retrainings: Mapping[str, int] = field(default_factory=dict)
    live_version: str | None = None
    breaches: Mapping[tuple[str, str], bool] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every task's metrics by task name, and the consumer lag by (topic, partition)."""

    tasks: Mapping[str, TaskMetrics] = field(default_factory=dict)
    consumer_lag: Mapping[tuple[str, int], int] = field(default_factory=dict)


class DaemonTelemetry:
    """The metrics registry of one daemon (see the module docstring)."""

    def __init__(
        self,
        collect: Callable[[], MetricsSnapshot] = MetricsSnapshot,
        *,
        version: str = __version__,
        alerts: AlertTally = ALERTS,
    ) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        build = Gauge(
            "distilld_build_info",
            "The distilld version this daemon runs (value 1).",
            ["version"],
            registry=self.registry,
        )
        build.labels(version=version).set(1)
        self.registry.register(_AlertsCollector(alerts))
        self.registry.register(_SnapshotCollector(collect))

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _AlertsCollector(Collector):
    def __init__(self, alerts: AlertTally) -> None:
        self._alerts = alerts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "distilld_alerts",
            "Alerts emitted, by event and severity.",
            labels=["event", "severity"],
        )
        for (event, severity), count in sorted(self._alerts.counts().items()):
            family.add_metric([event, severity], count)
        yield family


class _SnapshotCollector(Collector):
    def __init__(self, collect: Callable[[], MetricsSnapshot]) -> None:
        self._collect = collect

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(snapshot_families(self._collect()))


def snapshot_families(snapshot: MetricsSnapshot) -> list[Metric]:
    """The snapshot as metric families; tasks and label values sorted."""
    t = ["task"]
    requests = CounterMetricFamily(
        "distilld_requests", "Requests answered by the student.", labels=t
    )
    latency = HistogramMetricFamily(LATENCY_METRIC, _LATENCY_HELP, labels=t)
    dead = CounterMetricFamily(
        "distilld_dead_letters",
        "Requests sent to the dead-letter topic, by reason.",
        labels=[*t, "reason"],
    )
    teacher_calls = CounterMetricFamily(
        "distilld_teacher_calls", "Inputs sent to the teacher for labelling.", labels=t
    )
    budget = GaugeMetricFamily(
        "distilld_teacher_budget_left", "Teacher calls left in the current hour's budget.", labels=t
    )
    agreement_help = "Current agreement (or task metric) of the student with the teacher, 0 to 1."
    agreement = GaugeMetricFamily("distilld_agreement_ratio", agreement_help, labels=t)
    agreement_old = GaugeMetricFamily(
        "distilld_agreement", agreement_help + " Old name of distilld_agreement_ratio.", labels=t
    )
    drift_help = "Share of drifted input descriptors at the last monitoring check, 0 to 1."
    drift = GaugeMetricFamily("distilld_drift_share_ratio", drift_help, labels=t)
    drift_old = GaugeMetricFamily(
        "distilld_drift_share", drift_help + " Old name of distilld_drift_share_ratio.", labels=t
    )
    retrainings = CounterMetricFamily(
        "distilld_retrainings", "Finished retrainings, by outcome.", labels=[*t, "outcome"]
    )
    live = GaugeMetricFamily(
        "distilld_live_version_info",
        "The model version serving the task (value 1).",
        labels=[*t, "version"],
    )
    breach = GaugeMetricFamily(
        "distilld_policy_breach",
        "1 while a policy check of the task is in breach, 0 once it recovered.",
        labels=[*t, "metric", "segment"],
    )
    lag = GaugeMetricFamily(
        "distilld_consumer_lag_records",
        "Requests on the partition not yet polled by its serving loop.",
        labels=["topic", "partition"],
    )

    for task in sorted(snapshot.tasks):
        m = snapshot.tasks[task]
        requests.add_metric([task], m.requests)
        buckets, total = _summed(m.latency)
        latency.add_metric([task], buckets=buckets, sum_value=total)
        for reason in sorted(m.dead_letters):
            dead.add_metric([task, reason], m.dead_letters[reason])
        teacher_calls.add_metric([task], m.teacher_calls)
        if m.teacher_budget_left is not None:
            budget.add_metric([task], m.teacher_budget_left)
        if m.agreement is not None:
            agreement.add_metric([task], m.agreement)
            agreement_old.add_metric([task], m.agreement)
        if m.drift_share is not None:
            drift.add_metric([task], m.drift_share)
            drift_old.add_metric([task], m.drift_share)
        for outcome in sorted(m.retrainings):
            retrainings.add_metric([task, outcome], m.retrainings[outcome])
        if m.live_version is not None:
            live.add_metric([task, m.live_version], 1)
        for metric, segment in sorted(m.breaches):
            breach.add_metric([task, metric, segment], 1 if m.breaches[(metric, segment)] else 0)
    for topic, partition in sorted(snapshot.consumer_lag):
        lag.add_metric([topic, str(partition)], snapshot.consumer_lag[(topic, partition)])
    return [
        requests,
        latency,
        dead,
        teacher_calls,
        budget,
        agreement,
        drift,
        agreement_old,
        drift_old,
        retrainings,
        live,
        breach,
        lag,
    ]


def _summed(histograms: Sequence[Histogram]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets and the sum over histograms of equal buckets."""
    if not histograms:  # nothing observed into: every default bucket, at 0
        histograms = [latency_histogram()]
    counts: dict[str, float] = {}
    total = 0.0
    for histogram in histograms:
        for sample in next(iter(histogram.collect())).samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                counts[le] = counts.get(le, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return list(counts.items()), total
