"""Training settings, curriculum stages and real (tiny) training runs.

The training runs use the real small models from the offline wheels
(all-MiniLM-L6-v2, SmolLM2-135M-Instruct) but stay tiny: the test machine
has two shared CPU cores, on which one SmolLM2 step over a few short
sequences takes seconds to tens of seconds. Hence a few dozen examples, one
or two epochs, 32 tokens, on a toy task a student learns in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from distilld import assets
from distilld.errors import DistilldError, TrainingError
from distilld.policy.common import Architecture
from distilld.retrain.methods import (
    CurriculumConfig,
    DifficultyBy,
    DistillConfig,
    LoraConfig,
    SoftTargets,
    TrainingConfig,
)
from distilld.retrain.train import (
    TRAINING_FILE,
    TrainingExample,
    TrainProgress,
    curriculum_stages,
    train_student,
)
from distilld.teacher.base import TeacherAnswer

LABELS = ["good", "bad"]
_SUBJECTS = ["The movie", "This phone", "Our hotel", "The pasta", "That concert", "The album"]
_TAILS = ["today", "overall", "if you ask me", "for the price", "honestly", "this week"]


def toy_reviews(count: int, seed: int) -> list[tuple[str, str]]:
    """Texts that say "good" or "bad" (alternating), in varied short sentences."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = LABELS[index % 2]
        rows.append((f"{rng.choice(_SUBJECTS)} was {label} {rng.choice(_TAILS)}.", label))
    return rows


def confident_teacher(rows: list[tuple[str, str]]) -> list[TrainingExample]:
    """What a confident, correct teacher says about ``rows``."""
    other = {"good": "bad", "bad": "good"}
    return [
        TrainingExample(text, label, 0.95, {label: 0.95, other[label]: 0.05})
        for text, label in rows
    ]


# --------------------------------------------------------------------------- settings


def test_training_config_defaults_are_direct_full_fine_tuning() -> None:
    config = TrainingConfig()
    assert config.distill is None and config.curriculum is None and config.lora is None
    assert config.method == "direct"
    assert config.effective_learning_rate == 5e-5
    assert (config.epochs, config.batch_size, config.max_tokens, config.seed) == (3, 16, 128, 0)


