"""SQL for the queue of waiting Reserve calls (`waiters` rows, served in arrival order by
whichever replica frees devices; see domain/reservations.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.models import replicas, waiters
from icefarm_control.storage.records import WaiterRow

WAITING = "WAITING"
SERVED = "SERVED"
CANCELLED = "CANCELLED"


async def has_waiters(conn: AsyncConnection) -> bool:
    query = select(literal(1)).where(waiters.c.state == WAITING).limit(1)
    return (await conn.execute(query)).first() is not None


async def insert_waiter(
    conn: AsyncConnection,
    *,
    client_id: str,
    count: int,
    device_ids: Sequence[str],
    selector: str,
    mode: str,
    mode_args: dict[str, str],
    lease_seconds: float,
    request_id: str | None,
    now: datetime,
    deadline: datetime,
    replica_id: str,
) -> int:
    result = await conn.execute(
        insert(waiters)
        .values(
            client_id=client_id,
            count=count,
            device_ids=list(device_ids),
            selector=selector,
            mode=mode,
            mode_args=mode_args,
            lease_seconds=lease_seconds,
            request_id=request_id,
            create_time=now,
            deadline=deadline,
            state=WAITING,
            replica_id=replica_id,
        )
        .returning(waiters.c.id)
    )
    waiter_id: int = result.scalar_one()
    return waiter_id


async def adopt_waiter(
    conn: AsyncConnection,
    *,
    client_id: str,
    request_id: str,
    replica_id: str,
    deadline: datetime,
) -> int | None:
    """A retried Reserve (same client and request id) whose first attempt is still queued takes
    that queue entry over, place in line included; its id, or None when there is none."""
    result = await conn.execute(
        update(waiters)
        .where(
            waiters.c.state == WAITING,
            waiters.c.client_id == client_id,
            waiters.c.request_id == request_id,
        )
        .values(replica_id=replica_id, deadline=deadline)
        .returning(waiters.c.id)
    )
    row = result.first()
    return None if row is None else int(row[0])


async def waiting(conn: AsyncConnection, *, lock: bool = False) -> list[WaiterRow]:
    """The queue, in arrival order. `lock`: the rows stay locked until the transaction ends,
    so a caller withdrawing its request waits for the plan being made (and is then found
    served), or was first (and its row is no longer in the queue read here)."""
    query = select(waiters).where(waiters.c.state == WAITING).order_by(waiters.c.id)
    if lock:
        query = query.with_for_update()
    return [WaiterRow.from_mapping(r) for r in await conn.execute(query)]


async def get_waiter(conn: AsyncConnection, waiter_id: int) -> WaiterRow | None:
    row = (await conn.execute(select(waiters).where(waiters.c.id == waiter_id))).first()
    return WaiterRow.from_mapping(row) if row else None


async def mark_waiter_served(conn: AsyncConnection, waiter_id: int, reservation_id: str) -> bool:
    """Serve a waiter still queued; False (nothing written) when it was withdrawn already."""
    result = await conn.execute(
        update(waiters)
        .where(waiters.c.id == waiter_id, waiters.c.state == WAITING)
        .values(state=SERVED, reservation_id=reservation_id)
    )
    return result.rowcount == 1


async def cancel_waiter(conn: AsyncConnection, waiter_id: int) -> bool:
    """Withdraw a waiter still queued. False when it was served (or withdrawn) already."""
    result = await conn.execute(
        update(waiters)
        .where(waiters.c.id == waiter_id, waiters.c.state == WAITING)
        .values(state=CANCELLED)
    )
    return result.rowcount == 1


async def cancel_expired_waiters(conn: AsyncConnection, before: datetime) -> int:
    """Withdraw queued requests whose deadline passed long ago (their caller is gone)."""
    result = await conn.execute(
        update(waiters)
        .where(waiters.c.state == WAITING, waiters.c.deadline < before)
        .values(state=CANCELLED)
    )
    return result.rowcount


async def cancel_waiters_of_dead_replicas(conn: AsyncConnection, stale_since: datetime) -> int:
    """Withdraw queued requests made through a replica that has not refreshed its row since
    `stale_since`: it died, its callers were told nothing or retried elsewhere, and serving
    them would hold boards for nobody."""
    dead = select(replicas.c.id).where(replicas.c.last_seen_time < stale_since)
    result = await conn.execute(
        update(waiters)
        .where(waiters.c.state == WAITING, waiters.c.replica_id.in_(dead))
        .values(state=CANCELLED)
    )
    return result.rowcount


async def cancel_waiters_of_other_processes(conn: AsyncConnection, replica_id: str) -> int:
    """SQLite: one control process serves a file, so at its start every queued request of
    another replica id belongs to a process that is gone."""
    if conn.dialect.name != "sqlite":
        return 0
    result = await conn.execute(
        update(waiters)
        .where(waiters.c.state == WAITING, waiters.c.replica_id != replica_id)
        .values(state=CANCELLED)
    )
    return result.rowcount


async def prune_finished_waiters(conn: AsyncConnection, before: datetime) -> None:
    await conn.execute(
        delete(waiters).where(waiters.c.state != WAITING, waiters.c.create_time < before)
    )
