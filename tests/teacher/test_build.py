"""make_teacher: the policy's teacher section becomes a working teacher, or None.

Real parts only: the in-process teacher loads the cached MiniLM classifier, and
the HTTP teacher is pointed at a port where nothing listens (building it must
not contact the endpoint; calling it is a transient outage).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distilld.errors import ConfigError
from distilld.modelpaths import resolve_model_dir
from distilld.policy.model import Policy
from distilld.teacher.base import Teacher, TeacherUnavailable
from distilld.teacher.build import make_teacher
from distilld.teacher.local import LocalTeacher
from distilld.teacher.openai import OpenAITeacher

LABELS = ["fresh", "rotten"]


def policy(teacher: dict[str, Any] | None) -> Policy:
    document: dict[str, Any] = {
        "task": "reviews",
        "kind": "classification",
        "labels": LABELS,
        "traffic": {"requests_topic": "req", "responses_topic": "resp", "dead_letter_topic": "dl"},
        "student": {"model": "student"},
    }
    if teacher is not None:
        document["teacher"] = teacher
    return Policy.model_validate(document)


@pytest.fixture
def closed_port() -> int:
    """A local TCP port where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def teachers() -> Iterator[list[Teacher]]:
    """Closes every teacher a test built."""
    built: list[Teacher] = []
    yield built
    for teacher in built:
        teacher.close()


def test_no_teacher_section_builds_nothing(tmp_path: Path) -> None:
    assert make_teacher(policy(None), tmp_path) is None


def test_openai_teacher_builds_against_an_unreachable_endpoint(
    tmp_path: Path, closed_port: int, teachers: list[Teacher]
) -> None:
    section = {
        "backend": "openai",
        "base_url": f"http://127.0.0.1:{closed_port}/v1",
        "model": "teacher",
        "prompt": "Fresh or rotten? {input}",
        "max_retries": 0,
    }

    teacher = make_teacher(policy(section), tmp_path, environ={})

    assert isinstance(teacher, OpenAITeacher)
    teachers.append(teacher)
    assert teacher.status().available
    # The outage shows when the teacher is called, as a transient error.
    with pytest.raises(TeacherUnavailable):
        teacher.label(["A triumph."])


def test_openai_teacher_with_an_unset_key_variable_is_refused(tmp_path: Path) -> None:
    section = {
        "backend": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "teacher",
        "prompt": "Fresh or rotten? {input}",
        "api_key_env": "DISTILLD_TEST_TEACHER_KEY",
    }

    with pytest.raises(ConfigError, match="DISTILLD_TEST_TEACHER_KEY is not set"):
        make_teacher(policy(section), tmp_path, environ={})


def test_local_teacher_loads_from_the_models_directory(
    minilm_sentiment_dir: Path, teachers: list[Teacher]
) -> None:
    section = {"backend": "transformers", "model": minilm_sentiment_dir.name}

    teacher = make_teacher(policy(section), minilm_sentiment_dir.parent)

    assert isinstance(teacher, LocalTeacher)
    teachers.append(teacher)
    (answer,) = teacher.label(["A triumph! Funny, moving and beautifully shot."])
    assert answer.error is None
    assert answer.output in LABELS


def test_local_teacher_escaping_the_models_directory_is_refused(tmp_path: Path) -> None:
    # '..' is refused when the policy loads; a symbolic link is the remaining way out.
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models_dir / "teacher").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ConfigError) as caught:
        make_teacher(policy({"backend": "transformers", "model": "teacher"}), models_dir)

    message = str(caught.value)
    assert "teacher.model 'teacher' resolves to" in message
    assert f"outside DISTILLD_MODELS_DIR={models_dir}" in message


def test_local_teacher_missing_directory_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(teacher\.model 'absent'\) does not exist"):
        make_teacher(policy({"backend": "transformers", "model": "absent"}), tmp_path)


def test_resolve_model_dir_keeps_every_path_inside_the_models_directory(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "inside").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    assert resolve_model_dir(models_dir, "inside") == (models_dir / "inside").resolve()
    absolute_inside = str((models_dir / "inside").resolve())
    assert resolve_model_dir(models_dir, absolute_inside) == (models_dir / "inside").resolve()
    with pytest.raises(ConfigError, match="outside DISTILLD_MODELS_DIR"):
        resolve_model_dir(models_dir, str(outside))
    with pytest.raises(ConfigError, match=r"student\.model"):
        resolve_model_dir(models_dir, "nope")
