"""Policy files: the shipped examples load, and every mistake gets a clear message.

Each malformed policy must be rejected with a PolicyError whose text names the
file, the field path and what was expected, never a pydantic dump.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from distilld.cli import main
from distilld.errors import PolicyError
from distilld.models.prompting import render_prompt
from distilld.policy.load import load_policies, load_policy, policy_json_schema
from distilld.policy.model import Architecture, Policy
from distilld.teacher.config import OpenAITeacherConfig, TransformersTeacherConfig
from distilld.vocabulary import TaskKind

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_POLICIES = REPO_ROOT / "policies"

CLASSIFICATION: dict[str, Any] = {
    "task": "reviews",
    "kind": "classification",
    "labels": ["fresh", "rotten"],
    "traffic": {
        "requests_topic": "reviews.requests",
        "responses_topic": "reviews.responses",
        "dead_letter_topic": "reviews.dead-letter",
    },
    "student": {"model": "reviews-minilm", "batch": {"max_size": 8, "max_wait_ms": 10}},
}

EXTRACTION: dict[str, Any] = {
    "task": "address",
    "kind": "extraction",
    "output_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
    },
    "prompt": "Extract city and zip as JSON: {input}",
    "traffic": {
        "requests_topic": "address.requests",
        "responses_topic": "address.responses",
        "dead_letter_topic": "address.dead-letter",
    },
    "student": {"model": "address-smollm2", "architecture": "causal-lm"},
}

OPENAI_TEACHER: dict[str, Any] = {
    "backend": "openai",
    "base_url": "http://vllm:8000/v1",
    "model": "teacher",
    "prompt": "Is this review fresh or rotten? {input}",
}

LOCAL_TEACHER: dict[str, Any] = {"backend": "transformers", "model": "teachers/mpnet"}

# A classification task with every new section filled.
MONITORED: dict[str, Any] = {
    **CLASSIFICATION,
    "teacher": OPENAI_TEACHER,
    "sampling": {"base_rate": 0.1, "segment_keys": ["source"]},
    "monitors": {
        "interval_s": 60,
        "accuracy": {"window": 500, "min_samples": 100, "segments": {"keys": ["source"]}},
        "drift": {"features": ["char_length", "predicted_label"]},
    },
    "alerts": {"topic": "distilld.alerts"},
}

DROP = object()  # marks a field to remove from the base policy


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted-path ``changes`` applied (DROP removes)."""
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        section = data
        for part in parents:
            section = section.setdefault(part, {})
        if value is DROP:
            del section[last]
        else:
            section[last] = copy.deepcopy(value)
    return data


