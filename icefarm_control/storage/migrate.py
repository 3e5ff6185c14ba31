"""Schema migrations with Alembic, run at start-up and by `icefarm-control db upgrade`.

Alembic is imported only when there is something to migrate: a control restarted on a schema
that is already current (the usual case) never loads it, which keeps ~8 MB out of its memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from icefarm_control.storage.database import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest revision in migrations/versions (a test checks it against Alembic's head).
HEAD_REVISION = "0005"
# The PostgreSQL advisory lock key migrations hold ("icefarm" in ASCII).
MIGRATION_LOCK = 0x696365666172


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def upgrade(database: Database, revision: str = "head") -> None:
    """Bring the schema up to `revision` (idempotent)."""
    if revision == "head" and await _stored_revision(database) == HEAD_REVISION:
        return

    def run(connection: Connection) -> None:
        from alembic import command

        command.upgrade(alembic_config(connection), revision)

    async with database.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting at once on a new database take turns (the lock ends with the
            # transaction); the later ones then find the schema current and change nothing.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(run)


async def _stored_revision(database: Database) -> str | None:
    """The revision recorded in alembic_version, read without Alembic; None when absent."""
    try:
        async with database.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except DBAPIError:
        return None  # no table yet: a new database
    return rows[0][0] if len(rows) == 1 else None


async def current_revision(database: Database) -> str | None:
    def read(connection: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(connection).get_current_revision()

    async with database.engine.connect() as conn:
        return await conn.run_sync(read)
