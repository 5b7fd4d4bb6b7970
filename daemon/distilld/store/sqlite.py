"""The sample store on SQLite: one file, no server (the default).

One connection, shared by every thread behind a lock: writes are small and
come from one background worker, so serialising them costs little, and a
lock is easier to reason about than a connection per thread. The database
runs in WAL mode, so another process (``distilld status``, a second
replica) reads while the daemon writes, and a crash never leaves a
half-written transaction.

Outputs (a label or a JSON object), segments, metadata and payloads are
stored as JSON text. The schema is created on open; ``PRAGMA user_version``
records its version so a newer file is refused instead of misread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distilld.store.base import (
    AlertEvent,
    CheckResult,
    Output,
    StoredComparison,
    StoreError,
    TrafficSample,
)

SCHEMA_VERSION = 1
DEFAULT_RESERVOIR_PER_TASK = 20_000
#: The tables :meth:`SqliteStore.prune` trims by age.
PRUNED_TABLES = ("comparisons", "alerts", "checks")
#: Rows deleted per transaction when pruning: the lock is released between batches,
#: so a first sweep over months of rows does not hold up the shadow worker.
PRUNE_BATCH = 5_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    request_id TEXT NOT NULL,
    segment TEXT NOT NULL,
    input_text TEXT NOT NULL,
    student_output TEXT NOT NULL,
    student_confidence REAL NOT NULL,
    model_version TEXT NOT NULL,
    teacher_output TEXT,
    teacher_confidence REAL,
    teacher_probabilities TEXT,
    score REAL,
    schema_valid INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_by_task ON comparisons (task, id);
CREATE INDEX IF NOT EXISTS comparisons_by_time ON comparisons (task, created_at);

CREATE TABLE IF NOT EXISTS traffic (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    request_id TEXT,
    input_text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    student_output TEXT NOT NULL,
    student_confidence REAL NOT NULL,
    model_version TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS traffic_by_task ON traffic (task, id);

CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    metric TEXT NOT NULL,
    segment TEXT,
    value REAL,
    threshold REAL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_task ON alerts (task, id);

CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    summary TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checks_by_task ON checks (task, id);
"""


def _dump(value: Any) -> str:
    # sort_keys: equal segments are equal strings (SQL can group by them).
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _dump_optional(value: Any) -> str | None:
    return None if value is None else _dump(value)