def test_methods_combine() -> None:
    config = TrainingConfig.model_validate(
        {
            "distill": {"temperature": 2, "alpha": 0.5},
            "curriculum": {"by": "teacher_confidence", "stages": 3},
            "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    assert config.distill == DistillConfig(temperature=2.0, alpha=0.5)
    assert config.distill.soft_targets is SoftTargets.auto
    assert config.curriculum == CurriculumConfig(by=DifficultyBy.teacher_confidence, stages=3)
    assert config.lora == LoraConfig(rank=4, target_modules=("q_proj", "v_proj"))
    assert config.method == "distill+curriculum+lora"
    assert config.effective_learning_rate == 2e-4  # LoRA's default
    assert TrainingConfig.model_validate(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    "data",
    [
        {"distill": {"temperature": 0}},
        {"distill": {"alpha": 1.5}},
        {"distill": {"tempreature": 2}},  # a typo is an error, not ignored
        {"curriculum": {"by": "vibes"}},
        {"curriculum": {"stages": 0}},
        {"lora": {"rank": 0}},
        {"lora": {"target_modules": "some"}},
        {"epochs": 0},
        {"learning_rate": 0},
        {"method": "sft"},
    ],
)
def test_training_config_refuses_bad_values(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TrainingConfig.model_validate(data)


def test_training_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        TrainingConfig().epochs = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- curriculum


def test_curriculum_orders_easy_to_hard_and_adds_a_slice_per_stage() -> None:
    # Difficulty = 1 - teacher confidence; ties keep the input order.
    difficulty = [0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.0]
    stages = curriculum_stages(difficulty, 3)
    # Easy to hard: 6 (0.0), 1, 3 (0.1), 4 (0.3), 0 (0.5), 5 (0.7), 2 (0.9).
    # Seven examples in three slices: 3 + 2 + 2.
    assert stages == [[6, 1, 3], [6, 1, 3, 4, 0], [6, 1, 3, 4, 0, 5, 2]]


def test_curriculum_edge_cases() -> None:
    assert curriculum_stages([0.2, 0.1], 1) == [[1, 0]]
    assert curriculum_stages([0.2, 0.1], 5) == [[1], [1, 0]]  # never an empty stage
    assert curriculum_stages([], 3) == [[]]
    with pytest.raises(ValueError, match="stages"):
        curriculum_stages([0.1], 0)


# --------------------------------------------------------------------------- refusals


def test_example_from_a_teacher_answer() -> None:
    answer = TeacherAnswer(output="good", confidence=0.8, probabilities={"good": 0.8, "bad": 0.2})
    example = TrainingExample.from_answer("nice", answer)
    assert example == TrainingExample("nice", "good", 0.8, {"good": 0.8, "bad": 0.2})
    with pytest.raises(TrainingError, match="error"):
        TrainingExample.from_answer("x", TeacherAnswer(output="", confidence=0.0, error="bad"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"examples": []}, "no training examples"),
        ({"labels": None}, "needs the task's labels"),
        ({"examples": [TrainingExample("x", "meh")]}, "not one of the labels"),
        ({"examples": [TrainingExample("x", "good", confidence=1.5)]}, "outside"),
        ({"config": TrainingConfig(lora=LoraConfig())}, "LoRA is for causal-LM"),
        (
            {
                "config": TrainingConfig(
                    distill=DistillConfig(soft_targets=SoftTargets.top_k_tokens)
                )
            },
            "only apply to causal-LM",
        ),
        ({"architecture": Architecture.causal_lm, "prompt": "no placeholder"}, "prompt"),
    ],
)
def test_train_student_refuses_before_loading_anything(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    arguments: dict[str, object] = {
        "base_model_dir": assets.minilm_dir(),
        "examples": [TrainingExample("x", "good")],
        "config": TrainingConfig(),
        "out_dir": tmp_path / "student",
        "architecture": Architecture.sequence_classification,
        "labels": LABELS,
    }
    arguments.update(kwargs)
    with pytest.raises(TrainingError, match=match):
        train_student(**arguments)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_directory_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "student").mkdir()
    with pytest.raises(TrainingError, match="already exists"):
        train_student(
            assets.minilm_dir(),
            [TrainingExample("x", "good")],
            TrainingConfig(),
            tmp_path / "student",
            architecture=Architecture.sequence_classification,
            labels=LABELS,
        )


def test_a_broken_base_model_is_a_training_error_and_leaves_nothing(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{not json")
    (base / "model.safetensors").write_bytes(b"\0" * 16)
    out = tmp_path / "models" / "student"
    with pytest.raises(TrainingError) as caught:
        train_student(
            base,
            [TrainingExample("x", "good")],
            TrainingConfig(),
            out,
            architecture=Architecture.sequence_classification,
            labels=LABELS,
        )
    assert isinstance(caught.value, DistilldError)
    assert str(base) in str(caught.value)
    assert list(out.parent.iterdir()) == []  # no model, no temporary directory


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_minilm_distilled_from_a_confident_teacher_learns_the_toy_task(tmp_path: Path) -> None:
    """64 examples, one epoch of 16 steps, 32 tokens (about a minute on two
    CPU cores shared with other jobs). The untrained head is at chance."""
    config = TrainingConfig(
        distill=DistillConfig(temperature=2.0, alpha=0.5),
        epochs=1,
        batch_size=4,
        learning_rate=2e-4,
        max_tokens=32,
    )
    seen: list[TrainProgress] = []
    out = tmp_path / "student"
    result = train_student(
        assets.minilm_dir(),
        confident_teacher(toy_reviews(64, seed=1)),
        config,
        out,
        architecture=Architecture.sequence_classification,
        labels=LABELS,
        progress=seen.append,
    )
    assert result.model_dir == out and result.method == "distill" and not result.adapter
    assert result.steps == 16 and [p.step for p in seen] == list(range(1, 17))
    assert result.soft_targets == {"label_distribution": 64}

    record = json.loads((out / TRAINING_FILE).read_text())
    assert record["method"] == "distill"
    assert record["examples"] == 64 and record["seed"] == 0
    assert record["losses_per_epoch"] == result.epoch_losses and len(result.epoch_losses) == 1
    assert record["config"]["distill"] == {
        "temperature": 2.0,
        "alpha": 0.5,
        "soft_targets": "auto",
    }
    assert record["duration_s"] > 0
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".student*"))

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    held_out = toy_reviews(40, seed=2)
    with torch.inference_mode():
        encoded = tokenizer([text for text, _ in held_out], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(dim=-1).tolist()
    correct = sum(
        model.config.id2label[p] == label for p, (_, label) in zip(predicted, held_out, strict=True)
    )
    assert correct / len(held_out) >= 0.9


@pytest.mark.slow
def test_minilm_curriculum_by_student_loss_trains_in_growing_stages(tmp_path: Path) -> None:
    """16 examples, batch 8, two stages (8 then 16 examples): three steps."""
    config = TrainingConfig(
        curriculum=CurriculumConfig(by=DifficultyBy.student_loss, stages=2),
        epochs=1,
        batch_size=8,
        max_tokens=32,
    )
    result = train_student(
        assets.minilm_dir(),
        confident_teacher(toy_reviews(16, seed=3)),
        config,
        tmp_path / "student",
        architecture=Architecture.sequence_classification,
        labels=LABELS,
    )
    record = json.loads((tmp_path / "student" / TRAINING_FILE).read_text())
    assert record["method"] == "direct+curriculum" == result.method
    assert [(e["stage"], e["examples"]) for e in record["epochs"]] == [(1, 8), (2, 16)]
    assert result.steps == 3
    assert result.soft_targets == {"none": 16}


@pytest.mark.slow
def test_smollm2_lora_distillation_saves_an_adapter_peft_loads(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """Four examples, batch 4, two epochs: two LoRA steps on SmolLM2-135M. Two
    examples carry the teacher's top-k token log-probabilities, two only its
    label distribution, so both soft losses run. About two minutes on two
    shared CPU cores."""
    other = {"good": "bad", "bad": "good"}
    examples = []
    for index, (text, label) in enumerate(toy_reviews(4, seed=4)):
        if index < 2:
            examples.append(TrainingExample(text, label, 0.9, {label: 0.9, other[label]: 0.1}))
        else:
            top_k = [{label: -0.1, other[label]: -2.4}, {"<|im_end|>": -0.01}]
            examples.append(TrainingExample(text, label, 0.9, top_logprobs=top_k))
    config = TrainingConfig(
        distill=DistillConfig(temperature=2.0, alpha=0.5),
        lora=LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")),
        epochs=2,
        batch_size=4,
        learning_rate=1e-3,
        max_tokens=32,
    )
    out = tmp_path / "adapter"
    result = train_student(
        smollm2_dir,
        examples,
        config,
        out,
        architecture=Architecture.causal_lm,
        labels=LABELS,
        prompt="Is this review good or bad? Answer with one word.\n{input}",
    )
    assert result.adapter and result.method == "distill+lora" and result.steps == 2
    assert result.soft_targets == {"label_distribution": 2, "top_k_tokens": 2}
    assert result.epoch_losses[1] < result.epoch_losses[0]
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / TRAINING_FILE).read_text())["adapter"] is True

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
