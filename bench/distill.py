"""Distillation benchmark: teacher vs student quality, methods, cost, filtering, cycle time.

For each dataset, from one run on this machine (every figure printed is
measured in that run; throughputs are measured side by side, interleaved, so
other work on the machine affects both sides alike):

  1. teacher and student scores on a held-out GOLD test set (never trained
     on by either): accuracy (and macro-F1, the primary metric for the
     imbalanced SMS spam set) for classification, mean field F1 for
     extraction; the student's agreement with the teacher on the same
     inputs; and the library's gate in gold mode
     (``distilld.retrain.gates.evaluate_gate`` with the teacher's answers
     beside the gold ones, margin 0.02): is the student within 2 points of
     the teacher on the primary metric?
  2. three students trained on the SAME teacher-labelled training split with
     the same seed: direct fine-tuning on the teacher's labels (SFT, hard
     labels), distribution matching (KL to the teacher's class
     probabilities, T=2, alpha 0.5) and a curriculum (easy to hard by the
     teacher's confidence, 3 stages);
  3. teacher and student throughput (texts/s, in-process transformers
     backends, same texts, same batch size, interleaved rounds) and the cost
     ratio (student texts/s over teacher texts/s; target: >= 5x);
  4. what the quality filter (``distilld.retrain.filter``) kept and dropped per
     reason. Reviewer flags are simulated: "reviewers" check a random 5 % of
     the teacher-labelled pool against gold and flag the ids the teacher got
     wrong; those ids go to a flags file read with ``load_flags``;
  5. the wall time of one retraining cycle as the daemon runs it
     (``distilld.retrain.run``): teacher labels the pool -> filter -> split
     (80/10/10 by text fingerprint) -> train (SFT) -> gate (student vs the
     teacher's labels on the split's held-out part).

Datasets, teachers and students (see bench/distill_data.py for the data):

* ``rt``: Rotten Tomatoes short reviews (<= 200 characters), fresh / rotten.
  Teacher: all-mpnet-base-v2 (109M) with a classification head, fine-tuned
  once on gold labels with ``train_student`` and cached under
  .cache/bench-models. Student: all-MiniLM-L6-v2 (22.7M) with a head,
  trained on the teacher's labels.
* ``spam``: SMS spam collection (13 % spam). Same teacher and student models.
* ``address``: usaddress labelled addresses mapped onto the fields of
  policies/us-address.yaml (that policy's schema and prompt). Teacher:
  SmolLM2-135M-Instruct fully fine-tuned on gold JSON answers (cached).
  Student: the same SmolLM2-135M with a LoRA adapter (rank 16, merged)
  trained on the teacher's answers. No smaller causal LM ships offline, so
  this student is NOT cheaper than its teacher (the cost target cannot be
  met this way, and the output says so); the in-process teacher reports no
  token log-probabilities, so distribution matching falls back to the hard
  answer and is not run separately, and neither is the curriculum (CPU
  time). On 2 CPU cores SmolLM2 trains at several seconds per example and
  generates JSON at well under one address per second, so the sizes are
  small; read its figures as a smoke measurement, not a quality estimate.

Usage:  .venv/bin/python bench/distill.py [--quick] [--datasets rt,spam,address]
Options: --quick (small sizes, a few minutes), --datasets (comma list), --seed,
--batch (inference batch for throughput, 8), --rounds (throughput rounds, 2),
--pool / --test / --student-epochs (override those sizes; the teacher stays).
Teachers are trained on first use and cached (.cache/bench-models); the first
run takes longer by that much. Fixed seeds throughout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import distill_data as data
from distill_data import CACHE, Example
from distilld import assets
from distilld.log import configure_logging
from distilld.policy.load import load_policy
from distilld.policy.model import Architecture, Policy
from distilld.retrain.data_config import FilterConfig, GateConfig, SplitConfig
from distilld.retrain.filter import (
    DROP_REASONS,
    LabelledExample,
    OutputValidator,
    filter_examples,
    load_flags,
    parsed_output,
)
from distilld.retrain.gates import (
    GateExample,
    classification_metrics,
    evaluate_gate,
    field_metrics,
)
from distilld.retrain.methods import (
    CurriculumConfig,
    DistillConfig,
    LoraConfig,
    TrainingConfig,
)
from distilld.retrain.split import check_held_out, split_examples
from distilld.retrain.train import TrainingExample, train_student
from distilld.serving.local import load_local_student
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("rt", "spam", "address")
MARGIN = 0.02  # the policy's "within 2 points of the teacher"
COST_TARGET = 5.0
REVIEW_SHARE = 0.05  # share of the pool the simulated reviewers check against gold
LABEL_BATCH = 32  # inputs per teacher call, as distilld.retrain.run labels


@dataclass(frozen=True)
class Sizes:
    teacher_train: int  # gold examples the teacher is fine-tuned on
    teacher_epochs: int
    pool: int  # inputs the teacher labels for the student (the retraining pool)
    test: int  # gold held-out test set
    student_epochs: int
    throughput_texts: int  # texts per throughput round


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    kind: str  # classification or extraction
    primary: str  # accuracy, macro_f1 or field_f1
    full: Sizes
    quick: Sizes
    load: Callable[[], list[Example]]
    max_tokens: int = 64  # input tokens (teacher and student)


SPECS = {
    "rt": Spec(
        name="rt",
        title="Rotten Tomatoes short reviews (<= 200 chars), fresh / rotten",
        kind="classification",
        primary="accuracy",
        full=Sizes(800, 2, 1500, 600, 3, 400),
        quick=Sizes(200, 2, 300, 150, 1, 100),
        load=lambda: data.rotten_tomatoes(200),
    ),
    "spam": Spec(
        name="spam",
        title="SMS spam collection, ham / spam (13 % spam)",
        kind="classification",
        primary="macro_f1",
        full=Sizes(600, 2, 1500, 800, 3, 400),
        quick=Sizes(200, 2, 300, 200, 1, 100),
        load=data.sms_spam,
    ),
    "address": Spec(
        name="address",
        title="usaddress addresses -> {street, city, state, zip} (policies/us-address.yaml)",
        kind="extraction",
        primary="field_f1",
        full=Sizes(48, 2, 48, 24, 2, 8),
        quick=Sizes(16, 1, 16, 8, 1, 4),
        load=data.us_addresses,
    ),
}


@dataclass
class StudentRun:
    method: str
    steps: int
    train_s: float
    scores: dict[str, float] = field(default_factory=dict)  # vs gold
    agreement: float = 0.0  # vs the teacher, primary metric with the teacher as gold
    within: bool | None = None  # the gold-mode gate's primary check


@dataclass
class Result:
    spec: Spec
    sizes: Sizes
    teacher_build_s: float | None  # None: cached
    teacher_scores: dict[str, float]
    students: list[StudentRun]
    teacher_rate: float
    student_rate: float
    filter_report: dict[str, Any]
    flags: int
    reviewed: int
    cycle: dict[str, float]
    split_sizes: dict[str, int]
    cycle_gate: str
    notes: list[str]


# --------------------------------------------------------------------------- policies


def classification_policy(directory: Path, name: str, labels: list[str], max_tokens: int) -> Policy:
    path = directory / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            task: {name}
            kind: classification
            labels: [{", ".join(labels)}]
            traffic:
              requests_topic: {name}.requests
              responses_topic: {name}.responses
              dead_letter_topic: {name}.dead-letter
            student:
              model: student
              max_input_tokens: {max_tokens}
            """
        )
    )
    return load_policy(path)


