"""Policy hot reload: notice that the policies directory changed, validate it first.

:class:`PolicyWatcher` fingerprints the policy files (names and contents) and,
when the fingerprint changes, loads the whole directory again. An invalid
directory never replaces a valid one: the problems are alerted once per
change (``policy.reload_rejected``), and the policies in force stay in force.
A valid change is handed to the caller (``app.serve``), which drains the
running daemon and starts it again on the new policies: offsets are committed
before the restart, so nothing is lost and nothing is answered twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distilld.errors import PolicyError
from distilld.log import alert, get_logger
from distilld.policy.load import load_policies
from distilld.policy.model import Policy

__all__ = ["PolicyWatcher", "fingerprint"]

POLICY_SUFFIXES = (".yaml", ".yml")


def fingerprint(directory: Path) -> str:
    """A digest of the policy files' names and contents ('' when unreadable)."""
    digest = hashlib.sha256()
    try:
        paths = sorted(
            p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file()
        )
        for path in paths:
            digest.update(path.name.encode("utf-8") + b"\0")
            digest.update(path.read_bytes() + b"\0")
    except OSError:
        return ""
    return digest.hexdigest()


class PolicyWatcher:
    """Polls a policies directory; :meth:`poll` returns the new policies after a valid
    change, None otherwise (no change, or an invalid one: alerted, ignored)."""

    def __init__(self, directory: Path, current: dict[str, Policy]) -> None:
        self._directory = directory
        self._current = current
        self._seen = fingerprint(directory)
        self._log = get_logger("policy")

    @property
    def current(self) -> dict[str, Policy]:
        return self._current

    def poll(self) -> dict[str, Policy] | None:
        seen = fingerprint(self._directory)
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            policies = load_policies(self._directory)
        except PolicyError as exc:
            alert(
                self._log,
                "policy.reload_rejected",
                severity="error",
                directory=str(self._directory),
                problems=exc.problems or [str(exc)],
                tasks_in_force=sorted(self._current),
                action="the policies in force stay in force; fix the files (distilld policy "
                "validate) and save them again",
            )
            return None
        if policies == self._current:
            return None  # e.g. a comment changed
        changed = sorted(
            t for t in set(policies) | set(self._current) if policies.get(t) != self._current.get(t)
        )
        self._log.info(
            "policy.reload_accepted",
            directory=str(self._directory),
            changed_tasks=changed,
            action="draining and restarting the daemon on the new policies",
        )
        self._current = policies
        return policies
