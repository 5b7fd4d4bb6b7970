"""One retraining job: from the traffic reservoir to a registered candidate.

    candidates (comparisons, reservoir, seed files)
      -> select (stratified, deduplicated, hard examples over-sampled)
      -> teacher labels (batches, bounded concurrency in the teacher client)
      -> filter (confidence, validation, reviewer flags)
      -> split (train / validation / held-out test)
      -> train (the policy's method)
      -> gate (candidate vs teacher and live student on the held-out test set)
      -> register (model, drift reference, gate report, manifest) as a candidate

The first attempt selects ``size.min_examples`` inputs, or more when that
cannot hold out the gate's ``min_test_examples``
(:func:`~distilld.retrain.decide.first_size`), or the size the manager asks
for after a failed job (``JobInputs.start_size``). When the gate fails for
lack of data (the candidate trails the teacher), the job selects more inputs
(``retraining.size.growth_factor``, and at least what the gate needs at the
drop rate the quality filter showed, up to the maximum) and tries again;
answers already given by the teacher are reused. What
happens next (shadow, promotion, watch, rollback) is the manager's business
(``retrain/manager.py``): this module never touches the live version.

Every failure is a :class:`RetrainError` (or a TrainingError / TeacherError
from the parts) with the reason; nothing is registered then, and the
scratch directory is removed.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distilld.errors import DistilldError
from distilld.log import get_logger
from distilld.monitoring.features import REFERENCE_FILE, fit_reference, save_reference
from distilld.policy.model import Policy
from distilld.registry import Manifest, ModelRegistry
from distilld.retrain.config import RetrainingConfig
from distilld.retrain.decide import first_size, inputs_needed
from distilld.retrain.filter import (
    LabelledExample,
    OutputValidator,
    filter_examples,
    load_flags,
    parsed_output,
)
from distilld.retrain.gate_report import GateReport
from distilld.retrain.gates import GateExample, evaluate_gate
from distilld.retrain.select import (
    Candidate,
    candidates_from_comparisons,
    candidates_from_traffic,
    select_inputs,
)
from distilld.retrain.split import check_held_out, split_examples
from distilld.retrain.train import (
    TrainingExample,
    TrainProgress,
    terminal_progress,
    train_student,
)
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.local import load_local_student
from distilld.store.base import SampleStore
from distilld.teacher.base import Teacher, TeacherAnswer
from distilld.vocabulary import TaskKind

__all__ = [
    "GATE_HTML",
    "GATE_JSON",
    "JobInputs",
    "JobResult",
    "RetrainCancelled",
    "RetrainError",
    "read_seed_inputs",
    "run_retraining",
]

GATE_JSON = "gate.json"
GATE_HTML = "gate.html"
LABEL_BATCH = 32  # inputs per teacher call; the teacher client bounds its own concurrency
PREDICT_BATCH = 32
REFERENCE_LIMIT = 1000  # inputs described in the drift reference
MAX_ATTEMPTS = 6  # growth steps; the size bounds end it sooner in practice


class RetrainError(DistilldError):
    """A retraining could not produce a candidate (too few inputs, unreadable seeds...)."""


class RetrainCancelled(RetrainError):
    """The daemon is stopping: the job gave up between two steps, registering nothing."""


@dataclass(frozen=True)
class JobInputs:
    """What one job needs; built by the manager from the policy and the daemon's parts."""

    policy: Policy
    config: RetrainingConfig
    teacher: Teacher
    store: SampleStore
    registry: ModelRegistry
    base_model_dir: Path
    seed_files: Sequence[Path] = ()
    flags_file: Path | None = None
    live_version: str | None = None
    live_model_dir: Path | None = None  # None: no live student (cold start) or not readable
    reason: str = "manual"
    seed: int = 0
    cancel: threading.Event | None = None  # set: stop at the next step (daemon stopping)
    start_size: int | None = None  # None: decide.first_size; the manager's after a failure


@dataclass
class JobResult:
    """What a job did; ``version`` is set when a candidate was registered."""

    status: Literal["registered", "gate_failed"]
    version: str | None
    gate: GateReport
    attempts: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    gate_report_path: Path | None = None
    duration_s: float = 0.0