def _load_optional(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class SqliteStore:
    """A :class:`~distilld.store.base.SampleStore` in one SQLite file."""

    def __init__(
        self, path: Path | str, *, reservoir_per_task: int = DEFAULT_RESERVOIR_PER_TASK
    ) -> None:
        if reservoir_per_task < 1:
            raise ValueError(
                f"reservoir_per_task must be at least 1 (received {reservoir_per_task})"
            )
        self.path = Path(path)
        self.reservoir_per_task = reservoir_per_task
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; _write opens its own.
            # check_same_thread=False: the lock, not the creating thread, guards it.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a crash of the process in WAL mode; only
            # a power loss may drop the last transactions, which are samples.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._create_schema(self._conn)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the sample store {self.path}: {type(exc).__name__}: {exc}; "
                "check that the directory exists and is writable (DISTILLD_STATE_DIR), and "
                "that the file is a distilld SQLite store"
            ) from exc

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the sample store {self.path} has schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this distilld understands; run the newer distilld, or point "
                "the daemon at another state directory"
            )
        conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"the sample store {self.path} is closed")
            cursor = self._conn.cursor()
            try:
                if write:
                    # IMMEDIATE takes the write lock now: another process writing
                    # makes us wait (busy timeout) instead of failing mid-transaction.
                    cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield cursor
                except BaseException:
                    if write:
                        cursor.execute("ROLLBACK")
                    raise
                if write:
                    cursor.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"sample store {self.path}: {type(exc).__name__}: {exc}") from exc
            finally:
                cursor.close()

    # -- comparisons ----------------------------------------------------------------

    def add_comparisons(self, records: Sequence[StoredComparison]) -> None:
        rows = [
            (
                r.task,
                r.request_id,
                _dump(r.segment),
                r.input_text,
                _dump(r.student_output),
                r.student_confidence,
                r.model_version,
                _dump_optional(r.teacher_output),
                r.teacher_confidence,
                _dump_optional(r.teacher_probabilities),
                r.score,
                int(r.schema_valid),
                r.created_at,
            )
            for r in records
        ]
        if not rows:
            return
        with self._cursor(write=True) as cursor:
            cursor.executemany(
                "INSERT INTO comparisons (task, request_id, segment, input_text, student_output, "
                "student_confidence, model_version, teacher_output, teacher_confidence, "
                "teacher_probabilities, score, schema_valid, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def last_comparisons(self, task: str, limit: int) -> list[StoredComparison]:
        with self._cursor(write=False) as cursor:
            rows = cursor.execute(
                "SELECT task, request_id, segment, input_text, student_output, "
                "student_confidence, model_version, teacher_output, teacher_confidence, "
                "teacher_probabilities, score, schema_valid, created_at "
                "FROM comparisons WHERE task = ? ORDER BY id DESC LIMIT ?",
                (task, limit),
            ).fetchall()
        return [
            StoredComparison(
                task=row[0],
                request_id=row[1],
                segment=json.loads(row[2]),
                input_text=row[3],
                student_output=_output(row[4]),
                student_confidence=row[5],
                model_version=row[6],
                teacher_output=_load_optional(row[7]),
                teacher_confidence=row[8],
                teacher_probabilities=_load_optional(row[9]),
                score=row[10],
                schema_valid=bool(row[11]),
                created_at=row[12],
            )
            for row in reversed(rows)
        ]

    def count_comparisons(self, task: str, since: float | None = None) -> int:
        with self._cursor(write=False) as cursor:
            if since is None:
                row = cursor.execute(
                    "SELECT COUNT(*) FROM comparisons WHERE task = ?", (task,)
                ).fetchone()
            else:
                row = cursor.execute(
                    "SELECT COUNT(*) FROM comparisons WHERE task = ? AND created_at >= ?",
                    (task, since),
                ).fetchone()
        return int(row[0])

    # -- traffic reservoir ----------------------------------------------------------

    def add_traffic(self, samples: Sequence[TrafficSample]) -> None:
        if not samples:
            return
        rows = [
            (
                s.task,
                s.request_id,
                s.input_text,
                _dump(s.metadata),
                _dump(s.student_output),
                s.student_confidence,
                s.model_version,
                s.created_at,
            )
            for s in samples
        ]
        tasks = sorted({s.task for s in samples})
        with self._cursor(write=True) as cursor:
            cursor.executemany(
                "INSERT INTO traffic (task, request_id, input_text, metadata, student_output, "
                "student_confidence, model_version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # Keep the newest reservoir_per_task rows of each task: delete every
            # row at or below the id of the first row past the bound.
            for task in tasks:
                cursor.execute(
                    "DELETE FROM traffic WHERE task = ? AND id <= ("
                    "SELECT id FROM traffic WHERE task = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (task, task, self.reservoir_per_task),
                )

    def reservoir(self, task: str, limit: int | None = None) -> list[TrafficSample]:
        with self._cursor(write=False) as cursor:
            rows = cursor.execute(
                "SELECT task, request_id, input_text, metadata, student_output, "
                "student_confidence, model_version, created_at "
                "FROM traffic WHERE task = ? ORDER BY id DESC LIMIT ?",
                (task, -1 if limit is None else limit),  # LIMIT -1: no limit
            ).fetchall()
        return [
            TrafficSample(
                task=row[0],
                request_id=row[1],
                input_text=row[2],
                metadata=json.loads(row[3]),
                student_output=_output(row[4]),
                student_confidence=row[5],
                model_version=row[6],
                created_at=row[7],
            )
            for row in reversed(rows)
        ]

    # -- alerts and checks ----------------------------------------------------------

    def add_alert(self, event: AlertEvent) -> None:
        with self._cursor(write=True) as cursor:
            cursor.execute(
                "INSERT INTO alerts (task, kind, metric, segment, value, threshold, payload, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.task,
                    event.kind,
                    event.metric,
                    _dump_optional(event.segment),
                    event.value,
                    event.threshold,
                    _dump(event.payload),
                    event.created_at,
                ),
            )

    def last_alerts(self, task: str | None = None, limit: int = 20) -> list[AlertEvent]:
        columns = "task, kind, metric, segment, value, threshold, payload, created_at"
        with self._cursor(write=False) as cursor:
            if task is None:
                rows = cursor.execute(
                    f"SELECT {columns} FROM alerts ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = cursor.execute(
                    f"SELECT {columns} FROM alerts WHERE task = ? ORDER BY id DESC LIMIT ?",
                    (task, limit),
                ).fetchall()
        return [
            AlertEvent(
                task=row[0],
                kind=row[1],
                metric=row[2],
                segment=_load_optional(row[3]),
                value=row[4],
                threshold=row[5],
                payload=json.loads(row[6]),
                created_at=row[7],
            )
            for row in reversed(rows)
        ]

    def add_check(self, result: CheckResult) -> None:
        with self._cursor(write=True) as cursor:
            cursor.execute(
                "INSERT INTO checks (task, summary, created_at) VALUES (?, ?, ?)",
                (result.task, _dump(result.summary), result.created_at),
            )

    def last_check(self, task: str) -> CheckResult | None:
        with self._cursor(write=False) as cursor:
            row = cursor.execute(
                "SELECT task, summary, created_at FROM checks WHERE task = ? "
                "ORDER BY id DESC LIMIT 1",
                (task,),
            ).fetchone()
        if row is None:
            return None
        return CheckResult(task=row[0], summary=json.loads(row[1]), created_at=row[2])

    def checks(self, task: str, limit: int = 500) -> list[CheckResult]:
        with self._cursor(write=False) as cursor:
            rows = cursor.execute(
                "SELECT task, summary, created_at FROM checks WHERE task = ? "
                "ORDER BY id DESC LIMIT ?",
                (task, limit),
            ).fetchall()
        return [
            CheckResult(task=row[0], summary=json.loads(row[1]), created_at=row[2])
            for row in reversed(rows)
        ]

    # -- retention ------------------------------------------------------------------

    def prune(self, older_than: float, keep_per_task: int) -> dict[str, int]:
        if keep_per_task < 0:
            raise ValueError(f"keep_per_task must be at least 0 (received {keep_per_task})")
        deleted: dict[str, int] = {}
        for table in PRUNED_TABLES:
            with self._cursor(write=False) as cursor:
                tasks = [row[0] for row in cursor.execute(f"SELECT DISTINCT task FROM {table}")]
            total = 0
            for task in tasks:
                while True:
                    # Old enough, and not among the task's newest keep_per_task rows (ids
                    # grow with insertion): the id bound is NULL, so nothing goes, when the
                    # task has no more than keep_per_task rows.
                    with self._cursor(write=True) as cursor:
                        cursor.execute(
                            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "
                            "WHERE task = ? AND created_at < ? AND id <= COALESCE(("
                            f"SELECT id FROM {table} WHERE task = ? ORDER BY id DESC "
                            "LIMIT 1 OFFSET ?), -1) ORDER BY id LIMIT ?)",
                            (task, older_than, task, keep_per_task, PRUNE_BATCH),
                        )
                        count = cursor.rowcount
                    total += count
                    if count < PRUNE_BATCH:
                        break
            deleted[table] = total
        return deleted

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _output(text: str) -> Output:
    value = json.loads(text)
    if not isinstance(value, str | dict):
        raise StoreError(
            f"a stored output is a {type(value).__name__}, expected a label (string) or a JSON "
            "object; the store file was written by something else than distilld"
        )
    return value
