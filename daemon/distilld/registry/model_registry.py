"""The on-disk model registry of one task: versions, states, atomic promotion, rollback.

Layout under the registry directory::

    versions/<version>/      the model files and manifest.json
    LIVE                     the live pointer (JSON), replaced atomically
    .lock                    fcntl lock: one process changes the registry at a time
    .staging/  .trash/       registrations and deletions in progress

:class:`ModelRegistry` orders the parts: the metadata (manifests, the live
pointer, the state rules: :mod:`~distilld.registry.metadata`), the model
files (staging, fsync, atomic rename, deletion: :mod:`~distilld.registry.files`)
and the lock (:mod:`~distilld.registry.lock`).

Crash safety
------------
The one file ``LIVE`` says which version is live, and it is only ever
replaced whole (written to a temporary file, fsynced, ``os.replace``): at
any instant it names exactly one version, the old one or the new one. A
promotion writes ``LIVE`` first and the manifests after, so a crash can
leave a manifest behind the pointer; ``LIVE`` also records what its writer
was about to do (which version it retires, and as what), and readers and
:meth:`ModelRegistry.repair` take the states from it: the pointer's version
is live, the version it retires has the recorded state, and any other
manifest that still says live is retired. Every change starts with a
repair, so the files catch up with the pointer at the next change. A
registration builds the version in ``.staging`` and renames it into
``versions/`` (one atomic rename); deletions rename into ``.trash`` first.
Leftovers of a crash in either are removed by the next repair. Every file of a
version (and its directories) is fsynced before the rename, so a version that
exists after a power loss is whole.

Two processes never change the registry at once: every change holds an
exclusive ``fcntl.flock`` on ``.lock`` (waiting up to ``lock_timeout_s``).
Reads take no lock: every file they read is replaced atomically.

The last ``keep_last`` versions are kept (by creation order); older ones are
deleted after each registration and promotion, never the live version, the
previous live version (the rollback target) or a version in shadow.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from distilld.errors import RegistryError
from distilld.registry.files import (
    clear_leftovers,
    delete_version,
    fsync_tree,
    install,
    remove_temporary,
    stage,
    version_names,
    write_json_atomic,
)
from distilld.registry.lock import registry_lock
from distilld.registry.metadata import (
    LIVE,
    MANIFEST,
    STATES,
    LivePointer,
    Manifest,
    State,
    check_version_name,
    effective_state,
    read_manifest,
    read_pointer,
    write_manifest,
    write_pointer,
)
from distilld.registry.steps import step as reached

_AUTO_VERSION = re.compile(r"^v(\d+)$")


class ModelRegistry:
    """The registry under ``root`` (created if missing); see the module docstring."""

    def __init__(
        self, root: str | Path, *, keep_last: int = 5, lock_timeout_s: float = 60.0
    ) -> None:
        if keep_last < 2:
            raise RegistryError(
                f"keep_last must be at least 2 (the live version and the previous one); "
                f"received {keep_last}"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.lock_timeout_s = lock_timeout_s
        self._versions = self.root / "versions"
        self._staging = self.root / ".staging"
        self._trash = self.root / ".trash"
        try:
            for directory in (self._versions, self._staging, self._trash):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the model registry at {self.root}: {exc}") from None

    # ------------------------------------------------------------------ reading

    def path(self, version: str) -> Path:
        """The directory of ``version`` (its model files and manifest)."""
        check_version_name(version)
        return self._versions / version

    def pointer(self) -> LivePointer | None:
        """The content of ``LIVE``, or None when no version was ever promoted."""
        return read_pointer(self.root)

    def live_version(self) -> str | None:
        pointer = self.pointer()
        return None if pointer is None else pointer.version

    def previous_live(self) -> str | None:
        """The version a rollback would make live again, or None."""
        pointer = self.pointer()
        return pointer.previous[-1] if pointer is not None and pointer.previous else None

    def live(self) -> Manifest | None:
        """The live version's manifest, or None when no version was ever promoted."""
        pointer = self.pointer()
        if pointer is None:
            return None
        return self._effective(self._read_manifest(pointer.version), pointer)

    def get(self, version: str) -> Manifest:
        """The manifest of ``version`` with its state as the live pointer has it."""
        return self._effective(self._read_manifest(version), self.pointer())

    def list(self) -> builtins.list[Manifest]:
        """Every version's manifest, oldest first (by creation time, then name)."""
        pointer = self.pointer()
        manifests = []
        for name in self._names():
            try:
                manifests.append(self._effective(self._read_manifest(name), pointer))
            except RegistryError:
                if (self._versions / name).exists():
                    raise
                # Deleted by a concurrent prune between listing and reading.
        return sorted(manifests, key=lambda m: (m.created_at, m.version))

    # ------------------------------------------------------------------ changing

    def register(
        self, model_dir: str | Path, manifest: Manifest | None = None, *, copy: bool = False
    ) -> str:
        """Add the model files in ``model_dir`` as a new version; returns its name.

        The directory is moved into the registry (copied with ``copy=True``),
        in one atomic rename once its manifest is written: a crash leaves
        either no version or a complete one. The manifest's ``version`` is
        used when set (it must be new), else the next ``vNNNN``; its state
        must be candidate or shadow. A ``reference_distribution`` must be a
        file of ``model_dir``. After a crash before the rename, the next
        repair deletes the staged files (with ``copy=False`` the model
        directory is then gone: the candidate must be trained again).
        """
        manifest = manifest or Manifest()
        source = Path(model_dir)
        if not source.is_dir():
            raise RegistryError(f"model directory {source} does not exist or is not a directory")
        if (source / MANIFEST).exists():
            raise RegistryError(
                f"{source} already contains a {MANIFEST}; register the model files only"
            )
        if manifest.state not in ("candidate", "shadow"):
            raise RegistryError(
                f"a version is registered as candidate or shadow (received state "
                f"{manifest.state!r}); make it live with promote()"
            )
        reference = manifest.reference_distribution
        if reference is not None and not (source / reference).is_file():
            raise RegistryError(
                f"reference distribution {reference!r} is not a file in {source}; write it "
                "into the model directory before registering"
            )
        if manifest.version:
            check_version_name(manifest.version)
        with self._locked():
            self._repair_locked()
            version = manifest.version or self._next_version()
            target = self._versions / version
            if target.exists():
                raise RegistryError(f"version {version!r} already exists in {self.root}")
            now = time.time()
            final = replace(
                manifest,
                version=version,
                created_at=manifest.created_at or now,
                state_changed_at=now,
            )
            staging = self._staging / f"{version}-{uuid.uuid4().hex}"
            try:
                stage(source, staging, copy=copy)
                reached("register:staged")
                # The weights on disk before any name points at them: a moved
                # directory may still be in the page cache, and after a power
                # loss LIVE must never name a truncated file.
                fsync_tree(staging)
                write_json_atomic(staging / MANIFEST, final.to_dict())
                reached("register:manifest_written")
                install(staging, target)
            except OSError as exc:
                raise RegistryError(f"cannot register {source} as {version}: {exc}") from None
            reached("register:renamed")
            self._prune_locked()
            return version

    def set_state(self, version: str, state: State) -> Manifest:
        """Mark a version that is not live as candidate, shadow, retired or rolled back."""
        if state not in STATES:
            raise RegistryError(f"unknown state {state!r}; expected one of {list(STATES)}")
        if state == "live":
            raise RegistryError(f"make {version} live with promote(), not set_state()")
        with self._locked():
            self._repair_locked()
            manifest = self._read_manifest(version)
            if self.live_version() == version:
                raise RegistryError(
                    f"{version} is live; promote another version or roll back before "
                    f"marking it {state}"
                )
            updated = replace(manifest, state=state, state_changed_at=time.time())
            self._write_manifest(updated)
            return updated

    def update(self, version: str, **changes: Any) -> Manifest:
        """Change a version's metrics, data, method, gate_report, reference_distribution or
        extra (not its name, parent, creation time or state)."""
        allowed = {"metrics", "data", "method", "gate_report", "reference_distribution", "extra"}
        refused = sorted(set(changes) - allowed)
        if refused:
            raise RegistryError(
                f"update() cannot change {refused}; it changes {sorted(allowed)} (states: "
                "set_state, promote, rollback)"
            )
        with self._locked():
            self._repair_locked()
            manifest = self._effective(self._read_manifest(version), self.pointer())
            updated = Manifest.from_dict(
                {**manifest.to_dict(), **changes}, source=f"update of {version}"
            )
            self._write_manifest(updated)
            return updated

    def promote(self, version: str) -> Manifest:
        """Make ``version`` the live version, atomically; the live one becomes retired.

        Promoting the live version again changes nothing. Returns the new
        live manifest.
        """
        with self._locked():
            self._repair_locked()
            reached("promote:locked")
            target = self._read_manifest(version)
            pointer = self.pointer()
            current = pointer.version if pointer is not None else None
            if current == version:
                return self._effective(target, pointer)
            previous = pointer.previous if pointer is not None else ()
            history = (*previous, current) if current is not None else previous
            new_pointer = LivePointer(
                version=version,
                previous=history[-self.keep_last :],
                retire=current,
                retire_state="retired",
                updated_at=time.time(),
            )
            self._switch(new_pointer, step="promote")
            self._prune_locked()
            reached("promote:pruned")
            return self._effective(self._read_manifest(version), new_pointer)

    def rollback(self) -> Manifest:
        """Make the previous live version live again; the current one becomes rolled back.

        Returns the manifest of the version now live.
        """
        with self._locked():
            self._repair_locked()
            reached("rollback:locked")
            pointer = self.pointer()
            if pointer is None:
                raise RegistryError(
                    f"no version of {self.root} was ever live: nothing to roll back"
                )
            if not pointer.previous:
                raise RegistryError(
                    f"{pointer.version} is the only version that was live in {self.root}: "
                    "there is no previous version to roll back to"
                )
            target = pointer.previous[-1]
            self._read_manifest(target)  # must exist
            new_pointer = LivePointer(
                version=target,
                previous=pointer.previous[:-1],
                retire=pointer.version,
                retire_state="rolled_back",
                updated_at=time.time(),
            )
            self._switch(new_pointer, step="rollback")
            return self._effective(self._read_manifest(target), new_pointer)

    def prune(self) -> builtins.list[str]:
        """Delete the versions beyond the last ``keep_last``; returns their names."""
        with self._locked():
            self._repair_locked()
            return self._prune_locked()

    def repair(self) -> None:
        """Bring the manifests in line with the live pointer and remove crash leftovers.

        Every change does this first; call it at start-up to tidy up at once.
        """
        with self._locked():
            self._repair_locked()

    # ------------------------------------------------------------------ internals

    def _names(self) -> builtins.list[str]:
        return version_names(self._versions)

    def _read_manifest(self, version: str) -> Manifest:
        return read_manifest(self.path(version), version, registry=self.root, known=self._names)

    def _write_manifest(self, manifest: Manifest) -> None:
        write_manifest(self.path(manifest.version), manifest)

    @staticmethod
    def _effective(manifest: Manifest, pointer: LivePointer | None) -> Manifest:
        """The manifest with the state the live pointer implies (see the module docstring)."""
        state = effective_state(manifest, pointer)
        return manifest if state == manifest.state else replace(manifest, state=state)

    def _switch(self, pointer: LivePointer, *, step: str) -> None:
        """Write the pointer (the commit point), then the two manifests it changes."""
        try:
            write_pointer(self.root, pointer)
        except OSError as exc:
            raise RegistryError(f"cannot write the live pointer of {self.root}: {exc}") from None
        reached(f"{step}:pointer_written")
        now = time.time()
        new = self._read_manifest(pointer.version)
        self._write_manifest(replace(new, state="live", state_changed_at=now))
        reached(f"{step}:new_marked")
        if pointer.retire is not None:
            old = self._read_manifest(pointer.retire)
            self._write_manifest(replace(old, state=pointer.retire_state, state_changed_at=now))
        reached(f"{step}:old_marked")

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for n in self._names() if (m := _AUTO_VERSION.fullmatch(n))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def _repair_locked(self) -> None:
        clear_leftovers(self.root, self._staging, self._trash)
        pointer = self.pointer()
        if pointer is not None and not (self._versions / pointer.version / MANIFEST).is_file():
            raise RegistryError(
                f"the live pointer of {self.root} names {pointer.version!r}, which is not in "
                "versions/ (deleted by hand?); restore it, or promote another version after "
                f"removing {self.root / LIVE}"
            )
        names = self._names()
        if pointer is not None and any(v not in names for v in pointer.previous):
            # A prune that crashed between deleting a version and updating the pointer.
            kept = tuple(v for v in pointer.previous if v in names)
            pointer = replace(pointer, previous=kept)
            write_pointer(self.root, pointer)
        for name in names:
            remove_temporary(self._versions / name)
            manifest = self._read_manifest(name)
            state = effective_state(manifest, pointer)
            if state != manifest.state:
                self._write_manifest(replace(manifest, state=state, state_changed_at=time.time()))

    def _prune_locked(self) -> builtins.list[str]:
        pointer = self.pointer()
        manifests = sorted(
            (self._effective(self._read_manifest(n), pointer) for n in self._names()),
            key=lambda m: (m.created_at, m.version),
        )
        protected = {m.version for m in manifests if m.state in ("live", "shadow")}
        if pointer is not None and pointer.previous:
            protected.add(pointer.previous[-1])
        keep = {m.version for m in manifests[-self.keep_last :]} | protected
        deleted = [m.version for m in manifests if m.version not in keep]
        for version in deleted:
            delete_version(self._versions, self._trash, version)
        if deleted:
            reached("prune:deleted")
        if deleted and pointer is not None:
            kept_history = tuple(v for v in pointer.previous if v not in deleted)
            if kept_history != pointer.previous:
                write_pointer(self.root, replace(pointer, previous=kept_history))
        return deleted

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return registry_lock(self.root, self.lock_timeout_s)
