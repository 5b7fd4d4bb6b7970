"""``distilld report``: an HTML page of the daemon's records."""

from __future__ import annotations

from pathlib import Path

from distilld.commands.common import existing_store
from distilld.policy.load import load_policies
from distilld.registry import ModelRegistry
from distilld.report import write_report
from distilld.settings import Settings


def report(settings: Settings, policies_dir: Path, out: Path | None) -> int:
    """Write the report to ``out`` (default: report.html in the state directory)."""
    policies = load_policies(policies_dir)
    registries = {
        task: ModelRegistry(settings.registry_root / task)
        if (settings.registry_root / task).is_dir()
        else None
        for task in policies
    }
    store = existing_store(settings)
    try:
        written = write_report(
            policies,
            store,
            registries,
            settings.reports_dir,
            out or settings.state_dir / "report.html",
        )
    finally:
        store.close()
    print(f"report written to {written}")
    return 0
