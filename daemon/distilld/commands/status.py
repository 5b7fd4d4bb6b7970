"""``distilld status``: per task, the live version, traffic, comparisons, agreement,
drift and the last alerts, read from the daemon's store and registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from distilld.commands.common import existing_store
from distilld.errors import ConfigError
from distilld.policy.load import load_policies
from distilld.registry import ModelRegistry
from distilld.settings import Settings
from distilld.status import format_status, task_status


def status(settings: Settings, policies_dir: Path, tasks: list[str], as_json: bool) -> int:
    """Print the status of ``tasks`` (all when empty), as text or one JSON object each."""
    policies = load_policies(policies_dir)
    unknown = sorted(set(tasks) - set(policies))
    if unknown:
        raise ConfigError(f"no policy for task(s) {unknown}; known tasks: {sorted(policies)}")
    store = existing_store(settings)
    try:
        for task in tasks or sorted(policies):
            root = settings.registry_root / task
            registry = ModelRegistry(root) if root.is_dir() else None
            found = task_status(policies[task], store, registry=registry)
            if as_json:
                print(json.dumps(dataclasses.asdict(found), default=str))
            else:
                print(format_status(found))
    finally:
        store.close()
    return 0
