"""Where the directories and files a policy names are on disk.

A policy names a model directory (``student.model``, ``teacher.model``,
``retraining.base_model``) either absolute or relative to
``DISTILLD_MODELS_DIR``. Either way it must lie inside that directory once
resolved (symbolic links included): a policy is configuration, and
configuration must not reach files the operator did not put under the models
directory (in a container: the models volume).

The other files a policy names are confined the same way:

* data files (``retraining.seed_files``, ``retraining.filtering.flags_file``):
  relative to the policies directory, and inside it or inside
  ``DISTILLD_DATA_DIR`` when that is set;
* secret files (``teacher.api_key_file``, ``student.vllm.api_key_file``):
  relative to ``DISTILLD_SECRETS_DIR`` (default ``/run/secrets``, where
  container secrets are mounted), and inside it.

Without this, a policy could read any file the daemon can (a seed file is
sent to the teacher, a key file is sent as a bearer token).

Imports nothing of the daemon but its errors, so that the daemon (``app.py``)
and the parts it builds (``teacher/build.py``) can share it without a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distilld.errors import ConfigError


def resolve_model_dir(
    models_dir: Path, model: str, field: str = "student.model", *, must_exist: bool = True
) -> Path:
    """The directory of a policy's ``model`` value, or a ConfigError naming ``field``.

    Refused: a path that resolves outside ``models_dir``, and (``must_exist``)
    a path that is not an existing directory.
    """
    candidate = Path(model)
    path = candidate if candidate.is_absolute() else (models_dir / candidate)
    path = path.resolve()
    if not path.is_relative_to(models_dir.resolve()):
        raise ConfigError(
            f"{field} {model!r} resolves to {path}, outside DISTILLD_MODELS_DIR={models_dir}; "
            "put the model under DISTILLD_MODELS_DIR and name it relative to it (or set "
            "DISTILLD_MODELS_DIR to the directory that holds it)"
        )
    if must_exist and not path.is_dir():
        raise ConfigError(
            f"model directory {path} ({field} {model!r}) does not exist; "
            f"put the model there or set DISTILLD_MODELS_DIR (now {models_dir})"
        )
    return path


def resolve_data_file(
    value: str, policies_dir: Path, data_dir: Path | None = None, *, field: str
) -> Path:
    """The file a policy's data field names (``retraining.seed_files[0]``,
    ``retraining.filtering.flags_file``): relative to ``policies_dir``, and inside it
    or ``data_dir`` (DISTILLD_DATA_DIR) once resolved; else a ConfigError naming
    ``field``, the value, where it resolves to and the allowed directories. The file
    need not exist yet (it is read when a retraining runs)."""
    roots = [("DISTILLD_POLICIES_DIR", policies_dir)]
    if data_dir is not None:
        roots.append(("DISTILLD_DATA_DIR", data_dir))
    return _confined_file(
        value,
        policies_dir,
        roots,
        field,
        "put the file in the policies directory and name it relative to it, or set "
        "DISTILLD_DATA_DIR to the directory that holds it",
    )


def resolve_secret_file(value: str, secrets_dir: Path | None, *, field: str) -> Path:
    """The file a policy's secret field names (``teacher.api_key_file``): relative to
    ``secrets_dir`` (DISTILLD_SECRETS_DIR), and inside it once resolved; else a
    ConfigError naming ``field``, the value, where it resolves to and the allowed
    directory. ``secrets_dir`` None: no secret file is allowed."""
    hint = (
        "put the secret in DISTILLD_SECRETS_DIR (container secrets: /run/secrets/NAME) and "
        "name it relative to it, set DISTILLD_SECRETS_DIR to the directory that holds it, "
        "or use api_key_env"
    )
    if secrets_dir is None:
        raise ConfigError(
            f"{field} {value!r}: no secrets directory is configured, so no key file is "
            f"allowed; {hint}"
        )
    return _confined_file(value, secrets_dir, [("DISTILLD_SECRETS_DIR", secrets_dir)], field, hint)


def _confined_file(
    value: str, base: Path, roots: Sequence[tuple[str, Path]], field: str, hint: str
) -> Path:
    candidate = Path(value)
    path = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if any(path.is_relative_to(root.resolve()) for _, root in roots):
        return path
    allowed = ", ".join(f"{name}={root}" for name, root in roots)
    raise ConfigError(
        f"{field} {value!r} resolves to {path}, outside the directories a policy may name "
        f"files in ({allowed}); {hint}"
    )
