"""Choosing the inputs a retraining labels with the teacher: a pure function.

From candidate inputs (the traffic reservoir, the teacher comparisons, seed
files) :func:`select_inputs` chooses ``n``:

1. empty inputs are dropped;
2. exact duplicates (same text after :func:`normalize_text`) are removed,
   keeping the first occurrence: pass the most informative sources first
   (comparisons, which know whether the student and the teacher agreed, then
   the reservoir, then seeds);
3. near duplicates are removed, keeping the first: two inputs whose word
   shingles (``shingle_words`` consecutive words) have a Jaccard similarity
   of at least ``near_duplicate_threshold``, found by MinHash and confirmed
   on the exact Jaccard (:func:`distilld.retrain.dedup.near_duplicates`);
   the result does not depend on the process nor on the seed;
4. the remaining inputs are grouped in strata by their segment values (the
   ``segment_keys``, or every key), and drawn without replacement, each
   weighing 1 times the factor of every reason it is hard: low student
   confidence, disagreement with the teacher, a rare segment value, an edge
   case tag. A stratum gets a share of ``n`` proportional to its total
   weight (largest remainders, capped by its size, what it cannot fill going
   to the others), so rare and hard strata are over-represented and easy
   abundant ones under-represented, but every stratum is represented.

Inputs are never repeated: over-sampling raises the chance an input is
chosen; repeating a text would spend teacher calls on the same answer
(weighting in the loss is the trainer's business). The draw uses
``numpy.random.default_rng(seed)``: the same candidates and seed give the
same selection, returned in the candidates' order.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distilld.errors import DistilldError
from distilld.monitoring.config import SamplingConfig
from distilld.retrain.data_config import SelectionConfig
from distilld.retrain.dedup import near_duplicates, normalize_text
from distilld.shadow.sampler import MAX_SEGMENT_VALUE_CHARS, segment_of
from distilld.store.base import StoredComparison, TrafficSample
from distilld.vocabulary import segment_label

__all__ = [
    "REASONS",
    "Candidate",
    "Selected",
    "Selection",
    "SelectionError",
    "SelectionReport",
    "candidates_from_comparisons",
    "candidates_from_traffic",
    "edge_tags",
    "segment_of_metadata",
    "select_inputs",
]

# Why an input weighs more than 1, in the report's order.
REASONS = ("low_confidence", "disagreement", "rare_segment", "edge_case")
ORDINARY = "ordinary"


class SelectionError(DistilldError):
    """The selection was asked something impossible (a negative size, a bad candidate)."""


@dataclass(frozen=True)
class Candidate:
    """One input that may be labelled.

    ``segment`` maps segment keys to values (``{"source": "app", "length":
    "<64"}``). ``student_confidence`` is None when unknown (never low).
    ``teacher_agreement`` is the student-vs-teacher score in [0, 1] when the
    input was compared (shadow/compare.py), else None. ``tags`` name why the
    input is an edge case (``short``, ``long``), empty if it is not one.
    ``source``: traffic, comparison, seed.
    """

    text: str
    segment: Mapping[str, str] = field(default_factory=dict)
    student_confidence: float | None = None
    teacher_agreement: float | None = None
    source: str = "traffic"
    id: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise SelectionError(
                f"candidate {self.id!r}: text must be a string (received "
                f"{type(self.text).__name__})"
            )
        for name in ("student_confidence", "teacher_agreement"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SelectionError(
                    f"candidate {self.id!r}: {name} must lie in [0, 1] (received {value!r})"
                )


@dataclass(frozen=True)
class Selected:
    """A chosen candidate, with the reasons it was over-weighted and its weight."""

    candidate: Candidate
    reasons: tuple[str, ...]
    weight: float
    stratum: str


@dataclass(frozen=True)
class SelectionReport:
    """What happened to the candidates. Every count is a number of inputs."""

    requested: int
    candidates: int
    empty: int
    exact_duplicates: int
    near_duplicates: int
    eligible: int  # after deduplication
    selected: int
    available_by_reason: Mapping[str, int]  # eligible inputs per reason (ordinary: none)
    selected_by_reason: Mapping[str, int]
    by_stratum: Mapping[str, Mapping[str, int]]  # stratum -> {available, selected}
    by_source: Mapping[str, Mapping[str, int]]  # source -> {candidates, selected}
    rare_segments: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "candidates": self.candidates,
            "dropped": {
                "empty": self.empty,
                "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates,
            },
            "eligible": self.eligible,
            "selected": self.selected,
            "available_by_reason": dict(self.available_by_reason),
            "selected_by_reason": dict(self.selected_by_reason),
            "by_stratum": {k: dict(v) for k, v in self.by_stratum.items()},
            "by_source": {k: dict(v) for k, v in self.by_source.items()},
            "rare_segments": list(self.rare_segments),
        }


@dataclass(frozen=True)
class Selection:
    items: tuple[Selected, ...]  # in the candidates' order
    report: SelectionReport

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(item.candidate for item in self.items)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(item.candidate.text for item in self.items)


# --------------------------------------------------------------------------- sources


def candidates_from_comparisons(
    comparisons: Iterable[StoredComparison], sampling: SamplingConfig | None = None
) -> list[Candidate]:
    """Candidates from the teacher comparisons: the agreement score is known.

    With the policy's ``sampling`` section, inputs in its shortest or longest
    length bucket are tagged ``short`` / ``long`` edge cases.
    """
    buckets = sampling.length_buckets if sampling is not None else None
    return [
        Candidate(
            text=c.input_text,
            segment=dict(c.segment),
            student_confidence=_clip(c.student_confidence),
            teacher_agreement=None if c.score is None else _clip(c.score),
            source="comparison",
            id=c.request_id,
            tags=edge_tags(c.input_text, buckets),
        )
        for c in comparisons
    ]


def candidates_from_traffic(
    samples: Iterable[TrafficSample], sampling: SamplingConfig | None = None
) -> list[Candidate]:
    """Candidates from the traffic reservoir.

    With the policy's ``sampling`` section, segments are computed as the
    shadow sampler computes them (its ``segment_keys`` of the metadata, and
    the length bucket), so they match the comparisons' segments, and inputs
    in the shortest or longest length bucket are tagged ``short`` / ``long``
    edge cases. Without it, segments are the sample's scalar metadata.
    """
    result = []
    for s in samples:
        if sampling is not None:
            segment = segment_of(s.input_text, s.metadata, sampling, sampling.segment_keys)
            tags = edge_tags(s.input_text, sampling.length_buckets)
        else:
            segment = segment_of_metadata(s.metadata)
            tags = ()
        result.append(
            Candidate(
                text=s.input_text,
                segment=segment,
                student_confidence=_clip(s.student_confidence),
                source="traffic",
                id=s.request_id,
                tags=tags,
            )
        )
    return result


def segment_of_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Scalar metadata values as segment values (lists, objects and nulls are left out)."""
    segment: dict[str, str] = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            segment[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            segment[key] = str(value)[:MAX_SEGMENT_VALUE_CHARS]
    return segment


def edge_tags(text: str, length_buckets: Sequence[int] | None) -> tuple[str, ...]:
    """``("short",)`` below the first length boundary, ``("long",)`` at or above the last."""
    if not length_buckets:
        return ()
    if len(text) < length_buckets[0]:
        return ("short",)
    if len(text) >= length_buckets[-1]:
        return ("long",)
    return ()


def _clip(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


# --------------------------------------------------------------------------- selection


def _stratum(segment: Mapping[str, str], keys: Collection[str] | None) -> str:
    labels = sorted(segment_label(k, v) for k, v in segment.items() if keys is None or k in keys)
    return ",".join(labels) if labels else "(none)"


def _allocate(capacity: Mapping[str, int], weight: Mapping[str, float], n: int) -> dict[str, int]:
    """Split ``n`` among strata proportionally to weight, capped by capacity.

    Largest remainders; what a full stratum cannot take goes to the others in
    proportion to theirs. Ties break on the stratum name (deterministic).
    """
    quota = dict.fromkeys(capacity, 0)
    remaining = min(n, sum(capacity.values()))
    open_strata = sorted(s for s in capacity if capacity[s] > 0)
    while remaining > 0 and open_strata:
        total = math.fsum(weight[s] for s in open_strata)
        shares = {s: remaining * weight[s] / total for s in open_strata}
        floors = {s: min(int(shares[s]), capacity[s] - quota[s]) for s in open_strata}
        given = sum(floors.values())
        for s, k in floors.items():
            quota[s] += k
        left = remaining - given
        # Hand out the rest one by one, by the largest remainder.
        order = sorted(open_strata, key=lambda s: (-(shares[s] - int(shares[s])), s))
        for s in order:
            if left == 0:
                break
            if quota[s] < capacity[s]:
                quota[s] += 1
                left -= 1
        remaining = left
        open_strata = [s for s in open_strata if quota[s] < capacity[s]]
    return quota


def select_inputs(
    candidates: Sequence[Candidate],
    n: int,
    config: SelectionConfig,
    *,
    seed: int = 0,
) -> Selection:
    """Choose up to ``n`` inputs among ``candidates``; see the module docstring.

    Fewer than ``n`` come back when fewer remain after deduplication.
    """
    if n < 0:
        raise SelectionError(f"the number of inputs to select must be >= 0 (received {n})")

    # 1-2: empty inputs, exact duplicates.
    normalized: list[str] = []
    unique: list[int] = []
    first_of: dict[str, int] = {}
    empty = exact = 0
    for i, c in enumerate(candidates):
        norm = normalize_text(c.text)
        if not norm:
            empty += 1
            continue
        if norm in first_of:
            exact += 1
            continue
        first_of[norm] = i
        unique.append(i)
        normalized.append(norm)

    # 3: near duplicates.
    near = near_duplicates(normalized, config.near_duplicate_threshold, config.shingle_words)
    eligible = [i for k, i in enumerate(unique) if k not in near]

    # 4: reasons, weights, strata.
    label_counts: Counter[str] = Counter()
    for i in eligible:
        label_counts.update(segment_label(k, v) for k, v in candidates[i].segment.items())
    rare = {
        label
        for label, count in label_counts.items()
        if count < config.rare_segment_share * len(eligible)
    }
    factors = {
        "low_confidence": config.low_confidence_factor,
        "disagreement": config.disagreement_factor,
        "rare_segment": config.rare_segment_factor,
        "edge_case": config.edge_case_factor,
    }
    reasons: dict[int, tuple[str, ...]] = {}
    weights: dict[int, float] = {}
    strata: dict[str, list[int]] = defaultdict(list)
    for i in eligible:
        c = candidates[i]
        why = []
        conf = c.student_confidence
        if conf is not None and conf < config.low_confidence_threshold:
            why.append("low_confidence")
        agree = c.teacher_agreement
        if agree is not None and agree < config.disagreement_below:
            why.append("disagreement")
        if any(segment_label(k, v) in rare for k, v in c.segment.items()):
            why.append("rare_segment")
        if c.tags:
            why.append("edge_case")
        reasons[i] = tuple(why)
        weights[i] = math.prod(factors[r] for r in why)
        strata[_stratum(c.segment, config.segment_keys)].append(i)

    quota = _allocate(
        {s: len(members) for s, members in strata.items()},
        {s: math.fsum(weights[i] for i in members) for s, members in strata.items()},
        n,
    )
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for s in sorted(strata):
        members = strata[s]
        k = quota[s]
        if k >= len(members):
            chosen.update(members)
            continue
        if k == 0:
            continue
        # Efraimidis-Spirakis: the k largest u ** (1 / w) are a weighted draw
        # without replacement (compared as log(u) / w to stay in range).
        w = np.array([weights[i] for i in members])
        keys = np.log(rng.random(len(members))) / w
        top = np.argsort(-keys, kind="stable")[:k]
        chosen.update(members[j] for j in top)

    items = tuple(
        Selected(
            candidate=candidates[i],
            reasons=reasons[i],
            weight=weights[i],
            stratum=_stratum(candidates[i].segment, config.segment_keys),
        )
        for i in sorted(chosen)
    )

    def by_reason(indices: Iterable[int]) -> dict[str, int]:
        counts = dict.fromkeys((*REASONS, ORDINARY), 0)
        for i in indices:
            for r in reasons[i] or (ORDINARY,):
                counts[r] += 1
        return counts

    by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"candidates": 0, "selected": 0})
    for c in candidates:
        by_source[c.source]["candidates"] += 1
    for i in chosen:
        by_source[candidates[i].source]["selected"] += 1

    report = SelectionReport(
        requested=n,
        candidates=len(candidates),
        empty=empty,
        exact_duplicates=exact,
        near_duplicates=len(near),
        eligible=len(eligible),
        selected=len(items),
        available_by_reason=by_reason(eligible),
        selected_by_reason=by_reason(chosen),
        by_stratum={
            s: {"available": len(strata[s]), "selected": sum(1 for i in strata[s] if i in chosen)}
            for s in sorted(strata)
        },
        by_source={s: by_source[s] for s in sorted(by_source)},
        rare_segments=tuple(sorted(rare)),
    )
    return Selection(items=items, report=report)
