"""One monitoring check of one task: read the store, measure, judge, write it down.

:func:`run_check` is what the scheduler runs every ``monitors.interval_s`` and
``distilld check`` runs on demand:

1. accuracy: the last ``accuracy.window`` comparisons from the store (of the
   live model version, when given), mean score with a Wilson interval,
   overall and per segment (:mod:`distilld.monitoring.accuracy`);
2. drift: the last ``drift.window`` rows of the traffic reservoir, described
   with the reference's vocabulary and projection (text descriptors,
   embedding projection, the student's predicted label for classification,
   its confidence) and tested with Evidently against the reference
   (:mod:`distilld.monitoring.drift`);
3. verdicts from :func:`distilld.monitoring.evaluate.evaluate`;
4. the check's JSON summary stored in the store and, with ``save_reports``,
   written with Evidently's HTML report under
   ``reports_dir/<task>/<UTC timestamp>/`` (``drift.html``, ``drift.json``,
   ``summary.json``).

The drift reference is the one saved with the live student (``reference_source
"model"``: the inputs it was trained on). A version without one (a student
trained outside distilld, or before references were saved) gets one pinned
from the first ``drift.reference_size`` requests it answered
(``"pinned"``; :func:`pin_reference`): once fitted, the caller saves it with
the version (``pin``), and it never moves again, so a lasting shift stays
reported until another version is live. (Fitting it afresh on the oldest
reservoir rows at each check would let it follow the bounded reservoir as it
rotates: a lasting shift would become the reference and "recover" by
itself.) Until the version has answered enough requests, drift is not
measured and the check says so. Too few recent rows give no drift
measurement either, and the verdict is insufficient data.

Deciding what to do about the verdicts (alerts, retraining) is the caller's.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distilld.monitoring.accuracy import (
    AccuracyMeasurement,
    Comparison,
    measure_accuracy,
    segment_labels,
)
from distilld.monitoring.config import (
    DEFAULT_MAX_SEGMENT_VALUES,
    DriftMonitorConfig,
    MonitorsConfig,
)
from distilld.monitoring.drift import DriftMeasurement, measure_drift
from distilld.monitoring.evaluate import Verdict, evaluate
from distilld.monitoring.features import (
    MonitoringError,
    Reference,
    ReferenceOrigin,
    describe,
    fit_reference,
)
from distilld.store.base import CheckResult, SampleStore, StoredComparison, TrafficSample

SUMMARY_JSON = "summary.json"
# The per-comparison score each task kind is measured on (see shadow.compare).
METRIC_BY_KIND = {
    "classification": "agreement",
    "extraction": "field_f1",
    "generation": "schema_valid",
}

ReferenceSource = ReferenceOrigin


@dataclass(frozen=True)
class CheckOutcome:
    """What one check measured and decided.

    ``accuracy`` / ``drift`` are None when the monitor is disabled or (drift)
    had too little data; ``drift_note`` then says why. ``report_dir`` is where
    the HTML report and summaries were written (None: not saved).
    """

    task: str
    checked_at: float
    accuracy: AccuracyMeasurement | None
    drift: DriftMeasurement | None
    verdicts: list[Verdict]
    reference_source: ReferenceSource | None
    drift_note: str | None
    report_dir: Path | None
    summary: dict[str, Any]


def run_check(
    task: str,
    *,
    kind: str,
    monitors: MonitorsConfig,
    store: SampleStore,
    reference: Reference | None,
    reports_dir: Path | None,
    now: float | None = None,
    model_version: str | None = None,
    pin: Callable[[str, Reference], None] | None = None,
    pin_size: int | None = None,
    max_values_per_key: int = DEFAULT_MAX_SEGMENT_VALUES,
) -> CheckOutcome:
    """Measure accuracy and drift of ``task`` now, evaluate them, store the summary.

    ``kind`` is the policy's task kind; ``reference`` the live student's drift
    reference (None: it has none yet); ``model_version`` restricts accuracy to
    the live student's comparisons. Without a reference, one is fitted on the
    first ``pin_size`` requests (default ``drift.reference_size``) that
    ``model_version`` answered, once it has answered them, and handed to
    ``pin(model_version, reference)`` to be saved with the version; without
    ``pin`` (or a version), drift is not measured. ``max_values_per_key`` bounds
    the segments reported per key. Raises MonitoringError (or the store's
    StoreError) when the check cannot be made.
    """
    if kind not in METRIC_BY_KIND:
        raise MonitoringError(
            f"task {task!r}: unknown task kind {kind!r}; expected one of {list(METRIC_BY_KIND)}"
        )
    checked_at = time.time() if now is None else now
    started = time.perf_counter()
    report_dir = None
    if monitors.save_reports and reports_dir is not None:
        report_dir = _report_dir(reports_dir, task, checked_at)

    accuracy = None
    if monitors.accuracy.enabled:
        accuracy = current_accuracy(
            task,
            kind=kind,
            monitors=monitors,
            store=store,
            model_version=model_version,
            max_values_per_key=max_values_per_key,
        )

    drift = None
    source: ReferenceSource | None = None
    note = None
    if monitors.drift.enabled:
        if reference is None:
            reference, note = _pinned(
                task, kind, monitors.drift, store, model_version, pin, pin_size
            )
        if reference is not None:
            source = reference.origin
            drift, note = _measure_drift(task, kind, monitors, store, reference, report_dir)

    verdicts = evaluate(task, monitors, accuracy=accuracy, drift=drift)
    summary = _summary(
        task, checked_at, model_version, accuracy, drift, source, note, verdicts, report_dir
    )
    summary["elapsed_s"] = round(time.perf_counter() - started, 3)
    if report_dir is not None:
        _write_json(report_dir / SUMMARY_JSON, summary)
    store.add_check(CheckResult(task=task, summary=summary, created_at=checked_at))
    return CheckOutcome(
        task=task,
        checked_at=checked_at,
        accuracy=accuracy,
        drift=drift,
        verdicts=verdicts,
        reference_source=source,
        drift_note=note,
        report_dir=report_dir,
        summary=summary,
    )


# --------------------------------------------------------------------------- accuracy


def current_accuracy(
    task: str,
    *,
    kind: str,
    monitors: MonitorsConfig,
    store: SampleStore,
    model_version: str | None = None,
    max_values_per_key: int = DEFAULT_MAX_SEGMENT_VALUES,
) -> AccuracyMeasurement:
    """The accuracy monitor's measurement over the stored comparisons, right now
    (what a check would measure; ``distilld status`` shows it between checks)."""
    stored = store.last_comparisons(task, monitors.accuracy.window)
    return measure_accuracy(
        _comparisons(stored),
        monitors.accuracy,
        task=task,
        metric=METRIC_BY_KIND[kind],
        model_version=model_version,
        max_values_per_key=max_values_per_key,
    )


def _comparisons(stored: list[StoredComparison]) -> list[Comparison]:
    """Scored comparisons as the accuracy monitor reads them (unscored ones carry no
    measurement: the teacher gave no usable answer)."""
    return [
        Comparison(
            task=c.task,
            request_id=c.request_id,
            segments=segment_labels(c.segment),
            student_output=c.student_output,
            teacher_output=c.teacher_output,
            student_confidence=c.student_confidence,
            teacher_confidence=c.teacher_confidence,
            model_version=c.model_version,
            score=c.score,
            schema_valid=c.schema_valid,
            timestamp=c.created_at,
        )
        for c in stored
        if c.score is not None
    ]


# --------------------------------------------------------------------------- drift


def pin_reference(
    rows: list[TrafficSample],
    *,
    kind: str,
    version: str,
    config: DriftMonitorConfig,
    size: int | None = None,
) -> tuple[Reference | None, int]:
    """A drift reference fitted on the first ``size`` rows (default
    ``config.reference_size``) answered by ``version``, among reservoir ``rows``
    (oldest first), and how many such rows there are; (None, found) while fewer."""
    needed = config.reference_size if size is None else size
    first = [r for r in rows if r.model_version == version][:needed]
    if len(first) < needed:
        return None, len(first)
    with_labels = kind == "classification"
    reference = fit_reference(
        [r.input_text for r in first],
        predicted_labels=_labels(first) if with_labels else None,
        confidences=[_confidence(r) for r in first],
        embedding_dims=config.embedding_dims,
    )
    return replace(reference, origin="pinned"), len(first)


def _pinned(
    task: str,
    kind: str,
    config: DriftMonitorConfig,
    store: SampleStore,
    version: str | None,
    pin: Callable[[str, Reference], None] | None,
    size: int | None,
) -> tuple[Reference | None, str | None]:
    """The reference pinned for ``version`` now, or why there is none yet."""
    needed = config.reference_size if size is None else size
    if version is None:
        return None, "no drift reference and no live version to pin one for"
    reference, found = pin_reference(
        store.reservoir(task), kind=kind, version=version, config=config, size=needed
    )
    if reference is None or pin is None:
        return None, (
            f"no drift reference for version {version!r} yet: one is pinned from the first "
            f"{needed} requests it answers ({found} so far), and drift is measured from then on"
        )
    pin(version, reference)
    return reference, None


def _measure_drift(
    task: str,
    kind: str,
    monitors: MonitorsConfig,
    store: SampleStore,
    reference: Reference,
    report_dir: Path | None,
) -> tuple[DriftMeasurement | None, str | None]:
    config = monitors.drift
    current = store.reservoir(task, limit=config.window)
    if len(current) < config.min_samples:
        return (
            None,
            f"{len(current)} recent inputs, fewer than drift.min_samples={config.min_samples}",
        )
    with_labels = kind == "classification"
    current_frame = describe(
        [r.input_text for r in current],
        reference.profile,
        predicted_labels=_labels(current) if with_labels else None,
        confidences=[_confidence(r) for r in current],
    )
    measurement = measure_drift(reference.frame, current_frame, config, report_dir=report_dir)
    return measurement, None


def _labels(rows: list[TrafficSample]) -> list[str]:
    # A classification student answers with a label string; anything else (an
    # invalid output kept as raw text) is still a category of its own.
    return [r.student_output if isinstance(r.student_output, str) else "(invalid)" for r in rows]


def _confidence(row: TrafficSample) -> float:
    return min(1.0, max(0.0, float(row.student_confidence)))


# --------------------------------------------------------------------------- reports


#: The name of a check's report folder (``_report_dir``): UTC time to the millisecond,
#: so that names sort as the checks ran. Retention deletes only folders named so.
REPORT_DIR_NAME = re.compile(r"\d{8}T\d{9}Z")


def _report_dir(reports_dir: Path, task: str, checked_at: float) -> Path:
    # Milliseconds: a check on demand may run in the same second as a scheduled one.
    moment = datetime.fromtimestamp(checked_at, tz=UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S") + f"{moment.microsecond // 1000:03d}Z"
    return reports_dir / task / stamp


def _summary(
    task: str,
    checked_at: float,
    model_version: str | None,
    accuracy: AccuracyMeasurement | None,
    drift: DriftMeasurement | None,
    source: ReferenceSource | None,
    note: str | None,
    verdicts: list[Verdict],
    report_dir: Path | None,
) -> dict[str, Any]:
    return {
        "task": task,
        "checked_at": datetime.fromtimestamp(checked_at, tz=UTC).isoformat(),
        "model_version": model_version,
        "accuracy": asdict(accuracy) if accuracy is not None else None,
        "drift": drift.to_dict() if drift is not None else None,
        "drift_note": note,
        "reference_source": source,
        "verdicts": [asdict(v) for v in verdicts],
        "report_dir": str(report_dir) if report_dir is not None else None,
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a person (or a tool) never reads a half-written summary.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise MonitoringError(
            f"could not write the check summary {path}: {exc}; check that the reports "
            "directory is writable"
        ) from exc
