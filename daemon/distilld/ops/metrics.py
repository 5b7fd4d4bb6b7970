"""Prometheus metrics of the daemon: a plain snapshot and its text exposition.

The app fills a :class:`MetricsSnapshot` from its own counters whenever the
``/metrics`` endpoint is scraped (one :class:`TaskMetrics` per task, plain
numbers only); :func:`render` turns it into the Prometheus text exposition
format 0.0.4 (``HELP`` and ``TYPE`` lines, escaped label values, cumulative
histogram buckets ending with ``le="+Inf"``, then ``_sum`` and ``_count``).
Nothing here keeps state between scrapes except :class:`LatencyHistogram`, a
small thread-safe accumulator the serving side can observe latencies into and
snapshot when collected.

Families (prefix ``distilld_``), every sample labelled with ``task``:

====================================== ========= ===============================
name                                   type      extra labels
====================================== ========= ===============================
``requests_total``                     counter
``request_latency_seconds``            histogram ``le``
``dead_letters_total``                 counter   ``reason``
``teacher_calls_total``                counter
``teacher_budget_left``                gauge     (omitted when unknown)
``agreement``                          gauge     (omitted when not measured)
``drift_share``                        gauge     (omitted when not measured)
``retrainings_total``                  counter   ``outcome``
``live_version_info``                  gauge     ``version`` (value 1)
====================================== ========= ===============================
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "PREFIX",
    "HistogramSnapshot",
    "LatencyHistogram",
    "MetricsSnapshot",
    "TaskMetrics",
    "escape_help",
    "escape_label_value",
    "format_value",
    "render",
]

#: The Content-Type of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "distilld_"
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


@dataclass(frozen=True)
class HistogramSnapshot:
    """Observations counted per bucket.

    ``bounds``: the finite upper bounds, strictly increasing (``+Inf`` is
    implicit). ``counts``: observations per bucket, *not* cumulative, one more
    than ``bounds``: ``counts[i]`` holds the observations ``<= bounds[i]`` and
    ``> bounds[i - 1]``, the last one those above the largest bound. ``sum``:
    the sum of every observation. The count is ``sum(counts)``.
    """

    bounds: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(DEFAULT_LATENCY_BUCKETS) + 1)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if any(not math.isfinite(b) for b in self.bounds):
            raise ValueError(f"histogram bounds must be finite (+Inf is implicit): {self.bounds}")
        if any(low >= high for low, high in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds must be strictly increasing: {self.bounds}")
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(
                f"a histogram with {len(self.bounds)} bounds needs {len(self.bounds) + 1} "
                f"bucket counts (the last one above the largest bound); received "
                f"{len(self.counts)}"
            )
        if any(c < 0 for c in self.counts):
            raise ValueError(f"histogram bucket counts must not be negative: {self.counts}")

    @property
    def count(self) -> int:
        """The number of observations."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` for each bound, then ``(inf, count)``."""
        total = 0
        buckets: list[tuple[float, int]] = []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            buckets.append((bound, total))
        return buckets


class LatencyHistogram:
    """A thread-safe histogram to observe latencies into; :meth:`snapshot` when scraped."""

    def __init__(self, bounds: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        self._bounds = tuple(float(b) for b in bounds)
        HistogramSnapshot(self._bounds, (0,) * (len(self._bounds) + 1))  # validates the bounds
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation (NaN is ignored: it would poison the sum)."""
        if math.isnan(value):
            return
        index = bisect.bisect_left(self._bounds, value)  # the first bound >= value
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum)


@dataclass(frozen=True)
class TaskMetrics:
    """One task's numbers at scrape time. Counters are totals since the daemon started.

    ``dead_letters``: dead-lettered requests by reason. ``retrainings``:
    finished retrainings by outcome (e.g. ``promoted``, ``gate_failed``,
    ``shadow_rejected``, ``failed``, ``rolled_back``). ``None`` for a gauge
    means unknown: the sample is left out rather than reported as 0.
    """

    requests: int = 0
    latency: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    teacher_calls: int = 0
    teacher_budget_left: float | None = None
    agreement: float | None = None
    drift_share: float | None = None
    retrainings: Mapping[str, int] = field(default_factory=dict)
    live_version: str | None = None


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every task's metrics, by task name."""

    tasks: Mapping[str, TaskMetrics] = field(default_factory=dict)


# ---------------------------------------------------------------------- rendering


def escape_label_value(value: str) -> str:
    r"""A label value as the text format wants it: ``\``, ``"`` and newlines escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""A HELP docstring as the text format wants it: ``\`` and newlines escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value or ``le`` bound: integers as such, ``+Inf``, ``-Inf``, ``NaN``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(v)}"' for name, v in pairs) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = PREFIX + name
        self.lines = [f"# HELP {self.name} {escape_help(help_text)}", f"# TYPE {self.name} {kind}"]

    def sample(
        self, value: float, labels: Sequence[tuple[str, str]] = (), suffix: str = ""
    ) -> None:
        self.lines.append(f"{self.name}{suffix}{_labels(labels)} {format_value(value)}")


def render(snapshot: MetricsSnapshot) -> str:
    """The snapshot in the Prometheus text exposition format 0.0.4 (ends with a newline).

    Tasks and label values are sorted, so equal snapshots render equally.
    Every family has its HELP and TYPE lines even when it has no sample.
    """
    requests = _Family("requests_total", "counter", "Requests answered by the student.")
    latency = _Family(
        "request_latency_seconds",
        "histogram",
        "Seconds from receiving a request to producing its answer.",
    )
    dead = _Family(
        "dead_letters_total", "counter", "Requests sent to the dead-letter topic, by reason."
    )
    teacher_calls = _Family(
        "teacher_calls_total", "counter", "Inputs sent to the teacher for labelling."
    )
    budget = _Family(
        "teacher_budget_left", "gauge", "Teacher calls left in the current hour's budget."
    )
    agreement = _Family(
        "agreement", "gauge", "Current agreement (or task metric) of the student with the teacher."
    )
    drift = _Family(
        "drift_share", "gauge", "Share of drifted input descriptors at the last monitoring check."
    )
    retrainings = _Family("retrainings_total", "counter", "Finished retrainings, by outcome.")
    live = _Family("live_version_info", "gauge", "The model version serving the task (value 1).")

    for task in sorted(snapshot.tasks):
        m = snapshot.tasks[task]
        t = (("task", task),)
        requests.sample(m.requests, t)
        for le, n in m.latency.cumulative():
            latency.sample(n, (*t, ("le", format_value(le))), "_bucket")
        latency.sample(m.latency.sum, t, "_sum")
        latency.sample(m.latency.count, t, "_count")
        for reason in sorted(m.dead_letters):
            dead.sample(m.dead_letters[reason], (*t, ("reason", reason)))
        teacher_calls.sample(m.teacher_calls, t)
        if m.teacher_budget_left is not None:
            budget.sample(m.teacher_budget_left, t)
        if m.agreement is not None:
            agreement.sample(m.agreement, t)
        if m.drift_share is not None:
            drift.sample(m.drift_share, t)
        for outcome in sorted(m.retrainings):
            retrainings.sample(m.retrainings[outcome], (*t, ("outcome", outcome)))
        if m.live_version is not None:
            live.sample(1, (*t, ("version", m.live_version)))

    families = (requests, latency, dead, teacher_calls, budget, agreement, drift, retrainings, live)
    return "".join(line + "\n" for family in families for line in family.lines)
