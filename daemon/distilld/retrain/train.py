"""Train a student on teacher-labelled examples: one function, :func:`train_student`.

Two kinds of student, as in serving (``distilld.serving.local``), each a task
of :mod:`distilld.retrain.training` driven by the same loop
(:mod:`distilld.retrain.training.loop`):

* sequence classification (an encoder with a classification head, e.g.
  all-MiniLM-L6-v2): :mod:`distilld.retrain.training.classifier`;
* causal LM (e.g. SmolLM2), full fine-tuning or LoRA:
  :mod:`distilld.retrain.training.causal`.

Prompts and inputs are tokenised by :mod:`distilld.models.prompting`, the
same code serving uses. The methods (direct fine-tuning, distribution
matching, curriculum, LoRA) come from
:class:`~distilld.retrain.methods.TrainingConfig` and combine; the losses are
the pure functions of :mod:`distilld.retrain.losses`.

This module checks the arguments, runs the task and publishes the result:
the trained model is written to a temporary sibling of ``out_dir`` and
renamed into place at the end, so a run killed half-way never leaves a
directory that looks like a model. Weights are safetensors only; a small
``training.json`` beside them records what was done. Every failure comes out
as :class:`~distilld.errors.TrainingError` (nothing is left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from distilld.errors import DistilldError, TrainingError
from distilld.log import get_logger
from distilld.policy.common import INPUT_PLACEHOLDER, Architecture
from distilld.retrain.methods import SoftTargets, TrainingConfig
from distilld.retrain.training.causal import CausalTask
from distilld.retrain.training.classifier import ClassifierTask
from distilld.retrain.training.examples import TrainingExample
from distilld.retrain.training.loop import (
    Task,
    TrainProgress,
    curriculum_stages,
    fit,
    terminal_progress,
)

__all__ = [
    "TRAINING_FILE",
    "TrainProgress",
    "TrainResult",
    "TrainingExample",
    "curriculum_stages",
    "terminal_progress",
    "train_student",
]

TRAINING_FILE = "training.json"
"""What was trained and how, written beside the weights."""


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_student` produced (also in ``model_dir / training.json``)."""

    model_dir: Path
    method: str
    architecture: Architecture
    examples: int
    adapter: bool
    """True when ``model_dir`` holds a LoRA adapter (load it over the base model);
    False for a full checkpoint (full fine-tuning, or LoRA with ``merge``)."""
    epoch_losses: list[float]
    """Mean training loss of each epoch, in order (across curriculum stages)."""
    steps: int
    duration_s: float
    trainable_parameters: int
    soft_targets: dict[str, int] = field(default_factory=dict)
    """How many examples had each kind of soft target (``none``: hard loss only)."""


# --------------------------------------------------------------------------- entry point


