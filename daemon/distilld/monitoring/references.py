"""The drift reference of the version being served: the one saved with the student
(in its model directory), else one pinned for its version from the first requests it
answered (saved with the version in the registry, else under the state directory)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distilld.errors import MonitoringError, RegistryError
from distilld.log import get_logger
from distilld.monitoring.features import (
    REFERENCE_FILE,
    Reference,
    load_reference,
    save_reference,
)
from distilld.registry import VERSION_PATTERN, ModelRegistry
from distilld.telemetry.alerts import alert


def drift_reference(model_dir: Path | None, pinned: Path | None = None) -> Reference | None:
    """The drift reference saved with a student (in its model directory), else the one
    pinned for its version outside it (``pinned``); None: none yet (one is pinned from
    the first requests the version answers)."""
    candidates = [model_dir / REFERENCE_FILE] if model_dir is not None else []
    candidates += [pinned] if pinned is not None else []
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        get_logger("monitoring").info(
            "monitoring.no_saved_reference",
            model_dir=str(model_dir) if model_dir is not None else None,
            expected=[str(p) for p in candidates],
            action="a drift reference is pinned from the first requests this version answers; "
            "drift is measured from then on",
        )
        return None
    for path in existing:
        try:
            return load_reference(path)
        except MonitoringError as exc:  # serving matters more than one monitor's reference
            alert(
                get_logger("monitoring"),
                "monitoring.reference_unreadable",
                severity="error",
                path=str(path),
                error=str(exc),
                action="serving anyway; drift is measured against a reference pinned from "
                "the first requests this version answers",
            )
    return None


#: Pinned drift references of versions outside a registry, under the state directory.
PINNED_REFERENCES_DIR = "drift-references"


@dataclass(frozen=True)
class ReferencePins:
    """Where the drift reference pinned for a version of one task is saved: in the
    version's registry directory (named in its manifest, as a trained version's is)
    when the task's registry has the version, else under the state directory."""

    task: str
    state_dir: Path
    registry: ModelRegistry | None = None

    def outside(self, version: str) -> Path:
        """The state-directory file of ``version`` (a registry version's is in it)."""
        name = version if re.fullmatch(VERSION_PATTERN, version) else _digest(version)
        return self.state_dir / PINNED_REFERENCES_DIR / self.task / name / REFERENCE_FILE

    def save(self, version: str, reference: Reference) -> Path:
        """Save ``reference`` for ``version``; returns the file written."""
        if self.registry is not None:
            try:
                version_dir = self.registry.path(version)
                if version_dir.is_dir():
                    save_reference(reference, version_dir / REFERENCE_FILE)
                    self.registry.update(version, reference_distribution=REFERENCE_FILE)
                    return version_dir / REFERENCE_FILE
            except (OSError, RegistryError) as exc:
                get_logger("monitoring").warning(
                    "drift.reference_not_in_registry",
                    task=self.task,
                    version=version,
                    error=str(exc),
                    action="saved under the state directory instead",
                )
        path = self.outside(version)
        save_reference(reference, path)
        return path


def _digest(text: str) -> str:
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class LiveReference:
    """The drift reference of the version being served, reloaded when a promotion or a
    rollback changes the version. With ``pins``, a reference pinned for a version
    that came without one (:meth:`pin`, called by the check that fitted it) is saved
    with the version and found again after a restart."""

    def __init__(
        self,
        model_dir: Callable[[], Path | None],
        version: Callable[[], str | None] | None = None,
        pins: ReferencePins | None = None,
    ) -> None:
        self._model_dir = model_dir
        self._version = version
        self._pins = pins
        self._loaded_for: tuple[Path | None, str | None] | None = None
        self._reference: Reference | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Reference | None:
        model_dir = self._model_dir()
        version = self._version() if self._version is not None else None
        with self._lock:
            if (model_dir, version) != self._loaded_for:
                pinned = (
                    self._pins.outside(version)
                    if self._pins is not None and version is not None
                    else None
                )
                self._reference = drift_reference(model_dir, pinned)
                self._loaded_for = (model_dir, version)
            return self._reference

    def pin(self, version: str, reference: Reference) -> None:
        """Keep ``reference``, fitted on the first requests ``version`` answered, as that
        version's reference, and save it with the version (see run_check's ``pin``)."""
        log = get_logger("monitoring")
        path: Path | None = None
        if self._pins is not None:
            try:
                path = self._pins.save(version, reference)
            except OSError as exc:
                alert(
                    log,
                    "drift.reference_not_saved",
                    severity="warning",
                    task=self._pins.task,
                    version=version,
                    error=str(exc),
                    action="drift is measured against it until the daemon stops; a restart "
                    "pins a new one; check that the state directory is writable",
                )
        log.info(
            "drift.reference_pinned",
            task=self._pins.task if self._pins is not None else None,
            version=version,
            rows=len(reference.frame),
            path=str(path) if path is not None else None,
            note="this version came without a drift reference: its first requests are its "
            "reference until another version is live",
        )
        with self._lock:
            if self._loaded_for is not None and self._loaded_for[1] == version:
                self._reference = reference
