"""The data of one retraining in the policy's ``retraining`` section, as pydantic models.

How many examples it uses (``size``), which teacher answers are dropped
(``filtering``), how the inputs are chosen (``selection``), split (``split``)
and how the candidate is judged on the held-out test set (``gate``). The
section itself is :class:`distilld.retrain.config.RetrainingConfig`.

Data sizes default by task kind (see :data:`DEFAULT_SIZES`): a retraining
starts with ``min_examples`` and, when the gate fails for lack of data (the
candidate under-performs the teacher), grows by ``growth_factor`` up to
``max_examples`` (:meth:`DataSizeConfig.grow`).

Self-contained like ``monitoring/config.py``; like every policy model these
forbid unknown keys and are frozen.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distilld.policy.common import StrictModel, check_segment_keys
from distilld.vocabulary import segment_key

__all__ = [
    "DEFAULT_SIZES",
    "DataSizeConfig",
    "FilterConfig",
    "GateConfig",
    "GateMetric",
    "SelectionConfig",
    "SizeCategory",
    "SplitConfig",
    "default_metric",
    "size_category",
]

SizeCategory = Literal["binary", "multiclass", "extraction", "generation"]
# (min, max) examples per task kind: the seed document's defaults. Generation
# asks for "50k+": the maximum is where growth stops unless the policy says more.
DEFAULT_SIZES: dict[SizeCategory, tuple[int, int]] = {
    "binary": (1_000, 5_000),
    "multiclass": (5_000, 20_000),
    "extraction": (5_000, 20_000),
    "generation": (50_000, 200_000),
}

GateMetric = Literal[
    "accuracy",
    "precision",
    "recall",
    "macro_f1",
    "field_f1",
    "field_precision",
    "field_recall",
    "exact_match",
    "schema_valid",
]
# The primary metric of each task kind when the policy names none: the same
# quantity that accuracy monitoring averages (shadow/compare.py), so the gate
# and the monitor that may later roll the version back measure one thing.
DEFAULT_METRIC: dict[str, GateMetric] = {
    "classification": "accuracy",
    "extraction": "field_f1",
    "generation": "schema_valid",
}


def size_category(kind: str, n_labels: int | None = None) -> SizeCategory:
    """The size category of a task: classification with two labels is binary."""
    if kind == "classification":
        return "binary" if n_labels is not None and n_labels <= 2 else "multiclass"
    if kind == "extraction":
        return "extraction"
    if kind == "generation":
        return "generation"
    raise ValueError(
        f"unknown task kind {kind!r}; expected classification, extraction or generation"
    )


def default_metric(kind: str) -> GateMetric:
    """The primary gate metric of a task kind when the policy names none."""
    try:
        return DEFAULT_METRIC[kind]
    except KeyError:
        raise ValueError(
            f"unknown task kind {kind!r}; expected classification, extraction or generation"
        ) from None


# --------------------------------------------------------------------------- data


class DataSizeConfig(StrictModel):
    """How many teacher-labelled examples a retraining uses, before filtering.

    Unset bounds take the defaults of the task kind (:data:`DEFAULT_SIZES`). A
    retraining starts at the minimum; when the gate fails for lack of data it
    grows by ``growth_factor`` up to the maximum (:meth:`grow`).
    """

    min_examples: int | None = Field(
        default=None,
        ge=10,
        description="First size tried. Unset: 1,000 for binary classification, 5,000 for "
        "multi-class and extraction, 50,000 for generation.",
    )
    max_examples: int | None = Field(
        default=None,
        ge=10,
        description="Largest size tried. Unset: 5,000 for binary classification, 20,000 for "
        "multi-class and extraction, 200,000 for generation.",
    )
    growth_factor: float = Field(
        default=2.0,
        gt=1.0,
        le=10.0,
        description="Size multiplier for the next attempt when the gate fails for lack of data.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> DataSizeConfig:
        low, high = self.min_examples, self.max_examples
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_examples ({low}) is larger than max_examples ({high}); lower "
                "min_examples or raise max_examples"
            )
        return self

    def bounds(self, kind: str, n_labels: int | None = None) -> tuple[int, int]:
        """(min, max) examples for a task: the policy's values, else the kind's defaults.

        A minimum set above the default maximum raises the maximum to it (and a
        maximum set below the default minimum lowers the minimum to it).
        """
        default_low, default_high = DEFAULT_SIZES[size_category(kind, n_labels)]
        low = self.min_examples
        high = self.max_examples
        if low is None:
            low = default_low if high is None else min(default_low, high)
        if high is None:
            high = max(default_high, low)
        return low, high

    def grow(self, current: int, kind: str, n_labels: int | None = None) -> int | None:
        """The next size after an attempt of ``current`` examples, or None at the maximum."""
        _, high = self.bounds(kind, n_labels)
        if current >= high:
            return None
        return min(high, max(current + 1, math.ceil(current * self.growth_factor)))


class FilterConfig(StrictModel):
    """Which teacher answers are not trained on."""

    min_teacher_confidence: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="Teacher answers with a lower confidence are dropped (the label's "
        "probability, or for JSON the geometric mean of the token probabilities; teachers "
        "that report no probabilities count as 1.0).",
    )
    flags_file: str | None = Field(
        default=None,
        min_length=1,
        description="File of request ids human reviewers flagged as incorrectly answered: "
        'one id per line, or JSON lines with an "id" field. Those requests are never '
        "trained on.",
    )


class SelectionConfig(StrictModel):
    """How the inputs to label are chosen among the candidates.

    Candidates are deduplicated (exact, then near duplicates), grouped in
    strata by segment, and drawn without replacement with weights: an
    ordinary input weighs 1, and each reason to over-sample multiplies its
    weight by its factor (a low-confidence input that the teacher disagreed
    with weighs ``low_confidence_factor * disagreement_factor``).
    """

    low_confidence_threshold: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="Student answers with a confidence below this are hard examples.",
    )
    low_confidence_factor: float = Field(
        default=3.0, ge=1.0, le=100.0, description="Weight multiplier of low-confidence inputs."
    )
    disagreement_below: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="A compared input whose student-vs-teacher score is below this counts as "
        "a disagreement (1.0: any imperfect agreement).",
    )
    disagreement_factor: float = Field(
        default=4.0,
        ge=1.0,
        le=100.0,
        description="Weight multiplier of inputs the student and the teacher disagreed on.",
    )
    rare_segment_share: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="A segment value (key=value) held by less than this share of the "
        "candidates is rare.",
    )
    rare_segment_factor: float = Field(
        default=2.0, ge=1.0, le=100.0, description="Weight multiplier of inputs in rare segments."
    )
    edge_case_factor: float = Field(
        default=2.0,
        ge=1.0,
        le=100.0,
        description="Weight multiplier of edge cases (tagged inputs, e.g. the shortest or "
        "longest length bucket).",
    )
    near_duplicate_threshold: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Two inputs whose word-shingle sets have a Jaccard similarity of at least "
        "this are near duplicates; the first is kept.",
    )
    shingle_words: int = Field(
        default=3, ge=1, le=10, description="Words per shingle for near-duplicate detection."
    )
    segment_keys: list[str] | None = Field(
        default=None,
        description="Segment keys that form the strata. Unset: every key of the candidates' "
        "segments.",
    )

    _keys = field_validator("segment_keys")(check_segment_keys)


class SplitConfig(StrictModel):
    """Fractions of the filtered examples in each split; the test set is never trained on."""

    train: float = Field(default=0.8, gt=0.0, lt=1.0, description="Share trained on.")
    validation: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share used during training (early stopping, model choice).",
    )
    test: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Held-out share the gate judges the candidate on; never trained on.",
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train + validation + test must be 1 (received {self.train} + "
                f"{self.validation} + {self.test} = {total:g})"
            )
        return self


# --------------------------------------------------------------------------- judging


class GateConfig(StrictModel):
    """The validation gate on the held-out test set.

    Gold is the teacher's answers unless a gold set exists. Without one the
    teacher is the reference with a score of 1.0, so the candidate's
    agreement with the teacher must reach ``1 - margin``: the worst-case
    bound under which the candidate is within ``margin`` of the teacher
    whatever the teacher's own accuracy. With a gold set, the candidate must
    be within ``margin`` of the teacher's score on it.
    """

    primary_metric: GateMetric | None = Field(
        default=None,
        description="Metric the margins apply to. Unset: accuracy (classification), field_f1 "
        "(extraction), schema_valid (generation), as accuracy monitoring measures.",
    )
    margin: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="The candidate may trail the teacher by at most this on the primary metric.",
    )
    live_tolerance: float = Field(
        default=0.005,
        ge=0.0,
        le=1.0,
        description="The candidate may trail the live student by at most this on the primary "
        "metric (sampling noise).",
    )
    segment_margin: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Margin of each segment (metadata segment, difficulty bucket, edge case): "
        "segments are smaller, so their estimates are noisier.",
    )
    segment_margins: dict[str, float] = Field(
        default_factory=dict,
        description="Margin for one segment, overriding segment_margin: keyed by segment label "
        "(source=app, difficulty=hard, edge_case=short) or by key (source, difficulty, "
        "edge_case).",
    )
    min_segment_size: int = Field(
        default=30,
        ge=1,
        description="Test examples a segment needs to be judged; smaller ones are reported "
        "but not judged.",
    )
    min_test_examples: int = Field(
        default=100,
        ge=1,
        description="A smaller test set fails the gate for lack of data.",
    )
    segment_keys: list[str] | None = Field(
        default=None,
        description="Metadata segment keys analysed. Unset: every key of the test examples.",
    )

    _keys = field_validator("segment_keys")(check_segment_keys)

    @field_validator("segment_margins")
    def _margins_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"margins must lie in [0, 1] (received {bad})")
        empty = [k for k in value if not k.strip()]
        if empty:
            raise ValueError("segment labels must not be empty")
        return value

    def margin_for(self, label: str) -> float:
        """The margin of a segment ``key=value``: its own, its key's, or segment_margin."""
        if label in self.segment_margins:
            return self.segment_margins[label]
        return self.segment_margins.get(segment_key(label), self.segment_margin)
