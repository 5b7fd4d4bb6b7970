"""The registry's metadata: each version's manifest, the live pointer, the state rules.

Each version has a :class:`Manifest` (``versions/<version>/manifest.json``:
version, parent, creation time, data summary, training method, metrics, gate
report path, reference distribution file, state). States: ``candidate``
(registered), ``shadow`` (answering live traffic beside the live student),
``live``, ``retired`` (replaced by a promotion) and ``rolled_back``
(replaced by a rollback).

The one file ``LIVE`` (a :class:`LivePointer`) says which version is live,
the earlier live versions (the rollback stack), and what its writer was about
to retire (and as what); :func:`effective_state` takes a version's state
from it, so the pointer wins over a manifest a crash left behind. Both are
JSON files replaced whole (:func:`distilld.registry.files.write_json_atomic`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

from distilld.errors import RegistryError
from distilld.registry.files import write_json_atomic

State = Literal["candidate", "shadow", "live", "retired", "rolled_back"]
STATES: tuple[State, ...] = ("candidate", "shadow", "live", "retired", "rolled_back")
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MANIFEST = "manifest.json"
LIVE = "LIVE"


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


def read_pointer(root: Path) -> LivePointer | None:
    """The content of ``root/LIVE``, or None when no version was ever promoted."""
    path = root / LIVE
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


def write_pointer(root: Path, pointer: LivePointer) -> None:
    """Replace ``root/LIVE`` with ``pointer`` (atomic; an OSError passes through)."""
    write_json_atomic(root / LIVE, pointer.to_dict())


def read_manifest(
    directory: Path, version: str, *, registry: Path, known: Callable[[], list[str]]
) -> Manifest:
    """The manifest in ``directory`` (the directory of ``version`` in ``registry``);
    ``known`` lists the registry's versions for the error when it is missing."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        names = ", ".join(known()) or "none"
        raise RegistryError(
            f"version {version!r} is not in the registry {registry} (versions: {names})"
        ) from None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read the manifest: {exc}") from None
    manifest = Manifest.from_dict(raw, source=str(path))
    if manifest.version != version:
        raise RegistryError(f"{path}: names version {manifest.version!r} but lies in {version!r}")
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace the manifest in ``directory`` (the directory of ``manifest.version``)."""
    try:
        write_json_atomic(directory / MANIFEST, manifest.to_dict())
    except OSError as exc:
        raise RegistryError(f"cannot write the manifest of {manifest.version}: {exc}") from None


def effective_state(manifest: Manifest, pointer: LivePointer | None) -> State:
    if pointer is None:
        return "retired" if manifest.state == "live" else manifest.state
    if manifest.version == pointer.version:
        return "live"
    if manifest.version == pointer.retire and manifest.state == "live":
        return pointer.retire_state
    if manifest.state == "live":
        return "retired"
    return manifest.state


def check_version_name(version: str) -> None:
    # fullmatch: re.match with "$" would accept a trailing newline ("v1\n").
    if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
        raise RegistryError(
            f"invalid version name {version!r}: letters, digits, '.', '_' and '-', starting "
            "with a letter or digit, at most 64 characters"
        )
