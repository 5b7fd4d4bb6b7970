"""Input drift with Evidently: recent traffic's features against the reference's.

One call runs one Evidently ``DataDriftPreset`` report over the feature
columns of :mod:`distilld.monitoring.features` and returns a plain
:class:`DriftMeasurement`: the share of drifted features and, per feature, the
statistical test Evidently used, its score, threshold and verdict. Deciding
whether that is a breach is :mod:`distilld.monitoring.evaluate`'s job.

Evidently is imported inside the function: the import takes 5 to 8 s, and
the serving path and the CLI must not pay for it. Every Evidently error is
wrapped into :class:`MonitoringError` here, where it enters our code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from distilld.monitoring.config import CATEGORICAL_FEATURES, DriftMonitorConfig
from distilld.monitoring.features import (
    CONFIDENCE_COLUMN,
    DESCRIPTOR_COLUMNS,
    EMBEDDING_PREFIX,
    LABEL_COLUMN,
    MonitoringError,
)

__all__ = ["DriftMeasurement", "FeatureDrift", "MonitoringError", "measure_drift"]

REPORT_HTML = "drift.html"
SUMMARY_JSON = "drift.json"
# A fixed seed: the same reference file always yields the same sample.
_REFERENCE_SAMPLE_SEED = 0


@dataclass(frozen=True)
class FeatureDrift:
    """Evidently's test of one feature column.

    ``score`` is a p-value for test-based methods (ks, chisquare, z ...: drift
    when below ``threshold``) and a distance for the others (wasserstein, psi,
    jensenshannon ...: drift when at or above it); ``drifted`` is Evidently's
    own verdict, so callers never need to know which kind it was.
    """

    column: str
    stattest: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftMeasurement:
    """One drift check. ``drift_share`` = drifted_columns / tested_columns."""

    reference_rows: int
    current_rows: int
    tested_columns: int
    drifted_columns: int
    drift_share: float
    share_threshold: float
    dataset_drift: bool  # drift_share >= share_threshold: Evidently's dataset-drift rule
    features: tuple[FeatureDrift, ...]
    evidently_version: str
    elapsed_s: float

    def feature(self, column: str) -> FeatureDrift:
        for item in self.features:
            if item.column == column:
                return item
        raise KeyError(f"no drift result for column {column!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _feature_columns(feature: str, frame: pd.DataFrame) -> list[str]:
    if feature == "embedding":
        return [c for c in frame.columns if str(c).startswith(EMBEDDING_PREFIX)]
    return [feature] if feature in frame.columns else []


def _known_columns(frame: pd.DataFrame) -> list[str]:
    known = [*DESCRIPTOR_COLUMNS, "embedding", LABEL_COLUMN, CONFIDENCE_COLUMN]
    return [c for feature in known for c in _feature_columns(feature, frame)]


def select_columns(
    reference: pd.DataFrame, current: pd.DataFrame, features: Sequence[str] | None
) -> list[str]:
    """The columns to test: those of ``features``, or every known feature in both frames."""
    if features is None:
        current_columns = set(current.columns)
        columns = [c for c in _known_columns(reference) if c in current_columns]
        if not columns:
            raise MonitoringError(
                "reference and current data share no feature column; expected columns "
                f"such as {list(DESCRIPTOR_COLUMNS[:3])} (received reference columns "
                f"{list(reference.columns)[:10]}, current columns {list(current.columns)[:10]})"
            )
        return columns
    columns = []
    for feature in features:
        in_reference = _feature_columns(feature, reference)
        in_current = _feature_columns(feature, current)
        if not in_reference or in_reference != in_current:
            raise MonitoringError(
                f"feature {feature!r} is configured for drift but its columns differ between "
                f"the reference ({in_reference}) and the current data ({in_current}); give "
                "the student's answers for both sides or drop the feature from drift.features"
            )
        columns.extend(in_reference)
    return columns


def _per_column(
    settings: dict[Any, Any], reference: pd.DataFrame, tested: list[str]
) -> dict[str, Any] | None:
    # Policy keys are feature names; Evidently's are column names ("embedding"
    # covers embedding_0, embedding_1, ...). Settings of untested features drop out.
    by_column = {
        column: value
        for feature, value in settings.items()
        for column in _feature_columns(feature, reference)
        if column in tested
    }
    return by_column or None


def _check_values(frame: pd.DataFrame, numerical: list[str], side: str) -> None:
    for column in numerical:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = int((~values.map(math.isfinite)).sum())
        if bad:
            raise MonitoringError(
                f"{side} column {column!r} has {bad} missing or non-numeric values; features "
                "must be finite numbers (describe the inputs with monitoring.features)"
            )


def _import_evidently() -> Any:
    """Evidently, imported on first use (5 to 8 s); a broken install is a MonitoringError."""
    try:
        with warnings.catch_warnings():
            # Its dependencies (numpy.core, litestar) warn about deprecations on
            # import; nothing distilld can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            import evidently
            import evidently.presets
    except Exception as exc:
        raise MonitoringError(
            f"Evidently cannot be imported ({type(exc).__name__}: {exc}); distilld needs "
            "evidently==0.7.23 with pandas<3: pip install 'evidently==0.7.23' 'pandas<3'"
        ) from exc
    return evidently


def measure_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    config: DriftMonitorConfig,
    *,
    report_dir: Path | None = None,
) -> DriftMeasurement:
    """Run Evidently's drift preset on ``current`` (its last ``config.window`` rows)
    against ``reference`` (a fixed sample of ``config.reference_size`` rows).

    With ``report_dir``, also writes ``drift.html`` (Evidently's report) and
    ``drift.json`` (this measurement) there. Whether the current window is
    large enough for a verdict (``config.min_samples``) is decided by policy
    evaluation, which sees ``current_rows``.
    """
    current = current.tail(config.window)
    if len(reference) > config.reference_size:
        reference = reference.sample(n=config.reference_size, random_state=_REFERENCE_SAMPLE_SEED)
    if len(reference) < 2 or len(current) < 2:
        raise MonitoringError(
            f"drift needs at least 2 reference and 2 current rows (received {len(reference)} "
            f"and {len(current)}); wait for more traffic before checking"
        )
    columns = select_columns(reference, current, config.features)
    categorical = [c for c in columns if c in CATEGORICAL_FEATURES]
    numerical = [c for c in columns if c not in CATEGORICAL_FEATURES]
    _check_values(reference, numerical, "reference")
    _check_values(current, numerical, "current")
    reference = reference[columns].reset_index(drop=True)
    current = current[columns].reset_index(drop=True)

    evidently = _import_evidently()
    started = time.perf_counter()
    try:
        definition = evidently.DataDefinition(
            numerical_columns=numerical, categorical_columns=categorical
        )
        preset = evidently.presets.DataDriftPreset(
            columns=columns,
            drift_share=config.drift_share,
            num_method=config.numerical_stattest,
            cat_method=config.categorical_stattest,
            num_threshold=config.numerical_threshold,
            cat_threshold=config.categorical_threshold,
            per_column_method=_per_column(config.per_feature_stattest, reference, columns),
            per_column_threshold=_per_column(config.per_feature_threshold, reference, columns),
        )
        with warnings.catch_warnings():
            # Evidently's report widgets divide by a zero standard deviation on
            # constant columns (no digits in any input, say) and numpy warns;
            # the drift results are unaffected, the noise would flood the logs.
            warnings.simplefilter("ignore", RuntimeWarning)
            # include_tests: each column's drift verdict comes back as a test status.
            snapshot = evidently.Report([preset], include_tests=True).run(
                evidently.Dataset.from_pandas(current, data_definition=definition),
                evidently.Dataset.from_pandas(reference, data_definition=definition),
            )
            result = snapshot.dict()
    except Exception as exc:
        raise MonitoringError(
            f"Evidently failed to compute drift over {len(columns)} columns "
            f"({len(reference)} reference rows, {len(current)} current rows): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    elapsed = time.perf_counter() - started

    features, drifted, share = _parse(result, columns)
    measurement = DriftMeasurement(
        reference_rows=len(reference),
        current_rows=len(current),
        tested_columns=len(columns),
        drifted_columns=drifted,
        drift_share=share,
        share_threshold=config.drift_share,
        dataset_drift=share >= config.drift_share,
        features=features,
        evidently_version=str(evidently.__version__),
        elapsed_s=elapsed,
    )
    if report_dir is not None:
        _write_reports(snapshot, measurement, report_dir)
    return measurement


def _parse(
    result: dict[str, Any], columns: list[str]
) -> tuple[tuple[FeatureDrift, ...], int, float]:
    """Per-column results, drifted count and share from ``Snapshot.dict()``.

    Evidently 0.7 reports a ``DriftedColumnsCount`` metric (count and share),
    one ``ValueDrift`` metric per column (score, resolved method and
    threshold), and with ``include_tests`` one test per column whose status
    FAIL means drift.
    """
    try:
        status_by_metric = {
            test["metric_config"]["metric_id"]: test["status"]
            for test in result["tests"]
            if test.get("id") == "drift"
        }
        by_column: dict[str, FeatureDrift] = {}
        count: dict[str, float] | None = None
        for metric in result["metrics"]:
            config = metric["config"]
            kind = config["type"]
            if kind.endswith(":DriftedColumnsCount"):
                count = metric["value"]
            elif kind.endswith(":ValueDrift"):
                column = config["column"]
                status = status_by_metric[metric["id"]]
                by_column[column] = FeatureDrift(
                    column=column,
                    stattest=str(config["method"]),
                    score=float(metric["value"]),
                    threshold=float(config["threshold"]),
                    drifted=status == "FAIL",
                )
        if count is None:
            raise KeyError("DriftedColumnsCount")
        missing = [c for c in columns if c not in by_column]
        if missing:
            raise KeyError(f"ValueDrift for {missing}")
        features = tuple(by_column[c] for c in columns)
        drifted = int(count["count"])
        share = float(count["share"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MonitoringError(
            f"Evidently's drift result does not have the expected shape ({exc!r}); distilld "
            "reads Evidently 0.7's DataDriftPreset output (pin evidently==0.7.23)"
        ) from exc
    return features, drifted, share


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_reports(snapshot: Any, measurement: DriftMeasurement, report_dir: Path) -> None:
    def summary(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(measurement.to_dict(), indent=2), encoding="utf-8")

    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(report_dir / REPORT_HTML, snapshot.save_html)
        _write_atomic(report_dir / SUMMARY_JSON, summary)
    except MonitoringError:
        raise
    except Exception as exc:
        raise MonitoringError(
            f"could not write the drift report to {report_dir}: {type(exc).__name__}: {exc}; "
            "check that the reports directory is writable"
        ) from exc
