"""One monitoring check end to end: store -> accuracy + Evidently drift -> verdicts -> reports.

Real parts throughout: the SqliteStore, Rotten Tomatoes rows as traffic,
Evidently 0.7 for drift, shadow.compare for the comparison scores. Windows of
500 rows, as in tests/monitoring/test_drift.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from distilld.demo.data import Row, load_rows
from distilld.monitoring.config import MonitorsConfig
from distilld.monitoring.evaluate import DRIFT_METRIC, Status, Verdict
from distilld.monitoring.features import Reference, fit_reference
from distilld.monitoring.measure import SUMMARY_JSON, run_check
from distilld.shadow.compare import compare
from distilld.store.base import StoredComparison, TrafficSample
from distilld.store.sqlite import SqliteStore

TASK = "reviews"
LABELS = ["fresh", "rotten"]
MONITORS = MonitorsConfig.model_validate(
    {
        "accuracy": {"window": 400, "min_samples": 100, "threshold": 0.8},
        "drift": {"window": 500, "min_samples": 200, "reference_size": 1000},
    }
)


class Corpus:
    def __init__(self) -> None:
        rows = [r for r in load_rows() if r.text.strip()]
        random.Random(5).shuffle(rows)
        self.reviews = [r for r in rows if r.label is not None]
        self.plots = [r for r in rows if r.category == "plot"]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def traffic(rows: Sequence[Row], seed: int) -> list[TrafficSample]:
    """Rows as the reservoir holds them. The gold label stands in for the student's
    answer and the confidence is drawn from one distribution for every row, so that
    only the inputs themselves can drift."""
    rng = random.Random(seed)
    return [
        TrafficSample(
            task=TASK,
            input_text=r.text,
            metadata={"kind": "plot" if r.label is None else "review"},
            student_output=r.label or rng.choice(LABELS),
            student_confidence=rng.uniform(0.5, 1.0),
            request_id=r.id,
            model_version="v1",
        )
        for r in rows
    ]


class Pins:
    """Stands in for the daemon's LiveReference.pin: keeps what run_check pinned."""

    def __init__(self) -> None:
        self.pinned: list[tuple[str, Reference]] = []

    def __call__(self, version: str, reference: Reference) -> None:
        self.pinned.append((version, reference))


def drift_verdict(verdicts: list[Verdict]) -> Verdict:
    (verdict,) = [v for v in verdicts if v.metric == DRIFT_METRIC]
    return verdict


def test_stationary_traffic_is_not_flagged_against_the_pinned_reference(
    corpus: Corpus, store: SqliteStore, tmp_path: Path
) -> None:
    store.add_traffic(traffic(corpus.reviews[:1500], seed=1))
    pins = Pins()
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=MONITORS,
        store=store,
        reference=None,
        reports_dir=tmp_path / "reports",
        now=1_700_000_000.0,
        model_version="v1",
        pin=pins,
    )
    # v1 came without a reference: its first 1000 requests became it, handed to pin.
    assert [(version, len(ref.frame), ref.origin) for version, ref in pins.pinned] == [
        ("v1", 1000, "pinned")
    ]
    assert outcome.reference_source == "pinned"
    assert outcome.drift is not None
    assert outcome.drift.reference_rows == 1000 and outcome.drift.current_rows == 500
    # descriptors, embedding projection, predicted label, confidence
    assert outcome.drift.tested_columns == 8 + 4 + 1 + 1
    assert drift_verdict(outcome.verdicts).status is Status.ok, outcome.drift.features

    # No comparisons yet: accuracy has no verdict, and says so.
    accuracy = [v for v in outcome.verdicts if v.metric == "agreement"]
    assert [v.status for v in accuracy] == [Status.insufficient_data]

    # Evidently's report and the summaries, under reports/<task>/<UTC time>/.
    assert outcome.report_dir == tmp_path / "reports" / TASK / "20231114T221320000Z"
    assert (outcome.report_dir / "drift.html").stat().st_size > 0
    assert json.loads((outcome.report_dir / "drift.json").read_text())["current_rows"] == 500
    summary = json.loads((outcome.report_dir / SUMMARY_JSON).read_text())
    assert summary["reference_source"] == "pinned"
    assert summary["drift"]["drift_share"] == outcome.drift.drift_share
    assert {v["metric"] for v in summary["verdicts"]} == {"agreement", DRIFT_METRIC}

    stored = store.last_check(TASK)
    assert stored is not None
    assert stored.created_at == 1_700_000_000.0
    assert stored.summary["reference_source"] == "pinned"


