"""Operations endpoints of the daemon: health, readiness, Prometheus metrics, admin API.

See :mod:`distilld.ops.http` (the server, and how the app wires it) and
:mod:`distilld.ops.metrics` (the snapshot the app fills, and its rendering).
"""

from __future__ import annotations

from distilld.ops.http import (
    AdminActions,
    NotFoundError,
    OpsConfig,
    OpsServer,
    Probe,
    ProbeResult,
)
from distilld.ops.metrics import (
    HistogramSnapshot,
    LatencyHistogram,
    MetricsSnapshot,
    TaskMetrics,
    render,
)

__all__ = [
    "AdminActions",
    "HistogramSnapshot",
    "LatencyHistogram",
    "MetricsSnapshot",
    "NotFoundError",
    "OpsConfig",
    "OpsServer",
    "Probe",
    "ProbeResult",
    "TaskMetrics",
    "render",
]
