"""Train a student on teacher-labelled examples: one function, :func:`train_student`.

Two kinds of student, as in serving (``distilld.serving.local``):

* sequence classification (an encoder with a classification head, e.g.
  all-MiniLM-L6-v2): the head predicts the label set; hard loss is
  cross-entropy against the teacher's label, soft loss KL to the teacher's
  class probabilities;
* causal LM (e.g. SmolLM2): the prompt template is rendered (through the
  tokenizer's chat template when it has one, exactly as the serving backend
  renders it) and the model learns the teacher's answer (the label, or the
  JSON object) followed by the end-of-sequence token. The loss covers the
  answer tokens only, never the prompt. Distribution matching uses the
  teacher's top-k token log-probabilities at each answer token when the
  example carries them (:attr:`TrainingExample.top_logprobs`), else, for a
  classification task, the teacher's label distribution against the
  student's distribution over the label set (each label scored as the whole
  answer, as serving scores it). An extraction or generation example without
  top-k log-probabilities is trained on the hard answer alone.

The methods (direct fine-tuning, distribution matching, curriculum, LoRA)
come from :class:`~distilld.retrain.methods.TrainingConfig` and combine; the
losses are the pure functions of :mod:`distilld.retrain.losses`.

The trained model is written to a temporary sibling of ``out_dir`` and
renamed into place at the end, so a run killed half-way never leaves a
directory that looks like a model. Weights are safetensors only; a small
``training.json`` beside them records what was done. Every failure comes out
as :class:`~distilld.errors.TrainingError` (nothing is left behind).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from distilld.errors import DistilldError, TrainingError
from distilld.log import get_logger
from distilld.policy.common import INPUT_PLACEHOLDER, Architecture
from distilld.retrain import losses
from distilld.retrain.methods import DifficultyBy, SoftTargets, TrainingConfig
from distilld.teacher.base import TeacherAnswer

__all__ = [
    "TRAINING_FILE",
    "TrainProgress",
    "TrainResult",
    "TrainingExample",
    "curriculum_stages",
    "train_student",
]

TRAINING_FILE = "training.json"
"""What was trained and how, written beside the weights."""

_MAX_GRAD_NORM = 1.0  # gradient clipping: keeps LoRA's larger learning rates stable

# What each example's soft loss was computed from (counted in training.json).
_SOFT_NONE = "none"
_SOFT_LABELS = "label_distribution"
_SOFT_TOP_K = "top_k_tokens"


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class TrainingExample:
    """One input with the teacher's answer.

    ``output`` is the label (classification) or the JSON object (extraction,
    generation). ``confidence`` is the teacher's, in [0, 1] (curriculum
    difficulty). ``probabilities`` is the teacher's distribution over the
    labels, if known. ``top_logprobs`` is, for causal-LM students, the
    teacher's top-k log-probabilities at each token of its answer (token text
    -> log-probability, one mapping per answer token, as OpenAI-compatible
    servers report them); it is used only when the teacher's answer tokens
    line up with the student's (same tokenizer family).
    """

    text: str
    output: str | dict[str, Any]
    confidence: float = 1.0
    probabilities: Mapping[str, float] | None = None
    top_logprobs: Sequence[Mapping[str, float]] | None = None

    @classmethod
    def from_answer(cls, text: str, answer: TeacherAnswer) -> TrainingExample:
        """The example for ``text`` from the teacher's answer (which must have no error)."""
        if answer.error is not None:
            raise TrainingError(
                f"the teacher's answer to {text[:60]!r} has an error ({answer.error}); "
                "filter failed answers out before training"
            )
        return cls(
            text=text,
            output=answer.output,
            confidence=answer.confidence,
            probabilities=answer.probabilities,
            top_logprobs=answer.top_logprobs,
        )


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


# --------------------------------------------------------------------------- curriculum


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
            task: _Task
            if architecture is Architecture.sequence_classification:
                assert labels is not None  # checked above
                task = _ClassifierTask(
                    base_model_dir, examples, config, list(labels), truncation_side
                )
            else:
                assert prompt is not None  # checked above
                task = _CausalTask(
                    base_model_dir,
                    examples,
                    config,
                    list(labels) if labels is not None else None,
                    prompt,
                    truncation_side,
                )
            epochs, steps = _fit(task, config, report, log)
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


# --------------------------------------------------------------------------- the loop


class _Task(Protocol):
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


