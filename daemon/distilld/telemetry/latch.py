"""The alert-once latch: report a condition when it starts and when it ends, not while it lasts.

A :class:`Latch` keeps the keys whose condition holds now, each with the payload
given when it started (e.g. the time an outage began). :meth:`Latch.set` says
whether this call started the condition (the breach edge), :meth:`Latch.clear`
hands back the payload when this call ended it (the recovery edge). Callers
alert only on those edges. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Latch"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Latch(Generic[K, V]):
    """Keys whose condition holds, with the payload each one started with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[K, V] = {}

    def set(self, key: K, payload: V) -> bool:
        """Mark ``key``'s condition as holding; True only when it did not hold before
        (then ``payload`` is kept; otherwise the first payload stays)."""
        with self._lock:
            if key in self._held:
                return False
            self._held[key] = payload
            return True

    def clear(self, key: K) -> V | None:
        """Mark ``key``'s condition as over; the payload it was set with when it held
        (the recovery edge), None when it did not hold."""
        with self._lock:
            return self._held.pop(key, None)

    def get(self, key: K) -> V | None:
        """The payload of ``key`` while its condition holds, else None."""
        with self._lock:
            return self._held.get(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._held

    def held(self) -> frozenset[K]:
        """The keys whose condition holds now."""
        with self._lock:
            return frozenset(self._held)
