"""The serving loop's counters: written by the loop thread, read by the CLI summary,
the logs, /metrics and the benchmarks."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Histogram


@dataclass
class ServingStats:
    """Counters of one loop; read by the CLI summary, the logs, /metrics and the
    benchmarks. Written by the loop thread only; readers take a consistent-enough
    copy (counters only grow)."""

    polled: int = 0
    answered: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    answered_by_task: Counter[str] = field(default_factory=Counter)
    # (task, reason); task "" when the record named no known task.
    dead_lettered_by_task: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency_by_task: dict[str, Histogram] = field(default_factory=dict)
    # (topic, partition) -> records on the broker not yet polled, measured every few
    # seconds (distilld.traffic.group.measure_lag).
    lag_by_partition: dict[tuple[str, int], int] = field(default_factory=dict)
    batches: int = 0
    batch_items: int = 0
    invalid_outputs: int = 0
    # Requests whose answer and minimal dead letter the broker both refused.
    dropped: int = 0
    commits: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.started_at)
        return {
            "polled": self.polled,
            "answered": self.answered,
            "dead_lettered": sum(self.dead_lettered.values()),
            "dead_lettered_by_reason": dict(self.dead_lettered),
            "invalid_outputs": self.invalid_outputs,
            "dropped": self.dropped,
            "batches": self.batches,
            "mean_batch_size": round(self.batch_items / self.batches, 2) if self.batches else 0.0,
            "answered_per_s": round(self.answered / elapsed, 2),
        }
