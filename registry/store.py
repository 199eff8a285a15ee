"""The registry's database: every query the registry runs, on either engine.

One database holds:

    versions   immutable bundle versions: bundle and checkpoint paths, parent, lineage, status
    active     one row: the active version, the previous one and a generation counter that every
               promote and rollback increments (service workers poll it to follow the active model,
               and on PostgreSQL also hear it: a NOTIFY on SWITCH_CHANNEL, sent in the same transaction;
               a register sends one on REGISTER_CHANNEL, so that replicas can fetch the version early)
    changes    every promote and rollback, in order (who, when, from, to)
    shadow     one row: the version run beside the active one on a sample of live traffic (or none), the
               share sampled; promoting that version ends it
    verdicts   verdicts on prototypes (registry/verdicts.py's format) with the version they were
               given on; withdrawn ones keep their row with withdrawn_at set
    jobs       revision jobs: queued -> running (a worker holds a lease it renews) -> done | failed;
               a failed one keeps its technical `error` and the sentence a reviewer reads, `reason`
    schema_version  the migrations applied (each engine's MIGRATIONS, numbered from 1)

The database is named by a location: a path or `sqlite:///PATH` (registry/sqlite_engine.py, the
embedded default, one machine) or `postgresql://...` (registry/postgres_engine.py, replicas and
workers on several machines). The queries here are plain SQL that both engines run; an engine adds
what only it needs: its connections, its write transaction, its row locks (`for_update`,
`skip_locked`: empty on SQLite, where a write transaction holds the one write lock) and its
notifications. On open, the migrations the database lacks are applied (idempotent: none when it is
current); a database whose schema is newer than this code is refused.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from registry.errors import RegistryError, RegistryUnavailable
from registry.job_failures import failure_reason
from registry.postgres_engine import PostgresEngine
from registry.revision_settings import QueuedRevision, RevisionSettings
from registry.sqlite_engine import SQLiteEngine
from registry.verdicts import Verdict

__all__ = ["DB_FILE", "REGISTER_CHANNEL", "SWITCH_CHANNEL", "Active", "RegistryError", "RegistryUnavailable", "Store",
           "VersionRow", "database_location"]

DB_FILE = "registry.sqlite"
SWITCH_CHANNEL = "protoserve_active"  # PostgreSQL: NOTIFY on promote and rollback, the new generation as payload
REGISTER_CHANNEL = "protoserve_registered"  # and on register, the new version as payload
TABLES = {"schema_version": "version", "versions": "version", "active": "id", "shadow": "id", "changes": "id",
          "verdicts": "id", "jobs": "id"}  # each with the key it is listed by

LOG_TAIL_CHARS = 8_000
MAX_ATTEMPTS = 2  # a job whose worker died twice is failed, not retried forever


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
    """The registry database at `location`: a path, `sqlite:///PATH` or `postgresql://...` (migrated on open)."""

    def __init__(self, location: str | Path):
        self.url = str(location)
        self.engine = open_engine(location)
        self.path: Path | None = getattr(self.engine, "path", None)  # the SQLite file (None on PostgreSQL)
        self.engine.migrate(self._migrate)

    def __repr__(self) -> str:
        return f"Store({self.engine.where!r})"

    def _connect(self):
        return self.engine.connect()

    def _write(self):
        """One write transaction (rows read with `for_update` are locked until it ends)."""
        return self.engine.write()

    def _migrate(self, db) -> None:
        """Apply the migrations the database lacks, each recorded in schema_version; refuse a newer schema."""
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        current = db.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()["v"] or 0
        migrations = self.engine.migrations
        if current > len(migrations):
            raise RegistryUnavailable(f"registry database {self.engine.where}: its schema is version {current}, newer "
                                      f"than this protoserve's {len(migrations)}; upgrade protoserve to use it")
        for number, steps in enumerate(migrations[current:], start=current + 1):
            for step in steps:  # a statement, or a function of the connection (SQLite's adoption of old files)
                if callable(step):
                    step(db)
                else:
                    db.execute(step)
            db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, now()))

    def schema_version(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()["v"]

    def dump(self) -> dict[str, list[dict]]:
        """Every row of every table, in order: what the database holds, the same shape on both engines."""
        with self._connect() as db:
            return {table: [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()]
                    for table, key in TABLES.items()}

    def close(self) -> None:
        """Release what the engine holds in this process (PostgreSQL: its connection pool)."""
        self.engine.close()

    # -- versions ----------------------------------------------------------------------------
    def add_version(self, version: str, name: str, family: str, bundle: str, checkpoint: str | None,
                    parent: str | None, status: str, lineage: dict | None = None, metrics: dict | None = None,
                    job_id: int | None = None) -> VersionRow:
        with self._write() as db:
            if parent is not None and not db.execute("SELECT 1 FROM versions WHERE version = ?",
                                                     (parent,)).fetchone():
                raise RegistryError(f"parent version {parent!r} is not registered")
            added = db.execute("INSERT INTO versions (version, name, family, bundle, checkpoint, parent, status, "
                               "lineage, metrics, job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                               "ON CONFLICT (version) DO NOTHING RETURNING version",
                               (version, name, family, bundle, checkpoint, parent, status, _dump(lineage),
                                _dump(metrics), job_id, now())).fetchone()
            if added is None:
                raise RegistryError(f"version {version!r} is registered already (versions are immutable)")
            self.engine.notify(db, REGISTER_CHANNEL, version)  # replicas may fetch it before it is promoted
        return self.version(version)

    def version(self, version: str) -> VersionRow:
        row = self.find_version(version)
        if row is None:
            raise RegistryError(f"version {version!r} is not registered")
        return row

    def find_version(self, version: str) -> VersionRow | None:
        """The version's row, or None when it is not registered."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        return None if row is None else _version_row(row)

    def versions(self) -> list[VersionRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM versions ORDER BY created_at, version").fetchall()
        return [_version_row(r) for r in rows]

    def never_active(self, newest: int) -> list[str]:
        """The `newest` most recently registered versions that no promote or rollback ever made active."""
        with self._connect() as db:
            rows = db.execute("SELECT version FROM versions WHERE version NOT IN (SELECT version FROM changes) "
                              "ORDER BY created_at DESC, version DESC LIMIT ?", (newest,)).fetchall()
        return [row["version"] for row in rows]

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

    @property
    def pushes_switches(self) -> bool:
        """True when the database tells listeners about a promote or rollback (PostgreSQL's NOTIFY)."""
        return self.engine.pushes_switches

    def listen_for_switches(self, on_switch: Callable[[str], None], stop: threading.Event,
                            on_register: Callable[[str], None] | None = None) -> None:
        """Block until `stop` is set, calling on_switch(new generation) after every promote and rollback,
        on_register(version) after every register, and each with "" after every (re)connection; returns at
        once when the database pushes nothing (SQLite)."""
        channels = {SWITCH_CHANNEL: on_switch}
        if on_register is not None:
            channels[REGISTER_CHANNEL] = on_register
        self.engine.listen(channels, stop)

    def generation(self) -> tuple[int, str | None]:
        """(generation, active version): what a service worker polls."""
        with self._connect() as db:
            row = db.execute("SELECT generation, version FROM active WHERE id = 1").fetchone()
        return row["generation"], row["version"]

    def activate(self, version: str, actor: str | None = None, expect_generation: int | None = None) -> Active:
        """Promote: `version` becomes active, the active one becomes previous; one transaction."""
        with self._write() as db:
            current = db.execute("SELECT version, generation FROM active WHERE id = 1" +
                                 self.engine.for_update).fetchone()
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
            current = db.execute("SELECT version, previous, generation FROM active WHERE id = 1" +
                                 self.engine.for_update).fetchone()
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
        self.engine.notify(db, SWITCH_CHANNEL, str(generation))  # delivered at commit (PostgreSQL; SQLite: none)

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
            active = db.execute("SELECT version FROM active WHERE id = 1" +
                                self.engine.for_update).fetchone()["version"]
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
            verdict_id = db.execute("INSERT INTO verdicts (version, prototype_id, verdict, round, source, at, note) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                                    (version, v.prototype_id, v.verdict, v.round, v.source, v.at,
                                     v.note)).fetchone()["id"]
        return self.verdict(verdict_id)

    def withdraw_verdict(self, verdict_id: int) -> dict:
        with self._write() as db:
            row = db.execute("SELECT withdrawn_at, job_id FROM verdicts WHERE id = ?" + self.engine.for_update,
                             (verdict_id,)).fetchone()
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
        stored with its settings: registry/revision_settings.py QueuedRevision)."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM versions WHERE version = ?", (parent,)).fetchone():
                raise RegistryError(f"version {parent!r} is not registered")
            open_ids = [r["id"] for r in db.execute(
                "SELECT id FROM verdicts WHERE version = ? AND withdrawn_at IS NULL AND job_id IS NULL ORDER BY id" +
                self.engine.for_update, (parent,)).fetchall()]
            if not open_ids and settings.mode != "prune":
                raise RegistryError(f"version {parent!r} has no open verdicts to revise with")
            stored = QueuedRevision(**settings.settings().model_dump(), verdict_ids=open_ids).model_dump_json()
            job_id = db.execute("INSERT INTO jobs (parent, settings, status, created_at) VALUES (?, ?, 'queued', ?) "
                                "RETURNING id", (parent, stored, now())).fetchone()["id"]
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
            for row in db.execute("SELECT id, attempts FROM jobs WHERE status = 'running' AND lease_until < ?" +
                                  self.engine.skip_locked, (t,)).fetchall():
                if row["attempts"] >= MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET status = 'failed', error = ?, reason = ?, finished_at = ? "
                               "WHERE id = ?", (f"its worker stopped renewing the lease {row['attempts']} times "
                                                "(killed?)", failure_reason("worker_lost"), now(), row["id"]))
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' OR (status = 'running' AND lease_until < ?) "
                             "ORDER BY id LIMIT 1" + self.engine.skip_locked, (t,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', worker = ?, lease_until = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (worker, t + lease_seconds, row["id"]))
        return self.job(row["id"])

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float, progress: dict | None = None,
                  log_lines: str = "") -> bool:
        """Renew the lease (and record progress, append to the log tail); False when the job is no longer ours."""
        with self._write() as db:
            row = db.execute("SELECT status, worker, log, progress FROM jobs WHERE id = ?" + self.engine.for_update,
                             (job_id,)).fetchone()
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
            row = db.execute("SELECT status, worker FROM jobs WHERE id = ?" + self.engine.for_update,
                             (job_id,)).fetchone()
            if row is None or row["status"] != "running" or row["worker"] != worker:
                raise RegistryError(f"job {job_id} is not running on {worker}")
            db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, reason = ?, finished_at = ?, "
                       "lease_until = NULL WHERE id = ?",
                       ("failed" if error else "done", _dump(result), error, reason if error else None, now(),
                        job_id))


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None):
    return None if text is None else json.loads(text)


def _version_row(row) -> VersionRow:
    d = dict(row)
    d["lineage"], d["metrics"] = _load(d["lineage"]), _load(d["metrics"])
    return VersionRow(**d)


def _job_row(row) -> dict:
    d = dict(row)
    for key in ("settings", "progress", "result"):
        d[key] = _load(d[key])
    return d


def database_location(url: str | None, root: Path) -> str | Path:
    """The database a registry at `root` uses: `url` (a PROTOSERVE_REGISTRY_DB value), else its SQLite file."""
    return url if url else root / DB_FILE


def open_engine(location: str | Path) -> SQLiteEngine | PostgresEngine:
    """The engine for a path, `sqlite:///PATH` or `postgresql://...` (RegistryError for anything else)."""
    text = str(location)
    if isinstance(location, Path) or "://" not in text:
        return SQLiteEngine(Path(location))
    if text.startswith("sqlite://"):
        return SQLiteEngine(Path(text.removeprefix("sqlite://")))
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(text)
    raise RegistryError(f"registry database {text.split('://')[0]}://...: not sqlite:///PATH or postgresql://...")
