"""Preflight: what a valid policy still needs from this environment, found before it starts.

No model is loaded here: the model directories are fakes that only look like
checkpoints (config.json and a safetensors file), which is all the preflight reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distilld.errors import ConfigError
from distilld.policy.load import load_policy
from distilld.policy.model import Policy
from distilld.preflight import check_policies, preflight
from distilld.settings import Settings
from support.kafka import write_sentiment_policy


def fake_model(models_dir: Path, name: str) -> Path:
    path = models_dir / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"not loaded by the preflight")
    return path


def with_section(policy_dir: Path, section: str) -> Policy:
    path = next(policy_dir.glob("*.yaml"))
    path.write_text(path.read_text() + section)
    return load_policy(path)


OPENAI_TEACHER = """\
teacher:
  backend: openai
  base_url: http://127.0.0.1:9/v1
  model: judge
  api_key_env: DISTILLD_TEST_PREFLIGHT_KEY
  prompt: "Answer fresh or rotten.\\nText: {input}"
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, Policy]:
    models = tmp_path / "models"
    served = write_sentiment_policy(tmp_path, fake_model(models, "student"))
    settings = Settings(
        policies_dir=served.policies_dir, models_dir=models, state_dir=served.state_dir
    )
    return settings, served.policy


def test_a_policy_whose_models_and_secrets_are_here_passes(
    setup: tuple[Settings, Policy],
) -> None:
    settings, policy = setup
    policy = with_section(settings.policies_dir, OPENAI_TEACHER)
    report = check_policies(
        settings, {policy.task: policy}, environ={"DISTILLD_TEST_PREFLIGHT_KEY": "k"}
    )
    assert report.problems == ()
    # What needs the running daemon is named, not silently passed.
    assert any("loads as a sequence-classification student" in n for n in report.not_checked)
    assert any("http://127.0.0.1:9/v1" in n for n in report.not_checked)


def test_a_missing_teacher_model_directory_is_a_problem(setup: tuple[Settings, Policy]) -> None:
    settings, _ = setup
    policy = with_section(
        settings.policies_dir, "teacher:\n  backend: transformers\n  model: gone\n"
    )
    with pytest.raises(ConfigError, match=r"\(teacher\.model 'gone'\) does not exist"):
        preflight(settings, {policy.task: policy})


def test_an_unset_api_key_variable_is_a_problem(setup: tuple[Settings, Policy]) -> None:
    settings, _ = setup
    policy = with_section(settings.policies_dir, OPENAI_TEACHER)
    problems = check_policies(settings, {policy.task: policy}, environ={}).problems
    assert len(problems) == 1
    assert "DISTILLD_TEST_PREFLIGHT_KEY" in problems[0]
    assert "is not set" in problems[0]
    assert problems[0].startswith(f"task {policy.task!r}: ")


def test_a_student_directory_without_a_checkpoint_is_a_problem(
    setup: tuple[Settings, Policy],
) -> None:
    settings, policy = setup
    (settings.models_dir / "student" / "model.safetensors").unlink()
    problems = check_policies(settings, {policy.task: policy}).problems
    assert len(problems) == 1
    assert "student.model" in problems[0]
    assert "no *.safetensors weights" in problems[0]


def test_a_missing_models_directory_is_skipped_only_when_asked(
    setup: tuple[Settings, Policy],
) -> None:
    settings, policy = setup
    away = settings.model_copy(update={"models_dir": settings.models_dir.parent / "absent"})
    strict = check_policies(away, {policy.task: policy})
    assert len(strict.problems) == 1
    lenient = check_policies(away, {policy.task: policy}, models_dir_required=False)
    assert lenient.problems == ()
    assert any("does not exist here" in n for n in lenient.not_checked)


def test_a_managed_vllm_student_needs_a_vllm_python(setup: tuple[Settings, Policy]) -> None:
    settings, policy = setup
    path = next(settings.policies_dir.glob("*.yaml"))
    path.write_text(path.read_text().replace("backend: transformers", "backend: vllm"))
    policy = load_policy(path)
    problems = check_policies(settings, {policy.task: policy}).problems
    assert any("DISTILLD_VLLM_PYTHON" in p for p in problems)
