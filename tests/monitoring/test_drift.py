"""Drift with the real Evidently on real data (Rotten Tomatoes).

Stationary traffic (reviews against other reviews) must not be flagged;
a change of population (plot summaries instead of reviews) must be. Windows
of 500 rows against a 2,000-row reference, as in production where the
reference holds more than 1,000 rows and Evidently uses distance measures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distilld.demo.data import load_rows
from distilld.monitoring.config import DriftMonitorConfig, MonitorsConfig
from distilld.monitoring.drift import MonitoringError, measure_drift, select_columns
from distilld.monitoring.evaluate import Status, drift_verdict
from distilld.monitoring.features import Reference, describe, fit_reference

CONFIG = DriftMonitorConfig(window=500, min_samples=200)
WINDOW = 500


class Corpus:
    def __init__(self) -> None:
        rows = [r for r in load_rows() if r.text.strip()]
        random.Random(11).shuffle(rows)
        self.reviews = [r for r in rows if r.label is not None]
        self.plots = [r for r in rows if r.category == "plot"]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


@pytest.fixture(scope="module")
def reference(corpus: Corpus) -> Reference:
    reviews = corpus.reviews[:2000]
    # The gold labels stand in for the student's answers on its training inputs.
    return fit_reference(
        [r.text for r in reviews], predicted_labels=[str(r.label) for r in reviews]
    )


def test_stationary_reviews_are_not_flagged(corpus: Corpus, reference: Reference) -> None:
    window = corpus.reviews[3000 : 3000 + WINDOW]
    current = describe(
        [r.text for r in window],
        reference.profile,
        predicted_labels=[str(r.label) for r in window],
    )
    measurement = measure_drift(reference.frame, current, CONFIG)
    assert measurement.current_rows == WINDOW
    assert measurement.reference_rows == 2000
    assert measurement.tested_columns == 8 + 4 + 1  # descriptors, embedding, label
    assert not measurement.dataset_drift, measurement.features
    assert measurement.drift_share < CONFIG.drift_share
    assert not measurement.feature("predicted_label").drifted
    assert drift_verdict("reviews", measurement, CONFIG).status is Status.ok


def test_plot_summaries_instead_of_reviews_are_flagged(
    corpus: Corpus, reference: Reference
) -> None:
    window = corpus.plots[:WINDOW]
    current = describe([r.text for r in window], reference.profile)
    config = CONFIG.model_copy(
        update={"features": ["char_length", "word_count", "oov_share", "embedding"]}
    )
    measurement = measure_drift(reference.frame, current, config)
    assert measurement.dataset_drift
    assert measurement.drift_share >= 0.9
    # Evidently's count agrees with its per-column verdicts.
    assert measurement.drifted_columns == sum(f.drifted for f in measurement.features)
    assert measurement.feature("char_length").drifted
    assert measurement.feature("oov_share").drifted
    verdict = drift_verdict("reviews", measurement, config)
    assert (verdict.status, verdict.value) == (Status.breach, measurement.drift_share)


def test_reports_are_written_and_policy_tests_are_used(
    corpus: Corpus, reference: Reference, tmp_path: Path
) -> None:
    window = corpus.reviews[4000 : 4000 + 300]
    current = describe([r.text for r in window], reference.profile)
    config = DriftMonitorConfig(
        window=300,
        min_samples=100,
        reference_size=800,  # at most 1,000 rows: Evidently's p-value tests by default
        features=["char_length", "word_count", "embedding"],
        per_feature_stattest={"char_length": "psi"},
        per_feature_threshold={"char_length": 0.3},
    )
    measurement = measure_drift(reference.frame, current, config, report_dir=tmp_path / "check-1")
    assert measurement.reference_rows == 800
    assert measurement.feature("char_length").stattest == "psi"
    assert measurement.feature("char_length").threshold == 0.3
    assert measurement.feature("word_count").stattest == "K-S p_value"
    assert measurement.feature("word_count").threshold == 0.05
    html = (tmp_path / "check-1" / "drift.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()
    summary = json.loads((tmp_path / "check-1" / "drift.json").read_text(encoding="utf-8"))
    assert summary["drift_share"] == measurement.drift_share
    assert [f["column"] for f in summary["features"]] == [
        "char_length",
        "word_count",
        "embedding_0",
        "embedding_1",
        "embedding_2",
        "embedding_3",
    ]
    assert summary["evidently_version"] == "0.7.23"


def test_evidently_errors_are_wrapped() -> None:
    rng = np.random.default_rng(0)

    def frame() -> pd.DataFrame:
        return pd.DataFrame(
            {"char_length": rng.normal(size=100), "predicted_label": rng.choice(list("abc"), 100)}
        )

    # Fisher's exact test only takes two categories: Evidently raises.
    config = DriftMonitorConfig(
        window=100, min_samples=50, per_feature_stattest={"predicted_label": "fisher_exact"}
    )
    with pytest.raises(MonitoringError, match=r"Evidently failed to compute drift.*binary"):
        measure_drift(frame(), frame(), config)


def test_inputs_are_checked_before_evidently_runs() -> None:
    reference = pd.DataFrame({"char_length": [1.0, 2.0, 3.0], "predicted_label": ["a", "b", "a"]})
    no_labels = pd.DataFrame({"char_length": [1.0, 2.0, 3.0]})
    config = DriftMonitorConfig(window=10, min_samples=10, features=["predicted_label"])
    with pytest.raises(MonitoringError, match="feature 'predicted_label' is configured"):
        measure_drift(reference, no_labels, config)
    # Without a feature list, only the columns both sides have are tested.
    assert select_columns(reference, no_labels, None) == ["char_length"]
    with pytest.raises(MonitoringError, match="share no feature column"):
        select_columns(reference, pd.DataFrame({"x": [1]}), None)
    broken = reference.assign(char_length=[1.0, float("nan"), 3.0])
    with pytest.raises(MonitoringError, match="'char_length' has 1 missing or non-numeric"):
        measure_drift(broken, reference, DriftMonitorConfig(window=10, min_samples=10))
    with pytest.raises(MonitoringError, match="at least 2 reference and 2 current rows"):
        measure_drift(reference, reference.head(1), DriftMonitorConfig(window=10, min_samples=10))


def test_default_policy_section_works_end_to_end(corpus: Corpus, reference: Reference) -> None:
    # The shipped defaults (window 1,000, reference up to 5,000 rows) on another
    # stationary window of real traffic.
    config = MonitorsConfig().drift
    window = corpus.reviews[5000 : 5000 + config.window]
    current = describe(
        [r.text for r in window],
        reference.profile,
        predicted_labels=[str(r.label) for r in window],
    )
    measurement = measure_drift(reference.frame, current, config)
    assert measurement.current_rows == config.window
    assert drift_verdict("reviews", measurement, config).status is Status.ok
