"""The registry database as one SQLite file: the embedded default (one machine).

WAL journal, so readers never wait for a writer; a busy timeout, so writers queue instead of
failing; every write transaction begun IMMEDIATE, so two writers never both read then both write
(which is why this engine needs no row locks: `for_update` and `skip_locked` are empty). Each call
opens its own connection and closes it: safe across threads and forked workers, and the cost
(~0.1 ms) is paid only on review and job routes, never on /predict. The file must not sit on a
network file system, whose locking SQLite cannot trust: replicas on several machines use PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000

# The schema's versions, in order (registry/store.py applies the ones a database lacks); the same
# numbers as postgres_engine.MIGRATIONS, each the same change in this dialect.
MIGRATIONS: tuple[tuple[str | Callable, ...], ...] = (
    # 1: the tables. IF NOT EXISTS, and jobs.reason added when missing: a database written before the
    # schema had versions (by an older protoserve) is adopted as it is.
    ("""CREATE TABLE IF NOT EXISTS versions (
        version     TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        family      TEXT NOT NULL,
        bundle      TEXT NOT NULL,
        checkpoint  TEXT,
        parent      TEXT REFERENCES versions(version),
        status      TEXT NOT NULL,
        lineage     TEXT,
        metrics     TEXT,
        job_id      INTEGER,
        created_at  TEXT NOT NULL)""",
     """CREATE TABLE IF NOT EXISTS active (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     TEXT REFERENCES versions(version),
        previous    TEXT REFERENCES versions(version),
        generation  INTEGER NOT NULL,
        changed_at  TEXT)""",
     "INSERT OR IGNORE INTO active (id, version, previous, generation) VALUES (1, NULL, NULL, 0)",
     """CREATE TABLE IF NOT EXISTS shadow (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     TEXT REFERENCES versions(version),
        sample      REAL NOT NULL,
        started_at  TEXT,
        actor       TEXT)""",
     "INSERT OR IGNORE INTO shadow (id, version, sample) VALUES (1, NULL, 0)",
     """CREATE TABLE IF NOT EXISTS changes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        action      TEXT NOT NULL,
        version     TEXT NOT NULL,
        replaced    TEXT,
        generation  INTEGER NOT NULL,
        actor       TEXT,
        at          TEXT NOT NULL)""",
     """CREATE TABLE IF NOT EXISTS verdicts (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        version      TEXT NOT NULL REFERENCES versions(version),
        prototype_id INTEGER NOT NULL,
        verdict      TEXT NOT NULL,
        round        INTEGER NOT NULL,
        source       TEXT NOT NULL,
        at           TEXT NOT NULL,
        note         TEXT,
        withdrawn_at TEXT,
        job_id       INTEGER)""",
     "CREATE INDEX IF NOT EXISTS verdicts_by_version ON verdicts (version, prototype_id)",
     """CREATE TABLE IF NOT EXISTS jobs (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        parent       TEXT NOT NULL REFERENCES versions(version),
        settings     TEXT NOT NULL,
        status       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        worker       TEXT,
        lease_until  REAL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        progress     TEXT,
        log          TEXT NOT NULL DEFAULT '',
        result       TEXT,
        error        TEXT,
        reason       TEXT,
        finished_at  TEXT)""",
     lambda db: _add_column(db, "jobs", "reason", "TEXT")),
)


class SQLiteEngine:
    """Connections to the registry file at `path`."""

    for_update = ""  # every write transaction holds the database's one write lock already
    skip_locked = ""
    migrations = MIGRATIONS
    pushes_switches = False  # followers poll the generation counter

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA synchronous=FULL")  # a verdict acknowledged is on disk, WAL included
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, begun IMMEDIATE (takes the write lock before reading)."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def migrate(self, apply: Callable[[sqlite3.Connection], None]) -> None:
        """Run `apply` (registry/store.py's migration step) in one write transaction; on every open."""
        with self.write() as db:
            apply(db)

    def notify(self, db: sqlite3.Connection, channel: str, payload: str) -> None:
        """No push on SQLite: followers poll the generation counter."""

    def listen(self, channels: dict[str, Callable[[str], None]], stop) -> None:
        """Returns at once: nothing is pushed (pushes_switches is False)."""

    def close(self) -> None:
        """Nothing held between calls."""


def _add_column(db: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    """Add a column a database created by an older protoserve lacks (a no-op when it has it)."""
    if column not in [row[1] for row in db.execute(f"PRAGMA table_info({table})")]:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
