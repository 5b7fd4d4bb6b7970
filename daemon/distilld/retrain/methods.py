"""Training settings of a retraining run: pydantic models, frozen, unknown keys refused.

One :class:`TrainingConfig` describes how a student is trained; the methods
combine:

* direct fine-tuning on the teacher's answers (hard labels): the default,
  when ``distill`` is left out;
* distribution matching (``distill``): KL to the teacher's soft labels
  (class probabilities) or, for causal-LM students, its top-k token
  log-probabilities, softened by ``temperature``, mixed with the hard-label
  loss by ``alpha``;
* curriculum (``curriculum``): examples ordered easy to hard, by the
  teacher's confidence or by the untrained student's loss, and trained in
  stages that each add the next slice of difficulty;
* for causal-LM students, LoRA (``lora``) instead of full fine-tuning.

For example::

    distill: {temperature: 2, alpha: 0.5}
    curriculum: {by: teacher_confidence, stages: 3}
    lora: {rank: 8}
    epochs: 3

The policy's ``retraining`` section embeds this model; the trainer is
:func:`distilld.retrain.train.train_student`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from distilld.policy.common import StrictModel

__all__ = [
    "CurriculumConfig",
    "DifficultyBy",
    "DistillConfig",
    "LoraConfig",
    "SoftTargets",
    "TrainingConfig",
]


class SoftTargets(StrEnum):
    """What the student's distribution is matched against."""

    auto = "auto"
    """The best the examples carry: top-k token log-probabilities for a causal-LM
    student when an example has them, else the teacher's label distribution."""
    label_distribution = "label_distribution"
    """The teacher's probabilities over the label set (classification tasks). A
    causal-LM student's label distribution is its softmax over the summed
    log-probabilities of each label as the answer."""
    top_k_tokens = "top_k_tokens"
    """The teacher's top-k log-probabilities at each answer token (causal-LM
    students only); examples without them are trained on the hard label."""


class DistillConfig(StrictModel):
    """Output-distribution matching (knowledge distillation)."""

    temperature: float = Field(
        default=2.0,
        gt=0,
        le=20,
        description=(
            "Softens teacher and student distributions before comparing them "
            "(1: as reported; higher: more weight on the non-top answers). The "
            "loss is scaled by temperature² so its size does not depend on it."
        ),
    )
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "Weight of the hard-label loss: loss = alpha * hard + (1 - alpha) * soft. "
            "1 is direct fine-tuning, 0 pure distribution matching."
        ),
    )
    soft_targets: SoftTargets = Field(
        default=SoftTargets.auto,
        description="What the student's distribution is matched against (see SoftTargets).",
    )


class DifficultyBy(StrEnum):
    """How the curriculum measures an example's difficulty."""

    teacher_confidence = "teacher_confidence"
    """1 - the teacher's confidence in its answer: cheap, known before training."""
    student_loss = "student_loss"
    """The loss of the student before training (one forward pass over the data)."""


class CurriculumConfig(StrictModel):
    """Easy-to-hard training in stages."""

    by: DifficultyBy = Field(
        default=DifficultyBy.teacher_confidence,
        description="How an example's difficulty is measured.",
    )
    stages: int = Field(
        default=3,
        ge=1,
        le=20,
        description=(
            "Examples are sorted easy to hard and cut into this many slices; stage k "
            "trains on slices 1..k (shuffled within the stage). The last stage is the "
            "whole data set and runs `epochs` epochs; earlier stages run "
            "`epochs_per_stage` each."
        ),
    )
    epochs_per_stage: int = Field(
        default=1,
        ge=1,
        le=20,
        description="Epochs of each stage before the last one.",
    )


class LoraConfig(StrictModel):
    """LoRA adapter (peft) for a causal-LM student instead of full fine-tuning."""

    rank: int = Field(default=8, ge=1, le=256, description="Rank r of the low-rank update.")
    alpha: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Scaling numerator: the update is scaled by alpha / rank.",
    )
    dropout: float = Field(
        default=0.05, ge=0, lt=1, description="Dropout on the adapter's input during training."
    )
    target_modules: Literal["all-linear"] | tuple[str, ...] = Field(
        default="all-linear",
        description=(
            "Modules that get an adapter: 'all-linear' (every linear layer but the "
            "output head) or module names, e.g. [q_proj, v_proj]."
        ),
    )
    merge: bool = Field(
        default=False,
        description=(
            "Save the base model with the adapter merged in (a plain checkpoint) instead "
            "of the adapter alone (which vLLM can load at runtime beside the base)."
        ),
    )


class TrainingConfig(StrictModel):
    """How a student is trained from teacher-labelled examples."""

    distill: DistillConfig | None = Field(
        default=None,
        description=(
            "Distribution matching; left out, the student is fine-tuned on the "
            "teacher's answers alone (hard labels)."
        ),
    )
    curriculum: CurriculumConfig | None = Field(
        default=None, description="Easy-to-hard training in stages; left out, no curriculum."
    )
    lora: LoraConfig | None = Field(
        default=None,
        description=(
            "LoRA adapter for causal-LM students; left out, every weight is trained "
            "(sequence-classification students are always fully fine-tuned)."
        ),
    )
    epochs: int = Field(default=3, ge=1, le=100, description="Epochs over the whole data set.")
    batch_size: int = Field(default=16, ge=1, le=4096, description="Examples per step.")
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "AdamW learning rate, decayed linearly to 0 over the run; left out: 5e-5 "
            "for full fine-tuning, 2e-4 for LoRA."
        ),
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_tokens: int = Field(
        default=128,
        ge=8,
        le=32768,
        description=(
            "Most tokens of an input text; longer texts are cut like the serving "
            "backend cuts them (the prompt template and the answer come on top for "
            "causal-LM students)."
        ),
    )
    seed: int = Field(
        default=0, ge=0, description="Seeds torch and the shuffles: same data, same model."
    )

    @property
    def method(self) -> str:
        """A short name of the combination, e.g. ``distill+curriculum+lora``."""
        parts = ["distill" if self.distill is not None else "direct"]
        if self.curriculum is not None:
            parts.append("curriculum")
        if self.lora is not None:
            parts.append("lora")
        return "+".join(parts)

    @property
    def effective_learning_rate(self) -> float:
        """``learning_rate``, or its default for the kind of fine-tuning."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.lora is not None else 5e-5
