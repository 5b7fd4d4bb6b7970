"""The demo's models: a teacher and a first student, built once and cached.

Both are all-MiniLM-L6-v2 with a classification head (the only encoder that
ships offline and trains in minutes on 2 cores):

* the teacher is fine-tuned on gold labels: a stand-in for the large model a
  real deployment calls (the policy's ``teacher`` section);
* the first student is distilled from that teacher, briefly, on reviews of
  the first population only (95 % fresh): it answers "fresh" to nearly
  everything, which serves that population well and the one after the
  shift (95 % rotten) badly.

Each is saved with the drift monitor's reference (its training inputs,
described, with its own answers on them) and a recipe file: a model built by
another recipe is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distilld import assets
from distilld.demo.data import LoopData, Row
from distilld.errors import ConfigError
from distilld.log import get_logger
from distilld.modelpaths import resolve_model_dir
from distilld.models.prompting import classifier_inputs
from distilld.monitoring.features import REFERENCE_FILE, fit_reference, save_reference
from distilld.policy.model import Policy
from distilld.serving.local import quiet_transformers
from distilld.teacher.config import TransformersTeacherConfig
from distilld.teacher.local import LocalTeacher

RECIPE_FILE = "demo-recipe.json"


@dataclass(frozen=True)
class Recipe:
    """How one of the demo's models is trained (with its rows, the cache key)."""

    name: str
    epochs: int
    batch_size: int
    max_tokens: int
    learning_rate: float


TEACHER_RECIPE = Recipe("teacher", epochs=2, batch_size=32, max_tokens=64, learning_rate=5e-5)
# Briefly, at the base rate: on a population that is 95 % fresh the first
# student learns little more than "fresh", which serves that population
# well and the one after the shift badly.
STUDENT_RECIPE = Recipe("first-student", epochs=1, batch_size=32, max_tokens=64, learning_rate=5e-5)


