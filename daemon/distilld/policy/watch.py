"""Policy hot reload: notice that the policies directory changed, validate it first.

:class:`PolicyWatcher` fingerprints the policy files (names and contents) and,
when the fingerprint changes, loads the whole directory again. An invalid
directory never replaces a valid one: the problems are alerted once per
change (``policy.reload_rejected``), and the policies in force stay in force.
So does a valid directory that cannot start here (``check``: the preflight of
secrets, model directories and vLLM settings). A change that passes both is
handed to the caller (``lifecycle.serve``), which drains the running daemon and
starts it again on the new policies: offsets are committed before the restart,
so nothing is lost and nothing is answered twice. Should the new set still fail
to start, the caller starts the previous one again and calls :meth:`revert`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from distilld.errors import PolicyError
from distilld.log import get_logger
from distilld.policy.load import load_policies
from distilld.policy.model import Policy
from distilld.telemetry.alerts import alert

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
    change, None otherwise (no change, or an invalid one: alerted, ignored).

    ``check`` returns the problems that would stop a set of policies from starting
    (empty: none); a set with problems is alerted and ignored like an invalid one."""

    def __init__(
        self,
        directory: Path,
        current: dict[str, Policy],
        check: Callable[[dict[str, Policy]], Sequence[str]] | None = None,
    ) -> None:
        self._directory = directory
        self._current = current
        self._check = check
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
            self._reject(
                exc.problems or [str(exc)],
                "the policies in force stay in force; fix the files (distilld policy "
                "validate) and save them again",
            )
            return None
        if policies == self._current:
            return None  # e.g. a comment changed
        try:
            problems = list(self._check(policies)) if self._check is not None else []
        except Exception as exc:  # a reload must never stop the daemon in force
            problems = [f"the preflight could not run: {type(exc).__name__}: {exc}"]
        if problems:
            self._reject(
                problems,
                "the policies in force stay in force; the new ones cannot start here: fix "
                "what is listed (distilld policy validate checks it too) and save the files again",
            )
            return None
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

    def revert(self, in_force: dict[str, Policy], error: str) -> None:
        """The policies :meth:`poll` returned failed to start (``error``) and the caller
        started ``in_force`` again: alert, and keep ``in_force`` as the current set. The
        files that failed are not tried again until they change."""
        self._current = in_force
        self._reject(
            [error],
            "the new policies failed to start after the drain; the previous policies were "
            "started again and stay in force: fix the files and save them again",
        )

    def _reject(self, problems: list[str], action: str) -> None:
        alert(
            self._log,
            "policy.reload_rejected",
            severity="error",
            directory=str(self._directory),
            problems=problems,
            tasks_in_force=sorted(self._current),
            action=action,
        )
