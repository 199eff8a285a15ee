"""The registry database on PostgreSQL: replicas and workers on several machines share it.

Connections come from a pool (psycopg_pool), one per process and database, made on first use (so a
forked worker makes its own) and checked before each use (a restarted server costs one retry, not an
error). Reads run in autocommit; a write is one transaction that locks the rows it reads before
changing them (`for_update`: the single `active` row on promote and rollback, a job on heartbeat),
and `claim_job` takes the oldest free job with `FOR UPDATE SKIP LOCKED`, so two workers never claim
the same one and never wait on each other. Migrations run once per process under an advisory lock,
so replicas starting together apply each one once. A register, promote or rollback sends NOTIFY in its
own transaction (delivered at commit); followers LISTEN on a connection of their own.

Queries are written once, in registry/store.py, with `?` placeholders; `_Connection` turns them
into psycopg's `%s`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from registry.errors import RegistryUnavailable

log = logging.getLogger("protoserve.registry")

POOL_MAX = 8  # connections per process: a service worker's review routes, a revision worker's heartbeat
CONNECT_TIMEOUT_S = 10
MIGRATION_LOCK = 0x70726F746F  # pg_advisory_xact_lock key: one migrating process at a time

# The schema's versions, in order: the same numbers as sqlite_engine.MIGRATIONS, each the same change.
# Identity columns for ids; DOUBLE PRECISION where SQLite says REAL (PostgreSQL's REAL is 4 bytes,
# too coarse for a lease's epoch seconds). Times stay ISO text, as on SQLite, so answers are the same.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("""CREATE TABLE versions (
        version     TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        family      TEXT NOT NULL,
        bundle      TEXT NOT NULL,
        checkpoint  TEXT,
        parent      TEXT REFERENCES versions(version),
        status      TEXT NOT NULL,
        lineage     TEXT,
        metrics     TEXT,
        job_id      BIGINT,
        created_at  TEXT NOT NULL)""",
     """CREATE TABLE active (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     TEXT REFERENCES versions(version),
        previous    TEXT REFERENCES versions(version),
        generation  BIGINT NOT NULL,
        changed_at  TEXT)""",
     "INSERT INTO active (id, version, previous, generation) VALUES (1, NULL, NULL, 0)",
     """CREATE TABLE shadow (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     TEXT REFERENCES versions(version),
        sample      DOUBLE PRECISION NOT NULL,
        started_at  TEXT,
        actor       TEXT)""",
     "INSERT INTO shadow (id, version, sample) VALUES (1, NULL, 0)",
     """CREATE TABLE changes (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        action      TEXT NOT NULL,
        version     TEXT NOT NULL,
        replaced    TEXT,
        generation  BIGINT NOT NULL,
        actor       TEXT,
        at          TEXT NOT NULL)""",
     """CREATE TABLE verdicts (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        version      TEXT NOT NULL REFERENCES versions(version),
        prototype_id INTEGER NOT NULL,
        verdict      TEXT NOT NULL,
        round        INTEGER NOT NULL,
        source       TEXT NOT NULL,
        at           TEXT NOT NULL,
        note         TEXT,
        withdrawn_at TEXT,
        job_id       BIGINT)""",
     "CREATE INDEX verdicts_by_version ON verdicts (version, prototype_id)",
     """CREATE TABLE jobs (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        parent       TEXT NOT NULL REFERENCES versions(version),
        settings     TEXT NOT NULL,
        status       TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        worker       TEXT,
        lease_until  DOUBLE PRECISION,
        attempts     INTEGER NOT NULL DEFAULT 0,
        progress     TEXT,
        log          TEXT NOT NULL DEFAULT '',
        result       TEXT,
        error        TEXT,
        reason       TEXT,
        finished_at  TEXT)""",
     # claim_job's scan: the queued and the running (expired lease) jobs, oldest first
     "CREATE INDEX jobs_open ON jobs (id) WHERE status IN ('queued', 'running')"),
)

_pools: dict[tuple[int, str], ConnectionPool] = {}
_migrated: set[tuple[int, str]] = set()
_lock = threading.Lock()


class _Connection:
    """A pooled psycopg connection taking the store's `?` placeholders."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params=None) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), params or None)

    def executemany(self, sql: str, rows) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)


class PostgresEngine:
    """Connections to the registry database at a postgresql:// URL."""

    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    migrations = MIGRATIONS
    pushes_switches = True  # NOTIFY on register, promote and rollback; followers LISTEN

    def __init__(self, url: str):
        self.url = url
        self.where = redacted(url)

    def _pool(self) -> ConnectionPool:
        key = (os.getpid(), self.url)
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                pool = ConnectionPool(self.url, min_size=1, max_size=POOL_MAX, open=True, timeout=CONNECT_TIMEOUT_S,
                                      check=ConnectionPool.check_connection, name=f"protoserve-registry-{os.getpid()}",
                                      kwargs={"autocommit": True, "row_factory": dict_row,
                                              "connect_timeout": CONNECT_TIMEOUT_S})
                _pools[key] = pool
        return pool

    @contextmanager
    def connect(self) -> Iterator[_Connection]:
        try:
            with self._pool().connection() as conn:
                yield _Connection(conn)
        except (psycopg.OperationalError, PoolTimeout) as e:
            raise self.unavailable(e) from None

    @contextmanager
    def write(self) -> Iterator[_Connection]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self.connect() as db, db.conn.transaction():
            yield db

    def migrate(self, apply: Callable[[_Connection], None]) -> None:
        """Run `apply` (registry/store.py's migration step) once per process, one process at a time."""
        key = (os.getpid(), self.url)
        if key in _migrated:
            return
        try:  # a connection of its own: its error names the cause (no server, wrong password, no database)
            with psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                 connect_timeout=CONNECT_TIMEOUT_S) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                apply(_Connection(conn))
        except psycopg.OperationalError as e:
            raise self.unavailable(e) from None
        _migrated.add(key)

    def notify(self, db: _Connection, channel: str, payload: str) -> None:
        """Tell every listener, when this transaction commits (and only if it does)."""
        db.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def listen(self, channels: dict[str, Callable[[str], None]], stop: threading.Event) -> None:
        """Call `channels[channel](payload)` for every notification on one of the channels until `stop` is set
        (blocks; run it in a thread). After a lost connection it reconnects, and calls each one with "" once
        connected again so that a caller checks what it missed meanwhile."""
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    for channel in channels:
                        conn.execute(f"LISTEN {channel}")
                    for on_notify in channels.values():
                        on_notify("")
                    while not stop.is_set():
                        for notification in conn.notifies(timeout=0.5):
                            channels[notification.channel](notification.payload)
            except psycopg.Error as e:
                log.warning("protoserve: listening on %s failed (%s); the poll goes on, retrying in 1 s", self.where,
                            one_line(e))
                stop.wait(1.0)

    def close(self) -> None:
        """Close this process's pool for the database (the next call opens a new one, the next Store migrates)."""
        with _lock:
            _migrated.discard((os.getpid(), self.url))
            pool = _pools.pop((os.getpid(), self.url), None)
        if pool is not None:
            pool.close()

    def unavailable(self, error: Exception) -> RegistryUnavailable:
        return RegistryUnavailable(f"registry database {self.where}: {one_line(error)}")


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
