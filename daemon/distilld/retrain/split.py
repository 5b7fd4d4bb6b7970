"""Splitting labelled examples into train, validation and a held-out test set: pure.

The split is decided by the text, not by the order or a random draw:

* every example gets a fingerprint, the BLAKE2b hash of its normalised text
  (:func:`~distilld.retrain.dedup.normalize_text`, salted with ``salt``);
  examples with the same normalised text share it and always land in the
  same split, so a duplicate can never carry a test example into training;
* examples are stratified by label (``label_of``; for classification the
  teacher's label): within each label the texts are ordered by fingerprint
  and the first ``test`` share goes to the test set, the next
  ``validation`` share to validation, the rest to training. Shares are
  rounded per label with the largest remainders, so the split sizes match
  the fractions overall and each label's proportions match within one
  example. Without labels (extraction, generation) there is one stratum.

The same examples always give the same split, and a text keeps its place
when data is added as long as its rank among its label's fingerprints does
not cross a boundary. :class:`Split` is frozen (tuples), carries the
fingerprints of its test set, and :func:`check_held_out` lets a trainer
prove that none of its training texts is a test text: the test set is for
the gate only, never for training, early stopping or model choice (that is
what validation is for).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from distilld.errors import DistilldError
from distilld.retrain.data_config import SplitConfig
from distilld.retrain.dedup import normalize_text

__all__ = [
    "Split",
    "SplitError",
    "SplitReport",
    "check_held_out",
    "fingerprint",
    "split_examples",
]

T = TypeVar("T")
PARTS = ("train", "validation", "test")


class SplitError(DistilldError):
    """Examples cannot be split, or a training set contains held-out test texts."""


def fingerprint(text: str, salt: str = "") -> str:
    """The hex BLAKE2b-64 hash of the normalised text (prefixed by ``salt`` when given)."""
    data = normalize_text(text).encode("utf-8")
    if salt:
        data = salt.encode("utf-8") + b"\0" + data
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True)
class SplitReport:
    sizes: Mapping[str, int]  # part -> examples
    by_label: Mapping[str, Mapping[str, int]]  # label -> part -> examples
    duplicate_texts: int  # examples that share their normalised text with an earlier one

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": dict(self.sizes),
            "by_label": {k: dict(v) for k, v in self.by_label.items()},
            "duplicate_texts": self.duplicate_texts,
        }


@dataclass(frozen=True)
class Split(Generic[T]):
    """Three disjoint parts, in the input order within each part.

    ``test`` is held out: it is read by the validation gate only.
    ``test_fingerprints`` are the fingerprints of its texts (see
    :func:`check_held_out`).
    """

    train: tuple[T, ...]
    validation: tuple[T, ...]
    test: tuple[T, ...]
    test_fingerprints: frozenset[str]
    salt: str
    report: SplitReport


def _example_text(example: Any) -> str:
    text = getattr(example, "text", None)
    if not isinstance(text, str):
        raise SplitError(
            f"cannot read the text of {type(example).__name__}; pass text_of=... to split_examples"
        )
    return text


def _example_label(example: Any) -> Hashable | None:
    output = getattr(example, "output", None)
    return output if isinstance(output, str) else None


def _largest_remainder(sizes: Mapping[Hashable, int], fraction: float) -> dict[Hashable, int]:
    """Per-stratum counts summing to round(total * fraction), each within one of its share."""
    total = sum(sizes.values())
    target = round(total * fraction)
    exact = {k: n * fraction for k, n in sizes.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = target - sum(counts.values())
    order = sorted(sizes, key=lambda k: (-(exact[k] - counts[k]), str(k)))
    for k in order:
        if left <= 0:
            break
        if counts[k] < sizes[k]:
            counts[k] += 1
            left -= 1
    return counts


def split_examples(
    examples: Sequence[T],
    config: SplitConfig,
    *,
    text_of: Callable[[T], str] = _example_text,
    label_of: Callable[[T], Hashable | None] = _example_label,
    salt: str = "",
) -> Split[T]:
    """Split ``examples`` by ``config``'s fractions; see the module docstring.

    ``text_of`` and ``label_of`` default to the ``text`` attribute and a
    string ``output`` attribute (a :class:`~distilld.retrain.filter.LabelledExample`).
    A text's label is that of its first occurrence.
    """
    # Group examples by fingerprint: one group per distinct normalised text.
    groups: dict[str, list[int]] = {}
    group_label: dict[str, Hashable | None] = {}
    duplicates = 0
    keys_of = [fingerprint(text_of(example), salt) for example in examples]
    for i, (example, key) in enumerate(zip(examples, keys_of, strict=True)):
        if key in groups:
            groups[key].append(i)
            duplicates += 1
        else:
            groups[key] = [i]
            group_label[key] = label_of(example)

    strata: dict[Hashable | None, list[str]] = defaultdict(list)
    for key in groups:
        strata[group_label[key]].append(key)
    # Counted in distinct texts (a group moves as one).
    sizes = {label: len(keys) for label, keys in strata.items()}
    n_test = _largest_remainder(sizes, config.test)
    n_validation = _largest_remainder(sizes, config.validation)

    part_of: dict[str, str] = {}
    for label, keys in strata.items():
        ordered = sorted(keys)
        t, v = n_test[label], min(n_validation[label], len(ordered) - n_test[label])
        for rank, key in enumerate(ordered):
            part_of[key] = "test" if rank < t else "validation" if rank < t + v else "train"

    parts: dict[str, list[T]] = {p: [] for p in PARTS}
    by_label: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(PARTS, 0))
    for key, members in groups.items():
        part = part_of[key]
        label = group_label[key]
        by_label["(none)" if label is None else str(label)][part] += len(members)
    for example, key in zip(examples, keys_of, strict=True):
        parts[part_of[key]].append(example)

    test_keys = frozenset(k for k, part in part_of.items() if part == "test")
    report = SplitReport(
        sizes={p: len(parts[p]) for p in PARTS},
        by_label={k: by_label[k] for k in sorted(by_label)},
        duplicate_texts=duplicates,
    )
    return Split(
        train=tuple(parts["train"]),
        validation=tuple(parts["validation"]),
        test=tuple(parts["test"]),
        test_fingerprints=test_keys,
        salt=salt,
        report=report,
    )


def check_held_out(training_texts: Iterable[str], split: Split[Any]) -> None:
    """Raise :class:`SplitError` if any of ``training_texts`` is a text of the test set."""
    leaked = [t for t in training_texts if fingerprint(t, split.salt) in split.test_fingerprints]
    if leaked:
        raise SplitError(
            f"{len(leaked)} training texts are in the held-out test set (first: "
            f"{leaked[0][:80]!r}); the test set must never be trained on"
        )
