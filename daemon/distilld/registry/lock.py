"""The registry's single-flight lock: one process changes a registry at a time.

An exclusive ``fcntl.flock`` on the registry's ``.lock`` file, waited for up
to a timeout. Reads take no lock: every file they read is replaced atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from distilld.errors import RegistryError
from distilld.registry.steps import step

LOCK = ".lock"


@contextlib.contextmanager
def registry_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """Hold the lock of the registry under ``root``, waiting up to ``timeout_s``."""
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RegistryError(f"cannot open the registry lock {path}: {exc}") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise RegistryError(f"cannot lock {path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise RegistryError(
                        f"the registry {root} stayed locked by another process for "
                        f"{timeout_s:g} s; retry later"
                    ) from None
                time.sleep(0.02)
        step("lock:acquired")
        try:
            yield
        finally:
            step("lock:releasing")
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
