"""A throwaway PostgreSQL server in a temporary folder: initdb, pg_ctl start on a free port, stop.

For tests, benchmarks and demos on one machine, never a deployment's database: it trusts every
login from 127.0.0.1 and its unix socket (in the folder). Debian's `postgresql` package provides
the binaries (`make postgresql` installs it when initdb is missing; they live in
/usr/lib/postgresql/<major>/bin, off the PATH). initdb refuses to run as root, so as root the
folder is given to the `postgres` system user and the server runs as that user (runuser).
`durable=False` turns fsync off: faster for tests, and a crash of the machine (not of the server)
could lose commits, which no test here depends on.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from protoserve.local_processes import free_port
from registry.errors import RegistryError

SEARCH = "/usr/lib/postgresql"
SYSTEM_USER = "postgres"


def binaries() -> Path:
    """The folder holding initdb and pg_ctl: on the PATH, else the newest under /usr/lib/postgresql."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted((p for p in Path(SEARCH).glob("*/bin") if (p / "initdb").is_file()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        raise RegistryError(f"PostgreSQL's initdb is neither on the PATH nor under {SEARCH}/*/bin: "
                            "`make postgresql` installs Debian's postgresql package")
    return versions[-1]


class LocalPostgres:
    """One server: `with LocalPostgres() as pg: url = pg.create_database("x")`."""

    def __init__(self, durable: bool = True, max_connections: int = 200):
        self.bin = binaries()
        self.durable, self.max_connections = durable, max_connections
        self.folder = Path(tempfile.mkdtemp(prefix="protoserve-postgres-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        self.port: int | None = None

    def _run(self, *command: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", SYSTEM_USER, "--"] if self.as_root else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = self.log.read_text()[-1500:] if self.log.is_file() else ""
            raise RegistryError(f"{Path(command[0]).name} failed ({done.returncode}): "
                                f"{' '.join((done.stderr + done.stdout + tail).split())[-2000:]}")

    def start(self, attempts: int = 3) -> LocalPostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SYSTEM_USER, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        options = [f"-c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder} "
                   f"-c max_connections={self.max_connections}"]
        if not self.durable:
            options.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        for attempt in range(attempts):  # another process may take the free port before the server binds it
            self.port = free_port()
            try:
                self._run(str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                          str(self.log), "-o", f"-p {self.port} " + " ".join(options), timeout=90)
                return self
            except RegistryError:
                if attempt == attempts - 1:
                    raise
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SYSTEM_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it, closing any connection still open to it."""
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.port is not None and (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
