"""The HTML report's drawing (pure): every section, escaped text, no script."""

from __future__ import annotations

from distilld.report import Mark, Point, TaskReport, render


def test_the_page_draws_every_section_and_escapes_what_it_shows() -> None:
    report = TaskReport(
        task="reviews",
        metric="agreement",
        agreement={
            "v1": [Point(100.0, 0.9, 50), Point(200.0, 0.6, 50)],
            "v2": [Point(300, 0.95, 40)],
        },
        drift=[Point(150.0, 0.2), Point(250.0, 0.8)],
        marks=[Mark(220.0, "breach", "breach agreement"), Mark(290.0, "retrain.promoted", "v2")],
        segments=[("source=<script>", 0.5, 12)],
        live_version="v2",
        versions=[{"version": "v2", "state": "live", "gate": "passed: accuracy 0.95"}],
        gate={
            "summary": "passed",
            "checks": [
                {"name": "primary_vs_teacher", "passed": True, "value": 0.95, "why": "ok"},
                {"name": "segment:source=app", "passed": None, "value": None, "why": "too few"},
            ],
        },
        evidently=[("20261128T050000Z", "reports/reviews/20261128T050000Z/drift.html")],
    )

    page = render([report], generated_at=0.0)

    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page  # self-contained, and the segment label is escaped
    assert "source=&lt;script&gt;" in page
    assert page.count("<svg") == 2
    assert page.count("<polyline") == 3  # two versions, one drift curve
    assert "stroke-dasharray" in page  # the breach and promotion marks
    assert "live version: <b>v2</b>" in page
    assert "not judged" in page and "pass" in page
    assert 'href="reports/reviews/20261128T050000Z/drift.html"' in page


def test_an_empty_task_says_what_is_missing() -> None:
    page = render([TaskReport(task="quiet", metric="agreement")], generated_at=0.0)

    assert "no data yet" in page
    assert "no registry for this task" in page
    assert "no drift report yet" in page


def test_segments_per_key_are_capped_as_the_accuracy_monitor_caps_them() -> None:
    from types import SimpleNamespace

    from distilld.report import _segments

    rows = [SimpleNamespace(score=1.0, segment={"source": "app"}) for _ in range(3)]
    rows += [SimpleNamespace(score=0.0, segment={"source": f"id-{i}"}) for i in range(300)]
    rows.append(SimpleNamespace(score=None, segment={"source": "unscored"}))

    segments = _segments(rows, max_values=2)

    assert [(label, n) for label, _, n in segments] == [
        ("source=app", 3),
        ("source=id-0", 1),
        ("source=other", 299),
    ]
