"""Which requests are also sent to the teacher: a pure decision per request.

The policy's ``sampling`` section (:class:`~distilld.monitoring.config.SamplingConfig`)
sets a base rate and raises it for the requests that say the most about the
student:

* a request in a segment with fewer than ``min_per_segment`` comparisons so
  far is always sampled, so that rare segments reach a per-segment verdict;
* a low-confidence student answer has its rate multiplied by
  ``low_confidence_boost`` (hard examples);
* an edge case (an input in the shortest or the longest length bucket, or
  with many out-of-vocabulary words) by ``edge_case_boost``.

A request's segments are its length bucket (key ``length``) and the values
of the metadata keys the policy declares (``sampling.segment_keys``; scalars
only, cut to 64 characters); undeclared metadata is never a segment. A
producer could otherwise make every request its own rare segment (a unique
value per request), sampled at rate 1, and spend the teacher's budget on
traffic of its choosing. For the same reason a declared key keeps at most
``max_values_per_key`` distinct values (:class:`SegmentValues`); a new value
beyond them is pooled as ``other``.

Nothing here calls the teacher or reads a clock: the caller keeps the
per-segment counts and the tracked values (:class:`TaskSampling` holds both
for one task) and passes its random source, so the decision is reproducible
in tests and cheap enough for the serving path, although the daemon makes it
off that path.

The per-segment counts cover the last ``window`` comparisons of a task (the
accuracy monitor's window, :class:`SegmentCounts`) and are seeded from the
store on start, so a restart does not over-sample segments that already have
their share. A tracked segment value unseen for :data:`IDLE_WINDOWS` windows of
requests gives its place up.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from distilld.monitoring.config import SamplingConfig
from distilld.vocabulary import (
    LENGTH_SEGMENT_KEY,
    OTHER_SEGMENT_VALUE,
    length_bucket,
    segment_label,
)

MAX_SEGMENT_VALUE_CHARS = 64
# A tracked segment value unseen for this many accuracy windows of requests gives its
# place up to a new value (see SegmentValues).
IDLE_WINDOWS = 10


@dataclass(frozen=True)
class SamplingDecision:
    """Whether to ask the teacher about a request, and why.

    ``segment`` maps each segment key of the request to its value (stored with
    the comparison). ``probability`` is the rate the request was sampled at;
    ``reasons`` names what raised it above the base rate.
    """

    sample: bool
    probability: float
    segment: dict[str, str]
    reasons: tuple[str, ...] = ()


def segment_of(
    text: str,
    metadata: Mapping[str, Any],
    config: SamplingConfig,
    keys: Collection[str] | None = None,
) -> dict[str, str]:
    """The segment keys and values of a request: the values of its metadata ``keys``
    (None: no metadata key; pass the policy's ``sampling.segment_keys``) and its
    length bucket."""
    segment: dict[str, str] = {}
    for key, value in metadata.items():
        if keys is None or key not in keys:
            continue
        # Lists, objects and nulls are no category; bool before int (bool is an int).
        if isinstance(value, bool):
            segment[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            segment[key] = str(value)[:MAX_SEGMENT_VALUE_CHARS]
    segment[LENGTH_SEGMENT_KEY] = length_bucket(len(text), config.length_buckets)
    return segment


class SegmentValues:
    """The metadata values tracked as segments of one task: at most ``max_values``
    per key, the others pooled as ``other``.

    A new value takes a free place; when every place is taken, it takes the place
    of the least recently seen value if that one was not seen in the last
    ``idle_after`` requests, else it counts as ``other``. Made-up values can so
    take at most ``max_values`` places per ``idle_after`` requests, and never the
    place of a value that keeps coming. The length bucket (bounded by the policy)
    passes unchanged. Not thread-safe: the caller serialises calls.
    """

    def __init__(self, max_values: int, idle_after: int) -> None:
        if max_values < 1 or idle_after < 1:
            raise ValueError(
                f"max_values and idle_after must be at least 1 (received {max_values}, "
                f"{idle_after})"
            )
        self.max_values = max_values
        self.idle_after = idle_after
        self._seen = 0  # requests admitted so far
        # key -> value -> the request number it was last seen at, least recent first
        self._last: dict[str, OrderedDict[str, int]] = {}

    def admit(self, segment: Mapping[str, str]) -> dict[str, str]:
        """The segment of one more request, with untracked values pooled."""
        self._seen += 1
        admitted: dict[str, str] = {}
        for key, value in segment.items():
            # The length bucket is bounded by the policy; "other" is the pool itself.
            pooled = key == LENGTH_SEGMENT_KEY or value == OTHER_SEGMENT_VALUE
            admitted[key] = value if pooled else self._place(key, value)
        return admitted

    def tracked(self, key: str) -> list[str]:
        """The values of ``key`` tracked now, least recently seen first."""
        return list(self._last.get(key, ()))

    def _place(self, key: str, value: str) -> str:
        values = self._last.setdefault(key, OrderedDict())
        if value not in values and len(values) >= self.max_values:
            oldest, last_seen = next(iter(values.items()))
            if self._seen - last_seen <= self.idle_after:
                return OTHER_SEGMENT_VALUE
            del values[oldest]
        values[value] = self._seen
        values.move_to_end(value)
        return value


class SegmentCounts:
    """Comparisons per (segment key, value) over the last ``window`` comparisons."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._recent: deque[tuple[tuple[str, str], ...]] = deque()
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, segment: Mapping[str, str]) -> None:
        items = tuple(segment.items())
        self._recent.append(items)
        self.counts.update(items)
        if len(self._recent) > self._window:
            for item in self._recent.popleft():
                self.counts[item] -= 1
                if self.counts[item] <= 0:
                    del self.counts[item]


