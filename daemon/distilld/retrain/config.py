"""The policy's ``retraining`` section, as pydantic models.

What starts a retraining (``triggers``), how requests are answered before the
first student exists (``cold_start``), how long a candidate runs in shadow
(``shadow``), how many versions the registry keeps (``registry``) and how long
a promoted version is watched for a rollback (``rollback``). The data of one
retraining (``size``, ``filtering``, ``selection``, ``split``, ``gate``) is in
:mod:`distilld.retrain.data_config`; the training method
(:class:`~distilld.retrain.methods.TrainingConfig`) is defined beside the
trainer. :class:`RetrainingConfig` assembles them.

Self-contained like ``monitoring/config.py``: the policy model plugs these
models in, and the retraining code reads them, so this module imports
neither. Like every policy model they forbid unknown keys and are frozen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from distilld.policy.common import StrictModel, check_no_parent_parts
from distilld.retrain.data_config import (
    DataSizeConfig,
    FilterConfig,
    GateConfig,
    SelectionConfig,
    SplitConfig,
)
from distilld.retrain.methods import TrainingConfig

__all__ = [
    "DEFAULT_CRON",
    "BreachTriggerConfig",
    "ColdStartConfig",
    "ManualTriggerConfig",
    "RegistryConfig",
    "RetrainingConfig",
    "RollbackConfig",
    "ScheduleTriggerConfig",
    "ShadowConfig",
    "TriggersConfig",
]

# Quarterly, at 03:00 on the first day of January, April, July and October.
DEFAULT_CRON = "0 3 1 */3 *"

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