@pytest.mark.parametrize("source", ["model", "pinned"])
def test_plot_summaries_after_reviews_are_flagged(
    corpus: Corpus, store: SqliteStore, tmp_path: Path, source: str
) -> None:
    reference: Reference | None = None
    if source == "model":
        # The reference saved with the student: its training reviews, fitted once.
        trained_on = traffic(corpus.reviews[2000:4000], seed=2)
        reference = fit_reference(
            [t.input_text for t in trained_on],
            predicted_labels=[str(t.student_output) for t in trained_on],
            confidences=[t.student_confidence for t in trained_on],
        )
    store.add_traffic(traffic(corpus.reviews[:1000], seed=3))
    store.add_traffic(traffic(corpus.plots[:500], seed=4))
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=MONITORS,
        store=store,
        reference=reference,
        reports_dir=None,
        model_version="v1",
        pin=Pins(),
    )
    assert outcome.reference_source == source
    assert outcome.report_dir is None
    assert outcome.drift is not None
    verdict = drift_verdict(outcome.verdicts)
    assert verdict.status is Status.breach, outcome.drift.features
    assert verdict.value is not None and verdict.value >= MONITORS.drift.drift_share
    assert outcome.drift.feature("char_length").drifted


def test_too_little_traffic_gives_no_drift_verdict(corpus: Corpus, store: SqliteStore) -> None:
    trained_on = traffic(corpus.reviews[2000:2400], seed=2)
    reference = fit_reference(
        [t.input_text for t in trained_on],
        predicted_labels=[str(t.student_output) for t in trained_on],
    )
    store.add_traffic(traffic(corpus.reviews[:150], seed=5))
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=MONITORS,
        store=store,
        reference=reference,
        reports_dir=None,
    )
    assert outcome.drift is None
    assert drift_verdict(outcome.verdicts).status is Status.insufficient_data
    assert outcome.drift_note is not None and "150 recent inputs" in outcome.drift_note

    # Without a reference: a full window, but too few of v1's requests to pin one from
    # (and nothing pinned, nothing measured: no reference is fitted on whatever is there).
    store.add_traffic(traffic(corpus.reviews[150:650], seed=6))
    pins = Pins()
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=MONITORS,
        store=store,
        reference=None,
        reports_dir=None,
        model_version="v1",
        pin=pins,
    )
    assert outcome.drift is None and pins.pinned == []
    assert outcome.reference_source is None
    assert drift_verdict(outcome.verdicts).status is Status.insufficient_data
    assert outcome.drift_note == (
        "no drift reference for version 'v1' yet: one is pinned from the first 1000 requests "
        "it answers (650 so far), and drift is measured from then on"
    )
    assert outcome.summary["drift_note"] == outcome.drift_note

    # Enough requests, but no pin to save the reference with (e.g. no live version).
    store.add_traffic(traffic(corpus.reviews[650:1100], seed=7))
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=MONITORS,
        store=store,
        reference=None,
        reports_dir=None,
    )
    assert outcome.drift is None
    assert outcome.drift_note == "no drift reference and no live version to pin one for"


