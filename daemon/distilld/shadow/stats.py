"""The shadow worker's counters, shared by the serving thread and the worker's threads."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class ShadowStats:
    """Counters of the worker, updated from the serving thread and the worker's threads.

    ``offered``: offer() calls; ``dropped_queue_full`` / ``dropped_not_running``
    / ``dropped_invalid`` / ``unknown_task``: offers not taken; ``reservoir_added``:
    rows written to the reservoir; ``sampled``: requests the sampler chose;
    ``paused``: sampled requests dropped while their teacher was unavailable;
    ``dropped_backlog``: sampled requests dropped because batches waited for the
    teacher already; ``compared``: comparisons stored; ``teacher_errors``:
    unusable answers; ``compare_errors``: answers that could not be scored;
    ``store_errors``: failed writes; ``dropped_on_stop``: left when stop() gave up;
    ``candidate_compared`` / ``candidate_errors``: answers of a candidate in shadow
    stored / lost to its errors; ``teacher_calls``: inputs sent to the teacher.
    """

    offered: int = 0
    dropped_queue_full: int = 0
    dropped_not_running: int = 0
    dropped_invalid: int = 0
    unknown_task: int = 0
    reservoir_added: int = 0
    sampled: int = 0
    paused: int = 0
    dropped_backlog: int = 0
    compared: int = 0
    teacher_errors: int = 0
    compare_errors: int = 0
    store_errors: int = 0
    dropped_on_stop: int = 0
    candidate_compared: int = 0
    candidate_errors: int = 0
    teacher_calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
