"""Wiring decisions of app.py that are not covered through a running daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilld.app import drift_reference
from distilld.log import configure_logging
from distilld.monitoring.features import REFERENCE_FILE, fit_reference, save_reference


def test_an_unreadable_drift_reference_falls_back_to_early_traffic_with_an_alert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    assert drift_reference(tmp_path) is None
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    unreadable = [e for e in events if e["event"] == "monitoring.reference_unreadable"]
    assert len(unreadable) == 1
    assert unreadable[0]["alert"] is True
    assert REFERENCE_FILE in unreadable[0]["path"]


def test_a_saved_drift_reference_is_loaded_and_a_missing_one_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    texts = [f"a short review number {i} about a film" for i in range(40)]
    save_reference(fit_reference(texts), tmp_path / REFERENCE_FILE)
    loaded = drift_reference(tmp_path)
    assert loaded is not None
    assert len(loaded.frame) == 40
    assert drift_reference(tmp_path / "elsewhere") is None
    assert "monitoring.no_saved_reference" in capsys.readouterr().out
    assert drift_reference(None) is None


def test_an_external_vllm_student_needs_no_model_files_here(tmp_path: Path) -> None:
    import threading
    from contextlib import ExitStack

    from distilld.app import load_students
    from distilld.policy.model import Policy
    from distilld.settings import Settings

    policy = Policy.model_validate(
        {
            "task": "reviews",
            "kind": "classification",
            "labels": ["fresh", "rotten"],
            "prompt": "Review: {input}",
            "traffic": {
                "requests_topic": "r.requests",
                "responses_topic": "r.responses",
                "dead_letter_topic": "r.dead-letter",
            },
            "student": {
                "backend": "vllm",
                "architecture": "causal-lm",
                "model": "served-elsewhere",  # a name on the server, not a directory here
                "vllm": {"base_url": "http://127.0.0.1:9"},
            },
        }
    )
    settings = Settings(models_dir=tmp_path / "models", state_dir=tmp_path / "state")
    with ExitStack() as stack:
        students = load_students(
            {"reviews": policy}, settings, stack, threading.Event(), registries={}, teachers={}
        )
        assert students.backends["reviews"].model_version == "served-elsewhere"
        assert students.vllm["reviews"].server is None