def address_policy() -> Policy:
    return load_policy(REPO / "policies" / "us-address.yaml")


def labels_of(spec: Spec) -> list[str] | None:
    return {"rt": ["fresh", "rotten"], "spam": ["ham", "spam"]}.get(spec.name)


# --------------------------------------------------------------------------- models


def progress(message: str) -> None:
    """A timestamped progress line on stderr (the table goes to stdout)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def cached_teacher(
    spec: Spec, sizes: Sizes, rows: list[Example], policy: Policy, seed: int
) -> tuple[Path, float | None]:
    """The teacher fine-tuned on gold ``rows`` (trained once, cached by its settings)."""
    if spec.kind == "classification":
        base = data.mpnet_dir()
        config = TrainingConfig(
            epochs=sizes.teacher_epochs,
            batch_size=16,
            learning_rate=5e-5,
            max_tokens=spec.max_tokens,
            seed=seed,
        )
        architecture = Architecture.sequence_classification
    else:
        base = data.smollm2_dir()
        config = TrainingConfig(
            epochs=sizes.teacher_epochs,
            batch_size=8,
            learning_rate=1e-4,
            max_tokens=spec.max_tokens,
            seed=seed,
        )
        architecture = Architecture.causal_lm
    ids = [r.id for r in rows]
    dest = CACHE / f"distill-teacher-{spec.name}-{_key(ids, config.model_dump(mode='json'))}"
    if dest.is_dir():
        return dest, None
    progress(f"[{spec.name}] training the teacher on {len(rows)} gold examples (cached after)")
    started = time.monotonic()
    train_student(
        base,
        [TrainingExample(text=r.text, output=r.gold) for r in rows],
        config,
        dest,
        architecture=architecture,
        labels=labels_of(spec),
        prompt=policy.prompt,
        progress=lambda p: None,
    )
    built = time.monotonic() - started
    progress(f"[{spec.name}] teacher trained in {built:.0f} s")
    return dest, built


def teacher_backend(spec: Spec, policy: Policy, model_dir: Path) -> LocalTeacher:
    config = TransformersTeacherConfig(
        model=str(model_dir),
        architecture=(
            Architecture.sequence_classification
            if spec.kind == "classification"
            else Architecture.causal_lm
        ),
        max_input_tokens=spec.max_tokens,
        max_new_tokens=policy.student.max_new_tokens,
    )
    return LocalTeacher(config, policy, model_dir)


def student_policy(spec: Spec, policy: Policy) -> Policy:
    """The policy with the student's input limit (the benchmark's max_tokens)."""
    student = policy.student.model_copy(update={"max_input_tokens": spec.max_tokens})
    return policy.model_copy(update={"student": student})


class Labeler:
    """A teacher seen as a backend: ``predict`` is its ``label`` (same models, same cost)."""

    def __init__(self, teacher: LocalTeacher) -> None:
        self.predict = teacher.label


def predict(backend: Any, texts: Sequence[str], batch: int) -> list[Any]:
    """Predictions (or teacher answers) for ``texts``, ``batch`` at a time."""
    out: list[Any] = []
    for start in range(0, len(texts), batch):
        out += backend.predict(list(texts[start : start + batch]))
    return out


def answer(p: Any) -> Any:
    """What a prediction is scored as: the output (raw text when it failed validation)."""
    return p.output


# --------------------------------------------------------------------------- scoring


def scores(spec: Spec, gold: Sequence[Any], predicted: Sequence[Any], policy: Policy) -> dict:
    if spec.kind == "classification":
        return classification_metrics(list(gold), list(predicted))
    return field_metrics("extraction", list(gold), list(predicted), schema=policy.output_schema)


def gold_gate(
    spec: Spec, gold: Sequence[Any], teacher: Sequence[Any], student: Sequence[Any], policy: Policy
) -> bool:
    """The library's gate in gold mode: student within MARGIN of the teacher's score on gold."""
    config = GateConfig(primary_metric=spec.primary, margin=MARGIN, min_test_examples=1)
    report = evaluate_gate(
        [
            GateExample(gold=g, candidate=s, teacher=t)
            for g, t, s in zip(gold, teacher, student, strict=True)
        ],
        config,
        kind=spec.kind,  # type: ignore[arg-type]
        schema=policy.output_schema,
    )
    check = next(c for c in report.checks if c.name == "primary_vs_teacher")
    return bool(check.passed)


# --------------------------------------------------------------------------- one dataset


def run_dataset(spec: Spec, sizes: Sizes, args: argparse.Namespace, work: Path) -> Result:
    seed = args.seed
    notes: list[str] = []
    rows = data.shuffled(spec.load(), seed)
    needed = sizes.teacher_train + sizes.pool + sizes.test
    if len(rows) < needed:
        raise SystemExit(f"{spec.name}: {len(rows)} rows, fewer than the {needed} needed")
    # Disjoint parts: the teacher's gold training set, the pool the teacher
    # labels for the student, and the gold test set neither ever trains on.
    teacher_rows = rows[: sizes.teacher_train]
    pool = rows[sizes.teacher_train : sizes.teacher_train + sizes.pool]
    test = rows[sizes.teacher_train + sizes.pool : needed]

    labels = labels_of(spec)
    if spec.kind == "classification":
        assert labels is not None
        policy = classification_policy(work, f"bench-{spec.name}", labels, spec.max_tokens)
    else:
        policy = address_policy()
    policy = student_policy(spec, policy)
    teacher_dir, built_s = cached_teacher(spec, sizes, teacher_rows, policy, seed)
    if spec.kind == "classification":
        student_base = assets.minilm_dir()
        predict_batch = 32
    else:
        student_base = data.smollm2_dir()
        predict_batch = 8

    # ---- one retraining cycle, timed step by step (as distilld.retrain.run runs it)
    cycle: dict[str, float] = {}
    t = time.monotonic()
    teacher = teacher_backend(spec, policy, teacher_dir)
    answers = predict(Labeler(teacher), [r.text for r in pool], LABEL_BATCH)
    cycle["label"] = time.monotonic() - t
    labelled = [
        LabelledExample(
            text=r.text,
            output=a.output,
            confidence=a.confidence,
            id=r.id,
            probabilities=a.probabilities,
            teacher_error=a.error,
        )
        for r, a in zip(pool, answers, strict=True)
    ]
    # Simulated reviewers: a random share of the pool checked against gold; the
    # ids the teacher got wrong are flagged (a flags file, read by load_flags).
    reviewed = random.Random(seed).sample(range(len(pool)), max(1, int(len(pool) * REVIEW_SHARE)))
    wrong = [
        pool[i].id for i in reviewed if not _same(spec, answers[i].output, pool[i].gold, policy)
    ]
    flags_path = work / f"{spec.name}-flags.txt"
    flags_path.write_text("# flagged by reviewers\n" + "".join(f"{i}\n" for i in wrong))

    t = time.monotonic()
    validator = OutputValidator(
        spec.kind,  # type: ignore[arg-type]
        labels=labels,
        schema=policy.output_schema,
    )
    filtered = filter_examples(
        labelled,
        validator=validator,
        min_confidence=FilterConfig().min_teacher_confidence,
        flagged=load_flags(flags_path),
    )
    cycle["filter"] = time.monotonic() - t
    t = time.monotonic()
    kept = [parsed_output(e) for e in filtered.kept]
    split = split_examples(kept, SplitConfig(), salt=spec.name)
    check_held_out([e.text for e in split.train], split)
    cycle["split"] = time.monotonic() - t
    progress(
        f"[{spec.name}] labelled {len(pool)} in {cycle['label']:.0f} s; filter kept "
        f"{filtered.report.kept}; split {dict(split.report.sizes)}"
    )
    if not split.train:
        raise SystemExit(
            f"{spec.name}: the filter and split left no training example "
            f"({filtered.report.to_dict()}); the teacher is too weak or unsure at these sizes"
        )

    base_config = TrainingConfig(
        epochs=sizes.student_epochs,
        batch_size=16 if spec.kind == "classification" else 8,
        max_tokens=spec.max_tokens,
        seed=seed,
        lora=LoraConfig(rank=16, alpha=32, merge=True) if spec.kind == "extraction" else None,
    )
    methods: list[tuple[str, TrainingConfig]] = [("SFT (hard labels)", base_config)]
    if spec.kind == "classification":
        methods += [
            (
                "KL (soft labels)",
                base_config.model_copy(update={"distill": DistillConfig(temperature=2, alpha=0.5)}),
            ),
            ("curriculum", base_config.model_copy(update={"curriculum": CurriculumConfig()})),
        ]
    else:
        notes.append(
            "KL: not run: the in-process teacher reports no token log-probabilities, so "
            "distribution matching would train on the hard answers (same as SFT)"
        )
        notes.append("curriculum: not run for extraction (CPU time on 2 cores)")
    train_set = [
        TrainingExample(
            text=e.text, output=e.output, confidence=e.confidence, probabilities=e.probabilities
        )
        for e in split.train
    ]
    students: list[tuple[StudentRun, Path]] = []
    cycle_gate = ""
    for index, (method, config) in enumerate(methods):
        out = work / f"{spec.name}-student-{index}"
        t = time.monotonic()
        trained = train_student(
            student_base,
            train_set,
            config,
            out,
            architecture=policy.student.architecture,
            labels=labels,
            prompt=policy.prompt,
            progress=lambda p: None,
        )
        train_s = time.monotonic() - t
        progress(f"[{spec.name}] student {method}: {trained.steps} steps in {train_s:.0f} s")
        students.append((StudentRun(method, trained.steps, train_s), out))
        if index == 0:
            cycle["train"] = train_s
            # The gate as the daemon runs it: the teacher's answers are gold.
            t = time.monotonic()
            backend = load_local_student(policy, out, "candidate")
            held_out = split.test
            predicted = predict(backend, [e.text for e in held_out], predict_batch)
            backend.close()
            report = evaluate_gate(
                [
                    GateExample(gold=e.output, candidate=answer(p), teacher_confidence=e.confidence)
                    for e, p in zip(held_out, predicted, strict=True)
                ],
                GateConfig(margin=MARGIN, primary_metric=spec.primary),
                kind=spec.kind,  # type: ignore[arg-type]
                schema=policy.output_schema,
            )
            cycle["gate"] = time.monotonic() - t
            cycle_gate = report.summary

    # ---- the gold test set: teacher and every student, with throughput
    test_texts = [r.text for r in test]
    test_gold = [r.gold for r in test]
    t = time.monotonic()
    teacher_preds = [answer(p) for p in predict(Labeler(teacher), test_texts, predict_batch)]
    teacher_test_s = time.monotonic() - t
    teacher_scores = scores(spec, test_gold, teacher_preds, policy)
    progress(f"[{spec.name}] teacher on the gold test set: {teacher_scores}")
    results: list[StudentRun] = []
    first_student_s = 0.0
    for run, out in students:
        backend = load_local_student(policy, out, run.method)
        t = time.monotonic()
        preds = [answer(p) for p in predict(backend, test_texts, predict_batch)]
        if not results:
            first_student_s = time.monotonic() - t
        backend.close()
        run.scores = scores(spec, test_gold, preds, policy)
        agree = scores(spec, teacher_preds, preds, policy)
        run.agreement = agree["accuracy" if spec.kind == "classification" else "field_f1"]
        run.within = gold_gate(spec, test_gold, teacher_preds, preds, policy)
        results.append(run)

    if spec.kind == "classification":
        student = load_local_student(policy, students[0][1], "student")
        texts = test_texts[: sizes.throughput_texts]
        teacher_rate, student_rate = side_by_side(
            Labeler(teacher), student, texts, args.batch, args.rounds
        )
        student.close()
    else:
        # Both models generate; the gold test pass above ran teacher then student
        # over the same texts at the same batch size: those times are the measure.
        teacher_rate = len(test_texts) / teacher_test_s
        student_rate = len(test_texts) / first_student_s
        notes.append(
            f"throughput: from the gold test pass ({len(test_texts)} addresses each, batch "
            f"{predict_batch}, teacher then student), not interleaved"
        )
    teacher.close()
    return Result(
        spec=spec,
        sizes=sizes,
        teacher_build_s=built_s,
        teacher_scores=teacher_scores,
        students=results,
        teacher_rate=teacher_rate,
        student_rate=student_rate,
        filter_report=filtered.report.to_dict(),
        flags=len(wrong),
        reviewed=len(reviewed),
        cycle=cycle,
        split_sizes=dict(split.report.sizes),
        cycle_gate=cycle_gate,
        notes=notes,
    )


def _same(spec: Spec, output: Any, gold: Any, policy: Policy) -> bool:
    if spec.kind == "classification":
        return bool(output == gold)
    return field_metrics("extraction", [gold], [output])["exact_match"] == 1.0


def side_by_side(
    teacher: Any, student: Any, texts: list[str], batch: int, rounds: int
) -> tuple[float, float]:
    """texts/s of each backend over the same texts, in interleaved rounds (ABBA...)."""
    teacher.predict(texts[:batch])  # warm-up
    student.predict(texts[:batch])
    spent = {"teacher": 0.0, "student": 0.0}
    done = {"teacher": 0, "student": 0}
    for r in range(rounds):
        order = [("teacher", teacher), ("student", student)]
        for name, backend in order if r % 2 == 0 else reversed(order):
            t = time.perf_counter()
            predict(backend, texts, batch)
            spent[name] += time.perf_counter() - t
            done[name] += len(texts)
    return done["teacher"] / spent["teacher"], done["student"] / spent["student"]


# --------------------------------------------------------------------------- output


def _pct(value: float) -> str:
    return f"{100 * value:6.2f}"


def print_result(res: Result, batch: int, rounds: int) -> None:
    spec, sizes = res.spec, res.sizes
    print(f"\n== {spec.name}: {spec.title}")
    if spec.kind == "classification":
        models = "teacher all-mpnet-base-v2 + head (109M); student all-MiniLM-L6-v2 + head (22.7M)"
    else:
        models = "teacher SmolLM2-135M full fine-tune; student SmolLM2-135M + LoRA r16 (merged)"
    built = (
        "cached"
        if res.teacher_build_s is None
        else f"built in this run: {res.teacher_build_s:.0f} s"
    )
    print(f"   {models}")
    print(
        f"   teacher fine-tuned on {sizes.teacher_train} gold examples, {sizes.teacher_epochs} "
        f"epoch(s) ({built}); pool labelled by the teacher {sizes.pool}; gold test "
        f"{sizes.test}; student epochs {sizes.student_epochs}; max {spec.max_tokens} input tokens"
    )
    primary = spec.primary
    if spec.kind == "classification":
        head = f"   {'model':22} {'accuracy':>9} {'macro-F1':>9} {'agree w/ teacher':>17}"
    else:
        head = f"   {'model':22} {'field F1':>9} {'exact':>9} {'F1 vs teacher':>17}"
    head += f" {'steps':>6} {'train s':>8}  within 2 pts of teacher ({primary})"
    print(head)

    def cells(s: dict[str, float]) -> str:
        if spec.kind == "classification":
            return f"{_pct(s['accuracy']):>9} {_pct(s['macro_f1']):>9}"
        return f"{_pct(s['field_f1']):>9} {_pct(s['exact_match']):>9}"

    print(f"   {'teacher':22} {cells(res.teacher_scores)} {'':>17}")
    for run in res.students:
        verdict = "met" if run.within else "NOT met"
        gap = 100 * (run.scores[primary] - res.teacher_scores[primary])
        print(
            f"   {'student ' + run.method:22} {cells(run.scores)} {_pct(run.agreement):>17} "
            f"{run.steps:>6} {run.train_s:>8.0f}  {verdict} ({gap:+.2f} pts)"
        )
    ratio = res.student_rate / res.teacher_rate
    print(
        f"   throughput (batch {batch}, {rounds} interleaved rounds): teacher "
        f"{res.teacher_rate:.1f} texts/s, student {res.student_rate:.1f} texts/s -> student "
        f"{ratio:.2f}x cheaper ({'met' if ratio >= COST_TARGET else 'NOT met'}, target >= 5x)"
        if spec.kind == "classification"
        else f"   throughput: teacher {res.teacher_rate:.2f} texts/s, student "
        f"{res.student_rate:.2f} texts/s -> cost ratio {ratio:.2f}x "
        f"({'met' if ratio >= COST_TARGET else 'NOT met'}, target >= 5x)"
    )
    f = res.filter_report
    dropped = ", ".join(f"{r} {f['dropped'][r]}" for r in DROP_REASONS)
    print(
        f"   filter: {f['total']} teacher answers, kept {f['kept']}, dropped {dropped} "
        f"(min confidence {FilterConfig().min_teacher_confidence}; flags file: {res.flags} ids "
        f"the teacher got wrong among {res.reviewed} reviewed)"
    )
    c = res.cycle
    total = sum(c.values())
    steps = " + ".join(f"{k} {v:.1f}" for k, v in c.items())
    sizes_text = "/".join(str(res.split_sizes[p]) for p in ("train", "validation", "test"))
    print(
        f"   retraining cycle: {steps} = {total:.1f} s wall (split train/val/test {sizes_text}); "
        f"gate vs teacher labels: {res.cycle_gate}"
    )
    for note in res.notes:
        print(f"   note: {note}")


def summary_json(res: Result) -> dict[str, Any]:
    return {
        "dataset": res.spec.name,
        "teacher": {k: round(v, 4) for k, v in res.teacher_scores.items()},
        "students": {
            r.method: {
                **{k: round(v, 4) for k, v in r.scores.items()},
                "agreement": round(r.agreement, 4),
                "within_margin": r.within,
                "train_s": round(r.train_s, 1),
                "steps": r.steps,
            }
            for r in res.students
        },
        "teacher_texts_s": round(res.teacher_rate, 2),
        "student_texts_s": round(res.student_rate, 2),
        "cost_ratio": round(res.student_rate / res.teacher_rate, 2),
        "filter": {"kept": res.filter_report["kept"], **res.filter_report["dropped"]},
        "cycle_s": round(sum(res.cycle.values()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="inference batch for throughput")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds")
    parser.add_argument("--pool", type=int, help="override: inputs the teacher labels")
    parser.add_argument("--test", type=int, help="override: gold test examples")
    parser.add_argument("--student-epochs", type=int, help="override: student epochs")
    args = parser.parse_args()
    chosen = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in SPECS]
    if unknown:
        parser.error(f"unknown datasets {unknown}; choose from {list(DATASETS)}")
    configure_logging("WARNING")
    torch.manual_seed(args.seed)
    load = os.getloadavg()[0]
    print(
        f"distillation benchmark ({'quick' if args.quick else 'full'} sizes), "
        f"{os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
        f"load average {load:.2f} at start (other processes share these cores), seed {args.seed}"
    )
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        for name in chosen:
            spec = SPECS[name]
            t = time.monotonic()
            sizes = spec.quick if args.quick else spec.full
            # Overrides leave the teacher (and its cache entry) as it is.
            sizes = replace(
                sizes,
                pool=args.pool or sizes.pool,
                test=args.test or sizes.test,
                student_epochs=args.student_epochs or sizes.student_epochs,
            )
            res = run_dataset(spec, sizes, args, Path(tmp))
            print_result(res, args.batch, args.rounds)
            print(f"   ({name} took {time.monotonic() - t:.0f} s in all)", flush=True)
            results.append(res)
            for path in Path(tmp).glob(f"{name}-student-*"):
                shutil.rmtree(path, ignore_errors=True)
    print(
        f"\ntotal wall time {time.monotonic() - started:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    print(json.dumps([summary_json(r) for r in results]))


if __name__ == "__main__":
    main()
