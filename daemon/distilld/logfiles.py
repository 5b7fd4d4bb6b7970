"""Size-capped log files for the child processes the daemon runs (vLLM, Tansu).

A child's stdout and stderr go into a pipe; a thread of the daemon copies the
pipe into a :class:`RotatingLog`: ``PATH`` grows to ``max_bytes``, then becomes
``PATH.1`` (``PATH.1`` becomes ``PATH.2``, and so on), and the backup past
``backups`` is deleted. A log therefore never holds more than ``(backups + 1) *
max_bytes`` bytes, whatever the child writes, and the child never waits on it:
a write that fails (a full disk) is dropped and the pipe keeps being read.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from distilld.log import get_logger

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 3
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class LogRotation:
    """How big a child's log may grow (``max_bytes`` per file, ``backups`` old files)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.backups < 0:
            raise ValueError(
                "a log rotation needs max_bytes >= 1 and backups >= 0 "
                f"(received {self.max_bytes} and {self.backups})"
            )


def backup_path(path: Path, index: int) -> Path:
    """``PATH.index``: the ``index``-th newest rotated file of ``path``."""
    return path.with_name(f"{path.name}.{index}")


def rotate_files(path: Path, backups: int) -> None:
    """Shift ``PATH`` to ``PATH.1``, ``PATH.1`` to ``PATH.2`` ... keeping ``backups`` files
    (with none, ``PATH`` is deleted); missing files are skipped."""
    backup_path(path, backups + 1).unlink(missing_ok=True)  # left by a larger setting
    if backups == 0:
        path.unlink(missing_ok=True)
        return
    backup_path(path, backups).unlink(missing_ok=True)
    for index in range(backups - 1, 0, -1):
        older = backup_path(path, index)
        if older.exists():
            older.replace(backup_path(path, index + 1))
    if path.exists():
        path.replace(backup_path(path, 1))


class RotatingLog:
    """Bytes appended to ``path``, rotated by size (see the module docstring).

    Cuts a write that does not fit after its last newline when it has one, so
    lines stay whole unless one is longer than the room left. Not thread-safe:
    one writer (the pump thread, or the owner before the pump starts).
    """

    def __init__(self, path: Path, rotation: LogRotation) -> None:
        self.path = path
        self.rotation = rotation
        #: How many times the file was rotated since this object opened it.
        self.rotations = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = path.open("ab")
        self._size = self._file.tell()
        #: Where this object started writing in ``path`` (0 after a rotation).
        self.start_offset = self._size
        self._failed = False

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first whenever the current file is full. A write that
        fails is dropped (logged once) so that the child keeps running."""
        try:
            while data:
                if self._file is None:
                    return
                room = self.rotation.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    continue
                chunk = data[:room]
                if len(data) > room:
                    newline = chunk.rfind(b"\n")
                    if newline >= 0:
                        chunk = chunk[: newline + 1]
                    elif self._size > 0:
                        self._rotate()  # keep a line whole: start it in a fresh file
                        continue
                self._file.write(chunk)
                self._file.flush()
                self._size += len(chunk)
                data = data[len(chunk) :]
        except OSError as exc:
            if not self._failed:
                self._failed = True
                get_logger("logs").warning(
                    "logs.write_failed",
                    path=str(self.path),
                    error=f"{type(exc).__name__}: {exc}",
                    note="the child's output is dropped until the file can be written again "
                    "(check the disk); the child keeps running",
                )

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        rotate_files(self.path, self.rotation.backups)
        self._file = self.path.open("ab")
        self._size = 0
        self.start_offset = 0
        self.rotations += 1


class LogPump:
    """A thread copying a child's output pipe into a :class:`RotatingLog` until the pipe
    closes (every process holding it has exited); then it closes the log."""

    def __init__(self, source: IO[bytes], log: RotatingLog, name: str) -> None:
        self._source = source
        self._log = log
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._source.fileno()
        try:
            while True:
                try:
                    data = os.read(fd, _READ_SIZE)
                except OSError:
                    break
                if not data:
                    break
                self._log.write(data)
        finally:
            with contextlib.suppress(OSError):
                self._source.close()
            self._log.close()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the pipe to close; True when it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
