"""Alert history and run state in SQLite under the data directory.

Durability: WAL journal with ``synchronous=FULL``: every `record` is one committed
transaction, fsynced before it returns, so an alert the collector has logged or served
survives ``kill -9`` and power loss. Writes happen on the event loop thread: they are rare
(an alert fires once per condition, not per step), one row each, and a commit costs one
fsync of the WAL (well under a millisecond on SSDs, a few ms on spinning disks).
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

DB_NAME = "history.sqlite3"

EventType = Literal["fired", "resolved", "action", "ack"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    time     REAL    NOT NULL,
    run      TEXT    NOT NULL,
    event    TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    severity TEXT    NOT NULL,
    step     INTEGER,
    layer    TEXT,
    message  TEXT    NOT NULL,
    action   TEXT,
    action_id TEXT,
    outcome  TEXT,
    rank     INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run, id);
CREATE TABLE IF NOT EXISTS runs (
    name      TEXT PRIMARY KEY,
    status    TEXT NOT NULL,
    started   REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_step INTEGER NOT NULL,
    world_size INTEGER NOT NULL
);
"""

# Columns of `events` added after the first release, added where missing: to a fresh
# database right after _SCHEMA and to the history of an older collector alike, whose rows
# then read as the default.
_ADDED_COLUMNS = {
    "hint": "TEXT NOT NULL DEFAULT ''",
}


class HistoryError(RuntimeError):
    """The data directory cannot be used; the message says which and why."""


@dataclass(frozen=True)
class HistoryEntry:
    """One line of /api/alerts. `kind` is the alert kind; for action and ack entries it is
    the alert that caused the action, and `action` / `outcome` say what was done."""

    run: str
    event: EventType
    kind: str
    severity: str
    step: int | None
    layer: str | None
    message: str
    time: float
    hint: str = ""  # what to try; only fired alerts have one
    action: str | None = None
    action_id: str | None = None
    outcome: str | None = None
    rank: int | None = None
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunRecord:
    name: str
    status: str
    started: float
    last_seen: float
    last_step: int
    world_size: int


_COLUMNS = [f for f in HistoryEntry.__dataclass_fields__ if f != "id"]


class History:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        try:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
            self._db.execute("PRAGMA quick_check").fetchone()
        except (OSError, sqlite3.Error) as err:
            raise HistoryError(f"cannot use data directory {data_dir}: {_explain(err)}") from None

    def _add_missing_columns(self) -> None:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE events ADD COLUMN {column} {definition}")

    def record(self, entry: HistoryEntry) -> HistoryEntry:
        values = [getattr(entry, c) for c in _COLUMNS]
        cursor = self._db.execute(
            f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )
        return HistoryEntry(**{**asdict(entry), "id": cursor.lastrowid})

    def entries(self, run: str | None = None, after_id: int = 0, limit: int = 10_000) -> list[HistoryEntry]:
        """Oldest first; `after_id` pages forward from an entry's id."""
        where, params = "id > ?", [after_id]
        if run is not None:
            where += " AND run = ?"
            params.append(run)  # type: ignore[arg-type]
        rows = self._db.execute(
            f"SELECT id, {', '.join(_COLUMNS)} FROM events WHERE {where} ORDER BY id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [HistoryEntry(id=row[0], **dict(zip(_COLUMNS, row[1:]))) for row in rows]

    def save_runs(self, runs: list[RunRecord]) -> None:
        """Upsert in one transaction (one fsync however many runs)."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                [(r.name, r.status, r.started, r.last_seen, r.last_step, r.world_size) for r in runs],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def load_runs(self) -> list[RunRecord]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY started").fetchall()
        return [RunRecord(*row) for row in rows]

    def delete_runs(self, names: list[str]) -> None:
        self._db.executemany("DELETE FROM runs WHERE name = ?", [(n,) for n in names])

    def close(self) -> None:
        self._db.close()


def _explain(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, sqlite3.DatabaseError) and "not a database" in text:
        return f"{DB_NAME} is corrupt or not a gradwatch history ({text}); move it aside to start afresh"
    if "readonly" in text or "unable to open" in text or isinstance(err, PermissionError):
        return f"not writable ({text}); check its permissions or pass another --data DIR"
    return text

