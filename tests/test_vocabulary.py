"""The domain's words, declared once in distilld/vocabulary.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from distilld.teacher.resilience import Backoff
from distilld.vocabulary import (
    LENGTH_SEGMENT_KEY,
    OTHER_SEGMENT_VALUE,
    OVERALL,
    TASK_KINDS,
    TaskKind,
    backoff_ceiling,
    joined_segment_label,
    length_bucket,
    segment_key,
    segment_label,
    split_segment_label,
)

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "distilld"


def test_task_kinds() -> None:
    assert TASK_KINDS == ("classification", "extraction", "generation")
    assert [TaskKind(name) for name in TASK_KINDS] == list(TaskKind)
    assert TaskKind.classification == "classification"  # a str: usable as a dict key


def test_segment_labels() -> None:
    assert segment_label("source", "app") == "source=app"
    assert segment_label("kind", "a=b") == "kind=a=b"  # a value may hold "="
    assert split_segment_label("kind=a=b") == ("kind", "a=b")
    assert split_segment_label("length=") == ("length", "")
    assert split_segment_label("no-separator") is None
    assert split_segment_label("=value") is None
    assert segment_key("kind=a=b") == "kind"
    assert segment_key(segment_label(LENGTH_SEGMENT_KEY, OTHER_SEGMENT_VALUE)) == "length"
    assert OVERALL == "all"
    # Sorted by key (not by label: "a-b=2" sorts before "a=1" as a string).
    assert joined_segment_label({"a-b": "2", "a": "1"}) == "a=1,a-b=2"
    assert joined_segment_label({}) == ""


def test_length_bucket() -> None:
    assert [length_bucket(n, [10, 100]) for n in (0, 9, 10, 99, 100, 5000)] == [
        "<10",
        "<10",
        "10-99",
        "10-99",
        ">=100",
        ">=100",
    ]


def test_backoff_ceiling_doubles_up_to_the_maximum() -> None:
    assert [backoff_ceiling(a, 0.5, 30.0) for a in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert backoff_ceiling(-1, 2.0, 60.0) == 2.0  # "no earlier error" waits the first step
    assert backoff_ceiling(10_000, 1.0, 30.0) == 30.0  # no float overflow
    assert Backoff(0.5, 30.0).ceiling(3) == backoff_ceiling(3, 0.5, 30.0)


def test_the_vocabulary_imports_nothing_of_distilld() -> None:
    tree = ast.parse((PACKAGE / "vocabulary.py").read_text(encoding="utf-8"))
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("distilld")]


# A second declaration of the task kinds: an enum or a Literal of their names, or a
# tuple of them (the names may be listed in prose, and used one at a time).
_REDECLARED = re.compile(
    r"class TaskKind\b|Literal\[\s*\"classification\",\s*\"extraction\",\s*\"generation\"|"
    r"\(\s*\"classification\",\s*\"extraction\",\s*\"generation\"\s*\)"
)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_the_task_kinds_are_declared_only_in_the_vocabulary(path: Path) -> None:
    if path.name == "vocabulary.py" and path.parent == PACKAGE:
        return
    found = _REDECLARED.findall(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(PACKAGE)} declares the task kinds again: {found}"
