"""Opening the database: URL resolution, engines tuned per back end, write transactions."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import platformdirs
import structlog
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from icefarm_control.storage.outbox import take_touched

WRITE_OPTION = "icefarm_write"
# Storage's handle on an open transaction. The domain passes it to storage functions and
# never uses it itself; only this package opens, commits and rolls back transactions.
Transaction = AsyncConnection
_LOG_KEY = "icefarm.after_commit_log"
log = structlog.get_logger("icefarm_control.audit")


def log_after_commit(tx: AsyncConnection, what: str, **fields: Any) -> None:
    """An info line about what this transaction decided, written once it has committed (a
    transaction that is rolled back or retried logs nothing of it)."""
    tx.info.setdefault(_LOG_KEY, []).append((what, fields))


# Reserve/Release statements one replica runs on PostgreSQL at once (config: db_concurrency):
# past a few at once PostgreSQL on a small machine gets slower, not faster.
DEFAULT_DB_CONCURRENCY = 3 * (os.cpu_count() or 2)


def default_database_url() -> str:
    """SQLite in the user's data directory: the embedded default."""
    path = Path(platformdirs.user_data_dir("icefarm")) / "control.db"
    return f"sqlite+aiosqlite:///{path}"


def normalise_url(url: str) -> str:
    """Accept the short forms people type and name the async drivers we ship."""
    if url.startswith("sqlite:///"):
        url = "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    elif url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    parsed = make_url(url)
    if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+psycopg"):
        raise ValueError(
            f"unsupported database URL {parsed.drivername!r}: "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    return url


class Database:
    """An engine plus the knowledge of how to open a write transaction on it.

    SQLite: every write transaction starts with BEGIN IMMEDIATE (and writers in this process
    queue on one asyncio lock, so none spins on SQLITE_BUSY). PostgreSQL: READ COMMITTED, with
    row locks taken explicitly by the statements that need them (FOR UPDATE SKIP LOCKED).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        echo: bool = False,
        concurrency: int = DEFAULT_DB_CONCURRENCY,
        single_statement_paths: bool = True,
    ) -> None:
        self.url = normalise_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # The single-statement paths (storage/fast_paths.py) queue here, in arrival order.
        self.fast_lane = asyncio.Semaphore(concurrency)
        # PostgreSQL only; off = every call takes the general path (the agreement test).
        self.single_statement_paths = single_statement_paths and self.dialect == "postgresql"
        # Set by the app: wakes this process's readers of the topics a transaction touched.
        self.on_commit: Callable[[set[str]], None] | None = None
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # No pre-ping: it costs a round trip per checkout. After a server restart the first
            # call on a dead connection fails (UNAVAILABLE, which clients retry) and SQLAlchemy
            # then invalidates the whole pool, so the next calls get fresh connections.
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)
            _cache_long_statements()
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            _tune_sqlite(self.engine)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that may write; committed on success, rolled back on error. The
        topics it touched (storage/outbox.py) are published once it has committed."""
        topics: set[str] = set()
        lines: list[tuple[str, dict[str, Any]]] = []
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            conn = await stack.enter_async_context(self.engine.connect())
            if self.is_sqlite:
                conn = await conn.execution_options(**{WRITE_OPTION: True})
            try:
                async with conn.begin():
                    yield conn
                    topics = take_touched(conn)
                    lines = conn.info.pop(_LOG_KEY, [])
            except BaseException:
                # Forget the topics of what did not commit. On a connection the server closed,
                # reading its `info` makes SQLAlchemy reconnect outside its greenlet
                # (MissingGreenlet), which would hide the real error (a lost database is
                # UNAVAILABLE, which callers retry): that cleanup may fail, the error stands.
                with contextlib.suppress(Exception):
                    take_touched(conn)
                    conn.info.pop(_LOG_KEY, None)
                raise
        self.published(topics)
        for what, fields in lines:
            log.info(what, **fields)

    def published(self, topics: set[str]) -> None:
        """Wake the readers of `topics` after a commit: this process's at once, and (through
        the app's hook, on PostgreSQL) the other replicas' by a batched NOTIFY."""
        if topics and self.on_commit is not None:
            self.on_commit(topics)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection where each statement is its own transaction (single-statement paths)."""
        async with self.engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (never blocks writers on SQLite WAL)."""
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()


def _cache_long_statements() -> None:
    """Let psycopg cache the client-side conversion of our long single-statement fast paths
    (storage/fast_paths.py, ~6 kB each): by default it re-parses statements over 4 kB on every
    execution, which measured ~6% of the control's CPU under load."""
    from psycopg import _queries

    _queries.MAX_CACHED_STATEMENT_LENGTH = max(_queries.MAX_CACHED_STATEMENT_LENGTH, 16384)


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit transactions defer the lock).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
