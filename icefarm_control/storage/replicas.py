"""The control replicas alive now: each announces itself at start and refreshes its row every
second, so a worker stream held by a replica that died (its row went stale) never blocks the
worker from registering again (issue 9, defect 5).

Like storage/queries.py, each function runs inside the caller's transaction and none commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Select, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.models import replicas

# Rows of replicas gone this long are dropped when a replica starts (the table stays small).
_FORGET_AFTER = timedelta(days=1)


async def announce(conn: AsyncConnection, replica_id: str, now: datetime) -> None:
    """A replica starts. On SQLite only one control process serves a file, so every other
    replica recorded in it is dead: their rows go, and with them every session they held."""
    await _upsert(conn, replica_id, now, started=True)
    others = delete(replicas).where(replicas.c.id != replica_id)
    if conn.dialect.name != "sqlite":
        others = others.where(replicas.c.last_seen_time < now - _FORGET_AFTER)
    await conn.execute(others)


async def refresh(conn: AsyncConnection, replica_id: str, now: datetime) -> None:
    """The replica is still alive (recreated if its row was dropped)."""
    await _upsert(conn, replica_id, now, started=False)


async def is_live(conn: AsyncConnection, replica_id: str, stale_since: datetime) -> bool:
    """True when the replica refreshed its row at or after `stale_since`."""
    query = select(replicas.c.id).where(
        replicas.c.id == replica_id, replicas.c.last_seen_time >= stale_since
    )
    return (await conn.execute(query)).first() is not None


def live_replica_ids(stale_since: datetime) -> Select[tuple[str]]:
    """A subquery of the replicas alive since `stale_since` (for statements that judge many
    sessions at once)."""
    return select(replicas.c.id).where(replicas.c.last_seen_time >= stale_since)


async def _upsert(conn: AsyncConnection, replica_id: str, now: datetime, *, started: bool) -> None:
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(replicas).values(id=replica_id, start_time=now, last_seen_time=now)
    changes = {"last_seen_time": now, **({"start_time": now} if started else {})}
    await conn.execute(
        statement.on_conflict_do_update(index_elements=[replicas.c.id], set_=changes)
    )
