"""The registry's database: the only module that speaks SQL.

One SQLite file (WAL journal, so readers never wait for a writer; a busy timeout, so writers queue
instead of failing; every write transaction begun IMMEDIATE, so two writers never both read then
both write) holds:

    versions   immutable bundle versions: bundle and checkpoint paths, parent, lineage, status
    active     one row: the active version, the previous one and a generation counter that every
               promote and rollback increments (service workers poll it to follow the active model)
    changes    every promote and rollback, in order (who, when, from, to)
    shadow     one row: the version run beside the active one on a sample of live traffic (or none), the
               share sampled; promoting that version ends it
    verdicts   verdicts on prototypes (protoserve/verdicts.py's format) with the version they were
               given on; withdrawn ones keep their row with withdrawn_at set
    jobs       revision jobs: queued -> running (a worker holds a lease it renews) -> done | failed;
               a failed one keeps its technical `error` and the sentence a reviewer reads, `reason`

Each call opens its own connection and closes it: safe across threads and forked workers, and the
cost (~0.1 ms) is paid only on review and job routes, never on /predict. Switching to PostgreSQL
means this module only: the SQL is plain (no SQLite functions), IMMEDIATE becomes
`SELECT ... FOR UPDATE` on the active row and `SKIP LOCKED` in claim_job.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from protoserve.errors import ProtoserveError
from protoserve.job_failures import failure_reason
from protoserve.revision_settings import QueuedRevision, RevisionSettings
from protoserve.verdicts import Verdict

DB_FILE = "registry.sqlite"
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
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
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS active (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    version     TEXT REFERENCES versions(version),
    previous    TEXT REFERENCES versions(version),
    generation  INTEGER NOT NULL,
    changed_at  TEXT
);
INSERT OR IGNORE INTO active (id, version, previous, generation) VALUES (1, NULL, NULL, 0);
CREATE TABLE IF NOT EXISTS shadow (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    version     TEXT REFERENCES versions(version),
    sample      REAL NOT NULL,
    started_at  TEXT,
    actor       TEXT
);
INSERT OR IGNORE INTO shadow (id, version, sample) VALUES (1, NULL, 0);
CREATE TABLE IF NOT EXISTS changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    action      TEXT NOT NULL,
    version     TEXT NOT NULL,
    replaced    TEXT,
    generation  INTEGER NOT NULL,
    actor       TEXT,
    at          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    version      TEXT NOT NULL REFERENCES versions(version),
    prototype_id INTEGER NOT NULL,
    verdict      TEXT NOT NULL,
    round        INTEGER NOT NULL,
    source       TEXT NOT NULL,
    at           TEXT NOT NULL,
    note         TEXT,
    withdrawn_at TEXT,
    job_id       INTEGER
);
CREATE INDEX IF NOT EXISTS verdicts_by_version ON verdicts (version, prototype_id);
CREATE TABLE IF NOT EXISTS jobs (
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
    finished_at  TEXT
);
"""
# Columns added since a table was first created: (table, column, type), added to an older database on open.
ADDED_COLUMNS = (("jobs", "reason", "TEXT"),)

LOG_TAIL_CHARS = 8_000
MAX_ATTEMPTS = 2  # a job whose worker died twice is failed, not retried forever