class TaskSampling:
    """What the sampling decisions of one task remember: the comparisons per segment
    over the last ``window`` comparisons and the tracked segment values. Not
    thread-safe: the caller serialises calls."""

    def __init__(self, config: SamplingConfig, window: int) -> None:
        self.config = config
        self._keys = {*(config.segment_keys or ()), LENGTH_SEGMENT_KEY}
        self._counts = SegmentCounts(window)
        self._values = SegmentValues(config.max_values_per_key, IDLE_WINDOWS * window)

    def seed(self, stored: Iterable[Mapping[str, str]]) -> None:
        """Count the segments of comparisons stored before a start, oldest first."""
        for segment in stored:
            # Only the declared keys, pooled as new comparisons are (rows may predate
            # a change of segment_keys).
            declared = {k: v for k, v in segment.items() if k in self._keys}
            self._counts.add(self._values.admit(declared))

    def decide(
        self,
        text: str,
        metadata: Mapping[str, Any],
        confidence: float | None,
        rng: random.Random,
        *,
        oov_share: float | None = None,
    ) -> SamplingDecision:
        """:func:`decide` for one request of the task, its segment values pooled."""
        segment = segment_of(text, metadata, self.config, self.config.segment_keys)
        return decide(
            text,
            metadata,
            confidence,
            self.config,
            self._counts.counts,
            rng,
            oov_share=oov_share,
            segment=self._values.admit(segment),
        )

    def count(self, segment: Mapping[str, str]) -> None:
        """One more comparison stored for a request of ``segment``."""
        self._counts.add(segment)


def decide(
    text: str,
    metadata: Mapping[str, Any],
    confidence: float | None,
    config: SamplingConfig,
    counts: Mapping[tuple[str, str], int],
    rng: random.Random,
    *,
    oov_share: float | None = None,
    keys: Collection[str] | None = None,
    segment: Mapping[str, str] | None = None,
) -> SamplingDecision:
    """Decide whether to compare one request with the teacher.

    ``counts`` maps ``(segment key, value)`` to the comparisons that segment
    already has in the current window (a missing entry is 0), for this task.
    ``confidence`` is the student's (None: unknown, never low); ``oov_share``
    the input's out-of-vocabulary share, when the caller computed it.
    ``segment`` is the request's segment when the caller computed it (with its
    values pooled by :class:`SegmentValues`); else it is ``segment_of`` the
    metadata ``keys`` (None: none) and the length.
    """
    segment = dict(segment) if segment is not None else segment_of(text, metadata, config, keys)
    reasons: list[str] = []

    rare = [
        segment_label(key, value)
        for key, value in segment.items()
        if counts.get((key, value), 0) < config.min_per_segment
    ]
    probability = config.base_rate
    if confidence is not None and confidence < config.low_confidence_threshold:
        probability *= config.low_confidence_boost
        reasons.append(f"low confidence ({confidence:.3f} < {config.low_confidence_threshold})")
    edge = _edge_case(text, config, oov_share)
    if edge is not None:
        probability *= config.edge_case_boost
        reasons.append(f"edge case ({edge})")
    if rare:
        probability = 1.0
        reasons.append(f"segment below {config.min_per_segment} comparisons ({', '.join(rare)})")
    probability = min(1.0, probability)
    # random() is in [0, 1): rate 0 never samples, rate 1 always does.
    return SamplingDecision(
        sample=rng.random() < probability,
        probability=probability,
        segment=segment,
        reasons=tuple(reasons),
    )


def _edge_case(text: str, config: SamplingConfig, oov_share: float | None) -> str | None:
    """Why the input is an edge case, or None."""
    boundaries = config.length_buckets
    if len(text) < boundaries[0]:
        return f"shorter than {boundaries[0]} characters"
    if len(text) >= boundaries[-1]:
        return f"at least {boundaries[-1]} characters"
    if oov_share is not None and oov_share > config.edge_case_oov_share:
        return f"out-of-vocabulary share {oov_share:.2f} > {config.edge_case_oov_share}"
    return None
