"""The policy's ``retraining`` section (all but the training method), as pydantic models.

What starts a retraining (``triggers``), how much data it uses (``size``),
where the inputs come from besides the traffic reservoir (``seed_files``),
which teacher answers are dropped (``filtering``), how the inputs are chosen
(``selection``), split (``split``) and judged (``gate``), how long the
candidate runs in shadow (``shadow``), how many versions the registry keeps
(``registry``) and how long a promoted version is watched for a rollback
(``rollback``). The training method (:class:`~distilld.retrain.methods.TrainingConfig`)
is defined beside the trainer.

Self-contained like ``monitoring/config.py``: the policy model plugs these
models in, and the retraining code reads them, so this module imports
neither. Like every policy model they forbid unknown keys and are frozen.

Data sizes default by task kind (see :data:`DEFAULT_SIZES`): a retraining
starts with ``min_examples`` and, when the gate fails for lack of data (the
candidate under-performs the teacher), grows by ``growth_factor`` up to
``max_examples`` (:meth:`DataSizeConfig.grow`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distilld.policy.common import StrictModel, check_no_parent_parts, check_segment_keys
from distilld.retrain.methods import TrainingConfig
from distilld.vocabulary import segment_key

__all__ = [
    "DEFAULT_CRON",
    "DEFAULT_SIZES",
    "BreachTriggerConfig",
    "ColdStartConfig",
    "DataSizeConfig",
    "FilterConfig",
    "GateConfig",
    "GateMetric",
    "ManualTriggerConfig",
    "RegistryConfig",
    "RetrainingConfig",
    "RollbackConfig",
    "ScheduleTriggerConfig",
    "SelectionConfig",
    "ShadowConfig",
    "SizeCategory",
    "SplitConfig",
    "TriggersConfig",
    "default_metric",
    "size_category",
]

# Quarterly, at 03:00 on the first day of January, April, July and October.
DEFAULT_CRON = "0 3 1 */3 *"

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


# --------------------------------------------------------------------------- triggers


class BreachTriggerConfig(StrictModel):
    """Retrain when a monitor reports a breach (accuracy below threshold, drift)."""

    enabled: bool = Field(default=True, description="Start a retraining on a policy breach.")
    cooldown_s: float = Field(
        default=6 * 3600.0,
        ge=0.0,
        description="Seconds after a retraining started during which a new breach does not "
        "start another (at most one retraining per task runs at a time regardless); after a "
        "failed one, the next breach also waits this long from the failure, and for new inputs.",
    )


class ScheduleTriggerConfig(StrictModel):
    """Retrain periodically, breach or not: a baseline against slow decay."""

    enabled: bool = Field(default=True, description="Retrain on the cron schedule.")
    cron: str = Field(
        default=DEFAULT_CRON,
        description="Five-field crontab expression (minute hour day month weekday), in UTC. "
        "Default: quarterly, 03:00 on the first day of January, April, July and October.",
    )

    @field_validator("cron")
    def _valid_cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(
                "must have five fields (minute hour day month weekday), e.g. "
                f"{DEFAULT_CRON!r} (received {value!r})"
            )
        # APScheduler reads it at run time: refuse what it would refuse, now.
        from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"is not a valid crontab expression ({exc}): {value!r}") from None
        return " ".join(fields)


class ManualTriggerConfig(StrictModel):
    """``distilld retrain TASK`` by hand."""

    enabled: bool = Field(
        default=True, description="Allow retraining this task by hand (distilld retrain TASK)."
    )


class TriggersConfig(StrictModel):
    """What starts a retraining of the task."""

    on_breach: BreachTriggerConfig = Field(
        default_factory=BreachTriggerConfig, description="Retrain on a policy breach."
    )
    schedule: ScheduleTriggerConfig = Field(
        default_factory=ScheduleTriggerConfig, description="Periodic retraining (cron)."
    )
    manual: ManualTriggerConfig = Field(
        default_factory=ManualTriggerConfig, description="Retraining by hand."
    )


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


class ShadowConfig(StrictModel):
    """The candidate answers live traffic beside the live student before promotion.

    It answers a share of the requests the sampler sends to the teacher (only
    those can be scored); its answers are stored as comparisons of its own
    version and never go out.
    """

    enabled: bool = Field(
        default=True,
        description="Run a candidate that passed the gate in shadow before promoting it. "
        "false: promote as soon as the gate passes.",
    )
    share: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Share of the teacher-compared requests the candidate also answers (its "
        "answers never go out).",
    )
    min_comparisons: int = Field(
        default=500,
        ge=1,
        description="Candidate answers compared with the teacher before a promotion decision.",
    )
    max_duration_s: float = Field(
        default=48 * 3600.0,
        gt=0.0,
        description="Shadow gives up (candidate not promoted) if min_comparisons are not "
        "reached within this many seconds.",
    )
    tolerance: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="On the shadowed requests the candidate's score may trail the live "
        "student's by at most this.",
    )


class RegistryConfig(StrictModel):
    """The on-disk model registry of the task."""

    keep_last: int = Field(
        default=5,
        ge=2,
        le=1000,
        description="Versions kept on disk; older ones are deleted, never the live version "
        "nor the previous live one (the rollback target).",
    )


class RollbackConfig(StrictModel):
    """After a promotion: roll back automatically if the new version does worse."""

    enabled: bool = Field(default=True, description="Roll back automatically.")
    watch_window_s: float = Field(
        default=24 * 3600.0,
        gt=0.0,
        description="Seconds after a promotion during which the new version is compared with "
        "the previous one's accuracy.",
    )
    min_comparisons: int = Field(
        default=200,
        ge=1,
        description="Comparisons of the new version needed before it can be rolled back.",
    )
    tolerance: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Roll back when the new version's accuracy falls more than this below the "
        "previous version's.",
    )


class ColdStartConfig(StrictModel):
    """A task with no trained student yet (no ``student.model``, nothing live in the registry)."""

    serve: Literal["teacher", "hold"] = Field(
        default="teacher",
        description="teacher: the teacher answers requests until the first student is "
        "promoted (they also fill the traffic reservoir the first student is trained on); "
        "hold: requests wait in Kafka, uncommitted (the first student is trained on "
        "seed_files alone).",
    )
    retry_s: float = Field(
        default=60.0,
        gt=0.0,
        description="Seconds between attempts while there are too few inputs to train on, "
        "and the least wait after a failed first-student attempt (which also waits for new "
        "inputs).",
    )


# --------------------------------------------------------------------------- the section


class RetrainingConfig(StrictModel):
    """The ``retraining`` section, except the training method."""

    enabled: bool = Field(default=True, description="Retrain this task at all.")
    base_model: str | None = Field(
        default=None,
        min_length=1,
        description="Model directory every retraining starts from (absolute or relative to "
        "DISTILLD_MODELS_DIR). Unset: student.model. Required when student.model is unset.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="The training method: direct fine-tuning, distribution matching, "
        "curriculum, LoRA.",
    )
    cold_start: ColdStartConfig = Field(
        default_factory=ColdStartConfig,
        description="How requests are answered before the task's first student exists.",
    )
    triggers: TriggersConfig = Field(
        default_factory=TriggersConfig, description="What starts a retraining."
    )
    size: DataSizeConfig = Field(
        default_factory=DataSizeConfig,
        description="Examples per retraining (defaults by task kind), and how it grows.",
    )
    seed_files: list[str] = Field(
        default_factory=list,
        description="Files of inputs used besides the traffic reservoir (and alone for a "
        "task's first student): one input per line, or JSON lines with a text field.",
    )
    filtering: FilterConfig = Field(
        default_factory=FilterConfig, description="Teacher answers that are not trained on."
    )
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="How inputs are chosen among candidates."
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="Train / validation / held-out test fractions."
    )
    gate: GateConfig = Field(
        default_factory=GateConfig, description="Validation gate on the held-out test set."
    )
    shadow: ShadowConfig = Field(
        default_factory=ShadowConfig, description="Shadow run on live traffic before promotion."
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Versions kept on disk."
    )
    rollback: RollbackConfig = Field(
        default_factory=RollbackConfig, description="Automatic rollback after a promotion."
    )

    _base_model_stays_inside = field_validator("base_model")(check_no_parent_parts)

    @field_validator("seed_files")
    def _seed_files(cls, value: list[str]) -> list[str]:
        empty = [i for i, path in enumerate(value) if not path.strip()]
        if empty:
            raise ValueError(f"paths must not be empty (items {empty})")
        repeated = sorted({p for p in value if value.count(p) > 1})
        if repeated:
            raise ValueError(f"paths must be distinct (repeated: {repeated})")
        return value
