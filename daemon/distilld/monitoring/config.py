"""The `monitors` and `sampling` sections of a policy, as pydantic models.

Self-contained on purpose: ``policy/model.py`` plugs these models into
:class:`~distilld.policy.model.Policy`, and the monitoring code reads them,
so this module imports neither (no cycle). Like every policy model they
forbid unknown keys and are frozen.

Importing this module must stay cheap: it does not import Evidently. The
names of Evidently's statistical tests are listed here so that a typo in a
policy is refused when the policy loads, not at the first drift check hours
later.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distilld.policy.common import StrictModel, check_segment_keys
from distilld.vocabulary import LENGTH_SEGMENT_KEY, OTHER_SEGMENT_VALUE

# The per-input descriptors computed by monitoring/features.py. "embedding"
# stands for all the columns of the low-dimensional embedding projection.
DESCRIPTOR_FEATURES = (
    "char_length",
    "word_count",
    "mean_word_length",
    "oov_share",
    "digit_share",
    "uppercase_share",
    "punctuation_share",
    "non_ascii_share",
)
FeatureName = Literal[
    "char_length",
    "word_count",
    "mean_word_length",
    "oov_share",
    "digit_share",
    "uppercase_share",
    "punctuation_share",
    "non_ascii_share",
    "embedding",
    "predicted_label",
    "confidence",
]
# At most this many distinct values of one metadata segment key are tracked (by the
# sampler, the accuracy monitor); the values beyond them share OTHER_SEGMENT_VALUE, so
# that producers cannot grow memory, alerts or teacher calls with made-up values.
DEFAULT_MAX_SEGMENT_VALUES = 50
# The one categorical feature; every other feature is numerical.
CATEGORICAL_FEATURES = frozenset({"predicted_label"})

# Evidently 0.7's registered statistical tests, by the column type they accept
# (text-only tests are left out: raw text is never sent to Evidently).
NUMERICAL_STATTESTS = frozenset(
    {
        "anderson",
        "cramer_von_mises",
        "ed",
        "empirical_mmd",
        "es",
        "hellinger",
        "jensenshannon",
        "kl_div",
        "ks",
        "mannw",
        "psi",
        "t_test",
        "wasserstein",
    }
)
CATEGORICAL_STATTESTS = frozenset(
    {
        "chisquare",
        "fisher_exact",
        "g_test",
        "hellinger",
        "jensenshannon",
        "kl_div",
        "psi",
        "TVD",
        "z",
    }
)


def _check_stattest(name: str, allowed: frozenset[str], kind: str) -> str:
    if name not in allowed:
        raise ValueError(
            f"{name!r} is not an Evidently statistical test for {kind} features; "
            f"expected one of {sorted(allowed)}"
        )
    return name


class SegmentAccuracyConfig(StrictModel):
    """Accuracy per segment: a student that is fine overall can fail one segment."""

    enabled: bool = Field(default=True, description="Also measure each segment on its own.")
    min_samples: int = Field(
        default=50,
        ge=1,
        description="Comparisons a segment needs in the window before it gets a verdict.",
    )
    keys: list[str] | None = Field(
        default=None,
        description="Segment keys to check (e.g. [source, length]). Unset: every key seen. "
        "With sampling.segment_keys set, each key must be one of them or length.",
    )

    _keys = field_validator("keys")(check_segment_keys)


class AccuracyMonitorConfig(StrictModel):
    """Student-vs-teacher agreement (or the task metric) over the last comparisons.

    Comparisons come from the teacher: a policy without a ``teacher`` section
    has none, so this monitor reports insufficient data and never a verdict.
    """

    enabled: bool = True
    window: int = Field(
        default=1000, ge=1, description="How many of the most recent comparisons are measured."
    )
    min_samples: int = Field(
        default=200,
        ge=1,
        description="Comparisons the window needs before any overall verdict (below it: "
        "insufficient data, never a breach).",
    )
    threshold: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Minimum acceptable mean score: agreement rate for classification, "
        "field F1 for extraction, schema-valid rate for generation.",
    )
    confidence_level: float = Field(
        default=0.95,
        gt=0.5,
        lt=1.0,
        description="Confidence level of the Wilson interval around the measured value.",
    )
    breach_when: Literal["upper_bound", "estimate"] = Field(
        default="upper_bound",
        description="upper_bound: breach only when the whole interval lies below the "
        "threshold (few false alarms); estimate: breach as soon as the measured value does.",
    )
    segments: SegmentAccuracyConfig = SegmentAccuracyConfig()

    @model_validator(mode="after")
    def _window_holds_min_samples(self) -> AccuracyMonitorConfig:
        if self.min_samples > self.window:
            raise ValueError(
                f"accuracy.min_samples ({self.min_samples}) is larger than accuracy.window "
                f"({self.window}): no verdict could ever be reached; lower min_samples or "
                "raise window"
            )
        return self


class DriftMonitorConfig(StrictModel):
    """Input drift with Evidently: recent traffic against the student's training inputs."""

    enabled: bool = True
    window: int = Field(
        default=1000, ge=10, description="How many of the most recent inputs form the current data."
    )
    min_samples: int = Field(
        default=200, ge=10, description="Inputs the window needs before any drift verdict."
    )
    reference_size: int = Field(
        default=5000,
        ge=10,
        description="At most this many reference rows are used (a fixed sample beyond it). "
        "Evidently picks p-value tests up to 1,000 reference rows and distance measures above.",
    )
    drift_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Dataset drift when at least this share of the tested features drifted.",
    )
    features: list[FeatureName] | None = Field(
        default=None,
        description="Features to test. Unset: every feature present in both the reference "
        "and the current data. predicted_label exists for classification tasks only.",
    )
    embedding_dims: int = Field(
        default=4,
        ge=1,
        le=32,
        description="Components of the embedding projection, fixed when the reference is "
        "fitted (features.fit_reference) with the student.",
    )
    numerical_stattest: str | None = Field(
        default=None,
        description="Evidently test for numerical features (ks, wasserstein, psi ...). "
        "Unset: Evidently's choice by data size.",
    )
    categorical_stattest: str | None = Field(
        default=None,
        description="Evidently test for the predicted label (chisquare, z, jensenshannon ...). "
        "Unset: Evidently's choice.",
    )
    numerical_threshold: float | None = Field(
        default=None, gt=0.0, description="Threshold of the numerical test. Unset: its default."
    )
    categorical_threshold: float | None = Field(
        default=None, gt=0.0, description="Threshold of the categorical test. Unset: its default."
    )
    per_feature_stattest: dict[FeatureName, str] = Field(
        default_factory=dict, description="Evidently test for one feature, overriding the above."
    )
    per_feature_threshold: dict[FeatureName, float] = Field(
        default_factory=dict, description="Threshold for one feature, overriding the above."
    )

    @field_validator("numerical_stattest")
    def _numerical(cls, value: str | None) -> str | None:
        return None if value is None else _check_stattest(value, NUMERICAL_STATTESTS, "numerical")

    @field_validator("categorical_stattest")
    def _categorical(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_stattest(value, CATEGORICAL_STATTESTS, "categorical")

    @field_validator("per_feature_stattest")
    def _per_feature(cls, value: dict[FeatureName, str]) -> dict[FeatureName, str]:
        for feature, name in value.items():
            if feature in CATEGORICAL_FEATURES:
                _check_stattest(name, CATEGORICAL_STATTESTS, f"categorical ({feature})")
            else:
                _check_stattest(name, NUMERICAL_STATTESTS, f"numerical ({feature})")
        return value

    @field_validator("per_feature_threshold")
    def _positive_thresholds(cls, value: dict[FeatureName, float]) -> dict[FeatureName, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"thresholds must be greater than 0 (received {bad})")
        return value

    @field_validator("features")
    def _distinct_features(cls, value: list[FeatureName] | None) -> list[FeatureName] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one feature, or be left out to test them all")
        repeated = sorted({f for f in value if value.count(f) > 1})
        if repeated:
            raise ValueError(f"features must be distinct (repeated: {repeated})")
        return value

    @model_validator(mode="after")
    def _window_holds_min_samples(self) -> DriftMonitorConfig:
        if self.min_samples > self.window:
            raise ValueError(
                f"drift.min_samples ({self.min_samples}) is larger than drift.window "
                f"({self.window}): no verdict could ever be reached; lower min_samples or "
                "raise window"
            )
        return self


class MonitorsConfig(StrictModel):
    """The `monitors` section: when checks run and what they measure.

    Drift needs no teacher (it compares recent inputs with the student's
    training inputs); accuracy needs one (see :class:`AccuracyMonitorConfig`).
    """

    interval_s: float = Field(
        default=300.0, ge=1.0, le=7 * 24 * 3600, description="Seconds between two checks."
    )
    save_reports: bool = Field(
        default=True,
        description="Write each check's Evidently HTML report and JSON summary to the "
        "reports directory.",
    )
    accuracy: AccuracyMonitorConfig = AccuracyMonitorConfig()
    drift: DriftMonitorConfig = DriftMonitorConfig()


class SamplingConfig(StrictModel):
    """The `sampling` section: which requests are also sent to the teacher.

    Only meaningful with a ``teacher`` section: without a teacher no request
    is compared, and the policy refuses a ``sampling`` section.
    """

    base_rate: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Share of requests compared with the teacher."
    )
    min_per_segment: int = Field(
        default=50,
        ge=0,
        description="A segment with fewer comparisons than this in the accuracy window is "
        "sampled at rate 1 until it has them, so rare segments get a verdict too.",
    )
    low_confidence_threshold: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="Student answers with a confidence below this count as low-confidence.",
    )
    low_confidence_boost: float = Field(
        default=4.0, ge=1.0, description="Rate multiplier for low-confidence answers."
    )
    edge_case_boost: float = Field(
        default=3.0,
        ge=1.0,
        description="Rate multiplier for edge cases: inputs in the shortest or longest "
        "length bucket, or with an out-of-vocabulary share above edge_case_oov_share.",
    )
    edge_case_oov_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Out-of-vocabulary share above which an input counts as an edge case.",
    )
    length_buckets: list[int] = Field(
        default_factory=lambda: [64, 256, 1024],
        description="Increasing character-length boundaries; an input's length bucket is "
        "a segment (length=<64, length=64-255, ...).",
    )

    segment_keys: list[str] | None = Field(
        default=None,
        description="Request metadata keys that form segments (e.g. [source, language]); "
        "the length bucket (key length) is always one. Unset: no metadata key, only the "
        "length bucket (metadata a producer sets is never a segment unless declared here).",
    )
    max_values_per_key: int = Field(
        default=DEFAULT_MAX_SEGMENT_VALUES,
        ge=1,
        le=10_000,
        description="Distinct values tracked per segment key; a new value beyond them "
        f"counts as {OTHER_SEGMENT_VALUE!r} (a value unseen for 10 accuracy windows of "
        "requests gives its place up). Bounds the rare segments sampled at rate 1, and "
        "the segments the accuracy monitor reports.",
    )

    @field_validator("segment_keys")
    def _segment_keys(cls, value: list[str] | None) -> list[str] | None:
        value = check_segment_keys(value)
        if value is not None and LENGTH_SEGMENT_KEY in value:
            raise ValueError(
                f"{LENGTH_SEGMENT_KEY!r} is the length bucket, always a segment (a metadata key "
                f"of that name is shadowed by it); remove it (received {value})"
            )
        return value

    @field_validator("length_buckets")
    def _increasing(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one boundary (e.g. [64, 256, 1024])")
        if any(v <= 0 for v in value) or any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"must be positive and strictly increasing (received {value})")
        return value
