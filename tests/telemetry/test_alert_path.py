"""The one alert path: a JSON alert log line and a counted alert."""

from __future__ import annotations

from structlog.testing import capture_logs

from distilld.log import get_logger
from distilld.telemetry.alerts import ALERTS, alert
from distilld.telemetry.metrics import DaemonTelemetry
from support.metrics import samples, value


def test_an_alert_is_logged_as_an_alert_and_counted() -> None:
    before = ALERTS.counts().get(("test.thing_broke", "error"), 0)
    with capture_logs() as logs:
        alert(get_logger("tests"), "test.thing_broke", severity="error", task="t", error="boom")
    assert logs == [
        {
            "event": "test.thing_broke",
            "log_level": "warning",
            "alert": True,
            "severity": "error",
            "component": "tests",
            "task": "t",
            "error": "boom",
        }
    ]
    assert ALERTS.counts()[("test.thing_broke", "error")] == before + 1
    parsed = samples(DaemonTelemetry().exposition().decode())
    total = value(parsed, "distilld_alerts_total", event="test.thing_broke", severity="error")
    assert total == before + 1


def test_the_default_severity_is_warning() -> None:
    with capture_logs() as logs:
        alert(get_logger("tests"), "test.default")
    assert logs[0]["severity"] == "warning"
    assert logs[0]["alert"] is True
