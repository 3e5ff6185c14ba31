"""Shared fixtures: real databases (SQLite files and throw-away PostgreSQL databases)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from icefarm.logs import configure_logging
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade

PG_HOST = os.environ.get("ICEFARM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("ICEFARM_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("ICEFARM_TEST_PG_USER", "postgres")


def _admin_conninfo() -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres connect_timeout=5"


def require_postgres() -> None:
    """Skip without a server, except under CI where a missing PostgreSQL is a failure."""
    try:
        with psycopg.connect(_admin_conninfo(), autocommit=True):
            return
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def create_pg_database() -> str:
    """A new empty database; returns its SQLAlchemy URL."""
    require_postgres()
    name = f"icefarm_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database on each back end (the storage contract runs on both)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'control.db'}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A migrated database on each back end."""
    db = Database(database_url)
    await upgrade(db)
    try:
        yield db
    finally:
        await db.dispose()


configure_logging("console", "warning")


@pytest.fixture
async def pg_database() -> AsyncIterator[Database]:
    """A migrated PostgreSQL database, for what only PostgreSQL has (replicas, row locks)."""
    url = create_pg_database()
    db = Database(url)
    try:
        await upgrade(db)
        yield db
    finally:
        await db.dispose()
        drop_pg_database(url)
