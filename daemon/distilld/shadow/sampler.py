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

A request's segments are its length bucket (key ``length``) and its metadata
values (scalars only, cut to 64 characters). A metadata key named ``length``
is shadowed by the length bucket. Metadata keys with one value per request
(ids, timestamps) would make every request its own rare segment and so
always sampled: pass ``keys`` to use only the keys meant as segments.

Nothing here calls the teacher or reads a clock: the caller keeps the
per-segment counts and passes its random source, so the decision is
reproducible in tests and cheap enough for the serving path, although the
daemon makes it off that path.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distilld.monitoring.config import SamplingConfig

LENGTH_KEY = "length"
MAX_SEGMENT_VALUE_CHARS = 64


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


def length_bucket(length: int, boundaries: Sequence[int]) -> str:
    """The bucket name of a character length: ``<64``, ``64-255``, ..., ``>=1024``."""
    if length < boundaries[0]:
        return f"<{boundaries[0]}"
    for low, high in itertools.pairwise(boundaries):
        if length < high:
            return f"{low}-{high - 1}"
    return f">={boundaries[-1]}"


def segment_of(
    text: str,
    metadata: Mapping[str, Any],
    config: SamplingConfig,
    keys: Collection[str] | None = None,
) -> dict[str, str]:
    """The segment keys and values of a request: its metadata (the ``keys`` only,
    when given) and its length bucket."""
    segment: dict[str, str] = {}
    for key, value in metadata.items():
        if keys is not None and key not in keys:
            continue
        # Lists, objects and nulls are no category; bool before int (bool is an int).
        if isinstance(value, bool):
            segment[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            segment[key] = str(value)[:MAX_SEGMENT_VALUE_CHARS]
    segment[LENGTH_KEY] = length_bucket(len(text), config.length_buckets)
    return segment


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
) -> SamplingDecision:
    """Decide whether to compare one request with the teacher.

    ``counts`` maps ``(segment key, value)`` to the comparisons that segment
    already has in the current window (a missing entry is 0), for this task.
    ``confidence`` is the student's (None: unknown, never low); ``oov_share``
    the input's out-of-vocabulary share, when the caller computed it.
    """
    segment = segment_of(text, metadata, config, keys)
    reasons: list[str] = []

    rare = [
        f"{key}={value}"
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
