"""``distilld retrain``: ask the running daemon to retrain a task now (a request file it
picks up within seconds)."""

from __future__ import annotations

from pathlib import Path

from distilld.errors import ConfigError
from distilld.policy.load import load_policies
from distilld.retrain.requests import request_retraining
from distilld.settings import Settings


def retrain(settings: Settings, policies_dir: Path, task: str) -> int:
    """Leave a retraining request for ``task``; a ConfigError when it does not retrain."""
    policies = load_policies(policies_dir)
    policy = policies.get(task)
    if policy is None:
        raise ConfigError(f"no policy for task {task!r}; known tasks: {sorted(policies)}")
    if policy.retraining is None or not policy.retraining.enabled:
        raise ConfigError(
            f"task {task!r} does not retrain: its policy has no enabled retraining section"
        )
    path = request_retraining(settings.requests_dir, task)
    print(
        f"retraining of {task!r} requested ({path}); the running daemon starts it "
        "within seconds: follow its alert log (retrain.started, retrain.promoted ...)"
    )
    return 0
