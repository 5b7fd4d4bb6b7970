"""The SQLite sample store on a temporary file: round trips, bounds, threads, reopening."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from distilld.store.base import (
    AlertEvent,
    CheckResult,
    SampleStore,
    StoredComparison,
    StoreError,
    TrafficSample,
)
from distilld.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "state" / "samples.db", reservoir_per_task=5)
    yield opened
    opened.close()


def comparison(task: str = "reviews", index: int = 0, **changes: object) -> StoredComparison:
    fields: dict[str, object] = {
        "task": task,
        "request_id": f"r{index}",
        "segment": {"length": "<64", "source": "app"},
        "input_text": f"review number {index} — très bien",
        "student_output": "fresh",
        "student_confidence": 0.75,
        "model_version": "v1",
        "teacher_output": "rotten",
        "teacher_confidence": 0.9,
        "teacher_probabilities": {"fresh": 0.1, "rotten": 0.9},
        "score": 0.0,
        "schema_valid": True,
        "created_at": 1000.0 + index,
    }
    fields.update(changes)
    return StoredComparison(**fields)  # type: ignore[arg-type]


def traffic(task: str, index: int) -> TrafficSample:
    return TrafficSample(
        task=task,
        input_text=f"input {index}",
        metadata={"source": "app", "n": index},
        student_output="fresh",
        student_confidence=0.5,
        request_id=f"r{index}",
        model_version="v1",
        created_at=2000.0 + index,
    )


def test_store_follows_the_protocol(store: SqliteStore) -> None:
    assert isinstance(store, SampleStore)


def test_wal_mode_and_schema_version(store: SqliteStore) -> None:
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


def test_comparisons_round_trip_and_last_n_is_oldest_first(store: SqliteStore) -> None:
    records = [comparison(index=i) for i in range(4)]
    extraction = comparison(
        index=4,
        student_output={"title": "Heat", "year": 1995},
        teacher_output=None,
        teacher_confidence=None,
        teacher_probabilities=None,
        score=None,
        schema_valid=False,
    )
    store.add_comparisons([*records, extraction])
    store.add_comparisons([comparison(task="other", index=9)])
    store.add_comparisons([])

    assert store.last_comparisons("reviews", 10) == [*records, extraction]
    last_two = store.last_comparisons("reviews", 2)
    assert [c.request_id for c in last_two] == ["r3", "r4"]
    assert last_two[1].student_output == {"title": "Heat", "year": 1995}
    assert last_two[1].teacher_output is None
    assert last_two[1].schema_valid is False
    assert store.last_comparisons("absent", 10) == []

    assert store.count_comparisons("reviews") == 5
    assert store.count_comparisons("reviews", since=1003.0) == 2
    assert store.count_comparisons("other") == 1


def test_reservoir_keeps_the_newest_samples_per_task(store: SqliteStore) -> None:
    store.add_traffic([traffic("reviews", i) for i in range(3)])
    store.add_traffic([traffic("reviews", i) for i in range(3, 12)] + [traffic("sms", 0)])
    kept = store.reservoir("reviews")
    assert [s.input_text for s in kept] == [f"input {i}" for i in range(7, 12)]
    assert kept[0].metadata == {"source": "app", "n": 7}
    assert kept[0] == traffic("reviews", 7)
    assert [s.input_text for s in store.reservoir("reviews", limit=2)] == ["input 10", "input 11"]
    assert store.reservoir("sms") == [traffic("sms", 0)]  # other tasks keep their own bound


def test_alerts_and_checks(store: SqliteStore) -> None:
    first = AlertEvent(
        task="reviews",
        kind="breach",
        metric="accuracy",
        segment={"length": "<64"},
        value=0.71,
        threshold=0.9,
        payload={"window": 1000, "interval": [0.68, 0.74]},
        created_at=10.0,
    )
    second = AlertEvent(task="sms", kind="breach", metric="drift_share", created_at=11.0)
    third = AlertEvent(task="reviews", kind="recovery", metric="accuracy", created_at=12.0)
    for event in (first, second, third):
        store.add_alert(event)
    assert store.last_alerts("reviews") == [first, third]
    assert store.last_alerts(limit=2) == [second, third]
    assert store.last_alerts("absent") == []

    assert store.last_check("reviews") is None
    store.add_check(CheckResult(task="reviews", summary={"accuracy": 0.8}, created_at=1.0))
    latest = CheckResult(task="reviews", summary={"accuracy": 0.9, "drift": {"share": 0.1}})
    store.add_check(latest)
    store.add_check(CheckResult(task="sms", summary={}))
    assert store.last_check("reviews") == latest


def test_prune_deletes_rows_older_than_the_cutoff_and_keeps_newer_ones(
    store: SqliteStore,
) -> None:
    # created_at 1000..1009 for r0..r9; cutoff 1005: r0..r4 are old.
    store.add_comparisons([comparison(index=i) for i in range(10)])
    store.add_comparisons([comparison(task="addresses", index=i) for i in range(3)])
    for at in (1000.0, 1006.0):
        store.add_alert(AlertEvent(task="reviews", kind="breach", metric="m", created_at=at))
        store.add_check(CheckResult(task="reviews", summary={"at": at}, created_at=at))

    deleted = store.prune(older_than=1005.0, keep_per_task=0)

    assert deleted == {"comparisons": 5 + 3, "alerts": 1, "checks": 1}
    assert [c.request_id for c in store.last_comparisons("reviews", 100)] == [
        f"r{i}" for i in range(5, 10)
    ]
    assert store.count_comparisons("addresses") == 0
    assert [a.created_at for a in store.last_alerts("reviews")] == [1006.0]
    assert [c.summary for c in store.checks("reviews")] == [{"at": 1006.0}]
    assert store.prune(older_than=1005.0, keep_per_task=0) == {
        "comparisons": 0,
        "alerts": 0,
        "checks": 0,
    }


def test_prune_keeps_each_tasks_newest_rows_whatever_their_age(store: SqliteStore) -> None:
    store.add_comparisons([comparison(index=i) for i in range(10)])
    store.add_comparisons([comparison(task="addresses", index=i) for i in range(3)])
    store.add_check(CheckResult(task="reviews", summary={}, created_at=1.0))

    deleted = store.prune(older_than=1_000_000.0, keep_per_task=4)  # every row is old

    assert deleted == {"comparisons": 6, "alerts": 0, "checks": 0}
    assert [c.request_id for c in store.last_comparisons("reviews", 100)] == [
        "r6",
        "r7",
        "r8",
        "r9",
    ]
    assert store.count_comparisons("addresses") == 3  # within the floor
    assert store.last_check("reviews") is not None


def test_prune_deletes_in_batches(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("distilld.store.sqlite.PRUNE_BATCH", 3)
    store.add_comparisons([comparison(index=i) for i in range(10)])
    assert store.prune(older_than=1008.0, keep_per_task=1)["comparisons"] == 8
    assert [c.request_id for c in store.last_comparisons("reviews", 100)] == ["r8", "r9"]


def test_prune_refuses_a_negative_floor(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="keep_per_task must be at least 0"):
        store.prune(older_than=0.0, keep_per_task=-1)


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    first = SqliteStore(path)
    first.add_comparisons([comparison(index=1)])
    first.close()
    again = SqliteStore(path)
    try:
        assert again.last_comparisons("reviews", 5) == [comparison(index=1)]
    finally:
        again.close()


def test_one_thread_writes_while_another_reads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "samples.db", reservoir_per_task=50)
    errors: list[BaseException] = []
    done = threading.Event()
    seen_sizes: list[int] = []

    def write() -> None:
        try:
            for i in range(300):
                store.add_comparisons([comparison(index=i)])
                store.add_traffic([traffic("reviews", i)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                window = store.last_comparisons("reviews", 100)
                # Every read sees whole records, in insertion order.
                indexes = [int(c.request_id[1:]) for c in window]
                assert indexes == sorted(indexes)
                seen_sizes.append(len(store.reservoir("reviews")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == []
        assert store.count_comparisons("reviews") == 300
        assert len(store.reservoir("reviews")) == 50
        assert all(size <= 50 for size in seen_sizes)
    finally:
        store.close()


def test_a_second_connection_reads_while_the_store_is_open(store: SqliteStore) -> None:
    # Another process (`distilld status`) opens the same file.
    store.add_comparisons([comparison(index=1)])
    reader = SqliteStore(store.path)
    try:
        assert reader.count_comparisons("reviews") == 1
        store.add_comparisons([comparison(index=2)])
        assert reader.count_comparisons("reviews") == 2
    finally:
        reader.close()


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    closed = SqliteStore(tmp_path / "samples.db")
    closed.close()
    closed.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        closed.last_comparisons("reviews", 1)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(path)


def test_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StoreError, match="cannot open the sample store"):
        SqliteStore(not_a_dir / "samples.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the sample store"):
        SqliteStore(garbage)
