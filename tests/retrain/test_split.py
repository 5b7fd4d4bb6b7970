"""Deterministic, stratified, duplicate-safe train / validation / test splits."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from distilld.retrain.data_config import SplitConfig
from distilld.retrain.filter import LabelledExample
from distilld.retrain.split import (
    SplitError,
    check_held_out,
    fingerprint,
    split_examples,
)


def _examples(n_fresh: int, n_rotten: int) -> list[LabelledExample]:
    return [
        LabelledExample(text=f"review number {i}", output="fresh", confidence=1.0)
        for i in range(n_fresh)
    ] + [
        LabelledExample(text=f"rotten review {i}", output="rotten", confidence=1.0)
        for i in range(n_rotten)
    ]


def test_sizes_match_the_fractions_per_label() -> None:
    split = split_examples(_examples(700, 300), SplitConfig())
    assert split.report.sizes == {"train": 800, "validation": 100, "test": 100}
    assert split.report.by_label == {
        "fresh": {"train": 560, "validation": 70, "test": 70},
        "rotten": {"train": 240, "validation": 30, "test": 30},
    }
    assert len(split.test_fingerprints) == 100


def test_parts_are_disjoint_and_complete() -> None:
    examples = _examples(120, 80)
    split = split_examples(examples, SplitConfig(train=0.6, validation=0.2, test=0.2))
    texts = [{e.text for e in part} for part in (split.train, split.validation, split.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == 200
    assert isinstance(split.test, tuple)  # frozen


def test_duplicates_never_cross_splits() -> None:
    rng = random.Random(0)
    examples = _examples(300, 0)
    variants = [
        LabelledExample(text=f"  REVIEW   number {i} ", output="fresh", confidence=1.0)
        for i in rng.sample(range(300), 100)
    ]
    split = split_examples(examples + variants, SplitConfig())
    assert split.report.duplicate_texts == 100
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    where: dict[str, str] = {}
    for name, part in parts.items():
        for e in part:
            key = fingerprint(e.text)
            assert where.setdefault(key, name) == name
    # Proportions are of distinct texts; copies follow their original.
    assert sum(split.report.sizes.values()) == 400


def test_split_depends_on_the_texts_not_their_order() -> None:
    examples = _examples(150, 50)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    a = split_examples(examples, SplitConfig())
    b = split_examples(shuffled, SplitConfig())
    assert {e.text for e in a.test} == {e.text for e in b.test}
    assert {e.text for e in a.validation} == {e.text for e in b.validation}
    # Within a part, the input order is kept.
    order = {e.text: i for i, e in enumerate(shuffled)}
    assert [order[e.text] for e in b.train] == sorted(order[e.text] for e in b.train)


def test_salt_changes_the_split() -> None:
    examples = _examples(200, 0)
    plain = split_examples(examples, SplitConfig())
    salted = split_examples(examples, SplitConfig(), salt="retrain-2")
    assert {e.text for e in plain.test} != {e.text for e in salted.test}
    assert fingerprint("Hello  World") == fingerprint("hello world")
    assert fingerprint("x", salt="a") != fingerprint("x")


def test_unlabelled_examples_form_one_stratum() -> None:
    examples = [
        LabelledExample(text=f"address {i}", output={"city": "x"}, confidence=1.0)
        for i in range(50)
    ]
    split = split_examples(examples, SplitConfig(train=0.7, validation=0.1, test=0.2))
    assert split.report.sizes == {"train": 35, "validation": 5, "test": 10}
    assert set(split.report.by_label) == {"(none)"}


def test_custom_accessors() -> None:
    rows = [(f"t{i}", "a" if i % 2 else "b") for i in range(20)]
    split = split_examples(
        rows, SplitConfig(train=0.5, validation=0.0, test=0.5), text_of=lambda r: r[0],
        label_of=lambda r: r[1],
    )  # fmt: skip
    assert split.report.by_label["a"]["test"] == 5
    assert split.validation == ()


def test_check_held_out_catches_leaks() -> None:
    split = split_examples(_examples(100, 0), SplitConfig())
    check_held_out([e.text for e in split.train + split.validation], split)
    leaked = split.test[0].text.upper()
    with pytest.raises(SplitError, match="held-out test set"):
        check_held_out([e.text for e in split.train] + [leaked], split)


def test_split_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValidationError, match="must be 1"):
        SplitConfig(train=0.8, validation=0.1, test=0.2)
    with pytest.raises(ValidationError):
        SplitConfig(train=0.9, validation=0.1, test=0.0)


def test_examples_without_text_are_refused() -> None:
    with pytest.raises(SplitError, match="text_of"):
        split_examples([object()], SplitConfig())
