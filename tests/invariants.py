"""What must be true of a control's database at every moment, checked by SQL.

Each invariant is one SELECT returning the rows that break it, so each is judged on one
snapshot (PostgreSQL READ COMMITTED gives every statement its own snapshot; a check spread over
several statements could see a change half-way and report a break that never existed). The
fuzz suite runs them after every case; the chaos soak runs them after every fault.

    broken = await violations(control.database)
    assert not broken, describe(broken)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select

from icefarm_control.domain.states import (
    HELD_STATES,
    DeviceState,
    EndReason,
    ReservationState,
    WorkerState,
)
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.models import (
    devices,
    reservation_devices,
    reservations,
    waiters,
    worker_commands,
    workers,
)
from icefarm_control.storage.waiter_queries import CANCELLED, SERVED, WAITING

ACTIVE = ReservationState.ACTIVE.value
DEVICE_STATES = [s.value for s in DeviceState]
WORKER_STATES = [s.value for s in WorkerState]
RESERVATION_STATES = [s.value for s in ReservationState]
END_REASONS = [r.value for r in EndReason]
WAITER_STATES = [WAITING, SERVED, CANCELLED]
COMMAND_STATES = [outbox.PENDING, outbox.SENT, outbox.DONE, outbox.FAILED, outbox.TIMED_OUT]

rd = reservation_devices
# A device is held by a reservation while its row is not released and the reservation is active.
_held = and_(
    rd.c.released_reason.is_(None),
    reservations.c.id == rd.c.reservation_id,
    reservations.c.state == ACTIVE,
)


@dataclass(frozen=True)
class Violation:
    """One invariant that does not hold, and (some of) the rows that break it."""

    invariant: str
    rows: tuple[tuple[Any, ...], ...]

    def __str__(self) -> str:
        shown = ", ".join(repr(tuple(r)) for r in self.rows[:5])
        more = f" (+{len(self.rows) - 5} more)" if len(self.rows) > 5 else ""
        return f"{self.invariant}: {shown}{more}"


def _device_held_twice() -> Select[Any]:
    return (
        select(rd.c.device_id, func.count())
        .select_from(rd.join(reservations, reservations.c.id == rd.c.reservation_id))
        .where(rd.c.released_reason.is_(None), reservations.c.state == ACTIVE)
        .group_by(rd.c.device_id)
        .having(func.count() > 1)
    )


def _holder_column_disagrees() -> Select[Any]:
    """devices.reservation_id must name exactly the active reservation holding the device."""
    held_by = (
        select(rd.c.reservation_id)
        .select_from(rd.join(reservations, reservations.c.id == rd.c.reservation_id))
        .where(rd.c.device_id == devices.c.id, _held)
        .limit(1)
        .scalar_subquery()
    )
    return select(devices.c.id, devices.c.reservation_id, held_by).where(
        or_(
            and_(devices.c.reservation_id.is_(None), held_by.is_not(None)),
            and_(devices.c.reservation_id.is_not(None), held_by.is_(None)),
            devices.c.reservation_id != held_by,
        )
    )


def _active_reservation_without_devices() -> Select[Any]:
    holds_one = exists().where(
        rd.c.reservation_id == reservations.c.id, rd.c.released_reason.is_(None)
    )
    return select(reservations.c.id, reservations.c.client_id).where(
        reservations.c.state == ACTIVE, not_(holds_one)
    )


def _withdrawn_waiter_holding() -> Select[Any]:
    """A waiter the caller was told is withdrawn ("holding nothing") whose reservation is live."""
    return (
        select(waiters.c.id, waiters.c.client_id, waiters.c.reservation_id)
        .select_from(waiters.join(reservations, reservations.c.id == waiters.c.reservation_id))
        .where(waiters.c.state == CANCELLED, reservations.c.state == ACTIVE)
    )


def _waiter_state_inconsistent() -> Select[Any]:
    """SERVED names its reservation; WAITING has none yet; the state is one of the three."""
    return select(waiters.c.id, waiters.c.state, waiters.c.reservation_id).where(
        or_(
            waiters.c.state.not_in(WAITER_STATES),
            and_(waiters.c.state == SERVED, waiters.c.reservation_id.is_(None)),
            and_(waiters.c.state == WAITING, waiters.c.reservation_id.is_not(None)),
        )
    )


def _held_state_without_holder() -> Select[Any]:
    """RESERVED/READY without a reservation, or AVAILABLE (reservable) with one."""
    return select(devices.c.id, devices.c.state, devices.c.reservation_id).where(
        or_(
            and_(
                devices.c.state.in_([s.value for s in HELD_STATES]),
                devices.c.reservation_id.is_(None),
            ),
            and_(
                devices.c.state == DeviceState.AVAILABLE.value,
                devices.c.reservation_id.is_not(None),
            ),
        )
    )


def _illegal_values() -> list[tuple[str, Select[Any]]]:
    return [
        (
            "device state is not a DeviceState",
            select(devices.c.id, devices.c.state).where(devices.c.state.not_in(DEVICE_STATES)),
        ),
        (
            "worker state is not a WorkerState",
            select(workers.c.name, workers.c.state).where(workers.c.state.not_in(WORKER_STATES)),
        ),
        (
            "reservation state or end reason is not legal",
            select(reservations.c.id, reservations.c.state, reservations.c.end_reason).where(
                or_(
                    reservations.c.state.not_in(RESERVATION_STATES),
                    reservations.c.end_reason.not_in(END_REASONS),
                    and_(reservations.c.state == ACTIVE, reservations.c.end_reason.is_not(None)),
                )
            ),
        ),
        (
            "released reason is not an EndReason",
            select(rd.c.reservation_id, rd.c.device_id, rd.c.released_reason).where(
                rd.c.released_reason.not_in(END_REASONS)
            ),
        ),
        (
            "worker command state is not legal",
            select(worker_commands.c.correlation_id, worker_commands.c.state).where(
                worker_commands.c.state.not_in(COMMAND_STATES)
            ),
        ),
    ]


def checks() -> list[tuple[str, Select[Any]]]:
    """(name, statement returning the rows that break it) for every invariant."""
    return [
        ("device held by two active reservations", _device_held_twice()),
        ("devices.reservation_id disagrees with the active holder", _holder_column_disagrees()),
        ("active reservation holding no device", _active_reservation_without_devices()),
        ("withdrawn (CANCELLED) waiter whose reservation is active", _withdrawn_waiter_holding()),
        ("waiter state inconsistent with its reservation", _waiter_state_inconsistent()),
        ("device state disagrees with its holder", _held_state_without_holder()),
        *_illegal_values(),
    ]


async def check(conn: AsyncConnection, limit: int = 20) -> list[Violation]:
    """Every invariant that does not hold on `conn` (each judged by one statement)."""
    found: list[Violation] = []
    for name, statement in checks():
        rows = (await conn.execute(statement.limit(limit))).all()
        if rows:
            found.append(Violation(name, tuple(tuple(r) for r in rows)))
    return found


async def violations(database: Database) -> list[Violation]:
    """Every invariant that does not hold in the control's database now."""
    async with database.read() as conn:
        return await check(conn)


def describe(found: Sequence[Violation]) -> str:
    return "; ".join(str(v) for v in found)
