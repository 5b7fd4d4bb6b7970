"""Structured logs: one JSON object per line, alert events marked as alerts."""

from __future__ import annotations

import json

import pytest

from distilld.log import configure_logging, get_logger
from distilld.telemetry.alerts import alert


def test_events_are_json_lines_and_alerts_are_marked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    log = get_logger("serving")
    log.info("serving.stats", answered=3)
    alert(log, "student.failed", severity="error", task="t", error="boom")
    log.debug("hidden.at.info")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    stats, failure = (json.loads(line) for line in lines)
    assert stats["event"] == "serving.stats"
    assert stats["answered"] == 3
    assert stats["component"] == "serving"
    assert stats["level"] == "info"
    assert "alert" not in stats
    assert failure["alert"] is True
    assert failure["severity"] == "error"
    assert failure["task"] == "t"
    assert failure["timestamp"].endswith("Z")


def test_no_log_field_is_longer_than_the_bound(capsys: pytest.CaptureFixture[str]) -> None:
    from distilld.echo import LOG_FIELD_CHARS

    configure_logging("INFO", "json")
    huge = "\u0085" * 400_000
    alert(get_logger("serving"), "serving.send_failed", error=huge, detail={"task": huge})
    line = capsys.readouterr().out.strip()
    # JSON writes U+0085 as 6 characters ("\u0085"): two fields of 6 x the bound at most.
    assert len(line) < 2 * 6 * (LOG_FIELD_CHARS + 10) + 500
    event = json.loads(line)
    assert event["error"] == "\u0085" * LOG_FIELD_CHARS + "..."
    assert event["detail"]["task"] == "\u0085" * LOG_FIELD_CHARS + "..."


def test_captured_logs_are_the_events_after_the_projects_processors() -> None:
    from distilld.echo import LOG_FIELD_CHARS
    from support.logs import captured_logs, named

    with captured_logs("INFO") as entries:
        log = get_logger("serving")  # as a component does when it is built
        log.info("serving.stats", answered=3, note="x" * (LOG_FIELD_CHARS + 5))
        log.debug("hidden.at.info")
        alert(log, "student.failed", severity="error", task="t")
    assert [e["event"] for e in entries] == ["serving.stats", "student.failed"]
    (stats,) = named(entries, "serving.stats")
    assert stats["component"] == "serving"
    assert stats["level"] == "info"
    assert stats["note"] == "x" * LOG_FIELD_CHARS + "..."
    assert named(entries, "student.failed")[0]["alert"] is True