class RegistryError(ProtoserveError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class VersionRow:
    version: str
    name: str
    family: str
    bundle: str
    checkpoint: str | None
    parent: str | None
    status: str
    lineage: dict | None
    metrics: dict | None
    job_id: int | None
    created_at: str

    def public(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Active:
    version: str | None
    previous: str | None
    generation: int
    changed_at: str | None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Store:
    """The registry database at `path` (created with its schema on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            db.executescript(SCHEMA)
            for table, column, kind in ADDED_COLUMNS:
                _add_column(db, table, column, kind)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
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
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, begun IMMEDIATE (takes the write lock before reading)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- versions ----------------------------------------------------------------------------
    def add_version(self, version: str, name: str, family: str, bundle: str, checkpoint: str | None,
                    parent: str | None, status: str, lineage: dict | None = None, metrics: dict | None = None,
                    job_id: int | None = None) -> VersionRow:
        with self._write() as db:
            if db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone():
                raise RegistryError(f"version {version!r} is registered already (versions are immutable)")
            if parent is not None and not db.execute("SELECT 1 FROM versions WHERE version = ?",
                                                     (parent,)).fetchone():
                raise RegistryError(f"parent version {parent!r} is not registered")
            db.execute("INSERT INTO versions (version, name, family, bundle, checkpoint, parent, status, lineage, "
                       "metrics, job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (version, name, family, bundle, checkpoint, parent, status, _dump(lineage), _dump(metrics),
                        job_id, now()))
        return self.version(version)

    def version(self, version: str) -> VersionRow:
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise RegistryError(f"version {version!r} is not registered")
        return _version_row(row)

    def versions(self) -> list[VersionRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM versions ORDER BY created_at, version").fetchall()
        return [_version_row(r) for r in rows]

    def lineage(self, version: str) -> list[VersionRow]:
        """The version, its parent, its parent's parent, ... up to a version with no parent."""
        chain, seen = [], set()
        current: str | None = version
        while current is not None and current not in seen:
            seen.add(current)
            row = self.version(current)
            chain.append(row)
            current = row.parent
        return chain

    # -- the active version ------------------------------------------------------------------
    def active(self) -> Active:
        with self._connect() as db:
            row = db.execute("SELECT version, previous, generation, changed_at FROM active WHERE id = 1").fetchone()
        return Active(row["version"], row["previous"], row["generation"], row["changed_at"])

    def generation(self) -> tuple[int, str | None]:
        """(generation, active version): what a service worker polls."""
        with self._connect() as db:
            row = db.execute("SELECT generation, version FROM active WHERE id = 1").fetchone()
        return row["generation"], row["version"]

    def activate(self, version: str, actor: str | None = None, expect_generation: int | None = None) -> Active:
        """Promote: `version` becomes active, the active one becomes previous; one transaction."""
        with self._write() as db:
            current = db.execute("SELECT version, generation FROM active WHERE id = 1").fetchone()
            if expect_generation is not None and current["generation"] != expect_generation:
                raise RegistryError(f"the active version changed meanwhile (generation {current['generation']}, "
                                    f"expected {expect_generation}); look again and retry")
            if not db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone():
                raise RegistryError(f"version {version!r} is not registered")
            if current["version"] == version:
                raise RegistryError(f"version {version!r} is active already")
            self._switch(db, "promote", version, current["version"], current["generation"] + 1, actor)
            db.execute("UPDATE versions SET status = 'released' WHERE version = ? AND status = 'candidate'",
                       (version,))
        return self.active()

    def roll_back(self, actor: str | None = None, expect_previous: str | None = None) -> Active:
        """Rollback: the previous version becomes active again (and the active one its previous)."""
        with self._write() as db:
            current = db.execute("SELECT version, previous, generation FROM active WHERE id = 1").fetchone()
            if current["previous"] is None:
                raise RegistryError("nothing to roll back to: no previous version")
            if expect_previous is not None and current["previous"] != expect_previous:
                raise RegistryError(f"the previous version changed meanwhile ({current['previous']}, expected "
                                    f"{expect_previous}); look again and retry")
            self._switch(db, "rollback", current["previous"], current["version"], current["generation"] + 1, actor)
        return self.active()

    def _switch(self, db, action: str, version: str, replaced: str | None, generation: int, actor) -> None:
        at = now()
        # The shadow was a trial of the version now active: it has nothing left to compare.
        db.execute("UPDATE shadow SET version = NULL, sample = 0, started_at = ?, actor = ? WHERE id = 1 AND "
                   "version = ?", (at, actor, version))
        db.execute("UPDATE active SET version = ?, previous = ?, generation = ?, changed_at = ? WHERE id = 1",
                   (version, replaced, generation, at))
        db.execute("INSERT INTO changes (action, version, replaced, generation, actor, at) VALUES (?, ?, ?, ?, ?, ?)",
                   (action, version, replaced, generation, actor, at))

    # -- shadow ------------------------------------------------------------------------------
    def shadow(self) -> tuple[str | None, float, str | None]:
        """(version, sample, started_at) of the shadow; version None: no shadow. What service workers poll."""
        with self._connect() as db:
            row = db.execute("SELECT version, sample, started_at FROM shadow WHERE id = 1").fetchone()
        return row["version"], row["sample"], row["started_at"]

    def start_shadow(self, version: str, sample: float, actor: str | None = None) -> tuple[str | None, float, str]:
        """Run `version` as the shadow on `sample` (0 to 1] of the requests; it replaces any other shadow."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone():
                raise RegistryError(f"version {version!r} is not registered")
            active = db.execute("SELECT version FROM active WHERE id = 1").fetchone()["version"]
            if active == version:
                raise RegistryError(f"version {version!r} is the active one: a shadow is a version beside it")
            db.execute("UPDATE shadow SET version = ?, sample = ?, started_at = ?, actor = ? WHERE id = 1",
                       (version, sample, now(), actor))
        return self.shadow()

    def end_shadow(self, actor: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE shadow SET version = NULL, sample = 0, started_at = ?, actor = ? WHERE id = 1",
                       (now(), actor))

    def changes(self) -> list[dict]:
        with self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM changes ORDER BY id").fetchall()]

    # -- verdicts ----------------------------------------------------------------------------
    def add_verdict(self, version: str, v: Verdict) -> dict:
        """Record one verdict on `version`; returns it with its id once committed (durable)."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone():
                raise RegistryError(f"version {version!r} is not registered")
            cursor = db.execute("INSERT INTO verdicts (version, prototype_id, verdict, round, source, at, note) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (version, v.prototype_id, v.verdict, v.round, v.source, v.at, v.note))
            verdict_id = cursor.lastrowid
        return self.verdict(verdict_id)

    def withdraw_verdict(self, verdict_id: int) -> dict:
        with self._write() as db:
            row = db.execute("SELECT withdrawn_at, job_id FROM verdicts WHERE id = ?", (verdict_id,)).fetchone()
            if row is None:
                raise RegistryError(f"verdict {verdict_id} does not exist")
            if row["withdrawn_at"] is not None:
                raise RegistryError(f"verdict {verdict_id} is withdrawn already")
            if row["job_id"] is not None:
                raise RegistryError(f"verdict {verdict_id} was used by revision job {row['job_id']}; it stays")
            db.execute("UPDATE verdicts SET withdrawn_at = ? WHERE id = ?", (now(), verdict_id))
        return self.verdict(verdict_id)

    def verdict(self, verdict_id: int) -> dict:
        with self._connect() as db:
            row = db.execute("SELECT * FROM verdicts WHERE id = ?", (verdict_id,)).fetchone()
        if row is None:
            raise RegistryError(f"verdict {verdict_id} does not exist")
        return dict(row)

    def verdicts(self, version: str | None = None, include_withdrawn: bool = False) -> list[dict]:
        """Verdicts in the order they were recorded (of one version, if given)."""
        query, args = "SELECT * FROM verdicts WHERE 1 = 1", []
        if version is not None:
            query, args = query + " AND version = ?", [version]
        if not include_withdrawn:
            query += " AND withdrawn_at IS NULL"
        with self._connect() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY id", args).fetchall()]

    def open_verdict_counts(self) -> dict[str, int]:
        """Per version: verdicts neither withdrawn nor used by a revision job yet."""
        with self._connect() as db:
            rows = db.execute("SELECT version, COUNT(*) AS n FROM verdicts WHERE withdrawn_at IS NULL "
                              "AND job_id IS NULL GROUP BY version").fetchall()
        return {r["version"]: r["n"] for r in rows}

    # -- revision jobs -----------------------------------------------------------------------
    def add_job(self, parent: str, settings: RevisionSettings) -> dict:
        """Queue a revision of `parent` using its open verdicts (they are tied to the job, and their ids
        stored with its settings: protoserve/revision_settings.py QueuedRevision)."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM versions WHERE version = ?", (parent,)).fetchone():
                raise RegistryError(f"version {parent!r} is not registered")
            open_ids = [r["id"] for r in db.execute(
                "SELECT id FROM verdicts WHERE version = ? AND withdrawn_at IS NULL AND job_id IS NULL ORDER BY id",
                (parent,)).fetchall()]
            if not open_ids and settings.mode != "prune":
                raise RegistryError(f"version {parent!r} has no open verdicts to revise with")
            stored = QueuedRevision(**settings.settings().model_dump(), verdict_ids=open_ids).model_dump_json()
            job_id = db.execute("INSERT INTO jobs (parent, settings, status, created_at) VALUES (?, ?, 'queued', ?)",
                                (parent, stored, now())).lastrowid
            db.executemany("UPDATE verdicts SET job_id = ? WHERE id = ?", [(job_id, i) for i in open_ids])
        return self.job(job_id)

    def job(self, job_id: int) -> dict:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise RegistryError(f"job {job_id} does not exist")
        return _job_row(row)

    def job_settings(self, job_id: int) -> QueuedRevision:
        """A job's settings and verdict ids, parsed back into the object they were stored from."""
        with self._connect() as db:
            row = db.execute("SELECT settings FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise RegistryError(f"job {job_id} does not exist")
        return QueuedRevision.model_validate_json(row["settings"])

    def jobs(self) -> list[dict]:
        with self._connect() as db:
            return [_job_row(r) for r in db.execute("SELECT * FROM jobs ORDER BY id").fetchall()]

    def claim_job(self, worker: str, lease_seconds: float) -> dict | None:
        """Take the oldest queued job, or one whose worker's lease ran out (it died): running, leased."""
        with self._write() as db:
            t = time.time()
            for row in db.execute("SELECT id, attempts FROM jobs WHERE status = 'running' AND lease_until < ?",
                                  (t,)).fetchall():
                if row["attempts"] >= MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET status = 'failed', error = ?, reason = ?, finished_at = ? "
                               "WHERE id = ?", (f"its worker stopped renewing the lease {row['attempts']} times "
                                                "(killed?)", failure_reason("worker_lost"), now(), row["id"]))
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND lease_until < ?) "
                             "ORDER BY id LIMIT 1", (t,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', worker = ?, lease_until = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (worker, t + lease_seconds, row["id"]))
        return self.job(row["id"])

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float, progress: dict | None = None,
                  log_lines: str = "") -> bool:
        """Renew the lease (and record progress, append to the log tail); False when the job is no longer ours."""
        with self._write() as db:
            row = db.execute("SELECT status, worker, log, progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running" or row["worker"] != worker:
                return False
            log = (row["log"] + log_lines)[-LOG_TAIL_CHARS:]
            db.execute("UPDATE jobs SET lease_until = ?, progress = ?, log = ? WHERE id = ?",
                       (time.time() + lease_seconds, _dump(progress) if progress is not None else row["progress"],
                        log, job_id))
        return True

    def finish_job(self, job_id: int, worker: str, result: dict | None = None, error: str | None = None,
                   reason: str | None = None) -> None:
        """Done with its result, or (given an error) failed with the error and the reviewer's `reason`."""
        with self._write() as db:
            row = db.execute("SELECT status, worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running" or row["worker"] != worker:
                raise RegistryError(f"job {job_id} is not running on {worker}")
            db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, reason = ?, finished_at = ?, "
                       "lease_until = NULL WHERE id = ?",
                       ("failed" if error else "done", _dump(result), error, reason if error else None, now(),
                        job_id))


def _add_column(db: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    """Add a column a database created by an older protoserve lacks (a no-op when it has it)."""
    try:
        db.execute(f"SELECT {column} FROM {table} LIMIT 0")
    except sqlite3.OperationalError:
        try:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError:  # another process added it between the two statements
            db.execute(f"SELECT {column} FROM {table} LIMIT 0")


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None):
    return None if text is None else json.loads(text)


def _version_row(row: sqlite3.Row) -> VersionRow:
    d = dict(row)
    d["lineage"], d["metrics"] = _load(d["lineage"]), _load(d["metrics"])
    return VersionRow(**d)


def _job_row(row: sqlite3.Row) -> dict:
    d = dict(row)
    for key in ("settings", "progress", "result"):
        d[key] = _load(d[key])
    return d
