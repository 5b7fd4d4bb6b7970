"""The policy's teacher section: defaults, discriminated backends, refused values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import TypeAdapter, ValidationError

from distilld.policy.model import Architecture
from distilld.teacher.config import OpenAITeacherConfig, TeacherConfig, TransformersTeacherConfig

ADAPTER: TypeAdapter[OpenAITeacherConfig | TransformersTeacherConfig] = TypeAdapter(TeacherConfig)


def test_openai_section_with_defaults() -> None:
    config = ADAPTER.validate_python(
        {
            "backend": "openai",
            "base_url": "http://vllm:8000/v1/",
            "model": "teacher",
            "api_key_env": "TEACHER_API_KEY",
        }
    )
    assert isinstance(config, OpenAITeacherConfig)
    assert config.base_url == "http://vllm:8000/v1"  # trailing slash dropped
    assert config.api_key_env == "TEACHER_API_KEY"
    assert config.constraint == "structured_outputs"
    assert config.max_retries == 2
    assert config.max_calls_per_hour == 1000
    assert config.breaker_failure_threshold == 5


def test_transformers_section_with_defaults() -> None:
    config = ADAPTER.validate_python({"backend": "transformers", "model": "teachers/mpnet"})
    assert isinstance(config, TransformersTeacherConfig)
    assert config.architecture is Architecture.sequence_classification
    assert config.prompt is None


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"backend": "openai", "base_url": "vllm:8000", "model": "m"}, "base_url"),
        (
            {"backend": "openai", "base_url": "http://h/v1", "model": "m", "api_key": "sk-1"},
            "api_key",
        ),
        (
            {"backend": "openai", "base_url": "http://h/v1", "model": "m", "api_key_env": "sk-1"},
            "api_key_env",
        ),
        ({"backend": "openai", "base_url": "http://h/v1", "model": "m", "prompt": "x"}, "prompt"),
        (
            {"backend": "openai", "base_url": "http://h/v1", "model": "m", "top_logprobs": 50},
            "top_logprobs",
        ),
        (
            {"backend": "openai", "base_url": "http://h/v1", "model": "m", "constraint": "guided"},
            "constraint",
        ),
        ({"backend": "transformers", "model": "../outside"}, "model"),
        ({"backend": "anthropic", "model": "m"}, "backend"),
    ],
)
def test_refused_values_name_the_field(document: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ADAPTER.validate_python(document)
    text = str(info.value)
    assert field in text


def test_backoff_bounds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="backoff_max_s"):
        OpenAITeacherConfig(base_url="http://h/v1", model="m", backoff_base_s=5, backoff_max_s=1)


def test_section_is_frozen() -> None:
    config = OpenAITeacherConfig(base_url="http://h/v1", model="m")
    with pytest.raises(ValidationError):
        config.model = "other"  # type: ignore[misc]


def test_json_schema_requires_the_backend_tag() -> None:
    # The loader needs `backend` to tell the two sections apart, default or not.
    assert OpenAITeacherConfig.model_json_schema()["required"] == ["backend", "base_url", "model"]
    assert TransformersTeacherConfig.model_json_schema()["required"] == ["backend", "model"]
    with pytest.raises(ValidationError, match="Unable to extract tag using discriminator"):
        ADAPTER.validate_python({"base_url": "http://h/v1", "model": "m"})


def test_the_section_imports_before_the_policy_model() -> None:
    # policy/model.py imports this section, so the section must not import model.py
    # back; importing model.py first is what every other test does.
    code = "import distilld.teacher.config; import distilld.policy.model"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
