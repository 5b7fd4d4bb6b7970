"""Where a policy's model directory is on disk.

A policy names a model directory (``student.model``, ``teacher.model``,
``retraining.base_model``) either absolute or relative to
``DISTILLD_MODELS_DIR``. Either way it must lie inside that directory once
resolved (symbolic links included): a policy is configuration, and
configuration must not reach files the operator did not put under the models
directory (in a container: the models volume).

Imports nothing of the daemon but its errors, so that the daemon (``app.py``)
and the parts it builds (``teacher/build.py``) can share it without a cycle.
"""

from __future__ import annotations

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
