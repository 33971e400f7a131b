"""A throwaway PostgreSQL server for the tests: initdb into a temporary folder, a free loopback port, pg_ctl.

PostgreSQL refuses to run as root, so under root the server's files belong to ``nobody`` and initdb, pg_ctl and
the server run as that user (``subprocess``'s ``user=``/``group=``; no sudo needed). Trust authentication on
127.0.0.1 only, no Unix socket, fsync off: a test server, started once per session.

    server = PgServer.start()      # raises PgUnavailable (with why) when PostgreSQL is not installed
    url = server.create_database("t1")
    server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["PgServer", "PgUnavailable", "find_bindir"]


class PgUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed (or cannot run here); the message says why."""


def find_bindir() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") + glob.glob("/usr/local/pgsql/bin/pg_ctl"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])  # fmt: skip
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A running test server: ``url`` for its ``postgres`` database, :meth:`create_database`, :meth:`stop`."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: dict[str, Any]) -> None:
        self.bindir, self.root, self.port, self.run_as = bindir, root, port, run_as
        self.data = root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    @classmethod
    def start(cls, timeout: float = 60.0) -> PgServer:
        bindir = find_bindir()
        if bindir is None:
            raise PgUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                                "/usr/lib/postgresql/*/bin: apt-get install postgresql")  # fmt: skip
        root = Path(tempfile.mkdtemp(prefix="ckptkit-pg-"))
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to nobody
            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError as err:
                raise PgUnavailable("running as root and there is no user 'nobody' to run PostgreSQL as") from err
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
            run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        server = cls(bindir, root, _free_port(), run_as)
        try:
            server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                        "--no-sync", "--no-instructions")  # fmt: skip
            opts = (f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories='' -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")  # fmt: skip
            server._run("pg_ctl", "-D", str(server.data), "-o", opts, "-l", str(root / "server.log"), "-w",
                        "-t", str(int(timeout)), "start")  # fmt: skip
        except BaseException:
            server.stop()
            raise
        return server

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, cwd=self.root,
                             timeout=120, **self.run_as)  # fmt: skip
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise PgUnavailable(f"{tool} failed ({out.returncode}): {out.stderr[-2000:]}{tail}")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and remove its files."""
        if (self.data / "postmaster.pid").exists():
            for _ in range(3):
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
                    break
                except PgUnavailable:
                    time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
