"""A private PostgreSQL cluster a test may stop, kill and restart, without touching the
system server (other tests use that one).

`initdb` and `pg_ctl` from /usr/lib/postgresql/*/bin run as the `postgres` user (`runuser`
when this process is root) in a fresh directory under /tmp, on a free loopback port, with
fsync off (nothing in it outlives the test). Use the `pg_cluster` fixture, or `PgCluster`
directly in a script (bench/recovery.py does).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

USER = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PgCluster:
    """One cluster: `start()`, `stop()`, `kill()` (no shutdown at all), `restart()`."""

    def __init__(self, bin_dir: Path, base: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.port = port

    @classmethod
    def create(cls) -> PgCluster:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        base = Path(tempfile.mkdtemp(prefix="icefarm-pg-"))
        owner = pwd.getpwnam(USER)
        os.chown(base, owner.pw_uid, owner.pw_gid)
        cluster = cls(bin_dir, base, free_port())
        cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", USER, "-E", "UTF8")
        return cluster

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=self.base)

    @property
    def admin_conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres connect_timeout=5"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.base / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """The server dies at once (`immediate`: no checkpoint, clients cut off)."""
        self.stop("immediate")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"icefarm_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A started private cluster, removed afterwards."""
    cluster = PgCluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster the test may stop and restart. Skipped where the server
    binaries or the postgres user are missing (a failure under CI, which has them)."""
    require_private_cluster()
    with private_cluster() as cluster:
        yield cluster


def require_private_cluster() -> None:
    """Skip without PostgreSQL's server binaries or its user; under CI that is a failure."""
    try:
        pwd.getpwnam(USER)
        available = _bin_dir() is not None
    except KeyError:
        available = False
    if not available:
        message = "no PostgreSQL server binaries or postgres user for a private cluster"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
