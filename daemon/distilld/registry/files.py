"""The registry's file operations on model artifacts: staging, fsync, atomic rename, deletion.

The directories of a registry (see :mod:`distilld.registry.model_registry`):
``versions/<version>/`` holds each version's model files, ``.staging/`` the
registrations and ``.trash/`` the deletions in progress. A version enters
``versions/`` by one atomic rename once every file of it is fsynced, and
leaves it by a rename into ``.trash/``; leftovers of a crash in either are
removed by :func:`clear_leftovers`. JSON files are replaced whole
(:func:`write_json_atomic`): readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distilld.errors import RegistryError

# The pattern of the temporary files write_json_atomic leaves behind on a crash.
TEMPORARY = ".*.tmp"


def fsync_dir(path: Path) -> None:
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
        fsync_dir(Path(directory))


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
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
    fsync_dir(path.parent)


def version_names(versions: Path) -> list[str]:
    """The names of the version directories under ``versions``, sorted."""
    try:
        return sorted(
            entry.name
            for entry in os.scandir(versions)
            if entry.is_dir() and not entry.name.startswith(".")
        )
    except OSError as exc:
        raise RegistryError(f"cannot list {versions}: {exc}") from None


def stage(source: Path, staging: Path, *, copy: bool) -> None:
    """Put the model files of ``source`` at ``staging`` (moved, or copied with ``copy``)."""
    if copy:
        shutil.copytree(source, staging, symlinks=True)
    else:
        shutil.move(str(source), str(staging))


def install(staging: Path, target: Path) -> None:
    """Rename a staged version into place (atomic) and make the new name durable."""
    os.rename(staging, target)
    fsync_dir(target.parent)


def delete_version(versions: Path, trash: Path, version: str) -> None:
    """Delete the directory of ``version``: renamed into ``trash`` first (atomic), then removed."""
    moved = trash / f"{version}-{uuid.uuid4().hex}"
    try:
        os.rename(versions / version, moved)
    except OSError as exc:
        raise RegistryError(f"cannot delete version {version}: {exc}") from None
    remove(moved)


def clear_leftovers(root: Path, staging: Path, trash: Path) -> None:
    """Remove what a crashed registration, deletion or JSON write left behind."""
    for leftovers in (staging, trash):
        for entry in leftovers.iterdir():
            remove(entry)
    remove_temporary(root)


def remove_temporary(directory: Path) -> None:
    """Remove the temporary files a crashed :func:`write_json_atomic` left in ``directory``."""
    for tmp in directory.glob(TEMPORARY):
        remove(tmp)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
