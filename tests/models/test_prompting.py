"""Training and serving build the same token ids for the same inputs (no train/serve skew).

Every pair below goes through the real code of both sides: the training tasks
of :mod:`distilld.retrain.training` and the in-process students of
:mod:`distilld.serving.local`, on the cached test models (MiniLM + head,
SmolLM2-135M-Instruct with its chat template), for each architecture and task
kind, with the start and the end of long inputs cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distilld.models.prompting import (
    CausalPrompts,
    answer_text,
    chat_messages,
    keep_tokens,
    left_pad,
    position_ids,
    render_prompt,
)
from distilld.policy.model import Policy
from distilld.retrain.methods import TrainingConfig
from distilld.retrain.training.causal import CausalExamples
from distilld.retrain.training.classifier import ClassifierTask
from distilld.retrain.training.examples import TrainingExample
from distilld.serving.local import CausalLMStudent, SequenceClassificationStudent

MAX_TOKENS = 16  # short enough that the long inputs below are cut
LABELS = ["fresh", "rotten"]
TRAFFIC = {"requests_topic": "req", "responses_topic": "resp", "dead_letter_topic": "dead"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["title", "year"],
}
PROMPTS = {
    "classification": "Is this review fresh or rotten? Answer with one word.\nReview: {input}",
    "extraction": 'Extract {"title", "year"} as JSON.\nText: {input}',
    "generation": "Write a JSON summary with a title and a year.\nNotes: {input}",
}
TEXTS = [
    "A triumph! Funny, moving and beautifully shot.",
    "Meh.",
    "Ünïcödé — naïve café, 東京 and emoji 🎬🍿 in a review that runs on for a while.",
    " ".join(f"w{i}" for i in range(200)),  # many times MAX_TOKENS; each word once
    "",
]


def policy(kind: str, architecture: str, truncation_side: str) -> Policy:
    document: dict[str, Any] = {
        "task": "t",
        "kind": kind,
        "traffic": TRAFFIC,
        "student": {
            "model": "student",
            "architecture": architecture,
            "max_input_tokens": MAX_TOKENS,
            "truncation_side": truncation_side,
        },
    }
    if kind == "classification":
        document["labels"] = LABELS
    else:
        document["output_schema"] = SCHEMA
    if architecture == "causal-lm":
        document["prompt"] = PROMPTS[kind]
    return Policy.model_validate(document)


def examples(kind: str) -> list[TrainingExample]:
    if kind == "classification":
        return [TrainingExample(text, LABELS[i % 2]) for i, text in enumerate(TEXTS)]
    return [
        TrainingExample(text, {"title": f"T{i} ü", "year": 1900 + i})
        for i, text in enumerate(TEXTS)
    ]


# --------------------------------------------------------------------------- pure parts


def test_keep_tokens_cuts_the_side_it_is_told() -> None:
    assert keep_tokens([1, 2, 3, 4], 2, "right") == [1, 2]
    assert keep_tokens([1, 2, 3, 4], 2, "left") == [3, 4]
    assert keep_tokens([1, 2], 5, "left") == [1, 2]


def test_rendering_is_plain_replacement_in_one_user_message() -> None:
    prompt = render_prompt('JSON {"a": 1} for {input}', "x {input} y")
    assert prompt == 'JSON {"a": 1} for x {input} y'
    assert chat_messages(prompt) == [{"role": "user", "content": prompt}]
    assert answer_text("fresh") == "fresh"
    assert answer_text({"t": "é"}) == '{"t": "é"}'


def test_left_padding_ends_every_row_at_the_last_position() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


# ------------------------------------------------------------------ sequence classification


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_classification_ids_match(minilm_sentiment_dir: Path, side: str) -> None:
    config = TrainingConfig(max_tokens=MAX_TOKENS)
    task = ClassifierTask(minilm_sentiment_dir, examples("classification"), config, LABELS, side)
    training = task.inputs(list(range(len(TEXTS))))
    student = SequenceClassificationStudent(
        policy("classification", "sequence-classification", side), minilm_sentiment_dir, "v"
    )
    serving = student.inputs(TEXTS)
    student.close()

    assert sorted(training.keys()) == sorted(serving.keys())
    for name in training:
        assert torch.equal(training[name], serving[name]), name
    long_row = training["attention_mask"][3]
    assert int(long_row.sum()) == MAX_TOKENS  # the long text was cut
    # [CLS] text [SEP]: the kept end of the long text is the one the side says.
    ids = training["input_ids"][3].tolist()
    kept = task._tokenizer.decode(ids[1:-1]).split()
    assert ("w0" in kept, "w199" in kept) == ((True, False) if side == "right" else (False, True))


# --------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


@pytest.fixture(scope="module", params=["classification", "extraction", "generation"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def causal_students(smollm2_dir: Path, kind: str) -> Iterator[dict[str, CausalLMStudent]]:
    """One served student per truncation side (loading builds the JSON constraint
    tables of extraction and generation: a few seconds each)."""
    students = {
        side: CausalLMStudent(policy(kind, "causal-lm", side), smollm2_dir, "v")
        for side in ("right", "left")
    }
    yield students
    for student in students.values():
        student.close()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_ids_match(
    smollm2_dir: Path,
    smollm2_tokenizer: Any,
    causal_students: dict[str, CausalLMStudent],
    kind: str,
    side: str,
) -> None:
    student = causal_students[side]
    assert student.max_input_tokens == MAX_TOKENS  # SmolLM2 has room: the policy's limit holds
    labels = LABELS if kind == "classification" else None
    training = CausalExamples(
        smollm2_tokenizer,
        smollm2_dir,
        examples(kind),
        TrainingConfig(max_tokens=MAX_TOKENS),
        labels,
        PROMPTS[kind],
        side,
    )
    serving = student.prompt_ids(TEXTS)
    assert [item.prompt for item in training.items] == serving
    if labels is not None:
        # Serving scores each label as the answer training teaches.
        assert training.label_ids == student._label_ids
        assert [item.answer for item in training.items] == [
            student._label_ids[i % 2] for i in range(len(TEXTS))
        ]

    # The pipeline really rendered the chat template and cut the long input.
    prompts = CausalPrompts(smollm2_tokenizer, PROMPTS[kind])
    assert prompts.chat
    short, long = serving[1], serving[3]
    assert len(long) - prompts.template_tokens() <= MAX_TOKENS + 2  # re-tokenising may merge
    assert len(long) > len(short)
    kept = smollm2_tokenizer.decode(long)  # no other word contains "w0"
    assert ("w0" in kept, "w199" in kept) == ((True, False) if side == "right" else (False, True))
