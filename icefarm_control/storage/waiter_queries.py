"""SQL for the queue of waiting Reserve calls (`waiters` rows, served in arrival order by
whichever replica frees devices; see domain/reservations.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.models import waiters
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


async def prune_finished_waiters(conn: AsyncConnection, before: datetime) -> None:
    await conn.execute(
        delete(waiters).where(waiters.c.state != WAITING, waiters.c.create_time < before)
    )
