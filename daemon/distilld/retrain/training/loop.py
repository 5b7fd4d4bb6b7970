"""The training loop: curriculum stages, epochs, optimiser steps and progress.

It knows a student only through :class:`Task` (prepared examples, a model
and a per-example loss), so the same loop trains every architecture.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from distilld.retrain import losses
from distilld.retrain.methods import DifficultyBy, TrainingConfig

_MAX_GRAD_NORM = 1.0  # gradient clipping: keeps LoRA's larger learning rates stable


@dataclass(frozen=True)
class TrainProgress:
    """Where a run is, reported after every optimiser step."""

    stage: int
    stages: int
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float


class Task(Protocol):
    """One student architecture: prepared examples, a model and its losses."""

    model: Any
    soft_kinds: list[str]
    confidences: list[float]
    adapter: bool

    @property
    def size(self) -> int: ...

    @property
    def trainable_parameters(self) -> int: ...

    def losses(self, indices: list[int]) -> Tensor:
        """The training loss of each of these examples, shape ``[len(indices)]``."""
        ...

    def save(self, dest: Path) -> None: ...


def curriculum_stages(difficulties: Sequence[float], stages: int) -> list[list[int]]:
    """Indices of the examples trained in each curriculum stage.

    Examples are sorted easy to hard (lowest difficulty first; ties keep their
    input order) and cut into ``stages`` slices as equal as possible (the
    first slices take one more when the count does not divide). Stage k holds
    slices 1..k, easiest first, so the last stage is every example.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1 (received {stages})")
    order = sorted(range(len(difficulties)), key=lambda i: (difficulties[i], i))
    count = len(order)
    slices = min(stages, count) if count else 1
    bounds = [(count * (k + 1) + slices - 1) // slices for k in range(slices)]
    return [order[:bound] for bound in bounds]


def fit(
    task: Task,
    config: TrainingConfig,
    report: Callable[[TrainProgress], None] | None,
    log: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Run every stage and epoch; return the per-epoch records and the step count."""
    plan = _plan(task, config)
    steps_total = sum(epochs * math.ceil(len(idx) / config.batch_size) for idx, epochs in plan)
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.effective_learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps_total)
    rng = random.Random(config.seed)
    task.model.train()
    records: list[dict[str, Any]] = []
    step = 0
    started = time.monotonic()
    for stage, (indices, epochs) in enumerate(plan, start=1):
        for epoch in range(1, epochs + 1):
            order = list(indices)
            rng.shuffle(order)
            total = 0.0
            for batch in _batches(order, config.batch_size):
                loss = task.losses(batch).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                value = float(loss.detach())
                total += value * len(batch)
                if report is not None:
                    report(TrainProgress(stage, len(plan), epoch, epochs, step, steps_total, value))
            record = {
                "stage": stage,
                "epoch": epoch,
                "examples": len(order),
                "mean_loss": round(total / len(order), 6),
            }
            records.append(record)
            log.info(
                "retrain.epoch",
                **record,
                stages=len(plan),
                epochs=epochs,
                seconds=round(time.monotonic() - started, 1),
            )
    task.model.eval()
    return records, step


def _plan(task: Task, config: TrainingConfig) -> list[tuple[list[int], int]]:
    """(example indices, epochs) of each stage: one stage without a curriculum."""
    everything = list(range(task.size))
    curriculum = config.curriculum
    if curriculum is None:
        return [(everything, config.epochs)]
    if curriculum.by is DifficultyBy.student_loss:
        task.model.eval()
        with torch.no_grad():
            difficulty = [
                float(v) for b in _batches(everything, config.batch_size) for v in task.losses(b)
            ]
    else:
        difficulty = [1.0 - c for c in task.confidences]
    stages = curriculum_stages(difficulty, curriculum.stages)
    return [
        (indices, config.epochs if k == len(stages) - 1 else curriculum.epochs_per_stage)
        for k, indices in enumerate(stages)
    ]


def _batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def terminal_progress() -> Callable[[TrainProgress], None] | None:
    """A one-line progress display on stderr, only when stderr is a terminal."""
    stream = sys.stderr
    if not stream.isatty():
        return None

    def show(p: TrainProgress) -> None:
        stage = f"stage {p.stage}/{p.stages} " if p.stages > 1 else ""
        stream.write(
            f"\rtraining: {stage}epoch {p.epoch}/{p.epochs} "
            f"step {p.step}/{p.steps} loss {p.loss:.4f}"
        )
        if p.step == p.steps:
            stream.write("\n")
        stream.flush()

    return show


def mix(config: TrainingConfig, hard: Tensor, soft: Tensor, has_soft: Tensor) -> Tensor:
    """Per-example loss: mixed where a soft target exists, hard alone elsewhere."""
    if config.distill is None:
        return hard
    mixed = losses.mixed_loss(hard, soft, config.distill.alpha)
    return torch.where(has_soft, mixed, hard)


def count_parameters(model: Any) -> int:
    """How many parameters training updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
