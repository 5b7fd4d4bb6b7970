"""Operations endpoints of the daemon: health, readiness, Prometheus metrics, admin API.

See :mod:`distilld.ops.http` (the routes, and how the app wires them),
:mod:`distilld.ops.server` (the bounded server), :mod:`distilld.ops.auth` (the admin token) and
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