def train_student(
    base_model_dir: Path,
    examples: Sequence[TrainingExample],
    config: TrainingConfig,
    out_dir: Path,
    *,
    architecture: Architecture,
    labels: Sequence[str] | None = None,
    prompt: str | None = None,
    truncation_side: Literal["left", "right"] = "right",
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a student from ``base_model_dir`` on ``examples``; save it to ``out_dir``.

    ``labels`` is the label set of a classification task (required for a
    sequence-classification student; for a causal-LM student it enables the
    label-distribution soft targets). ``prompt`` is the template with
    ``{input}`` a causal-LM student is driven by. ``out_dir`` must not exist.
    ``progress`` gets a :class:`TrainProgress` after each step; without it, a
    progress line is drawn on stderr when stderr is a terminal.

    Raises TrainingError for bad arguments or examples (before any training),
    and for any failure while loading, training or saving.
    """
    started = time.monotonic()
    base_model_dir = Path(base_model_dir)
    out_dir = Path(out_dir)
    _check_arguments(base_model_dir, examples, config, out_dir, architecture, labels, prompt)
    log = get_logger("retrain")
    report = progress if progress is not None else terminal_progress()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.training-", dir=out_dir.parent))
    try:
        # Late in training, tiny gradients and Adam moments become subnormal
        # floats, which x86 CPUs process many times slower; flushing them to
        # zero changes nothing measurable (see demo/student.py).
        torch.set_flush_denormal(True)
        # Seeded without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            task: Task
            if architecture is Architecture.sequence_classification:
                assert labels is not None  # checked above
                task = ClassifierTask(
                    base_model_dir, examples, config, list(labels), truncation_side
                )
            else:
                assert prompt is not None  # checked above
                task = CausalTask(
                    base_model_dir,
                    examples,
                    config,
                    list(labels) if labels is not None else None,
                    prompt,
                    truncation_side,
                )
            epochs, steps = fit(task, config, report, log)
            # Counted before saving: merging an adapter leaves nothing trainable.
            trainable = task.trainable_parameters
            task.save(tmp)
        duration = time.monotonic() - started
        result = TrainResult(
            model_dir=out_dir,
            method=config.method,
            architecture=architecture,
            examples=len(examples),
            adapter=task.adapter,
            epoch_losses=[e["mean_loss"] for e in epochs],
            steps=steps,
            duration_s=round(duration, 3),
            trainable_parameters=trainable,
            soft_targets=dict(Counter(task.soft_kinds)),
        )
        _write_training_file(tmp, result, config, base_model_dir, epochs)
        _check_safetensors_only(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            # mkdtemp makes a private directory; a model is read by other
            # processes, possibly as another user (vLLM, a container's user).
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, out_dir)
        except OSError as exc:
            raise TrainingError(
                f"could not move the trained model into {out_dir}: {exc}; "
                "it must not exist and be on the same file system as its parent"
            ) from exc
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        wrapped = _training_error(exc, base_model_dir)
        if wrapped is None:
            raise
        raise wrapped from exc
    log.info(
        "retrain.trained",
        model_dir=str(out_dir),
        method=result.method,
        examples=result.examples,
        steps=result.steps,
        seconds=round(result.duration_s, 1),
    )
    return result


def _training_error(exc: BaseException, base_model_dir: Path) -> TrainingError | None:
    """``exc`` as a TrainingError; None for what must pass through unchanged (our own
    errors, KeyboardInterrupt, SystemExit)."""
    if isinstance(exc, DistilldError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return TrainingError(
            f"out of memory training the student from {base_model_dir}: {exc}; "
            "lower batch_size or max_tokens, or use LoRA"
        )
    # transformers, peft, torch and the file system raise many unrelated types;
    # the retraining job needs one error with the reason (the live student
    # keeps serving).
    return TrainingError(
        f"training the student from {base_model_dir} failed: {type(exc).__name__}: {exc}"
    )


def _check_arguments(
    base_model_dir: Path,
    examples: Sequence[TrainingExample],
    config: TrainingConfig,
    out_dir: Path,
    architecture: Architecture,
    labels: Sequence[str] | None,
    prompt: str | None,
) -> None:
    """Refuse what cannot train, before loading anything."""
    if out_dir.exists():
        raise TrainingError(
            f"{out_dir} already exists; a trained student is never written over another "
            "model (which may be serving): choose a new directory"
        )
    if not base_model_dir.is_dir():
        raise TrainingError(f"base model directory {base_model_dir} does not exist")
    if not any(base_model_dir.glob("*.safetensors")):
        raise TrainingError(
            f"no *.safetensors weights in {base_model_dir}; distilld only loads safetensors "
            "(pickle weights can run code when loaded)"
        )
    if not examples:
        raise TrainingError("no training examples: nothing to train on")
    if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise TrainingError(f"labels must be at least two distinct names (received {labels})")
    is_classifier = architecture is Architecture.sequence_classification
    if is_classifier:
        if labels is None:
            raise TrainingError("a sequence-classification student needs the task's labels")
        if config.lora is not None:
            raise TrainingError(
                "LoRA is for causal-LM students; a sequence-classification student is "
                "always fully fine-tuned (leave `lora` out)"
            )
        if config.distill is not None and config.distill.soft_targets is SoftTargets.top_k_tokens:
            raise TrainingError(
                "top-k token log-probabilities only apply to causal-LM students; use "
                "soft_targets: label_distribution (or auto)"
            )
    elif prompt is None or INPUT_PLACEHOLDER not in prompt:
        raise TrainingError(
            f"a causal-LM student needs a prompt template containing {INPUT_PLACEHOLDER}"
        )
    for index, example in enumerate(examples):
        where = f"example {index} ({example.text[:40]!r})"
        if not isinstance(example.text, str):
            raise TrainingError(f"{where}: text is a {type(example.text).__name__}, not str")
        if not 0.0 <= example.confidence <= 1.0:
            raise TrainingError(
                f"{where}: teacher confidence {example.confidence} is outside [0, 1]"
            )
        if labels is not None and example.output not in labels:
            raise TrainingError(
                f"{where}: the teacher's answer {example.output!r} is not one of the labels "
                f"{list(labels)}; filter invalid answers out before training"
            )
        if is_classifier and not isinstance(example.output, str):
            raise TrainingError(f"{where}: a classification answer must be a label string")


# --------------------------------------------------------------------------- output


def _write_training_file(
    dest: Path,
    result: TrainResult,
    config: TrainingConfig,
    base_model_dir: Path,
    epochs: list[dict[str, Any]],
) -> None:
    record = {
        "method": result.method,
        "architecture": result.architecture.value,
        "base_model": str(base_model_dir),
        "adapter": result.adapter,
        "examples": result.examples,
        "seed": config.seed,
        "steps": result.steps,
        "trainable_parameters": result.trainable_parameters,
        "soft_targets": result.soft_targets,
        "losses_per_epoch": result.epoch_losses,
        "epochs": epochs,
        "duration_s": result.duration_s,
        "config": config.model_dump(mode="json"),
    }
    (dest / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _check_safetensors_only(dest: Path) -> None:
    """Refuse to publish pickle weights (they can run code when loaded)."""
    pickled = [p.name for p in dest.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    if pickled:
        raise TrainingError(
            f"the trained model was saved with pickle weights {pickled}; distilld only "
            "publishes safetensors"
        )
    if not any(dest.glob("*.safetensors")):
        raise TrainingError(f"no *.safetensors weights were written to {dest}")
