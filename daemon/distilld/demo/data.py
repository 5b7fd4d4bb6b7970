"""Rotten Tomatoes rows (fresh / rotten reviews and plot summaries) as requests,
and the populations of the closed-loop demo."""

from __future__ import annotations

import bz2
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from distilld import assets

LABELS = ["fresh", "rotten"]


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    category: str  # fresh, rotten or plot

    @property
    def label(self) -> str | None:
        return self.category if self.category in LABELS else None


def load_rows(path: Path | None = None) -> list[Row]:
    """Every row, in file order, with a stable id (``rt-<line number>``)."""
    source = path or assets.rotten_tomatoes_csv()
    with bz2.open(source, "rt", encoding="utf-8", newline="") as handle:
        return [
            Row(id=f"rt-{i:05d}", text=record.get("text") or "", category=record["category"])
            for i, record in enumerate(csv.DictReader(handle))
        ]


@dataclass(frozen=True)
class DemoSplit:
    train: list[Row]  # gold-labelled reviews the quick-start student learns from
    traffic: list[Row]  # what is replayed through the daemon (reviews and plot summaries)


def split_rows(rows: list[Row], train_size: int, traffic_size: int, seed: int = 7) -> DemoSplit:
    """Disjoint train and traffic sets; traffic keeps the file's share of plot summaries."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    reviews = [r for r in shuffled if r.label is not None and r.text.strip()]
    train = reviews[:train_size]
    taken = {r.id for r in train}
    traffic = [r for r in shuffled if r.id not in taken][:traffic_size]
    return DemoSplit(train=train, traffic=traffic)


@dataclass(frozen=True)
class LoopData:
    """The closed-loop demo's data, every part disjoint from the others.

    ``teacher_train``: gold-labelled reviews the demo teacher learns from.
    ``student_train``: reviews of the first population (mostly fresh) that the
    teacher labels for the first student. ``before`` and ``after``: the
    traffic before and after the population shift (mostly fresh, then mostly
    rotten), never trained on by the first student or the teacher.
    """

    teacher_train: list[Row]
    student_train: list[Row]
    before: list[Row]
    after: list[Row]


def mixed(fresh: list[Row], rotten: list[Row], size: int, fresh_share: float) -> list[Row]:
    """``size`` rows, ``fresh_share`` of them fresh (rounded down), taken from the front
    of each list (which the caller then drops), interleaved evenly."""
    n_fresh = min(len(fresh), int(size * fresh_share))
    n_rotten = min(len(rotten), size - n_fresh)
    picked = fresh[:n_fresh] + rotten[:n_rotten]
    random.Random(size).shuffle(picked)
    return picked


def loop_data(
    rows: list[Row],
    *,
    teacher_size: int,
    student_size: int,
    before_size: int,
    after_size: int,
    before_fresh_share: float,
    after_fresh_share: float,
    seed: int = 7,
) -> LoopData:
    """Split the reviews into the demo's disjoint parts (see :class:`LoopData`)."""
    reviews = [r for r in rows if r.label is not None and r.text.strip()]
    random.Random(seed).shuffle(reviews)
    teacher_train, rest = reviews[:teacher_size], reviews[teacher_size:]
    fresh = [r for r in rest if r.label == "fresh"]
    rotten = [r for r in rest if r.label == "rotten"]
    parts: list[list[Row]] = []
    for size, share in (
        (student_size, before_fresh_share),
        (before_size, before_fresh_share),
        (after_size, after_fresh_share),
    ):
        part = mixed(fresh, rotten, size, share)
        taken = {r.id for r in part}
        fresh = [r for r in fresh if r.id not in taken]
        rotten = [r for r in rotten if r.id not in taken]
        parts.append(part)
    return LoopData(teacher_train, parts[0], parts[1], parts[2])


def request_line(row: Row, task: str) -> bytes:
    segment = "plot" if row.category == "plot" else "review"
    doc = {"id": row.id, "task": task, "input": row.text, "metadata": {"kind": segment}}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def malformed_lines(task: str, max_input_chars: int) -> list[bytes]:
    """A few broken records mixed into the demo traffic, to show the dead-letter path."""
    return [
        b"{not json",
        b"\xff\xfe broken bytes",
        json.dumps({"id": "bad-missing-input", "task": task}).encode(),
        json.dumps({"id": "bad-type", "task": task, "input": 42}).encode(),
        json.dumps({"id": "bad-task", "task": "no-such-task", "input": "hello"}).encode(),
        json.dumps({"id": "bad-size", "task": task, "input": "x" * (max_input_chars + 1)}).encode(),
    ]