def _write(directory: Path, data: dict[str, Any], name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _rejection(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value


def _assert_readable(error: PolicyError, path: Path) -> None:
    text = str(error)
    assert error.problems, "a PolicyError must list its problems"
    for problem in error.problems:
        assert problem.startswith(f"{path}: "), problem
    # pydantic's raw wording and links must not reach the operator.
    for leak in ("Value error,", "errors.pydantic.dev", "Traceback", "validation error for"):
        assert leak not in text


# --------------------------------------------------------------- shipped examples


def test_shipped_policies_load() -> None:
    policies = load_policies(SHIPPED_POLICIES)

    quick_start = policies["rotten-tomatoes"]
    assert quick_start.kind is TaskKind.classification
    assert quick_start.labels == ["fresh", "rotten"]
    assert quick_start.traffic.requests_topic == "rotten-tomatoes.requests"
    assert quick_start.traffic.responses_topic == "rotten-tomatoes.responses"
    assert quick_start.traffic.dead_letter_topic == "rotten-tomatoes.dead-letter"
    assert quick_start.student.backend == "transformers"
    assert quick_start.student.architecture is Architecture.sequence_classification
    assert quick_start.student.model == "rotten-tomatoes-minilm"
    assert quick_start.student.max_input_tokens == 128
    assert (quick_start.student.batch.max_size, quick_start.student.batch.max_wait_ms) == (8, 10)

    extraction = [p for p in policies.values() if p.kind is TaskKind.extraction]
    assert len(extraction) == 1
    assert extraction[0].student.architecture is Architecture.causal_lm
    assert extraction[0].output_schema is not None
    assert {"street", "city", "state", "zip"} <= set(extraction[0].output_schema["properties"])
    assert extraction[0].prompt is not None
    rendered = render_prompt(extraction[0].prompt, "12 Main St, Springfield IL 62701")
    assert "12 Main St" in rendered


@pytest.mark.parametrize("path", sorted(SHIPPED_POLICIES.glob("*.y*ml")), ids=lambda p: p.name)
def test_each_shipped_policy_loads_alone(path: Path) -> None:
    assert isinstance(load_policy(path), Policy)


def _uncommented_examples(text: str) -> str:
    """The commented-out sections of a policy file (``# teacher:`` and the
    ``#   `` lines under it), uncommented."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if re.fullmatch(r"# [a-z_]+:", line):
            inside = True
        elif not (inside and line.startswith("#   ")):
            inside = False
            continue
        lines.append(line[2:])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", sorted(SHIPPED_POLICIES.glob("*.y*ml")), ids=lambda p: p.name)
def test_commented_out_examples_of_shipped_policies_are_valid(tmp_path: Path, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    examples = _uncommented_examples(text)
    assert "teacher:" in examples
    # An uncommented example replaces the active section of the same name.
    document = {**yaml.safe_load(text), **yaml.safe_load(examples)}

    policy = load_policy(_write_text(tmp_path / path.name, yaml.safe_dump(document)))

    assert policy.teacher is not None


def test_shipped_policies_set_the_monitors() -> None:
    quick_start = load_policy(SHIPPED_POLICIES / "rotten-tomatoes.yaml")
    # The demo's in-process teacher, and retraining on.
    assert isinstance(quick_start.teacher, TransformersTeacherConfig)
    assert quick_start.teacher.model == "rotten-tomatoes-teacher"
    assert quick_start.retraining is not None
    assert quick_start.monitors.accuracy.threshold == 0.9
    assert quick_start.monitors.drift.drift_share == 0.5
    address = load_policy(SHIPPED_POLICIES / "us-address.yaml")
    assert address.monitors.drift.features is not None
    assert "predicted_label" not in address.monitors.drift.features


# -------------------------------------------------------------- malformed fields

# (id, base policy, dotted changes, field path in the message, expected words)
MALFORMED: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("task-not-a-string", CLASSIFICATION, {"task": 12}, "task", "expected a valid string"),
    ("labels-not-a-list", CLASSIFICATION, {"labels": "fresh"}, "labels", "expected a valid list"),
    ("label-not-a-string", CLASSIFICATION, {"labels": ["a", 2]}, "labels[1]", "valid string"),
    (
        "max-input-chars-not-a-number",
        CLASSIFICATION,
        {"traffic.max_input_chars": "lots"},
        "traffic.max_input_chars",
        "expected a valid integer",
    ),
    ("student-not-a-mapping", CLASSIFICATION, {"student": "minilm"}, "student", "a mapping"),
    (
        "unknown-top-level-key",
        CLASSIFICATION,
        {"lables": ["a", "b"]},
        "lables",
        "unknown field; the fields of a policy are: version, task, kind",
    ),
    (
        "unknown-nested-key",
        CLASSIFICATION,
        {"student.batch.max_sise": 4},
        "student.batch.max_sise",
        "unknown field; the fields of student.batch are: max_size, max_wait_ms",
    ),
    (
        "classification-without-labels",
        CLASSIFICATION,
        {"labels": DROP},
        "labels",
        "a classification task needs `labels`",
    ),
    ("single-label", CLASSIFICATION, {"labels": ["fresh"]}, "labels", "at least two labels"),
    (
        "duplicate-labels",
        CLASSIFICATION,
        {"labels": ["fresh", "rotten", "fresh"]},
        "labels",
        "labels must be distinct (repeated: ['fresh'])",
    ),
    ("empty-prompt", EXTRACTION, {"prompt": "   "}, "prompt", "must not be empty"),
    (
        "prompt-without-placeholder",
        EXTRACTION,
        {"prompt": "Extract the fields."},
        "prompt",
        "must contain the placeholder {input}",
    ),
    (
        "causal-lm-without-prompt",
        EXTRACTION,
        {"prompt": DROP},
        "prompt",
        "a causal-lm student needs a `prompt`",
    ),
    (
        "topic-with-space",
        CLASSIFICATION,
        {"traffic.requests_topic": "reviews requests"},
        "traffic.requests_topic",
        "expected a Kafka topic name",
    ),
    (
        "topic-too-long",
        CLASSIFICATION,
        {"traffic.responses_topic": "r" * 250},
        "traffic.responses_topic",
        "1 to 249 characters",
    ),
    (
        "topic-dot-dot",
        CLASSIFICATION,
        {"traffic.dead_letter_topic": ".."},
        "traffic.dead_letter_topic",
        "not '.' or '..'",
    ),
    # "$" in Python's re matches before a final newline: these passed the patterns.
    (
        "task-with-trailing-newline",
        CLASSIFICATION,
        {"task": "reviews\n"},
        "task",
        "a name of 1 to 63 characters",
    ),
    (
        "topic-with-trailing-newline",
        CLASSIFICATION,
        {"traffic.requests_topic": "reviews.requests\n"},
        "traffic.requests_topic",
        "expected a Kafka topic name",
    ),
    (
        "vllm-base-url-with-trailing-newline",
        CLASSIFICATION,
        {"student.backend": "vllm", "student.vllm": {"base_url": "http://vllm:8000\n"}},
        "student.vllm.base_url",
        "expected",
    ),
    (
        "vllm-key-env-with-trailing-newline",
        CLASSIFICATION,
        {"student.backend": "vllm", "student.vllm": {"api_key_env": "VLLM_KEY\n"}},
        "student.vllm.api_key_env",
        "expected",
    ),
    (
        "vllm-key-from-two-places",
        CLASSIFICATION,
        {
            "student.backend": "vllm",
            "student.vllm": {"api_key_env": "VLLM_KEY", "api_key_file": "vllm_key"},
        },
        "student.vllm.api_key_file",
        "set api_key_env or api_key_file, not both",
    ),
    (
        "requests-equals-responses",
        CLASSIFICATION,
        {"traffic.responses_topic": "reviews.requests"},
        "traffic.responses_topic",
        "must be three different topics",
    ),
    (
        "negative-max-input-chars",
        CLASSIFICATION,
        {"traffic.max_input_chars": -1},
        "traffic.max_input_chars",
        "expected a number greater than 0 (received -1)",
    ),
    (
        "negative-batch-size",
        CLASSIFICATION,
        {"student.batch.max_size": -4},
        "student.batch.max_size",
        "expected a number greater than or equal to 1 (received -4)",
    ),
    (
        "max-wait-too-large",
        CLASSIFICATION,
        {"student.batch.max_wait_ms": 60_000},
        "student.batch.max_wait_ms",
        "less than or equal to 10000 (received 60000)",
    ),
    ("missing-task", CLASSIFICATION, {"task": DROP}, "task", "required field is missing"),
    (
        "bad-task-name",
        CLASSIFICATION,
        {"task": "Movie Reviews"},
        "task",
        "lowercase letters, digits, '-' and '_', starting with a letter or a digit "
        "(received 'Movie Reviews')",
    ),
    (
        "unknown-kind",
        CLASSIFICATION,
        {"kind": "summarisation"},
        "kind",
        "expected one of 'classification', 'extraction' or 'generation'",
    ),
    (
        "extraction-without-schema",
        EXTRACTION,
        {"output_schema": DROP},
        "output_schema",
        "an extraction task needs `output_schema`",
    ),
    (
        "invalid-json-schema",
        EXTRACTION,
        {"output_schema.properties": {"city": {"type": "txet"}}},
        "output_schema",
        "is not a valid JSON Schema",
    ),
    (
        "schema-not-an-object",
        EXTRACTION,
        {"output_schema": {"type": "string"}},
        "output_schema",
        "must describe a JSON object (type: object)",
    ),
    (
        "extraction-schema-without-properties",
        EXTRACTION,
        {"output_schema.properties": DROP},
        "output_schema",
        "must list `properties`",
    ),
    (
        "labels-on-extraction",
        EXTRACTION,
        {"labels": ["a", "b"]},
        "labels",
        "an extraction task takes `output_schema`, not `labels`",
    ),
    (
        "schema-on-classification",
        CLASSIFICATION,
        {"output_schema": {"type": "object", "properties": {"a": {}}}},
        "output_schema",
        "a classification task takes `labels`, not `output_schema`",
    ),
    (
        "sequence-classification-for-extraction",
        EXTRACTION,
        {"student.architecture": "sequence-classification"},
        "student.architecture",
        "use architecture: causal-lm for extraction",
    ),
    (
        "model-path-escapes",
        CLASSIFICATION,
        {"student.model": "../../etc/minilm"},
        "student.model",
        "must not contain '..' path parts",
    ),
    (
        "unknown-backend",
        CLASSIFICATION,
        {"student.backend": "triton"},
        "student.backend",
        "expected 'transformers' or 'vllm'",
    ),
    (
        "vllm-section-without-vllm-backend",
        CLASSIFICATION,
        {"student.vllm": {"concurrency": 8}},
        "student.vllm",
        "only applies to backend: vllm",
    ),
    (
        "vllm-bad-base-url",
        CLASSIFICATION,
        {"student.backend": "vllm", "student.vllm": {"base_url": "vllm:8000"}},
        "student.vllm.base_url",
        "vllm:8000",
    ),
    ("unknown-version", CLASSIFICATION, {"version": 2}, "version", "expected 1 (received 2)"),
    # ---- retraining
    (
        "retraining-empty",
        MONITORED,
        {"retraining": None},
        "retraining",
        "the retraining section is empty",
    ),
    (
        "retraining-unknown-key",
        MONITORED,
        {"retraining": {"every": "1d"}},
        "retraining.every",
        "unknown field",
    ),
    (
        "retraining-without-teacher",
        CLASSIFICATION,
        {"retraining": {}},
        "retraining",
        "retraining labels its data with the teacher, and this policy has no teacher section",
    ),
    (
        "retraining-lora-on-classifier",
        MONITORED,
        {"retraining": {"training": {"lora": {"rank": 4}}}},
        "retraining.training.lora",
        "LoRA applies to causal-lm students",
    ),
    (
        "retraining-bad-cron",
        MONITORED,
        {"retraining": {"triggers": {"schedule": {"cron": "every day"}}}},
        "retraining.triggers.schedule.cron",
        "must have five fields",
    ),
    (
        "retraining-split-not-one",
        MONITORED,
        {"retraining": {"split": {"train": 0.5}}},
        "retraining.split",
        "train + validation + test must be 1",
    ),
    (
        "retraining-sizes-reversed",
        MONITORED,
        {"retraining": {"size": {"min_examples": 500, "max_examples": 100}}},
        "retraining.size",
        "min_examples (500) is larger than max_examples (100)",
    ),
    (
        "no-student-model-without-cold-start",
        MONITORED,
        {"student.model": DROP},
        "student.model",
        "is required unless the task starts cold",
    ),
    (
        "cold-start-hold-without-seeds",
        MONITORED,
        {
            "student.model": DROP,
            "retraining": {"base_model": "base", "cold_start": {"serve": "hold"}},
        },
        "retraining.seed_files",
        "has no traffic to learn from",
    ),
    (
        "retraining-base-model-escapes",
        MONITORED,
        {"retraining": {"base_model": "../elsewhere"}},
        "retraining.base_model",
        "must not contain '..' path parts",
    ),
    # ---- teacher: pydantic's path teacher.openai.prompt is shown as teacher.prompt
    (
        "teacher-empty",
        CLASSIFICATION,
        {"teacher": None},
        "teacher",
        "the teacher section is empty; fill it in (see `distilld policy schema`) or remove",
    ),
    (
        "teacher-not-a-mapping",
        CLASSIFICATION,
        {"teacher": "gpt-4o"},
        "teacher",
        "expected a mapping (key: value lines) (received 'gpt-4o')",
    ),
    (
        "teacher-without-backend",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.backend": DROP},
        "teacher.backend",
        "required field is missing; expected 'openai' or 'transformers'",
    ),
    (
        "teacher-unknown-backend",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.backend": "anthropic"},
        "teacher.backend",
        "expected 'openai' or 'transformers' (received 'anthropic')",
    ),
    (
        "teacher-prompt-without-placeholder",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.prompt": "Fresh or rotten?"},
        "teacher.prompt",
        "must contain the placeholder {input} (received 'Fresh or rotten?')",
    ),
    (
        "teacher-missing-base-url",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.base_url": DROP},
        "teacher.base_url",
        "required field is missing",
    ),
    (
        "teacher-api-key-in-the-policy",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.api_key": "sk-secret"},
        "teacher.api_key",
        "unknown field; the fields of teacher (backend openai) are: backend, base_url, model, "
        "api_key_env",
    ),
    (
        "teacher-field-of-the-other-backend",
        CLASSIFICATION,
        {"teacher": LOCAL_TEACHER, "teacher.base_url": "http://vllm:8000/v1"},
        "teacher.base_url",
        "unknown field; the fields of teacher (backend transformers) are: backend, model",
    ),
    (
        "teacher-top-logprobs-too-large",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.top_logprobs": 50},
        "teacher.top_logprobs",
        "expected a number less than or equal to 20 (received 50)",
    ),
    (
        "teacher-backoff-out-of-order",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.backoff_base_s": 5, "teacher.backoff_max_s": 1},
        "teacher.backoff_max_s",
        "backoff_max_s (1.0) must be at least backoff_base_s (5.0)",
    ),
    (
        "openai-teacher-without-any-prompt",
        CLASSIFICATION,
        {"teacher": OPENAI_TEACHER, "teacher.prompt": DROP},
        "teacher.prompt",
        "an openai teacher needs a prompt template containing {input}; set teacher.prompt, "
        "or the policy's prompt",
    ),
    (
        "causal-lm-teacher-without-any-prompt",
        CLASSIFICATION,
        {"teacher": {**LOCAL_TEACHER, "architecture": "causal-lm"}},
        "teacher.prompt",
        "a causal-lm teacher needs a prompt template",
    ),
    (
        "sequence-classification-teacher-for-extraction",
        EXTRACTION,
        {"teacher": LOCAL_TEACHER},
        "teacher.architecture",
        "a sequence-classification teacher can only label classification tasks; use "
        "architecture: causal-lm for extraction",
    ),
    (
        "teacher-model-path-escapes",
        CLASSIFICATION,
        {"teacher": LOCAL_TEACHER, "teacher.model": "../teachers/mpnet"},
        "teacher.model",
        "must not contain '..' path parts (received '../teachers/mpnet')",
    ),
    # ---- sampling
    (
        "sampling-without-teacher",
        CLASSIFICATION,
        {"sampling": {"base_rate": 0.2}},
        "sampling",
        "this policy has no teacher section; add a teacher or remove sampling",
    ),
    (
        "sampling-rate-above-one",
        MONITORED,
        {"sampling.base_rate": 2},
        "sampling.base_rate",
        "expected a number less than or equal to 1.0 (received 2)",
    ),
    (
        "sampling-length-buckets-decreasing",
        MONITORED,
        {"sampling.length_buckets": [256, 64]},
        "sampling.length_buckets",
        "must be positive and strictly increasing (received [256, 64])",
    ),
    (
        "sampling-length-as-segment-key",
        MONITORED,
        {"sampling.segment_keys": ["source", "length"]},
        "sampling.segment_keys",
        "'length' is the length bucket, always a segment",
    ),
    (
        "segment-keys-not-sampled",
        MONITORED,
        {"monitors.accuracy.segments.keys": ["source", "language", "length"]},
        "monitors.accuracy.segments.keys",
        "['language'] are not segment keys of the sampled requests (sampling.segment_keys is "
        "['source'], plus 'length')",
    ),
    # ---- monitors: a section-wide check is reported at the section
    (
        "accuracy-min-samples-above-window",
        CLASSIFICATION,
        {"monitors": {"accuracy": {"window": 100, "min_samples": 300}}},
        "monitors.accuracy",
        "accuracy.min_samples (300) is larger than accuracy.window (100): no verdict could "
        "ever be reached; lower min_samples or raise window",
    ),
    (
        "drift-min-samples-above-window",
        CLASSIFICATION,
        {"monitors": {"drift": {"window": 100, "min_samples": 300}}},
        "monitors.drift",
        "drift.min_samples (300) is larger than drift.window (100)",
    ),
    (
        "monitors-empty",
        CLASSIFICATION,
        {"monitors": None},
        "monitors",
        "expected a mapping (key: value lines) (received None)",
    ),
    (
        "monitors-unknown-key",
        CLASSIFICATION,
        {"monitors": {"drift": {"treshold": 0.3}}},
        "monitors.drift.treshold",
        "unknown field; the fields of monitors.drift are: enabled, window, min_samples",
    ),
    (
        "accuracy-threshold-above-one",
        CLASSIFICATION,
        {"monitors": {"accuracy": {"threshold": 90}}},
        "monitors.accuracy.threshold",
        "expected a number less than or equal to 1.0 (received 90)",
    ),
    (
        "drift-unknown-stattest",
        CLASSIFICATION,
        {"monitors": {"drift": {"numerical_stattest": "kolmogorov"}}},
        "monitors.drift.numerical_stattest",
        "'kolmogorov' is not an Evidently statistical test for numerical features; expected "
        "one of ['anderson',",
    ),
    (
        "drift-unknown-feature",
        CLASSIFICATION,
        {"monitors": {"drift": {"features": ["char_length", "char_lenght"]}}},
        "monitors.drift.features[1]",
        "expected 'char_length', 'word_count',",
    ),
    (
        "drift-unknown-feature-as-key",
        CLASSIFICATION,
        {"monitors": {"drift": {"per_feature_threshold": {"char_lenght": 0.1}}}},
        "monitors.drift.per_feature_threshold",
        "or 'confidence' as a key (received the key 'char_lenght')",
    ),
    (
        "predicted-label-drift-for-extraction",
        EXTRACTION,
        {"monitors": {"drift": {"features": ["char_length", "predicted_label"]}}},
        "monitors.drift.features",
        "['predicted_label'] only exist for classification tasks",
    ),
    # ---- alerts
    (
        "alerts-topic-invalid",
        CLASSIFICATION,
        {"alerts": {"topic": "distilld alerts"}},
        "alerts.topic",
        "expected a Kafka topic name",
    ),
    (
        "alerts-topic-is-a-traffic-topic",
        CLASSIFICATION,
        {"alerts": {"topic": "reviews.dead-letter"}},
        "alerts.topic",
        "'reviews.dead-letter' is already traffic.dead_letter_topic; alert events need a topic "
        "of their own",
    ),
    (
        "alerts-unknown-key",
        CLASSIFICATION,
        {"alerts": {"topics": ["a"]}},
        "alerts.topics",
        "unknown field; the fields of alerts are: topic (received ['a'])",
    ),
]


@pytest.mark.parametrize(
    ("base", "changes", "field_path", "expected"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_policy_is_rejected_with_field_path(
    tmp_path: Path, base: dict[str, Any], changes: dict[str, Any], field_path: str, expected: str
) -> None:
    path = _write(tmp_path, _changed(base, changes), name="bad-policy.yaml")

    error = _rejection(path)

    _assert_readable(error, path)
    matching = [p for p in error.problems if p.startswith(f"{path}: {field_path}: ")]
    assert matching, f"no problem about {field_path}: {error.problems}"
    assert any(expected in p for p in matching), matching
    assert f"{path}: {field_path}: " in str(error)


def test_bases_of_malformed_cases_are_valid(tmp_path: Path) -> None:
    # Otherwise a case could pass because of an unrelated mistake in its base.
    assert load_policy(_write(tmp_path, CLASSIFICATION, "c.yaml")).task == "reviews"
    assert load_policy(_write(tmp_path, EXTRACTION, "e.yaml")).task == "address"
    assert load_policy(_write(tmp_path, MONITORED, "m.yaml")).task == "reviews"


def test_section_errors_are_one_line_without_pydantic_locations(tmp_path: Path) -> None:
    # pydantic locates a teacher field under its backend tag (teacher.openai.prompt) and
    # a bad mapping key under "[key]"; neither reaches the operator.
    changes = {
        "teacher.prompt": "no placeholder",
        "monitors.drift.per_feature_stattest": {"oov_shar": "ks"},
    }
    path = _write(tmp_path, _changed(MONITORED, changes))

    error = _rejection(path)

    _assert_readable(error, path)
    assert len(error.problems) == 2
    for problem in error.problems:
        assert "\n" not in problem
        for leak in ("openai", "[key]"):
            assert leak not in problem.split(": ")[1], problem


# --------------------------------------------------------------- new sections


def test_a_policy_without_teacher_gets_drift_only_defaults(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, CLASSIFICATION))

    assert policy.teacher is None
    assert policy.alerts.topic is None
    # Monitors run without a teacher: drift has data, accuracy reports none.
    assert policy.monitors.drift.enabled
    assert policy.monitors.accuracy.enabled
    assert policy.sampling.segment_keys is None


def test_teacher_sampling_monitors_and_alerts_sections_load(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, MONITORED))

    assert isinstance(policy.teacher, OpenAITeacherConfig)
    assert policy.teacher.base_url == "http://vllm:8000/v1"
    assert policy.teacher.prompt == OPENAI_TEACHER["prompt"]
    assert policy.sampling.base_rate == 0.1
    assert policy.sampling.segment_keys == ["source"]
    assert policy.monitors.interval_s == 60
    assert policy.monitors.accuracy.segments.keys == ["source"]
    assert policy.monitors.drift.features == ["char_length", "predicted_label"]
    assert policy.alerts.topic == "distilld.alerts"


def test_openai_teacher_may_use_the_policy_prompt(tmp_path: Path) -> None:
    changes = {"teacher": OPENAI_TEACHER, "teacher.prompt": DROP}
    policy = load_policy(_write(tmp_path, _changed(EXTRACTION, changes)))

    assert isinstance(policy.teacher, OpenAITeacherConfig)
    assert policy.teacher.prompt is None
    assert policy.prompt is not None


def test_transformers_teacher_section_loads(tmp_path: Path) -> None:
    teacher = {**LOCAL_TEACHER, "architecture": "causal-lm", "max_new_tokens": 128}
    policy = load_policy(_write(tmp_path, _changed(EXTRACTION, {"teacher": teacher})))

    assert isinstance(policy.teacher, TransformersTeacherConfig)
    assert policy.teacher.architecture is Architecture.causal_lm
    assert policy.teacher.max_new_tokens == 128


def test_segment_keys_may_be_given_on_the_sampling_side_only(tmp_path: Path) -> None:
    sampling_only = _changed(MONITORED, {"monitors.accuracy.segments.keys": DROP})
    length_bucket = _changed(MONITORED, {"monitors.accuracy.segments.keys": ["length"]})
    length_only = _changed(
        MONITORED,
        {"sampling.segment_keys": DROP, "monitors.accuracy.segments.keys": ["length"]},
    )

    for name, data in [("b", sampling_only), ("c", length_bucket), ("d", length_only)]:
        assert load_policy(_write(tmp_path, data, f"{name}.yaml")).teacher is not None


def test_monitored_segment_keys_must_be_declared_for_sampling(tmp_path: Path) -> None:
    # Undeclared metadata never forms segments, so checking one would find nothing.
    monitors_only = _changed(MONITORED, {"sampling.segment_keys": DROP})

    (problem,) = _rejection(_write(tmp_path, monitors_only)).problems

    assert "monitors.accuracy.segments.keys" in problem
    assert "['source'] are not segment keys of the sampled requests" in problem
    assert "sampling.segment_keys is unset, plus 'length'" in problem


def test_long_received_values_are_truncated(tmp_path: Path) -> None:
    path = _write(tmp_path, _changed(CLASSIFICATION, {"traffic.max_input_chars": "x" * 500}))

    (problem,) = _rejection(path).problems

    received = problem[problem.index("(received ") :]
    assert received.endswith("...)")
    assert len(received) < 100


def test_every_problem_of_one_file_is_reported(tmp_path: Path) -> None:
    changes = {
        "task": "Bad",
        "student.batch.max_size": 0,
        "retraining": {"every": 1},
        "extra": 1,
        "teacher.top_logprobs": 0,
        "monitors.drift.window": 1,
    }
    path = _write(tmp_path, _changed(MONITORED, changes))

    error = _rejection(path)

    paths = sorted(p.split(": ")[1] for p in error.problems)
    assert paths == [
        "extra",
        "monitors.drift.window",
        "retraining.every",
        "student.batch.max_size",
        "task",
        "teacher.top_logprobs",
    ]


# ---------------------------------------------------------- unreadable files

# (id, file content, expected words)
UNREADABLE: list[tuple[str, str, str]] = [
    (
        "yaml-syntax-error",
        "task: reviews\n  kind: classification\n",
        "invalid YAML at line 2, column 7",
    ),
    ("unclosed-bracket", "task: reviews\nlabels: [a, b\n", "invalid YAML at line 3"),
    ("duplicate-key", "task: a\nkind: classification\ntask: b\n", "found the key 'task' twice"),
    ("empty-file", "", "the file is empty"),
    ("comments-only", "# nothing here yet\n", "the file is empty"),
    ("top-level-list", "- task: reviews\n- kind: classification\n", "(received a list)"),
    ("top-level-scalar", "reviews\n", "expected a mapping (key: value lines) at the top level"),
]


@pytest.mark.parametrize(
    ("content", "expected"), [case[1:] for case in UNREADABLE], ids=[c[0] for c in UNREADABLE]
)
def test_unreadable_policy_is_rejected(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(content, encoding="utf-8")

    error = _rejection(path)

    _assert_readable(error, path)
    assert expected in str(error)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    error = _rejection(path)
    _assert_readable(error, path)
    assert "file not found" in str(error)


def test_directory_instead_of_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dir.yaml"
    path.mkdir()
    error = _rejection(path)
    _assert_readable(error, path)
    assert "is a directory" in str(error)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("task: caf\xe9\n".encode("latin-1"))
    error = _rejection(path)
    _assert_readable(error, path)
    assert "not UTF-8" in str(error)


# ------------------------------------------------------------------ directories


def test_directory_loads_yaml_and_yml_and_ignores_other_files(tmp_path: Path) -> None:
    _write(tmp_path, CLASSIFICATION, "a.yaml")
    _write(tmp_path, EXTRACTION, "b.yml")
    (tmp_path / "README.md").write_text("not a policy", encoding="utf-8")
    (tmp_path / "old.yaml.bak").write_text("not: [valid", encoding="utf-8")

    policies = load_policies(tmp_path)

    assert list(policies) == ["reviews", "address"]


def test_duplicate_task_names_name_both_files(tmp_path: Path) -> None:
    first = _write(tmp_path, CLASSIFICATION, "a.yaml")
    other_topics = {
        "traffic.requests_topic": "other.requests",
        "traffic.responses_topic": "other.responses",
        "traffic.dead_letter_topic": "other.dead-letter",
    }
    second = _write(tmp_path, _changed(CLASSIFICATION, other_topics), "b.yaml")

    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{second}: task: ")
    assert str(first) in problem
    assert "'reviews' is already declared" in problem


def test_shared_requests_topic_needs_one_consumer_group(tmp_path: Path) -> None:
    first = _write(tmp_path, _changed(CLASSIFICATION, {"traffic.consumer_group": "g1"}), "a.yaml")
    shared = {
        "task": "address",
        "traffic.requests_topic": "reviews.requests",
        "traffic.consumer_group": "g2",
    }
    second = _write(tmp_path, _changed(EXTRACTION, shared), "b.yaml")

    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{second}: traffic.consumer_group: ")
    assert str(first) in problem
    assert "'reviews.requests'" in problem
    assert "one consumer group reads a topic once" in problem


def test_shared_requests_topic_with_one_consumer_group_is_fine(tmp_path: Path) -> None:
    _write(tmp_path, CLASSIFICATION, "a.yaml")
    _write(tmp_path, _changed(EXTRACTION, {"traffic.requests_topic": "reviews.requests"}), "b.yaml")

    assert set(load_policies(tmp_path)) == {"reviews", "address"}


def test_directory_without_policies_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("policies go here", encoding="utf-8")

    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)

    assert f"{tmp_path}: no policy files (*.yaml, *.yml)" in str(caught.value)


def test_missing_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path / "nowhere")

    assert f"{tmp_path / 'nowhere'}: directory does not exist" in str(caught.value)


def test_problems_of_all_files_are_reported_together(tmp_path: Path) -> None:
    _write(tmp_path, CLASSIFICATION, "good.yaml")
    bad_kind = _write(tmp_path, _changed(EXTRACTION, {"kind": "poetry"}), "bad-kind.yaml")
    empty = tmp_path / "empty.yml"
    empty.write_text("", encoding="utf-8")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("task: [unclosed\n", encoding="utf-8")

    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)

    problems = caught.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{bad_kind}: kind: expected one of")
    assert problems[1].startswith(f"{empty}: the file is empty")
    assert problems[2].startswith(f"{syntax}: invalid YAML at line")
    assert "3 problem(s)" in str(caught.value)


# ---------------------------------------------------------------- JSON Schema


def test_json_schema_lists_the_policy_fields() -> None:
    schema = policy_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "distilld policy"
    expected = {"version", "task", "kind", "labels", "output_schema", "prompt"}
    sections = {"traffic", "student", "teacher", "sampling", "monitors", "alerts", "retraining"}
    assert expected | sections <= set(schema["properties"])
    assert set(schema["required"]) == {"task", "kind", "traffic", "student"}
    assert json.loads(json.dumps(schema)) == schema
    jsonschema.Draft202012Validator.check_schema(schema)


def test_json_schema_describes_the_teacher_backends_and_monitors() -> None:
    schema = policy_json_schema()
    definitions = schema["$defs"]

    openai = definitions["OpenAITeacherConfig"]
    assert openai["required"] == ["backend", "base_url", "model"]
    assert "api_key_env" in openai["properties"]
    assert definitions["TransformersTeacherConfig"]["required"] == ["backend", "model"]
    assert {"accuracy", "drift", "interval_s"} <= set(definitions["MonitorsConfig"]["properties"])
    assert "segment_keys" in definitions["SamplingConfig"]["properties"]
    assert set(definitions["AlertsPolicy"]["properties"]) == {"topic"}


def test_json_schema_agrees_with_the_loader_on_the_new_sections() -> None:
    validator = jsonschema.Draft202012Validator(policy_json_schema())

    assert not list(validator.iter_errors(MONITORED))
    local = _changed(EXTRACTION, {"teacher": {**LOCAL_TEACHER, "architecture": "causal-lm"}})
    assert not list(validator.iter_errors(local))
    for changes in (
        {"teacher.backend": DROP},  # the loader needs the tag too
        {"teacher.backend": "anthropic"},
        {"teacher.api_key": "sk-secret"},
        {"monitors.drift.features": ["char_lenght"]},
        {"alerts.topic": "a b"},
    ):
        assert list(validator.iter_errors(_changed(MONITORED, changes))), changes


def test_policy_schema_command_prints_the_new_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed == policy_json_schema()
    for section in ("teacher", "sampling", "monitors", "alerts"):
        assert section in printed["properties"]


def test_json_schema_accepts_the_shipped_policies_and_refuses_typos() -> None:
    validator = jsonschema.Draft202012Validator(policy_json_schema())
    for path in sorted(SHIPPED_POLICIES.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert not list(validator.iter_errors(data)), path.name

    assert list(validator.iter_errors(_changed(CLASSIFICATION, {"lables": ["a", "b"]})))


@pytest.mark.parametrize("name", ["rotten-tomatoes.yaml", "us-address.yaml"])
def test_a_loaded_policy_survives_a_dump_and_reload(name: str) -> None:
    # Code builds variants of a policy this way (tests, the retraining job): the
    # defaults a dump writes out must not be refused when read back.
    policy = load_policy(REPO_ROOT / "policies" / name)
    assert Policy.model_validate(policy.model_dump()) == policy
    assert Policy.model_validate_json(policy.model_dump_json()) == policy
