"""Secrets: masking before cutting, the environment children get, reading API keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from distilld.credentials import (
    EXCERPT_CHARS,
    Redactor,
    child_environment,
    is_secret_name,
    read_api_key,
)
from distilld.errors import ConfigError

KEY = "sk-live-4f9c2a7e1b3d5f60"

DAEMON_ENVIRONMENT = {
    "PATH": "/usr/bin",
    "HOME": "/var/lib/distilld",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "HF_HOME": "/cache/hf",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
    "CUDA_VISIBLE_DEVICES": "0",
    "PYTHONUNBUFFERED": "1",
    "RUST_LOG": "info",
    # The daemon's secrets and unrelated settings: none may reach a child.
    "DISTILLD_ADMIN_TOKEN": "admin-secret",
    "DISTILLD_KAFKA_SASL_PASSWORD": "sasl-secret",
    "DISTILLD_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "TEACHER_API_KEY": "teacher-secret",
    "OPENAI_API_KEY": "openai-secret",
    "HF_TOKEN": "hf-secret",
    "VLLM_API_KEY": "operator-secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
}


def test_a_child_gets_the_allowed_variables_and_no_secret() -> None:
    env = child_environment(DAEMON_ENVIRONMENT)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/distilld",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "HF_HOME": "/cache/hf",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "PYTHONUNBUFFERED": "1",
        "RUST_LOG": "info",
    }
    assert not any("secret" in value for value in env.values())


def test_what_the_daemon_sets_for_a_child_is_passed_on_purpose() -> None:
    env = child_environment(DAEMON_ENVIRONMENT, {"VLLM_API_KEY": "for-this-server"})
    assert env["VLLM_API_KEY"] == "for-this-server"
    assert "DISTILLD_ADMIN_TOKEN" not in env


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("HUGGING_FACE_HUB_TOKEN", True),
        ("VLLM_API_KEY", True),
        ("DISTILLD_KAFKA_SASL_PASSWORD", True),
        ("OPENAI_APIKEY", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("VLLM_CPU_KVCACHE_SPACE", False),
        ("KMP_AFFINITY", False),
    ],
)
def test_secret_names_are_told_by_their_words(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_a_key_straddling_the_cut_is_masked_at_every_offset() -> None:
    redact = Redactor(KEY)
    for offset in range(EXCERPT_CHARS - len(KEY) - 2, EXCERPT_CHARS + 3):
        body = "x" * offset + KEY + "y" * EXCERPT_CHARS
        shown = redact.excerpt(body)
        masked = "x" * offset + "[redacted]" + "y" * EXCERPT_CHARS
        assert shown == masked[:EXCERPT_CHARS] + "...", offset
        # Not even a prefix of the key is left (cutting first left up to len(KEY) - 1).
        for length in range(3, len(KEY) + 1):
            assert KEY[:length] not in shown, (offset, length)


def test_without_a_key_the_excerpt_only_cuts() -> None:
    assert Redactor(None).excerpt("a" * 300) == "a" * EXCERPT_CHARS + "..."
    assert Redactor("").excerpt("short") == "short"
    assert KEY not in repr(Redactor(KEY))


def test_read_api_key_from_a_variable_or_a_file(tmp_path: Path) -> None:
    assert read_api_key(env=None, file=None, environ={}, field="teacher") is None
    assert read_api_key(env="K", file=None, environ={"K": KEY}, field="teacher") == KEY
    with pytest.raises(ConfigError, match=r"K is not set or empty \(student.vllm.api_key_env\)"):
        read_api_key(env="K", file=None, environ={}, field="student.vllm")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert read_api_key(env=None, file=key_file, environ={}, field="teacher") == KEY
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(env=None, file=key_file, environ={}, field="teacher")
    key_file.unlink()
    with pytest.raises(ConfigError, match="cannot read the API key file") as missing:
        read_api_key(env=None, file=key_file, environ={}, field="teacher")
    assert "teacher.api_key_file" in str(missing.value)
