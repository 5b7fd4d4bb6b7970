"""``distilld policy validate`` and ``distilld policy schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distilld.errors import PolicyError
from distilld.policy.load import load_policies, load_policy, policy_json_schema
from distilld.preflight import check_policies
from distilld.settings import Settings


def schema() -> int:
    """Print the policy JSON Schema (editor completion)."""
    print(json.dumps(policy_json_schema(), indent=2))
    return 0


def validate(settings: Settings, paths: list[Path]) -> int:
    """Exit 0 when every policy is valid and can start here, 2 otherwise. Besides the
    schema, each policy gets the daemon's preflight in this environment (teacher
    secrets, model directories under DISTILLD_MODELS_DIR, vLLM settings); what only
    the running daemon can check is printed as 'not checked' lines."""
    problems: list[str] = []
    for path in paths:
        try:
            if path.is_dir():
                found = load_policies(path)
            else:
                policy = load_policy(path)
                found = {policy.task: policy}
        except PolicyError as exc:
            problems.extend(exc.problems or [str(exc)])
            continue
        for task in sorted(found):
            report = check_policies(settings, {task: found[task]}, models_dir_required=False)
            problems.extend(f"{path}: {problem}" for problem in report.problems)
            if not report.problems:
                print(f"ok: {path}: task {task!r}")
            for line in report.not_checked:
                print(f"  not checked here: {line}")
            for line in found[task].warnings():  # valid, but will not work as written
                print(f"  warning: {path}: task {task!r}: {line}")
    if problems:
        print("distilld: invalid policy:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 2
    return 0
