"""In-process transformers students on real models (MiniLM + head, SmolLM2-135M-Instruct)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from distilld.errors import BackendError, ModelLoadError
from distilld.policy.model import Policy
from distilld.serving.base import Prediction, StudentBackend
from distilld.serving.local import (
    CausalLMStudent,
    SequenceClassificationStudent,
    load_local_student,
)

TRAFFIC = {"requests_topic": "req", "responses_topic": "resp", "dead_letter_topic": "dead"}

REVIEWS = [
    "A dull, lifeless film with no redeeming qualities.",
    "A triumph! Funny, moving and beautifully shot.",
    "Meh.",
    "Great cast, terrible script, and far too long for what it is.",
    "I loved every minute of it.",
    "Not worth the price of the ticket.",
    "An instant classic of the genre.",
    "",
]

LONG_TEXT = " ".join(f"word{i % 97}" for i in range(5_000))

MOVIE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["title", "year"],
    "additionalProperties": False,
}


def classification_policy(
    labels: list[str] | None = None,
    *,
    max_input_tokens: int = 128,
    truncation_side: str = "right",
    architecture: str = "sequence-classification",
) -> Policy:
    document: dict[str, Any] = {
        "task": "reviews",
        "kind": "classification",
        "labels": labels or ["fresh", "rotten"],
        "traffic": TRAFFIC,
        "student": {
            "model": "student",
            "architecture": architecture,
            "max_input_tokens": max_input_tokens,
            "truncation_side": truncation_side,
        },
    }
    if architecture == "causal-lm":
        document["prompt"] = (
            "Is this movie review fresh (positive) or rotten (negative)? "
            "Answer with one word.\nReview: {input}"
        )
    return Policy.model_validate(document)


def extraction_policy(max_new_tokens: int = 48) -> Policy:
    return Policy.model_validate(
        {
            "task": "movies",
            "kind": "extraction",
            "output_schema": MOVIE_SCHEMA,
            "prompt": (
                "Extract the movie title and its release year as JSON with the keys "
                "title and year.\nText: {input}"
            ),
            "traffic": TRAFFIC,
            "student": {
                "model": "student",
                "architecture": "causal-lm",
                "max_input_tokens": 128,
                "max_new_tokens": max_new_tokens,
            },
        }
    )


def assert_distribution(prediction: Prediction, labels: list[str]) -> None:
    assert prediction.error is None
    assert prediction.output in labels
    assert prediction.probabilities is not None
    assert sorted(prediction.probabilities) == sorted(labels)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.confidence == max(prediction.probabilities.values())
    assert prediction.probabilities[str(prediction.output)] == prediction.confidence


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_student(minilm_sentiment_dir: Path) -> Iterator[StudentBackend]:
    student = load_local_student(classification_policy(), minilm_sentiment_dir, "minilm-v1")
    yield student
    student.close()


def test_seq_cls_is_picked_from_the_policy_and_reports_its_version(
    minilm_student: StudentBackend,
) -> None:
    assert isinstance(minilm_student, SequenceClassificationStudent)
    assert isinstance(minilm_student, StudentBackend)
    assert minilm_student.model_version == "minilm-v1"


def test_seq_cls_answers_every_input_in_order(minilm_student: StudentBackend) -> None:
    predictions = minilm_student.predict(REVIEWS)
    assert len(predictions) == len(REVIEWS)
    for prediction in predictions:
        assert_distribution(prediction, ["fresh", "rotten"])
    # Order kept: the same inputs reversed give the same answers reversed.
    backwards = minilm_student.predict(REVIEWS[::-1])[::-1]
    for forward, backward in zip(predictions, backwards, strict=True):
        assert backward.output == forward.output
        assert backward.confidence == pytest.approx(forward.confidence, abs=1e-5)


def test_seq_cls_batch_of_8_matches_8_batches_of_1(minilm_student: StudentBackend) -> None:
    batched = minilm_student.predict(REVIEWS)
    single = [minilm_student.predict([text])[0] for text in REVIEWS]
    for one, many in zip(single, batched, strict=True):
        assert many.output == one.output
        assert many.probabilities is not None and one.probabilities is not None
        for label, probability in one.probabilities.items():
            assert many.probabilities[label] == pytest.approx(probability, abs=1e-4)


def test_seq_cls_empty_batch_gives_no_predictions(minilm_student: StudentBackend) -> None:
    assert minilm_student.predict([]) == []


def test_seq_cls_rejects_a_non_text_input(minilm_student: StudentBackend) -> None:
    with pytest.raises(BackendError, match="input 1 of the batch is a int"):
        minilm_student.predict(["fine", 42])  # type: ignore[list-item]


@pytest.mark.parametrize("side", ["right", "left"])
def test_seq_cls_truncates_a_5000_word_input(minilm_sentiment_dir: Path, side: str) -> None:
    # 2,048 tokens asked for, the encoder has 512 positions: capped, never an error.
    policy = classification_policy(max_input_tokens=2048, truncation_side=side)
    student = load_local_student(policy, minilm_sentiment_dir, "v")
    assert isinstance(student, SequenceClassificationStudent)
    assert student.max_input_tokens == 512
    [prediction] = student.predict([LONG_TEXT])
    assert_distribution(prediction, ["fresh", "rotten"])


def test_truncation_side_decides_which_end_is_kept(minilm_sentiment_dir: Path) -> None:
    start = "an absolutely wonderful film, " * 20
    end = "a tedious and forgettable mess. " * 20
    middle = LONG_TEXT
    texts = [start + middle + end, start + middle, middle + end]
    right = load_local_student(classification_policy(), minilm_sentiment_dir, "v")
    left = load_local_student(
        classification_policy(truncation_side="left"), minilm_sentiment_dir, "v"
    )
    keep_start = right.predict(texts)
    keep_end = left.predict(texts)
    # right keeps the start: texts 0 and 1 share it; left keeps the end: texts 0 and 2 do.
    assert keep_start[0].probabilities == pytest.approx(keep_start[1].probabilities, abs=1e-5)
    assert keep_end[0].probabilities == pytest.approx(keep_end[2].probabilities, abs=1e-5)
    assert keep_start[0].probabilities != pytest.approx(keep_end[0].probabilities, abs=1e-5)


def test_seq_cls_accepts_the_label_set_in_any_order(minilm_sentiment_dir: Path) -> None:
    policy = classification_policy(["rotten", "fresh"])
    student = load_local_student(policy, minilm_sentiment_dir, "v")
    [prediction] = student.predict(["Quite good."])
    assert prediction.probabilities is not None
    assert list(prediction.probabilities) == ["rotten", "fresh"]


def test_seq_cls_refuses_a_model_with_another_label_set(minilm_sentiment_dir: Path) -> None:
    policy = classification_policy(["positive", "negative"])
    with pytest.raises(ModelLoadError) as caught:
        load_local_student(policy, minilm_sentiment_dir, "v")
    message = str(caught.value)
    assert "['fresh', 'rotten']" in message
    assert "['negative', 'positive']" in message


def test_refuses_a_directory_with_only_pickle_weights(
    minilm_sentiment_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    shutil.copy(minilm_sentiment_dir / "config.json", model_dir / "config.json")
    (model_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match=r"safetensors.*pytorch_model\.bin"):
        load_local_student(classification_policy(), model_dir, "v")


def test_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_local_student(classification_policy(), tmp_path / "nowhere", "v")


def test_wraps_broken_weights_into_model_load_error(
    minilm_sentiment_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "broken"
    shutil.copytree(minilm_sentiment_dir, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError, match=str(model_dir)):
        load_local_student(classification_policy(), model_dir, "v")


def test_closed_student_refuses_to_predict(minilm_sentiment_dir: Path) -> None:
    student = load_local_student(classification_policy(), minilm_sentiment_dir, "v")
    student.close()
    with pytest.raises(BackendError, match="closed"):
        student.predict(["hello"])


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_classifier(smollm2_dir: Path) -> Iterator[StudentBackend]:
    policy = classification_policy(architecture="causal-lm", max_input_tokens=64)
    student = load_local_student(policy, smollm2_dir, "smollm2-v1")
    yield student
    student.close()


@pytest.mark.slow
def test_causal_lm_classification_stays_in_the_label_set(
    smollm2_classifier: StudentBackend,
) -> None:
    assert isinstance(smollm2_classifier, CausalLMStudent)
    texts = [*REVIEWS[:3], LONG_TEXT]
    predictions = smollm2_classifier.predict(texts)
    assert len(predictions) == len(texts)
    for prediction in predictions:
        assert_distribution(prediction, ["fresh", "rotten"])


@pytest.mark.slow
def test_causal_lm_classification_batch_matches_single(
    smollm2_classifier: StudentBackend,
) -> None:
    # Prompts of different lengths are left-padded together; padding must not
    # change the scores.
    texts = [REVIEWS[1], REVIEWS[2], REVIEWS[3]]
    batched = smollm2_classifier.predict(texts)
    for text, many in zip(texts, batched, strict=True):
        [one] = smollm2_classifier.predict([text])
        assert many.output == one.output
        assert many.probabilities is not None and one.probabilities is not None
        for label, probability in one.probabilities.items():
            assert many.probabilities[label] == pytest.approx(probability, abs=1e-3)


@pytest.mark.slow
def test_causal_lm_extraction_returns_schema_valid_json_or_an_error(smollm2_dir: Path) -> None:
    student = load_local_student(extraction_policy(), smollm2_dir, "v")
    texts = [
        "Casablanca came out in 1942 and starred Humphrey Bogart.",
        "Jaws (1975) was directed by Steven Spielberg.",
        LONG_TEXT,
    ]
    predictions = student.predict(texts)
    assert len(predictions) == len(texts)
    for prediction in predictions:
        assert 0.0 < prediction.confidence <= 1.0
        if prediction.error is None:
            assert isinstance(prediction.output, dict)
            jsonschema.validate(prediction.output, MOVIE_SCHEMA)
        else:
            assert isinstance(prediction.output, str)
    student.close()


@pytest.mark.slow
def test_causal_lm_extraction_cut_short_reports_an_error(smollm2_dir: Path) -> None:
    # Three tokens cannot hold a complete object: the raw text comes back with an error.
    student = load_local_student(extraction_policy(max_new_tokens=3), smollm2_dir, "v")
    [prediction] = student.predict(["Casablanca came out in 1942."])
    assert prediction.error is not None
    assert "not valid JSON" in prediction.error
    assert isinstance(prediction.output, str)
    assert prediction.output.startswith("{")
    student.close()


@pytest.mark.slow
def test_causal_lm_extraction_with_a_schema_the_constraint_cannot_enforce(
    smollm2_dir: Path,
) -> None:
    # lm-format-enforcer does not support `not`; the answer must still come
    # back (valid or with an error), never as an exception.
    document = extraction_policy(max_new_tokens=16).model_dump()
    document["output_schema"] = {
        "type": "object",
        "properties": {"title": {"not": {"type": "integer"}}},
        "required": ["title"],
    }
    student = load_local_student(Policy.model_validate(document), smollm2_dir, "v")
    [prediction] = student.predict(["Casablanca came out in 1942."])
    if prediction.error is None:
        assert isinstance(prediction.output, dict)
    else:
        assert isinstance(prediction.output, str)
    student.close()


@pytest.mark.slow
def test_causal_lm_label_scores_match_a_plain_forward_pass(smollm2_dir: Path) -> None:
    # Labels of different token lengths, one a prefix of another: the cached
    # prompt + padded labels must give what scoring each full sequence gives.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    labels = ["positive", "negative", "neutral review", "pos"]
    policy = classification_policy(labels, architecture="causal-lm")
    student = load_local_student(policy, smollm2_dir, "v")
    texts = ["I loved every minute of it.", "Boring."]
    predictions = student.predict(texts)
    student.close()

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir), local_files_only=True, dtype=torch.float32
    ).eval()
    for text, prediction in zip(texts, predictions, strict=True):
        assert policy.prompt is not None
        chat = [{"role": "user", "content": policy.prompt.replace("{input}", text)}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        scores = []
        for label in labels:
            label_ids = [*tokenizer(label, add_special_tokens=False).input_ids]
            label_ids.append(tokenizer.eos_token_id)
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt_ids + label_ids])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            start = len(prompt_ids) - 1
            scores.append(sum(float(logprobs[start + i, t]) for i, t in enumerate(label_ids)))
        probabilities = torch.softmax(torch.tensor(scores), dim=-1).tolist()
        expected = dict(zip(labels, probabilities, strict=True))
        assert prediction.probabilities == pytest.approx(expected, abs=1e-4)
