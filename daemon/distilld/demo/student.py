"""The quick-start student: all-MiniLM-L6-v2 fine-tuned once on gold labels, then cached.

Until the retraining pipeline produces students from teacher labels, the quick
start needs some trained student; this is it. It is trained on reviews that
are never replayed as traffic, and saved with the drift monitor's reference
(its training inputs, described, with its own answers on them).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from distilld import assets
from distilld.demo.data import Row
from distilld.log import get_logger
from distilld.monitoring.features import REFERENCE_FILE, fit_reference, save_reference
from distilld.serving.local import quiet_transformers


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
    """Fine-tune MiniLM (with a new classification head) on ``rows``; save to ``dest``.

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
            encoded = tokenizer(
                [text for text, _ in chunk],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
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
            encoded = tokenizer(
                sample[start : start + 32],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            probs = torch.softmax(model(**encoded).logits, dim=-1)
            best = probs.max(dim=-1)
            labels += [model.config.id2label[int(i)] for i in best.indices]
            confidences += [float(v) for v in best.values]
    path = model_dir / REFERENCE_FILE
    save_reference(fit_reference(sample, predicted_labels=labels, confidences=confidences), path)
    return path