def _fit(
    task: _Task,
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


def _plan(task: _Task, config: TrainingConfig) -> list[tuple[list[int], int]]:
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


def _mix(config: TrainingConfig, hard: Tensor, soft: Tensor, has_soft: Tensor) -> Tensor:
    """Per-example loss: mixed where a soft target exists, hard alone elsewhere."""
    if config.distill is None:
        return hard
    mixed = losses.mixed_loss(hard, soft, config.distill.alpha)
    return torch.where(has_soft, mixed, hard)


# --------------------------------------------------------------------------- loading


def _quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _label_distribution(example: TrainingExample, labels: Sequence[str]) -> list[float] | None:
    """The teacher's probabilities in ``labels`` order, renormalised; None if unknown."""
    if example.probabilities is None:
        return None
    row = [max(0.0, float(example.probabilities.get(label, 0.0))) for label in labels]
    total = sum(row)
    if not total > 0 or not math.isfinite(total):
        return None
    return [p / total for p in row]


def _count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- encoder + head


class _ClassifierTask:
    """A sequence-classification student (encoder + head) for the task's labels."""

    adapter = False

    def __init__(
        self,
        base: Path,
        examples: Sequence[TrainingExample],
        config: TrainingConfig,
        labels: list[str],
        truncation_side: str,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        _quiet_transformers()
        self._config = config
        # A base that already has a head for this label set (a previous student)
        # keeps it, in its own label order; any other head is replaced.
        base_config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        existing = [str(v) for _, v in sorted(base_config.id2label.items())]
        has_head = any(
            a.endswith("ForSequenceClassification") for a in base_config.architectures or []
        )
        order = existing if has_head and sorted(existing) == sorted(labels) else labels
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(order),
            id2label=dict(enumerate(order)),
            label2id={label: i for i, label in enumerate(order)},
            problem_type="single_label_classification",
            ignore_mismatched_sizes=True,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
        self._tokenizer.truncation_side = truncation_side
        index = {label: i for i, label in enumerate(order)}
        self._texts = [e.text for e in examples]
        self._targets = torch.tensor([index[str(e.output)] for e in examples])
        self.confidences = [e.confidence for e in examples]
        soft_wanted = config.distill is not None
        rows = [_label_distribution(e, order) if soft_wanted else None for e in examples]
        self._has_soft = torch.tensor([r is not None for r in rows])
        self._teacher = torch.tensor(
            [r if r is not None else [1.0 / len(order)] * len(order) for r in rows]
        )
        self.soft_kinds = [_SOFT_LABELS if r is not None else _SOFT_NONE for r in rows]

    @property
    def size(self) -> int:
        return len(self._texts)

    @property
    def trainable_parameters(self) -> int:
        return _count_parameters(self.model)

    def losses(self, indices: list[int]) -> Tensor:
        encoded = self._tokenizer(
            [self._texts[i] for i in indices],
            padding=True,
            truncation=True,
            max_length=self._config.max_tokens,
            return_tensors="pt",
        )
        logits = self.model(**encoded).logits
        hard = losses.hard_label_loss(logits, self._targets[indices], reduction="none")
        distill = self._config.distill
        if distill is None:
            return hard
        soft = losses.soft_label_loss(
            logits, self._teacher[indices], distill.temperature, reduction="none"
        )
        return _mix(self._config, hard, soft, self._has_soft[indices])

    def save(self, dest: Path) -> None:
        self.model.save_pretrained(str(dest))
        self._tokenizer.save_pretrained(str(dest))


# --------------------------------------------------------------------------- causal LM


@dataclass
class _Sequence:
    """One causal-LM example, tokenized."""

    prompt: list[int]
    answer: list[int]  # ends with the end-of-sequence token
    target: int  # index of the answer in the label set, or -1
    top_k: list[list[tuple[int, float]]] | None  # per answer token (eos included if reported)
    teacher_labels: list[float] | None  # label distribution, when that is the soft target
    soft: str


class _CausalTask:
    """A causal-LM student (full fine-tuning or LoRA) learning the teacher's answers."""

    def __init__(
        self,
        base: Path,
        examples: Sequence[TrainingExample],
        config: TrainingConfig,
        labels: list[str] | None,
        prompt: str,
        truncation_side: str,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        self._config = config
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
        eos = self._tokenizer.eos_token_id
        if not isinstance(eos, int):
            raise TrainingError(
                f"the tokenizer in {base} has no end-of-sequence token; a causal-LM student "
                "needs one to end its answers"
            )
        self._eos: int = eos
        # Padding positions are masked out of attention and loss: any id will do.
        self._pad: int = (
            self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else eos
        )
        self._chat = bool(getattr(self._tokenizer, "chat_template", None))
        self._template = prompt
        self._truncation_side = truncation_side
        self._vocab: dict[str, int] = dict(self._tokenizer.get_vocab())
        self._token_ids: dict[str, int | None] = {}
        self._labels = labels
        self._label_ids = (
            [self._answer_ids(label) for label in labels] if labels is not None else []
        )
        self.confidences = [e.confidence for e in examples]
        self._items = [self._prepare(e) for e in examples]
        self.soft_kinds = [item.soft for item in self._items]

        model: Any = AutoModelForCausalLM.from_pretrained(
            str(base),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            # Trained in float32: CPU kernels and optimiser updates need it (a
            # small update to a bfloat16 weight is often rounded away).
            dtype=torch.float32,
        )
        # A merged adapter is saved as a plain checkpoint.
        self.adapter = config.lora is not None and not config.lora.merge
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            target: str | list[str] = (
                lora.target_modules
                if isinstance(lora.target_modules, str)
                else list(lora.target_modules)
            )
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=target,
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        self.model = model

    @property
    def size(self) -> int:
        return len(self._items)

    @property
    def trainable_parameters(self) -> int:
        return _count_parameters(self.model)

    # ---- preparation

    def _answer_ids(self, answer: str) -> list[int]:
        ids: list[int] = self._tokenizer(answer, add_special_tokens=False).input_ids
        return [*ids, self._eos]

    def _prompt_ids(self, text: str) -> list[int]:
        """The prompt tokens for ``text``, cut and rendered as serving/local.py does."""
        text_ids: list[int] = self._tokenizer(text, add_special_tokens=False).input_ids
        limit = self._config.max_tokens
        if len(text_ids) > limit:
            kept = text_ids[:limit] if self._truncation_side == "right" else text_ids[-limit:]
            text = self._tokenizer.decode(kept)
        rendered = self._template.replace(INPUT_PLACEHOLDER, text)
        if self._chat:
            rendered = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": rendered}],
                tokenize=False,
                add_generation_prompt=True,
            )
        # A chat template already writes the special tokens it needs.
        ids: list[int] = self._tokenizer(rendered, add_special_tokens=not self._chat).input_ids
        return ids

    def _token_id(self, token: str) -> int | None:
        """The student's id for a token reported by the teacher (its text), if it has one."""
        if token not in self._token_ids:
            found = self._vocab.get(token)
            if found is None:
                ids = self._tokenizer(token, add_special_tokens=False).input_ids
                found = ids[0] if len(ids) == 1 else None
            self._token_ids[token] = found
        return self._token_ids[token]

    def _top_k(
        self, example: TrainingExample, answer: list[int]
    ) -> list[list[tuple[int, float]]] | None:
        """The teacher's top-k per answer token, in student ids; None unless they line up.

        The teacher reports one mapping per generated token; it lines up with the
        student's answer when it has as many entries as the answer's tokens, with
        or without the end-of-sequence token.
        """
        reported = example.top_logprobs
        if not reported or len(reported) not in (len(answer) - 1, len(answer)):
            return None
        rows: list[list[tuple[int, float]]] = []
        for position in reported:
            row: dict[int, float] = {}
            for token, logprob in position.items():
                token_id = self._token_id(token)
                if token_id is not None and math.isfinite(logprob):
                    row.setdefault(token_id, float(logprob))
            rows.append(sorted(row.items()))
        return rows if any(rows) else None

    def _prepare(self, example: TrainingExample) -> _Sequence:
        output = example.output
        answer_text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        answer = self._answer_ids(answer_text)
        target = self._labels.index(answer_text) if self._labels is not None else -1
        top_k: list[list[tuple[int, float]]] | None = None
        teacher_labels: list[float] | None = None
        distill = self._config.distill
        if distill is not None:
            wanted = distill.soft_targets
            if wanted in (SoftTargets.auto, SoftTargets.top_k_tokens):
                top_k = self._top_k(example, answer)
            by_labels = wanted in (SoftTargets.auto, SoftTargets.label_distribution)
            if top_k is None and by_labels and self._labels is not None:
                teacher_labels = _label_distribution(example, self._labels)
        soft = _SOFT_TOP_K if top_k else _SOFT_LABELS if teacher_labels else _SOFT_NONE
        return _Sequence(
            prompt=self._prompt_ids(example.text),
            answer=answer,
            target=target,
            top_k=top_k,
            teacher_labels=teacher_labels,
            soft=soft,
        )

    # ---- losses

    def losses(self, indices: list[int]) -> Tensor:
        items = [self._items[i] for i in indices]
        result = torch.zeros(len(items))
        by_labels = [k for k, item in enumerate(items) if item.teacher_labels is not None]
        others = [k for k, item in enumerate(items) if item.teacher_labels is None]
        if others:
            result = result.index_put(
                (torch.tensor(others),), self._answer_losses([items[k] for k in others])
            )
        if by_labels:
            result = result.index_put(
                (torch.tensor(by_labels),), self._label_losses([items[k] for k in by_labels])
            )
        return result

    def _forward(self, rows: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
        """Logits over the answer positions of (prompt, answer) rows, and their targets.

        Rows are left-padded so that every answer ends at the last position;
        only the last ``longest answer + 1`` positions' logits are computed
        (``logits_to_keep``), which saves the vocabulary-sized logits of every
        prompt position. Returns logits ``[rows, A, vocab]`` aligned with
        targets ``[rows, A]`` (A: the longest answer), IGNORE_INDEX outside each
        row's answer.
        """
        width = max(len(p) + len(a) for p, a in rows)
        longest = max(len(a) for _, a in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), longest), losses.IGNORE_INDEX, dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            ids = prompt + answer
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
            targets[r, longest - len(answer) :] = torch.tensor(answer)
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=longest + 1,
        )
        # Position t predicts token t + 1: drop the last position's logits.
        return output.logits[:, :-1, :], targets

    def _answer_losses(self, items: list[_Sequence]) -> Tensor:
        """Hard loss on each answer, mixed with the top-k loss where the teacher gave it."""
        logits, targets = self._forward([(item.prompt, item.answer) for item in items])
        hard = losses.token_cross_entropy(logits, targets, reduction="none")
        distill = self._config.distill
        if distill is None or not any(item.top_k for item in items):
            return hard
        longest = targets.shape[1]
        k = max(len(row) for item in items if item.top_k for row in item.top_k)
        ids = torch.full((len(items), longest, k), -1, dtype=torch.long)
        logprobs = torch.zeros((len(items), longest, k))
        for r, item in enumerate(items):
            if not item.top_k:
                continue
            offset = longest - len(item.answer)
            for j, row in enumerate(item.top_k):
                for m, (token_id, logprob) in enumerate(row):
                    ids[r, offset + j, m] = token_id
                    logprobs[r, offset + j, m] = logprob
        soft = losses.top_k_logprob_loss(
            logits, ids, logprobs, distill.temperature, reduction="none"
        )
        has_soft = torch.tensor([bool(item.top_k) for item in items])
        return _mix(self._config, hard, soft, has_soft)

    def _label_losses(self, items: list[_Sequence]) -> Tensor:
        """Hard loss on the teacher's label, mixed with KL over the label set.

        Every label is scored as the whole answer after each prompt (one row per
        example and label, in one forward pass); the summed log-probabilities
        are the student's logits over the label set, as serving computes them.
        """
        distill = self._config.distill
        assert distill is not None  # label targets are only prepared when distilling
        count = len(self._label_ids)
        rows = [(item.prompt, answer) for item in items for answer in self._label_ids]
        logits, targets = self._forward(rows)
        scores = losses.sequence_logprobs(logits, targets).reshape(len(items), count)
        picked = torch.tensor([r * count + item.target for r, item in enumerate(items)])
        hard = losses.token_cross_entropy(logits[picked], targets[picked], reduction="none")
        teacher = torch.tensor([item.teacher_labels for item in items])
        soft = losses.soft_label_loss(scores, teacher, distill.temperature, reduction="none")
        return losses.mixed_loss(hard, soft, distill.alpha)

    # ---- saving

    def save(self, dest: Path) -> None:
        model = self.model
        lora = self._config.lora
        if lora is not None and lora.merge:
            model = model.merge_and_unload()
        # Saved in float32 (as trained): rounding to bfloat16 would undo part of
        # the fine-tuning. An adapter alone is a few MB anyway.
        model.save_pretrained(str(dest))
        self._tokenizer.save_pretrained(str(dest))


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