def read_seed_inputs(path: Path) -> list[str]:
    """Inputs of a seed file: one per line, or JSON lines with a ``text`` (or ``input``) field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrainError(
            f"cannot read the seed file {path}: {exc}; retraining.seed_files must name UTF-8 "
            "text files (one input per line, or JSON lines with a text field)"
        ) from None
    inputs: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise RetrainError(
                    f"{path}:{number}: a line starting with '{{' must be a JSON object "
                    f"({exc.msg}); write plain text lines or valid JSON lines"
                ) from None
            text = record.get("text", record.get("input")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise RetrainError(
                    f"{path}:{number}: a JSON line needs a string 'text' (or 'input') field "
                    f"(received keys {sorted(record) if isinstance(record, dict) else '?'})"
                )
            inputs.append(text)
        else:
            inputs.append(line)
    return inputs


def gather_candidates(job: JobInputs) -> list[Candidate]:
    """Compared requests first (their agreement is known, and the first of duplicates
    is kept), then the reservoir, then the seed inputs."""
    task = job.policy.task
    sampling = job.policy.sampling
    candidates = candidates_from_comparisons(job.store.last_comparisons(task, 50_000), sampling)
    candidates += candidates_from_traffic(job.store.reservoir(task), sampling)
    for path in job.seed_files:
        candidates += [
            Candidate(text=text, source="seed", id=f"seed:{path.name}:{i}")
            for i, text in enumerate(read_seed_inputs(path))
        ]
    return candidates


def run_retraining(
    job: JobInputs, *, work_dir: Path, progress: Callable[[str], None] | None = None
) -> JobResult:
    """Run one job; see the module docstring. ``work_dir`` holds the scratch files."""
    started = time.monotonic()
    log = get_logger("retrain")
    cancel = job.cancel or threading.Event()

    def note(step: str) -> None:
        if cancel.is_set():
            raise RetrainCancelled(f"task {job.policy.task!r}: stopped before: {step}")
        if progress is not None:
            progress(step)

    terminal = terminal_progress()

    def training_progress(p: TrainProgress) -> None:
        if cancel.is_set():  # raised inside the trainer: it removes its partial output
            raise RetrainCancelled(f"task {job.policy.task!r}: stopped while training")
        if terminal is not None:
            terminal(p)

    policy, config = job.policy, job.config
    kind = policy.kind.value
    n_labels = len(policy.labels) if policy.labels else None
    low, high = config.size.bounds(kind, n_labels)
    candidates = gather_candidates(job)
    minimum = inputs_needed(config)
    if len(candidates) < minimum:
        raise RetrainError(
            f"task {policy.task!r}: {len(candidates)} candidate inputs (comparisons, reservoir, "
            f"seed files), fewer than the {minimum} needed for a held-out test set of "
            f"{config.gate.min_test_examples} (gate.min_test_examples / split.test); let more "
            "traffic arrive, add retraining.seed_files, or lower gate.min_test_examples"
        )
    flags = load_flags(job.flags_file) if job.flags_file is not None else frozenset()
    validator = OutputValidator(policy.kind, labels=policy.labels, schema=policy.output_schema)
    answers: dict[str, TeacherAnswer] = {}
    attempts: list[dict[str, Any]] = []
    size = min(max(job.start_size or first_size(config, kind, n_labels), low), high)
    work_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        note(f"attempt {attempt}: selecting {size} inputs")
        selection = select_inputs(candidates, size, config.selection, seed=job.seed + attempt)
        chosen = selection.candidates
        note(f"attempt {attempt}: teacher labels {len(chosen)} inputs")
        _label_missing(job.teacher, [c.text for c in chosen], answers, note)
        labelled = [_labelled(c, answers[c.text]) for c in chosen]
        filtered = filter_examples(
            labelled,
            validator=validator,
            min_confidence=config.filtering.min_teacher_confidence,
            flagged=flags,
        )
        if not filtered.kept:
            raise RetrainError(
                f"task {policy.task!r}: the quality filter dropped all {filtered.report.total} "
                f"teacher answers ({dict(filtered.report.dropped)}); if most are low_confidence, "
                "lower retraining.filtering.min_teacher_confidence (now "
                f"{config.filtering.min_teacher_confidence}) or use a more confident teacher"
            )
        kept = [parsed_output(e) for e in filtered.kept]
        split = split_examples(kept, config.split, salt=policy.task)
        check_held_out([e.text for e in split.train], split)  # never train on the test set
        out_dir = work_dir / f"attempt-{attempt}"
        shutil.rmtree(out_dir, ignore_errors=True)
        note(f"attempt {attempt}: training on {len(split.train)} examples")
        trained = train_student(
            job.base_model_dir,
            [_training_example(e) for e in split.train],
            config.training,
            out_dir,
            architecture=policy.student.architecture,
            labels=policy.labels,
            prompt=policy.prompt,
            truncation_side=policy.student.truncation_side,
            progress=training_progress,
        )
        note(f"attempt {attempt}: gate on {len(split.test)} held-out examples")
        gate, reference_inputs = _judge(job, out_dir, split.test, [e.text for e in split.train])
        record = {
            "attempt": attempt,
            "size": size,
            "selection": selection.report.to_dict(),
            "filtering": filtered.report.to_dict(),
            "split": split.report.to_dict(),
            "training": {
                "method": trained.method,
                "examples": trained.examples,
                "steps": trained.steps,
                "epoch_losses": trained.epoch_losses,
                "seconds": trained.duration_s,
            },
            "gate": gate.summary,
        }
        attempts.append(record)
        log.info(
            "retrain.attempt",
            task=policy.task,
            attempt=attempt,
            size=size,
            selected=selection.report.selected,
            kept=filtered.report.kept,
            dropped=dict(filtered.report.dropped),
            train=len(split.train),
            test=len(split.test),
            gate=gate.summary,
        )
        (out_dir / GATE_JSON).write_text(gate.to_json(), encoding="utf-8")
        (out_dir / GATE_HTML).write_text(
            gate.to_html(f"Validation gate: {policy.task}, attempt {attempt}"), encoding="utf-8"
        )
        if gate.passed:
            _write_drift_reference(job.policy, out_dir, reference_inputs)
            version = job.registry.register(
                out_dir,
                Manifest(
                    parent=job.live_version,
                    task=policy.task,
                    data={"attempts": attempts, "reason": job.reason},
                    method=config.training.model_dump(mode="json") | {"name": trained.method},
                    metrics={"gate": gate.to_dict()["metrics"], "gate_summary": gate.summary},
                    gate_report=GATE_JSON,
                    reference_distribution=REFERENCE_FILE,
                    extra={"base_model": str(job.base_model_dir), "reason": job.reason},
                ),
            )
            return JobResult(
                status="registered",
                version=version,
                gate=gate,
                attempts=attempts,
                data=record,
                gate_report_path=job.registry.path(version) / GATE_JSON,
                duration_s=round(time.monotonic() - started, 1),
            )
        grown = config.size.grow(size, kind, n_labels)
        eligible = selection.report.eligible
        if not gate.needs_more_data or grown is None or size >= eligible:
            # Keep the failed gate's report for the operator; the model is not kept.
            report = work_dir / f"gate-attempt-{attempt}.json"
            shutil.copyfile(out_dir / GATE_JSON, report)
            shutil.copyfile(out_dir / GATE_HTML, report.with_suffix(".html"))
            shutil.rmtree(out_dir, ignore_errors=True)
            return JobResult(
                status="gate_failed",
                version=None,
                gate=gate,
                attempts=attempts,
                data=record,
                gate_report_path=report,
                duration_s=round(time.monotonic() - started, 1),
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        # At least what the gate needs once the filter drops the share it just dropped.
        dropped = 1.0 - filtered.report.kept / filtered.report.total
        size = min(max(grown, inputs_needed(config, dropped)), high)
    raise RetrainError(f"task {policy.task!r}: no decision after {MAX_ATTEMPTS} attempts")


def _label_missing(
    teacher: Teacher,
    texts: Sequence[str],
    answers: dict[str, TeacherAnswer],
    note: Callable[[str], None],
) -> None:
    missing = list(dict.fromkeys(t for t in texts if t not in answers))
    for start in range(0, len(missing), LABEL_BATCH):
        note(f"teacher labels inputs {start}-{start + LABEL_BATCH} of {len(missing)}")
        batch = missing[start : start + LABEL_BATCH]
        labelled = teacher.label(batch)
        if len(labelled) != len(batch):
            raise RetrainError(
                f"the teacher returned {len(labelled)} answers for {len(batch)} inputs"
            )
        answers.update(zip(batch, labelled, strict=True))


def _labelled(candidate: Candidate, answer: TeacherAnswer) -> LabelledExample:
    return LabelledExample(
        text=candidate.text,
        output=answer.output,
        confidence=answer.confidence,
        id=candidate.id,
        probabilities=answer.probabilities,
        top_logprobs=answer.top_logprobs,
        # An answer that came back but failed validation (a label outside the set,
        # JSON not matching the schema) is an invalid output, judged by the filter's
        # validator; an input the teacher gave nothing for is a teacher error.
        teacher_error=answer.error if not answer.output else None,
        segment=dict(candidate.segment),
        tags=candidate.tags,
        source=candidate.source,
    )


def _training_example(example: LabelledExample) -> TrainingExample:
    return TrainingExample(
        text=example.text,
        output=example.output,
        confidence=example.confidence,
        probabilities=example.probabilities,
        top_logprobs=example.top_logprobs,
    )


def _predict(backend: StudentBackend, texts: Sequence[str]) -> list[Prediction]:
    predictions: list[Prediction] = []
    for start in range(0, len(texts), PREDICT_BATCH):
        predictions += backend.predict(texts[start : start + PREDICT_BATCH])
    return predictions


def _answer(prediction: Prediction, kind: TaskKind) -> Any:
    # An invalid JSON answer scores as an empty object, never as raw text.
    if prediction.error is not None and kind is not TaskKind.classification:
        return {}
    return prediction.output


def _judge(
    job: JobInputs, candidate_dir: Path, test: Sequence[LabelledExample], train_texts: list[str]
) -> tuple[GateReport, tuple[list[str], list[Prediction]]]:
    """The gate report, and the candidate's answers on (part of) its training inputs for the
    drift reference (loaded once for both)."""
    policy = job.policy
    texts = [e.text for e in test]
    reference_texts = train_texts[:REFERENCE_LIMIT]
    candidate = load_local_student(policy, candidate_dir, model_version="candidate")
    try:
        candidate_answers = _predict(candidate, texts)
        reference_answers = _predict(candidate, reference_texts)
    finally:
        candidate.close()
    live_answers: list[Prediction] | None = None
    if job.live_model_dir is not None:
        live = load_local_student(policy, job.live_model_dir, model_version="live")
        try:
            live_answers = _predict(live, texts)
        finally:
            live.close()
    examples = [
        GateExample(
            gold=e.output,
            candidate=_answer(candidate_answers[i], policy.kind),
            live=_answer(live_answers[i], policy.kind) if live_answers is not None else None,
            segment=dict(e.segment),
            teacher_confidence=e.confidence,
            tags=e.tags,
            id=e.id,
        )
        for i, e in enumerate(test)
    ]
    gate = evaluate_gate(
        examples,
        job.config.gate,
        kind=policy.kind,
        schema=policy.output_schema,
    )
    return gate, (reference_texts, reference_answers)


def _write_drift_reference(
    policy: Policy, model_dir: Path, inputs: tuple[list[str], list[Prediction]]
) -> None:
    texts, answers = inputs
    classification = policy.kind is TaskKind.classification
    reference = fit_reference(
        texts,
        predicted_labels=[str(a.output) for a in answers] if classification else None,
        confidences=[a.confidence for a in answers],
    )
    save_reference(reference, model_dir / REFERENCE_FILE)
