"""Files a policy names stay in the directories the operator allowed.

A seed file is sent to the teacher and a key file is sent as a bearer token: a
policy that could name any absolute path could read any file the daemon can and
send it out. Data files live in the policies directory (or DISTILLD_DATA_DIR),
secret files in DISTILLD_SECRETS_DIR.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distilld.errors import ConfigError
from distilld.modelpaths import resolve_data_file, resolve_secret_file
from distilld.policy.model import Policy
from distilld.preflight import check_policies
from distilld.settings import Settings
from support.kafka import sentiment_task


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / name for name in ("policies", "data", "secrets", "elsewhere")}
    for path in made.values():
        path.mkdir()
    (made["elsewhere"] / "private.txt").write_text("daemon-only\n")
    return made


def test_data_files_are_relative_to_the_policies_directory(dirs: dict[str, Path]) -> None:
    policies = dirs["policies"]
    field = "retraining.seed_files[0]"
    assert (
        resolve_data_file("seeds.txt", policies, field=field) == (policies / "seeds.txt").resolve()
    )
    assert resolve_data_file("sub/seeds.txt", policies, field=field).is_relative_to(policies)
    absolute = str(policies / "flags.txt")
    assert resolve_data_file(absolute, policies, field=field) == Path(absolute).resolve()
    # DISTILLD_DATA_DIR allows one more directory.
    inside_data = str(dirs["data"] / "seeds.txt")
    assert resolve_data_file(inside_data, policies, dirs["data"], field=field).parent == (
        dirs["data"].resolve()
    )


@pytest.mark.parametrize(
    "value", ["/etc/passwd", "../elsewhere/private.txt", "{elsewhere}/private.txt", "link.txt"]
)
def test_data_files_elsewhere_are_refused_with_what_to_do(
    dirs: dict[str, Path], value: str
) -> None:
    (dirs["policies"] / "link.txt").symlink_to(dirs["elsewhere"] / "private.txt")
    value = value.format(elsewhere=dirs["elsewhere"])
    with pytest.raises(ConfigError) as refused:
        resolve_data_file(
            value, dirs["policies"], dirs["data"], field="retraining.filtering.flags_file"
        )
    message = str(refused.value)
    assert f"retraining.filtering.flags_file {value!r} resolves to" in message
    assert f"DISTILLD_POLICIES_DIR={dirs['policies']}" in message
    assert f"DISTILLD_DATA_DIR={dirs['data']}" in message
    assert "set DISTILLD_DATA_DIR" in message
    assert "daemon-only" not in message


def test_secret_files_are_confined_to_the_secrets_directory(dirs: dict[str, Path]) -> None:
    secrets = dirs["secrets"]
    field = "teacher.api_key_file"
    assert resolve_secret_file("key", secrets, field=field) == (secrets / "key").resolve()
    assert resolve_secret_file(str(secrets / "key"), secrets, field=field).name == "key"
    for value in (str(dirs["elsewhere"] / "private.txt"), "../policies/x.yaml"):
        with pytest.raises(ConfigError, match="outside the directories") as refused:
            resolve_secret_file(value, secrets, field=field)
        assert f"DISTILLD_SECRETS_DIR={secrets}" in str(refused.value)
    with pytest.raises(ConfigError, match="no secrets directory is configured"):
        resolve_secret_file("key", None, field=field)


def test_the_secrets_directory_defaults_to_container_secrets() -> None:
    assert Settings().secrets_dir == Path("/run/secrets")
    assert Settings().data_dir is None


def test_the_preflight_reports_every_file_outside_its_directory(dirs: dict[str, Path]) -> None:
    (dirs["policies"] / "seeds.txt").write_text("a review\n")
    policy = Policy.model_validate(
        {
            **sentiment_task("files"),
            "student": {
                "backend": "vllm",
                "model": "student",
                "vllm": {
                    "base_url": "http://127.0.0.1:9",
                    "api_key_file": str(dirs["elsewhere"] / "private.txt"),
                },
            },
            "teacher": {
                "backend": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "model": "judge",
                "api_key_file": "/etc/hostname",
                "prompt": "fresh or rotten? {input}",
            },
            "retraining": {
                "base_model": "student",
                "seed_files": ["seeds.txt", "/etc/passwd"],
                "filtering": {"flags_file": "../elsewhere/private.txt"},
            },
        }
    )
    settings = Settings(
        policies_dir=dirs["policies"],
        models_dir=dirs["policies"] / "models",
        secrets_dir=dirs["secrets"],
    )
    problems = "\n".join(check_policies(settings, {policy.task: policy}, environ={}).problems)
    assert "retraining.seed_files[1] '/etc/passwd'" in problems
    assert "retraining.seed_files[0]" not in problems
    assert "retraining.filtering.flags_file '../elsewhere/private.txt'" in problems
    assert "teacher.api_key_file '/etc/hostname'" in problems
    assert "student.vllm.api_key_file" in problems
    assert "daemon-only" not in problems
