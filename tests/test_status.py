"""`distilld status` and `distilld check` on the daemon's records (real SQLite store,
real Evidently), as an operator runs them beside the daemon."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distilld.cli import main
from distilld.demo.data import load_rows
from distilld.registry import Manifest, ModelRegistry
from distilld.settings import Settings
from distilld.store.base import AlertEvent, CheckResult, StoredComparison, TrafficSample
from distilld.store.sqlite import SqliteStore

TASK = "reviews"
POLICY = """\
task: reviews
kind: classification
labels: [fresh, rotten]
traffic:
  requests_topic: reviews.requests
  responses_topic: reviews.responses
  dead_letter_topic: reviews.dead-letter
student:
  model: reviews-student
teacher:
  backend: openai
  base_url: http://127.0.0.1:9/v1
  model: big-teacher
  prompt: "Is this review fresh or rotten?\nReview: {input}"
monitors:
  accuracy: {window: 400, min_samples: 100, threshold: 0.9}
  drift: {window: 300, min_samples: 200, reference_size: 600, drift_share: 0.5}
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "reviews.yaml").write_text(POLICY)
    monkeypatch.setenv("DISTILLD_POLICIES_DIR", str(policies))
    monkeypatch.setenv("DISTILLD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DISTILLD_MODELS_DIR", str(tmp_path / "models"))
    settings = Settings(state_dir=tmp_path / "state")
    settings.state_dir.mkdir()
    return settings


def _traffic(texts: list[str], version: str, start: float) -> list[TrafficSample]:
    return [
        TrafficSample(
            task=TASK,
            input_text=text,
            metadata={},
            student_output="fresh" if i % 2 else "rotten",
            student_confidence=0.9,
            request_id=f"r-{start}-{i}",
            model_version=version,
            created_at=start + i * 0.01,
        )
        for i, text in enumerate(texts)
    ]


def _comparison(i: int, agree: bool, version: str) -> StoredComparison:
    return StoredComparison(
        task=TASK,
        request_id=f"c-{i}",
        segment={"length": "<64"},
        input_text=f"review {i}",
        student_output="fresh",
        student_confidence=0.8,
        model_version=version,
        teacher_output="fresh" if agree else "rotten",
        teacher_confidence=0.9,
        teacher_probabilities=None,
        score=1.0 if agree else 0.0,
        schema_valid=True,
        created_at=time.time() - 100 + i * 0.01,
    )


def test_status_shows_version_traffic_agreement_drift_and_alerts(
    state: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    store = SqliteStore(state.store_path)
    try:
        store.add_traffic(_traffic([f"text {i}" for i in range(300)], "v7", now - 60))
        # 200 agreements and 50 disagreements of the live version; older version ignored.
        store.add_comparisons([_comparison(i, i < 200, "v7") for i in range(250)])
        store.add_check(
            CheckResult(
                task=TASK,
                summary={
                    "checked_at": "2026-11-28T05:00:00+00:00",
                    "drift": {"drift_share": 0.75},
                    "verdicts": [{"metric": "drift_share", "segment": "all", "status": "breach"}],
                },
            )
        )
        store.add_alert(
            AlertEvent(task=TASK, kind="breach", metric="drift_share", value=0.75, threshold=0.5)
        )
    finally:
        store.close()

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "task reviews" in out
    assert "live model version   v7" in out
    assert "comparisons stored   250" in out
    assert "agreement" in out and "0.800 [" in out and "over 250" in out
    assert "drift                breach, drift share 0.75" in out
    assert "breach drift_share value=0.750 threshold=0.500" in out

    assert main(["status", "--json", TASK]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_version"] == "v7"
    assert doc["value"] == pytest.approx(0.8)
    assert doc["low"] < 0.8 < doc["high"]
    assert doc["enough_samples"] is True
    # 300 requests in the last 5 minutes.
    assert doc["requests_per_s"] == pytest.approx(300 / 300.0)
    assert doc["versions"] == 0 and doc["registry_live"] is None  # no registry yet

    # With a model registry: the live version and a candidate in shadow.
    registry = ModelRegistry(state.registry_root / TASK)
    for name in ("v7", "v8"):
        model = state.state_dir / "models" / name
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        registry.register(model, Manifest(version=name))
    registry.promote("v7")
    registry.set_state("v8", "shadow")
    assert main(["status", TASK]) == 0
    assert "registry             2 versions, live v7, v8 in shadow" in capsys.readouterr().out

    assert main(["report", "--out", str(state.state_dir / "page.html")]) == 0
    assert "report written to" in capsys.readouterr().out
    page = (state.state_dir / "page.html").read_text()
    assert "<svg" in page and "v8" in page and "breach" in page


def test_check_flags_a_shift_once_and_exits_3_and_passes_stationary_traffic(
    state: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = load_rows()
    reviews = [r.text for r in rows if r.label is not None and r.text.strip()]
    plots = [r.text for r in rows if r.label is None and r.text.strip()]
    now = time.time()
    store = SqliteStore(state.store_path)
    try:
        # Early traffic (no reference saved with the model) then more reviews.
        store.add_traffic(_traffic(reviews[:900], "v1", now - 600))
    finally:
        store.close()

    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "reviews: drift_share all: ok" in out
    assert "report " in out

    store = SqliteStore(state.store_path)
    try:
        store.add_traffic(_traffic(plots[:300], "v1", now - 60))
    finally:
        store.close()
    assert main(["check", TASK]) == 3
    out = capsys.readouterr().out
    assert "reviews: drift_share all: breach" in out
    assert main(["check", TASK]) == 3  # still breached: reported, but alerted only once
    capsys.readouterr()

    store = SqliteStore(state.store_path)
    try:
        alerts = [a for a in store.last_alerts(TASK) if a.metric == "drift_share"]
    finally:
        store.close()
    assert [a.kind for a in alerts] == ["breach"]
    reports = list((state.reports_dir / TASK).rglob("drift.html"))
    assert len(reports) == 3


def test_status_and_check_without_a_store_say_what_to_set(
    state: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 2
    assert "DISTILLD_STATE_DIR" in capsys.readouterr().err
    assert main(["check", "no-such-task"]) == 2
    err = capsys.readouterr().err
    assert "no-such-task" in err and "Traceback" not in err
