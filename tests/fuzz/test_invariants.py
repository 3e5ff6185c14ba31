"""The database invariants (tests/invariants.py) catch each kind of lie, on both back ends,
and find nothing in a consistent farm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.database import Database
from icefarm_control.storage.models import (
    devices,
    reservation_devices,
    reservations,
    waiters,
    workers,
)
from tests import invariants

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def seed(conn: AsyncConnection) -> None:
    """One worker with three boards; reservation r1 holds d1 (READY); d2, d3 are free."""
    await conn.execute(insert(workers).values(name="w", state="ONLINE", last_seen_time=NOW))
    for device_id, state, holder in (("d1", "READY", "r1"), ("d2", "AVAILABLE", None)):
        await conn.execute(
            insert(devices).values(
                id=device_id,
                worker_name="w",
                kind="pico2-ice",
                state=state,
                state_time=NOW,
                reservation_id=holder,
            )
        )
    await conn.execute(
        insert(devices).values(
            id="d3", worker_name="w", kind="pico2-ice", state="BROKEN", state_time=NOW
        )
    )
    await add_reservation(conn, "r1", "d1")
    await conn.execute(insert(waiters).values(**waiter("SERVED", "r1")))


async def add_reservation(conn: AsyncConnection, rid: str, *device_ids: str, **values: Any) -> None:
    row = {"state": "ACTIVE", **values}
    await conn.execute(
        insert(reservations).values(
            id=rid, client_id="alice", create_time=NOW, end_time=NOW + timedelta(hours=1), **row
        )
    )
    for device_id in device_ids:
        await conn.execute(
            insert(reservation_devices).values(reservation_id=rid, device_id=device_id)
        )


def waiter(state: str, reservation_id: str | None) -> dict[str, Any]:
    return {
        "client_id": "alice",
        "count": 1,
        "lease_seconds": 60.0,
        "create_time": NOW,
        "deadline": NOW,
        "state": state,
        "reservation_id": reservation_id,
        "replica_id": "x",
    }


async def hold_d1_twice(conn: AsyncConnection) -> None:
    await add_reservation(conn, "r2", "d1")


async def holder_column_wrong(conn: AsyncConnection) -> None:
    await conn.execute(update(devices).where(devices.c.id == "d2").values(reservation_id="r1"))


async def reservation_without_devices(conn: AsyncConnection) -> None:
    await add_reservation(conn, "r2")


async def withdrawn_waiter_served(conn: AsyncConnection) -> None:
    await conn.execute(insert(waiters).values(**waiter("CANCELLED", "r1")))


async def served_waiter_without_reservation(conn: AsyncConnection) -> None:
    await conn.execute(insert(waiters).values(**waiter("SERVED", None)))


async def held_board_marked_free(conn: AsyncConnection) -> None:
    await conn.execute(update(devices).where(devices.c.id == "d1").values(state="AVAILABLE"))


async def unknown_device_state(conn: AsyncConnection) -> None:
    await conn.execute(update(devices).where(devices.c.id == "d3").values(state="MELTED"))


async def unknown_end_reason(conn: AsyncConnection) -> None:
    await add_reservation(conn, "r2", state="ENDED", end_reason="BORED")


async def unknown_worker_state(conn: AsyncConnection) -> None:
    await conn.execute(update(workers).values(state="ASLEEP"))


LIES = {
    "device held by two active reservations": hold_d1_twice,
    "devices.reservation_id disagrees with the active holder": holder_column_wrong,
    "active reservation holding no device": reservation_without_devices,
    "withdrawn (CANCELLED) waiter whose reservation is active": withdrawn_waiter_served,
    "waiter state inconsistent with its reservation": served_waiter_without_reservation,
    "device state disagrees with its holder": held_board_marked_free,
    "device state is not a DeviceState": unknown_device_state,
    "reservation state or end reason is not legal": unknown_end_reason,
    "worker state is not a WorkerState": unknown_worker_state,
}


async def test_a_consistent_farm_breaks_no_invariant_and_each_lie_is_caught(
    database: Database,
) -> None:
    async with database.write() as conn:
        await seed(conn)
    assert await invariants.violations(database) == []
    for invariant, lie in LIES.items():
        # Each lie in its own transaction, rolled back: the next one starts from the farm again.
        async with database.engine.connect() as conn:
            transaction = await conn.begin()
            await lie(conn)
            found = {v.invariant for v in await invariants.check(conn)}
            await transaction.rollback()
        assert invariant in found, (invariant, found)
