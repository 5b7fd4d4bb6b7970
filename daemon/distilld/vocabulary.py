"""The domain's words, each declared once: task kinds, segments, the retry schedule.

Every part of the daemon (policies, serving, shadow comparisons, monitoring,
retraining, reports) speaks of the same task kinds and segments and waits
between retries the same way. They are declared here, in a module at the
bottom of the dependency graph: it imports nothing from distilld, so any
module may import it without an import cycle.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from enum import StrEnum

__all__ = [
    "LENGTH_SEGMENT_KEY",
    "OTHER_SEGMENT_VALUE",
    "OVERALL",
    "TASK_KINDS",
    "TaskKind",
    "backoff_ceiling",
    "joined_segment_label",
    "length_bucket",
    "segment_key",
    "segment_label",
    "split_segment_label",
]


# --------------------------------------------------------------------------- task kinds


class TaskKind(StrEnum):
    """What a task's answer is: one label, a JSON object of fields, or free JSON."""

    classification = "classification"
    extraction = "extraction"
    generation = "generation"


# The kinds' names, in the order error messages list them.
TASK_KINDS: tuple[str, ...] = tuple(kind.value for kind in TaskKind)


# --------------------------------------------------------------------------- segments
#
# A request's segment maps segment keys to values: its length bucket (key
# LENGTH_SEGMENT_KEY, always present) and the metadata keys the policy declares.
# Monitoring, gates, reports and alerts name one segment with a label "key=value";
# the key never contains "=" (the value may).

# The segment key of an input's length bucket, always present.
LENGTH_SEGMENT_KEY = "length"
# The value that the values of one key beyond the tracked ones are pooled under.
OTHER_SEGMENT_VALUE = "other"
# The label of the whole traffic, as opposed to one segment of it.
OVERALL = "all"


def segment_label(key: str, value: str) -> str:
    """The label of one segment: ``("source", "app")`` -> ``"source=app"``."""
    return f"{key}={value}"


def split_segment_label(label: str) -> tuple[str, str] | None:
    """The key and value of a label ``key=value``; None when it is not of that form
    (no "=", or an empty key)."""
    key, sep, value = label.partition("=")
    if not sep or not key:
        return None
    return key, value


def joined_segment_label(segment: Mapping[str, str]) -> str:
    """One label for a whole segment mapping, by key: ``{"b": "2", "a": "1"}`` ->
    ``"a=1,b=2"`` (empty for an empty mapping)."""
    return ",".join(segment_label(key, value) for key, value in sorted(segment.items()))


def segment_key(label: str) -> str:
    """The key of a label ``key=value`` (the whole label when it has no "=")."""
    return label.partition("=")[0]


def length_bucket(length: int, boundaries: Sequence[int]) -> str:
    """The bucket name of a character length: ``<64``, ``64-255``, ..., ``>=1024``."""
    if length < boundaries[0]:
        return f"<{boundaries[0]}"
    for low, high in itertools.pairwise(boundaries):
        if length < high:
            return f"{low}-{high - 1}"
    return f">={boundaries[-1]}"


# --------------------------------------------------------------------------- retries


def backoff_ceiling(attempt: int, first_s: float, max_s: float) -> float:
    """The wait before retry ``attempt`` (0-based) of an exponential back-off: ``first_s``
    doubled per earlier retry, at most ``max_s``. Callers add their own jitter."""
    # Cap the exponent: 2**1100 overflows a float long before anyone retries that often.
    return min(max_s, first_s * 2.0 ** min(max(attempt, 0), 64))
