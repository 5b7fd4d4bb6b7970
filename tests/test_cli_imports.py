"""The commands that only read state or files never import torch, transformers or
evidently: an operator runs them beside the daemon, on a machine without a GPU or in a
small container, and they answer in a second. Each runs in a fresh interpreter on a
small state directory (a store and a registry as the daemon leaves them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distilld.registry import Manifest, ModelRegistry
from distilld.store.sqlite import SqliteStore

HEAVY = ("torch", "transformers", "evidently")

POLICY = """\
task: reviews
kind: classification
labels: [fresh, rotten]
traffic:
  requests_topic: reviews.requests
  responses_topic: reviews.responses
  dead_letter_topic: reviews.dead-letter
student:
  model: reviews-student
teacher:
  backend: openai
  base_url: http://127.0.0.1:9/v1
  model: big-teacher
  prompt: "Is this review fresh or rotten?\\nReview: {input}"
retraining: {}
"""

# Runs distilld.cli.main with the arguments, then writes the exit code and the names of
# the top-level packages imported to the file named by the first argument.
RUNNER = """\
import json, sys
from distilld.cli import main
out, args = sys.argv[1], sys.argv[2:]
try:
    code = main(args)
except SystemExit as exc:  # --help
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}, f)
"""

COMMANDS = {
    "status": ["status"],
    "status --json": ["status", "--json"],
    "versions": ["versions", "reviews"],
    "policy validate": ["policy", "validate", "{policies}"],
    "policy schema": ["policy", "schema"],
    "report": ["report", "--out", "{tmp}/report.html"],
    "--help": ["--help"],
    "status --help": ["status", "--help"],
    "retrain": ["retrain", "reviews"],  # leaves a request file for the daemon
}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policies directory, a store with one row and a registry with a live version."""
    root = tmp_path_factory.mktemp("cli-imports")
    (root / "policies").mkdir()
    (root / "policies" / "reviews.yaml").write_text(POLICY)
    state_dir = root / "state"
    state_dir.mkdir()
    SqliteStore(state_dir / "distilld.sqlite").close()
    registry = ModelRegistry(state_dir / "registry" / "reviews")
    model = root / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    registry.promote(registry.register(model, Manifest(task="reviews"), copy=True))
    return root


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_read_only_command_imports_no_torch_transformers_or_evidently(
    name: str, state: Path, tmp_path: Path
) -> None:
    args = [a.format(policies=state / "policies", tmp=tmp_path) for a in COMMANDS[name]]
    out = tmp_path / "imported.json"
    env = {
        **os.environ,
        "DISTILLD_POLICIES_DIR": str(state / "policies"),
        "DISTILLD_STATE_DIR": str(state / "state"),
        "DISTILLD_MODELS_DIR": str(state / "models"),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["code"] == 0, (done.stdout, done.stderr)
    imported = sorted(set(HEAVY) & set(result["modules"]))
    assert imported == [], f"`distilld {' '.join(args)}` imported {imported}"
