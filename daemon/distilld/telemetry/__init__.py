"""Telemetry of the daemon: Prometheus metrics, the one alert path, the alert-once latch.

* :mod:`distilld.telemetry.metrics`: a metrics registry per daemon and its ``/metrics`` text.
* :mod:`distilld.telemetry.alerts`: :func:`~distilld.telemetry.alerts.alert`, which every
  alert goes through (JSON log line and ``distilld_alerts_total``).
* :mod:`distilld.telemetry.latch`: :class:`~distilld.telemetry.latch.Latch`, breach and
  recovery edges so a condition is reported once when it starts and once when it ends.
"""
