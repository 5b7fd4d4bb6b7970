"""Which model a task serves: the live version of the task's registry, else the
policy's student. A task that retrains adopts its policy's student as the registry's
first live version, so that the first retrained version can be rolled back to it."""

from __future__ import annotations

import re
from pathlib import Path

from distilld.errors import ConfigError, RegistryError
from distilld.log import get_logger
from distilld.modelpaths import resolve_model_dir
from distilld.monitoring.features import REFERENCE_FILE
from distilld.policy.model import Policy
from distilld.preflight import external_student
from distilld.registry import VERSION_PATTERN, Manifest, ModelRegistry
from distilld.settings import Settings


def adopt_policy_student(policy: Policy, settings: Settings, registry: ModelRegistry) -> None:
    if registry.live_version() is not None or policy.student.model is None:
        return
    if external_student(policy):
        return  # served elsewhere: the daemon has no files to keep
    model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
    name = model_dir.name
    taken = re.fullmatch(VERSION_PATTERN, name) is None or registry.path(name).exists()
    reference = REFERENCE_FILE if (model_dir / REFERENCE_FILE).is_file() else None
    try:
        version = registry.register(
            model_dir,
            Manifest(
                version="" if taken else name,
                task=policy.task,
                reference_distribution=reference,
                extra={"adopted_from": str(model_dir)},
            ),
            copy=True,
        )
    except RegistryError:
        # Another replica sharing the registry adopted it first.
        if registry.live_version() is not None:
            return
        if taken or not registry.path(name).is_dir():
            raise
        version = name
    registry.promote(version)  # promoting the live version again changes nothing
    get_logger("retrain").info(
        "registry.adopted",
        task=policy.task,
        version=version,
        model_dir=str(model_dir),
        note="the policy's student is the first live version of the task's registry",
    )


def served_model(
    policy: Policy, settings: Settings, registry: ModelRegistry | None
) -> tuple[Path, str] | None:
    """The model directory and version to serve: the registry's live version, else the
    policy's student.model, else None (a cold start)."""
    if registry is not None:
        live = registry.live_version()
        if live is not None:
            return registry.path(live), live
    if policy.student.model is None:
        return None
    model_dir = resolve_model_dir(settings.models_dir, policy.student.model)
    return model_dir, model_dir.name


def existing_registry(policy: Policy, settings: Settings) -> ModelRegistry | None:
    """The task's registry when it retrains and its directory exists (for commands)."""
    root = settings.registry_root / policy.task
    retraining = policy.retraining
    if retraining is None or not retraining.enabled or not root.is_dir():
        return None
    return ModelRegistry(root)


def current_model_dir(policy: Policy, settings: Settings) -> Path | None:
    """The live model directory when the daemon can read it: the registry's live version,
    else the policy's student (None: an external server, or no student yet)."""
    if external_student(policy):
        return None
    root = settings.registry_root / policy.task
    retraining = policy.retraining
    retrains = retraining is not None and retraining.enabled and root.is_dir()
    try:
        served = served_model(policy, settings, ModelRegistry(root) if retrains else None)
    except ConfigError:
        return None
    return served[0] if served is not None else None
