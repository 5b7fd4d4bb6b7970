"""The monitors and sampling policy sections: defaults, and refusals with clear messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distilld.monitoring.config import (
    AccuracyMonitorConfig,
    DriftMonitorConfig,
    MonitorsConfig,
    SamplingConfig,
)


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    monitors = MonitorsConfig()
    assert monitors.accuracy.min_samples <= monitors.accuracy.window
    assert monitors.drift.min_samples <= monitors.drift.window
    assert MonitorsConfig.model_validate_json(monitors.model_dump_json()) == monitors
    sampling = SamplingConfig()
    assert SamplingConfig.model_validate(sampling.model_dump()) == sampling


def test_a_policy_section_as_written_in_yaml_loads() -> None:
    monitors = MonitorsConfig.model_validate(
        {
            "interval_s": 60,
            "accuracy": {
                "window": 500,
                "min_samples": 100,
                "threshold": 0.85,
                "segments": {"min_samples": 30, "keys": ["kind"]},
            },
            "drift": {
                "features": ["char_length", "embedding", "predicted_label"],
                "numerical_stattest": "wasserstein",
                "per_feature_stattest": {"predicted_label": "jensenshannon"},
                "per_feature_threshold": {"char_length": 0.2},
            },
        }
    )
    assert monitors.accuracy.segments.keys == ["kind"]
    assert monitors.drift.per_feature_stattest == {"predicted_label": "jensenshannon"}


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="treshold"):
        AccuracyMonitorConfig.model_validate({"treshold": 0.9})
    with pytest.raises(ValidationError, match="base_rat"):
        SamplingConfig.model_validate({"base_rat": 0.1})


def test_models_are_frozen() -> None:
    config = DriftMonitorConfig()
    with pytest.raises(ValidationError):
        config.window = 5  # type: ignore[misc]


def test_an_unknown_stattest_names_the_allowed_ones() -> None:
    with pytest.raises(ValidationError) as info:
        DriftMonitorConfig(numerical_stattest="kolmogorov")
    text = str(info.value)
    assert "'kolmogorov' is not an Evidently statistical test for numerical features" in text
    assert "wasserstein" in text


def test_a_numerical_only_test_is_refused_for_the_predicted_label() -> None:
    with pytest.raises(ValidationError, match=r"categorical \(predicted_label\)"):
        DriftMonitorConfig.model_validate({"per_feature_stattest": {"predicted_label": "ks"}})
    with pytest.raises(ValidationError, match="categorical features"):
        DriftMonitorConfig(categorical_stattest="wasserstein")


def test_min_samples_above_the_window_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"min_samples \(300\) is larger than"):
        AccuracyMonitorConfig(window=200, min_samples=300)
    with pytest.raises(ValidationError, match=r"drift.min_samples \(300\)"):
        DriftMonitorConfig(window=200, min_samples=300)


def test_features_must_be_known_distinct_and_not_empty() -> None:
    with pytest.raises(ValidationError, match="char_lenght"):
        DriftMonitorConfig.model_validate({"features": ["char_lenght"]})
    with pytest.raises(ValidationError, match="repeated"):
        DriftMonitorConfig.model_validate({"features": ["oov_share", "oov_share"]})
    with pytest.raises(ValidationError, match="at least one feature"):
        DriftMonitorConfig.model_validate({"features": []})


def test_thresholds_and_rates_are_bounded() -> None:
    with pytest.raises(ValidationError):
        AccuracyMonitorConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        AccuracyMonitorConfig(confidence_level=1.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        DriftMonitorConfig.model_validate({"per_feature_threshold": {"char_length": 0}})
    with pytest.raises(ValidationError):
        SamplingConfig(base_rate=-0.1)
    with pytest.raises(ValidationError):
        SamplingConfig(low_confidence_boost=0.5)


def test_length_buckets_must_increase() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        SamplingConfig(length_buckets=[256, 64])
    with pytest.raises(ValidationError, match="at least one boundary"):
        SamplingConfig(length_buckets=[])


def test_segment_keys_are_plain_distinct_names() -> None:
    assert SamplingConfig(segment_keys=["source", "language"]).segment_keys == [
        "source",
        "language",
    ]
    assert SamplingConfig().segment_keys is None
    with pytest.raises(ValidationError, match=r"without '='.*received \['a=b'\]"):
        SamplingConfig(segment_keys=["a=b"])
    with pytest.raises(ValidationError, match=r"repeated: \['source'\]"):
        SamplingConfig(segment_keys=["source", "source"])
    with pytest.raises(ValidationError, match="at least one key"):
        SamplingConfig(segment_keys=[])
    with pytest.raises(ValidationError, match="'length' is the length bucket, always a segment"):
        SamplingConfig(segment_keys=["length"])


def test_accuracy_segment_keys_may_name_the_length_bucket() -> None:
    segments = AccuracyMonitorConfig.model_validate({"segments": {"keys": ["length", "source"]}})
    assert segments.segments.keys == ["length", "source"]
    with pytest.raises(ValidationError, match="surrounding spaces"):
        AccuracyMonitorConfig.model_validate({"segments": {"keys": [" source"]}})
