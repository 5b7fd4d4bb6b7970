"""``distilld versions``, ``promote`` and ``rollback``: a task's model registry, as the
daemon left it (the running daemon follows a promotion or a rollback within seconds)."""

from __future__ import annotations

import json

from distilld.errors import ConfigError
from distilld.registry import ModelRegistry
from distilld.settings import Settings


def versions(settings: Settings, task: str, as_json: bool) -> int:
    """Print the task's versions, the live one marked with '*' (or one JSON manifest each)."""
    registry = _registry(settings, task)
    live = registry.live_version()
    for manifest in registry.list():
        if as_json:
            print(json.dumps(manifest.to_dict(), default=str))
        else:
            marker = "*" if manifest.version == live else " "
            summary = manifest.metrics.get("gate_summary", "")
            print(f"{marker} {manifest.version:<24} {manifest.state:<12} {summary}")
    return 0


def promote(settings: Settings, task: str, version: str) -> int:
    """Make ``version`` live."""
    manifest = _registry(settings, task).promote(version)
    print(f"{task}: {manifest.version} is live; the running daemon switches within seconds")
    return 0


def rollback(settings: Settings, task: str) -> int:
    """Make the previous live version live again."""
    manifest = _registry(settings, task).rollback()
    print(f"{task}: {manifest.version} is live; the running daemon switches within seconds")
    return 0


def _registry(settings: Settings, task: str) -> ModelRegistry:
    root = settings.registry_root / task
    if not root.is_dir():
        raise ConfigError(
            f"no model registry for task {task!r} at {root}: the daemon has not run this "
            f"task with retraining (DISTILLD_STATE_DIR={settings.state_dir}, "
            f"DISTILLD_REGISTRY_DIR={settings.registry_dir})"
        )
    return ModelRegistry(root)
