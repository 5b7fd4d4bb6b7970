"""The on-disk model registry of one task: versions, states, atomic promotion, rollback.

Layout under the registry directory::

    versions/<version>/      the model files and manifest.json
    LIVE                     the live pointer (JSON), replaced atomically
    .lock                    fcntl lock: one process changes the registry at a time
    .staging/  .trash/       registrations and deletions in progress

Each version has a :class:`Manifest` (version, parent, creation time, data
summary, training method, metrics, gate report path, reference distribution
file, state). States: ``candidate`` (registered), ``shadow`` (answering live
traffic beside the live student), ``live``, ``retired`` (replaced by a
promotion) and ``rolled_back`` (replaced by a rollback).

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
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

from distilld.errors import RegistryError as RegistryError

__all__ = [
    "STATES",
    "VERSION_PATTERN",
    "LivePointer",
    "Manifest",
    "ModelRegistry",
    "RegistryError",
    "State",
]

State = Literal["candidate", "shadow", "live", "retired", "rolled_back"]
STATES: tuple[State, ...] = ("candidate", "shadow", "live", "retired", "rolled_back")
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MANIFEST = "manifest.json"
LIVE = "LIVE"
_AUTO_VERSION = re.compile(r"^v(\d+)$")

# Test hook: called with the name of each step of a change (see _step). Tests
# set it in a subprocess to crash between steps; None in production.
_test_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _test_hook is not None:
        _test_hook(name)


@dataclass(frozen=True)
class Manifest:
    """What the registry knows about one version (``manifest.json``).

    ``data``: a summary of the training data (sizes, selection and filter
    reports). ``method``: how it was trained. ``metrics``: gate and shadow
    results. ``gate_report``: path of the gate report (relative to the
    version directory, or absolute). ``reference_distribution``: file name,
    in the version directory, of the drift reference of this version.
    Times are Unix seconds.
    """

    version: str = ""  # "" on registration: the registry names it v0001, v0002, ...
    parent: str | None = None
    created_at: float = 0.0  # 0 on registration: set to the registration time
    task: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    method: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    gate_report: str | None = None
    reference_distribution: str | None = None
    state: State = "candidate"
    state_changed_at: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "task": self.task,
            "data": dict(self.data),
            "method": dict(self.method),
            "metrics": dict(self.metrics),
            "gate_report": self.gate_report,
            "reference_distribution": self.reference_distribution,
            "state": self.state,
            "state_changed_at": self.state_changed_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest") -> Manifest:
        if not isinstance(raw, dict):
            raise RegistryError(f"{source}: expected a JSON object (received {type(raw).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RegistryError(
                f"{source}: unknown fields {unknown} (written by a newer distilld?)"
            )
        checks: dict[str, tuple[type | tuple[type, ...], bool]] = {
            "version": (str, False),
            "parent": (str, True),
            "created_at": ((int, float), False),
            "task": (str, True),
            "data": (dict, False),
            "method": (dict, False),
            "metrics": (dict, False),
            "gate_report": (str, True),
            "reference_distribution": (str, True),
            "state": (str, False),
            "state_changed_at": ((int, float), False),
            "extra": (dict, False),
        }
        for name, (types, nullable) in checks.items():
            if name not in raw or (raw[name] is None and nullable):
                continue
            if isinstance(raw[name], bool) or not isinstance(raw[name], types):
                raise RegistryError(f"{source}: field {name!r} has the wrong type ({raw[name]!r})")
        if raw.get("state", "candidate") not in STATES:
            raise RegistryError(
                f"{source}: unknown state {raw.get('state')!r}; expected one of {list(STATES)}"
            )
        return cls(**raw)


@dataclass(frozen=True)
class LivePointer:
    """The content of ``LIVE``: the live version, the earlier live versions (oldest
    first: the rollback stack), and what its writer retired (and as what)."""

    version: str
    previous: tuple[str, ...] = ()
    retire: str | None = None
    retire_state: State = "retired"
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": list(self.previous),
            "retire": self.retire,
            "retire_state": self.retire_state,
            "updated_at": self.updated_at,
        }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory (``root`` last),
    so that their contents and names are on disk before anything points at them.
    Symbolic links are not followed."""
    for directory, _subdirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


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
        _check_version_name(version)
        return self._versions / version

    def pointer(self) -> LivePointer | None:
        """The content of ``LIVE``, or None when no version was ever promoted."""
        path = self.root / LIVE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: cannot read the live pointer: {exc}") from None
        try:
            return LivePointer(
                version=str(raw["version"]),
                previous=tuple(str(v) for v in raw.get("previous", [])),
                retire=None if raw.get("retire") is None else str(raw["retire"]),
                retire_state=cast(State, raw.get("retire_state", "retired")),
                updated_at=float(raw.get("updated_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"{path}: malformed live pointer ({exc!r}): {raw!r}") from None

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
            _check_version_name(manifest.version)
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
                if copy:
                    shutil.copytree(source, staging, symlinks=True)
                else:
                    shutil.move(str(source), str(staging))
                _step("register:staged")
                # The weights on disk before any name points at them: a moved
                # directory may still be in the page cache, and after a power
                # loss LIVE must never name a truncated file.
                fsync_tree(staging)
                _write_json_atomic(staging / MANIFEST, final.to_dict())
                _step("register:manifest_written")
                os.rename(staging, target)
                _fsync_dir(self._versions)
            except OSError as exc:
                raise RegistryError(f"cannot register {source} as {version}: {exc}") from None
            _step("register:renamed")
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
            _step("promote:locked")
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
            _step("promote:pruned")
            return self._effective(self._read_manifest(version), new_pointer)

    def rollback(self) -> Manifest:
        """Make the previous live version live again; the current one becomes rolled back.

        Returns the manifest of the version now live.
        """
        with self._locked():
            self._repair_locked()
            _step("rollback:locked")
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
        try:
            return sorted(
                entry.name
                for entry in os.scandir(self._versions)
                if entry.is_dir() and not entry.name.startswith(".")
            )
        except OSError as exc:
            raise RegistryError(f"cannot list {self._versions}: {exc}") from None

    def _read_manifest(self, version: str) -> Manifest:
        path = self.path(version) / MANIFEST
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            known = ", ".join(self._names()) or "none"
            raise RegistryError(
                f"version {version!r} is not in the registry {self.root} (versions: {known})"
            ) from None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: cannot read the manifest: {exc}") from None
        manifest = Manifest.from_dict(raw, source=str(path))
        if manifest.version != version:
            raise RegistryError(
                f"{path}: names version {manifest.version!r} but lies in {version!r}"
            )
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        try:
            _write_json_atomic(self.path(manifest.version) / MANIFEST, manifest.to_dict())
        except OSError as exc:
            raise RegistryError(f"cannot write the manifest of {manifest.version}: {exc}") from None

    @staticmethod
    def _effective(manifest: Manifest, pointer: LivePointer | None) -> Manifest:
        """The manifest with the state the live pointer implies (see the module docstring)."""
        state = _effective_state(manifest, pointer)
        return manifest if state == manifest.state else replace(manifest, state=state)

    def _switch(self, pointer: LivePointer, *, step: str) -> None:
        """Write the pointer (the commit point), then the two manifests it changes."""
        try:
            _write_json_atomic(self.root / LIVE, pointer.to_dict())
        except OSError as exc:
            raise RegistryError(f"cannot write the live pointer of {self.root}: {exc}") from None
        _step(f"{step}:pointer_written")
        now = time.time()
        new = self._read_manifest(pointer.version)
        self._write_manifest(replace(new, state="live", state_changed_at=now))
        _step(f"{step}:new_marked")
        if pointer.retire is not None:
            old = self._read_manifest(pointer.retire)
            self._write_manifest(replace(old, state=pointer.retire_state, state_changed_at=now))
        _step(f"{step}:old_marked")

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for n in self._names() if (m := _AUTO_VERSION.fullmatch(n))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def _repair_locked(self) -> None:
        for leftovers in (self._staging, self._trash):
            for entry in leftovers.iterdir():
                _remove(entry)
        for tmp in self.root.glob(".*.tmp"):
            _remove(tmp)
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
            _write_json_atomic(self.root / LIVE, pointer.to_dict())
        for name in names:
            directory = self._versions / name
            for tmp in directory.glob(".*.tmp"):
                _remove(tmp)
            manifest = self._read_manifest(name)
            state = _effective_state(manifest, pointer)
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
            trash = self._trash / f"{version}-{uuid.uuid4().hex}"
            try:
                os.rename(self._versions / version, trash)
            except OSError as exc:
                raise RegistryError(f"cannot delete version {version}: {exc}") from None
            _remove(trash)
        if deleted:
            _step("prune:deleted")
        if deleted and pointer is not None:
            kept_history = tuple(v for v in pointer.previous if v not in deleted)
            if kept_history != pointer.previous:
                _write_json_atomic(
                    self.root / LIVE, replace(pointer, previous=kept_history).to_dict()
                )
        return deleted

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RegistryError(f"cannot open the registry lock {path}: {exc}") from None
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise RegistryError(f"cannot lock {path}: {exc}") from None
                    if time.monotonic() >= deadline:
                        raise RegistryError(
                            f"the registry {self.root} stayed locked by another process for "
                            f"{self.lock_timeout_s:g} s; retry later"
                        ) from None
                    time.sleep(0.02)
            _step("lock:acquired")
            try:
                yield
            finally:
                _step("lock:releasing")
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _effective_state(manifest: Manifest, pointer: LivePointer | None) -> State:
    if pointer is None:
        return "retired" if manifest.state == "live" else manifest.state
    if manifest.version == pointer.version:
        return "live"
    if manifest.version == pointer.retire and manifest.state == "live":
        return pointer.retire_state
    if manifest.state == "live":
        return "retired"
    return manifest.state


def _check_version_name(version: str) -> None:
    # fullmatch: re.match with "$" would accept a trailing newline ("v1\n").
    if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
        raise RegistryError(
            f"invalid version name {version!r}: letters, digits, '.', '_' and '-', starting "
            "with a letter or digit, at most 64 characters"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