def _recipe_key(recipe: Recipe, rows: list[Row], parent: str = "") -> str:
    ids = hashlib.sha256("\n".join(r.id for r in rows).encode()).hexdigest()
    payload = json.dumps([asdict(recipe), ids, parent], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _built(model_dir: Path, key: str) -> bool:
    try:
        return bool(json.loads((model_dir / RECIPE_FILE).read_text())["key"] == key)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mark(model_dir: Path, key: str, recipe: Recipe, examples: int) -> None:
    record = {"key": key, "recipe": asdict(recipe), "examples": examples}
    (model_dir / RECIPE_FILE).write_text(json.dumps(record, indent=2))


def _train(dest: Path, rows: list[Row], labels: list[str], recipe: Recipe) -> None:
    train_quickstart_student(
        dest,
        rows,
        labels,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        max_tokens=recipe.max_tokens,
        learning_rate=recipe.learning_rate,
    )


def ensure_demo_models(models_dir: Path, policy: Policy, data: LoopData) -> tuple[Path, Path]:
    """The demo's teacher and first student (built on first use, then reused):
    ``(teacher_dir, student_dir)`` under ``models_dir`` as the policy names them."""
    log = get_logger("demo")
    teacher_config = policy.teacher
    if not isinstance(teacher_config, TransformersTeacherConfig) or policy.student.model is None:
        raise ConfigError(
            "the demo policy must have an in-process teacher (teacher.backend: transformers) "
            "and name its first student (student.model); restore policies/rotten-tomatoes.yaml"
        )
    if policy.labels is None:
        raise ConfigError("the demo policy must be a classification policy with labels")
    labels = list(policy.labels)
    models_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir = resolve_model_dir(
        models_dir, teacher_config.model, field="teacher.model", must_exist=False
    )
    student_dir = resolve_model_dir(models_dir, policy.student.model, must_exist=False)

    teacher_key = _recipe_key(TEACHER_RECIPE, data.teacher_train)
    if not _built(teacher_dir, teacher_key):
        log.info(
            "demo.training_teacher",
            model_dir=str(teacher_dir),
            gold_examples=len(data.teacher_train),
            note="once (a few minutes), cached for later runs",
        )
        _train(teacher_dir, data.teacher_train, labels, TEACHER_RECIPE)
        _mark(teacher_dir, teacher_key, TEACHER_RECIPE, len(data.teacher_train))

    student_key = _recipe_key(STUDENT_RECIPE, data.student_train, parent=teacher_key)
    if not _built(student_dir, student_key):
        teacher = LocalTeacher(teacher_config, policy, teacher_dir)
        try:
            answers = []
            for start in range(0, len(data.student_train), 64):
                chunk = data.student_train[start : start + 64]
                answers += teacher.label([r.text for r in chunk])
        finally:
            teacher.close()
        labelled = [
            Row(id=r.id, text=r.text, category=str(a.output))
            for r, a in zip(data.student_train, answers, strict=True)
            if a.output in labels
        ]
        log.info(
            "demo.training_first_student",
            model_dir=str(student_dir),
            teacher_labelled_examples=len(labelled),
            note="distilled from the teacher on the first population only; once, cached",
        )
        _train(student_dir, labelled, labels, STUDENT_RECIPE)
        _mark(student_dir, student_key, STUDENT_RECIPE, len(labelled))
    return teacher_dir, student_dir


def train_quickstart_student(
    dest: Path,
    rows: list[Row],
    labels: list[str],
    *,
    epochs: int = 2,
    max_tokens: int = 64,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    seed: int = 0,
) -> Path:
    """Fine-tune MiniLM (with a new classification head) on ``rows`` (their
    ``category`` is the label); save to ``dest``.

    Written to a temporary sibling directory and renamed at the end, so a run
    killed half-way never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    log = get_logger("demo")
    quiet_transformers()
    # Late in training, tiny gradients and Adam moments turn into subnormal
    # floats, which x86 CPUs process many times slower; flushing them to zero
    # changes nothing measurable and keeps the second epoch as fast as the first.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    base = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        local_files_only=True,
        use_safetensors=True,
    )
    index = {label: i for i, label in enumerate(labels)}
    examples = [(r.text, index[r.label]) for r in rows if r.label is not None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps)
    rng = random.Random(seed)
    model.train()
    started = time.monotonic()
    for epoch in range(epochs):
        rng.shuffle(examples)
        total = 0.0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            encoded = classifier_inputs(tokenizer, [text for text, _ in chunk], max_tokens, "right")
            targets = torch.tensor([label for _, label in chunk])
            loss = model(**encoded, labels=targets).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += loss.detach().item() * len(chunk)
        log.info(
            "demo.student_epoch",
            epoch=epoch + 1,
            epochs=epochs,
            mean_loss=round(total / len(examples), 4),
            seconds=round(time.monotonic() - started, 1),
        )
    model.eval()
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    save_drift_reference(partial, [text for text, _ in examples], max_tokens=max_tokens)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def save_drift_reference(
    model_dir: Path, texts: list[str], *, max_tokens: int = 64, limit: int = 1000
) -> Path:
    """Describe the student's training inputs, with its own answers on them, as the
    drift monitor's reference (``REFERENCE_FILE`` in the model directory)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, local_files_only=True, use_safetensors=True
    ).eval()
    sample = texts[:limit]
    labels: list[str] = []
    confidences: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(sample), 32):
            encoded = classifier_inputs(tokenizer, sample[start : start + 32], max_tokens, "right")
            probs = torch.softmax(model(**encoded).logits, dim=-1)
            best = probs.max(dim=-1)
            labels += [model.config.id2label[int(i)] for i in best.indices]
            confidences += [float(v) for v in best.values]
    path = model_dir / REFERENCE_FILE
    save_reference(fit_reference(sample, predicted_labels=labels, confidences=confidences), path)
    return path