def test_a_lasting_shift_stays_reported_as_the_reservoir_rotates(
    corpus: Corpus, tmp_path: Path
) -> None:
    # A version that came without a drift reference (adopted, trained elsewhere): its
    # first 200 requests (reviews) are pinned as its reference. Then the traffic shifts
    # to plot summaries for good, for more than the reservoir holds: the reservoir ends
    # up holding nothing but plots, and the drift must still be reported at each check
    # (a reference refitted on the oldest reservoir rows would follow the shift and
    # report a recovery).
    monitors = MonitorsConfig.model_validate(
        {
            "accuracy": {"enabled": False},
            "drift": {"window": 200, "min_samples": 100, "reference_size": 200},
        }
    )
    store = SqliteStore(tmp_path / "state.db", reservoir_per_task=500)
    pins = Pins()
    reference: Reference | None = None

    def check() -> Verdict:
        nonlocal reference
        outcome = run_check(
            TASK,
            kind="classification",
            monitors=monitors,
            store=store,
            reference=reference,
            reports_dir=None,
            model_version="v1",
            pin=pins,
        )
        if pins.pinned:  # the daemon keeps the pinned reference for the version
            reference = pins.pinned[-1][1]
        return drift_verdict(outcome.verdicts)

    try:
        store.add_traffic(traffic(corpus.reviews[:250], seed=10))
        assert check().status is Status.ok
        assert len(pins.pinned) == 1
        statuses = []
        for start in range(0, 1200, 200):  # 1,200 plots through a reservoir of 500
            store.add_traffic(traffic(corpus.plots[start : start + 200], seed=11 + start))
            statuses.append(check().status)
        assert all(r.input_text in {p.text for p in corpus.plots} for r in store.reservoir(TASK))
        assert statuses == [Status.breach] * 6
        assert len(pins.pinned) == 1  # pinned once, never refitted
    finally:
        store.close()


def comparisons(
    rows: Sequence[Row], agreement: float, kind: str, version: str, seed: int
) -> list[StoredComparison]:
    """The teacher answers the gold label; the student agrees at ``agreement``."""
    rng = random.Random(seed)
    stored = []
    for row in rows:
        teacher = row.label or rng.choice(LABELS)
        student = teacher if rng.random() < agreement else LABELS[1 - LABELS.index(teacher)]
        result = compare("classification", student, teacher, labels=LABELS)
        stored.append(
            StoredComparison(
                task=TASK,
                request_id=row.id,
                segment={"kind": kind, "length": "64-255"},
                input_text=row.text,
                student_output=student,
                student_confidence=0.9,
                model_version=version,
                teacher_output=teacher,
                teacher_confidence=0.95,
                teacher_probabilities=None,
                score=result.score,
                schema_valid=bool(result.schema_valid),
            )
        )
    return stored


def test_a_failing_segment_is_caught_while_overall_accuracy_passes(
    corpus: Corpus, store: SqliteStore
) -> None:
    monitors = MONITORS.model_copy(
        update={"drift": MONITORS.drift.model_copy(update={"enabled": False})}
    )
    # The previous student's poor comparisons are still in the window of 400; the
    # check measures the live v2 only.
    store.add_comparisons(comparisons(corpus.reviews[:200], 0.3, "review", "v1", seed=7))
    store.add_comparisons(comparisons(corpus.reviews[200:400], 0.97, "review", "v2", seed=8))
    store.add_comparisons(comparisons(corpus.plots[:100], 0.55, "plot", "v2", seed=9))
    outcome = run_check(
        TASK,
        kind="classification",
        monitors=monitors,
        store=store,
        reference=None,
        reports_dir=None,
        model_version="v2",
    )
    assert outcome.drift is None and outcome.reference_source is None
    assert outcome.accuracy is not None
    assert outcome.accuracy.metric == "agreement"
    assert outcome.accuracy.overall.samples == 300
    by_segment = {v.segment: v for v in outcome.verdicts}
    assert by_segment["all"].status is Status.ok
    assert by_segment["kind=review"].status is Status.ok
    assert by_segment["kind=plot"].status is Status.breach
    assert by_segment["kind=plot"].samples == 100
    interval = by_segment["kind=plot"].interval
    assert interval is not None and interval[1] < monitors.accuracy.threshold

    # Without the version filter the old student's comparisons drag the whole task down.
    mixed = run_check(
        TASK,
        kind="classification",
        monitors=monitors,
        store=store,
        reference=None,
        reports_dir=None,
    )
    assert {v.segment: v.status for v in mixed.verdicts}["all"] is Status.breach
