"""Operations endpoints of the daemon: health, readiness, Prometheus metrics, admin API.

See :mod:`distilld.ops.http` (the server, and how the app wires it) and
:mod:`distilld.telemetry.metrics` (the metrics registry the server exposes).
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

__all__ = [
    "AdminActions",
    "NotFoundError",
    "OpsConfig",
    "OpsServer",
    "Probe",
    "ProbeResult",
]
