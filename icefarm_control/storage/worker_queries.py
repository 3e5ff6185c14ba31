"""The statements behind worker sessions: sessions, liveness, drains, device reports, commands.

Like storage/queries.py, each function runs inside the caller's transaction and none commits.
Every change that more than one replica may attempt (going offline, finishing a drain, timing
out a command) is one conditional UPDATE … RETURNING, so exactly one replica acts on each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.states import DeviceState, WorkerState
from icefarm_control.storage import outbox
from icefarm_control.storage.models import devices, worker_commands, workers
from icefarm_control.storage.queries import device_row, device_select
from icefarm_control.storage.records import DeviceRow, WorkerRow

# States a device keeps while its worker is away: already gone, nothing to record.
_NOT_OFFLINED = (DeviceState.OFFLINE.value, DeviceState.REMOVED.value)


@dataclass(frozen=True)
class WorkerSessionRow:
    """The session bookkeeping of a worker row."""

    name: str
    state: str
    last_seen_time: datetime
    session_replica: str | None
    session_generation: int
    drain_deadline: datetime | None


# ---------------------------------------------------------------- sessions


async def ensure_worker(conn: AsyncConnection, name: str, now: datetime) -> None:
    """Create the worker row if it does not exist (offline, no session), so it can be locked."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(
        dialect_insert(workers)
        .values(
            name=name,
            endpoint="",
            version="",
            modes=[],
            labels={},
            state=WorkerState.OFFLINE.value,
            last_seen_time=now,
            session_generation=0,
        )
        .on_conflict_do_nothing(index_elements=[workers.c.name])
    )


async def lock_worker(conn: AsyncConnection, name: str) -> WorkerSessionRow | None:
    query = (
        select(
            workers.c.name,
            workers.c.state,
            workers.c.last_seen_time,
            workers.c.session_replica,
            workers.c.session_generation,
            workers.c.drain_deadline,
        )
        .where(workers.c.name == name)
        .with_for_update()
    )
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    return WorkerSessionRow(
        row.name,
        row.state,
        row.last_seen_time,
        row.session_replica,
        row.session_generation,
        row.drain_deadline,
    )


async def start_session(
    conn: AsyncConnection,
    name: str,
    *,
    endpoint: str,
    version: str,
    modes: Sequence[str],
    labels: dict[str, str],
    state: WorkerState,
    replica: str,
    generation: int,
    drain_deadline: datetime | None,
    now: datetime,
) -> None:
    await conn.execute(
        update(workers)
        .where(workers.c.name == name)
        .values(
            endpoint=endpoint,
            version=version,
            modes=list(modes),
            labels=labels,
            state=state.value,
            last_seen_time=now,
            connect_time=now,
            session_replica=replica,
            session_generation=generation,
            drain_deadline=drain_deadline,
        )
    )


async def end_session(conn: AsyncConnection, name: str, generation: int) -> None:
    """The stream of `generation` ended: the name is free again, unless a newer session has it."""
    await conn.execute(
        update(workers)
        .where(workers.c.name == name, workers.c.session_generation == generation)
        .values(session_replica=None)
    )


async def record_heartbeat(
    conn: AsyncConnection, name: str, generation: int, now: datetime
) -> bool:
    """last_seen = now for a live session; False when the session was replaced or timed out."""
    result = await conn.execute(
        update(workers)
        .where(
            workers.c.name == name,
            workers.c.session_generation == generation,
            workers.c.state != WorkerState.OFFLINE.value,
        )
        .values(last_seen_time=now)
    )
    return result.rowcount == 1


async def session_is_current(
    conn: AsyncConnection, name: str, generation: int, replica: str
) -> bool:
    query = select(workers.c.name).where(
        workers.c.name == name,
        workers.c.session_generation == generation,
        workers.c.session_replica == replica,
        workers.c.state != WorkerState.OFFLINE.value,
    )
    return (await conn.execute(query)).first() is not None


async def get_worker(conn: AsyncConnection, name: str) -> WorkerRow | None:
    count = (
        select(func.count())
        .where(devices.c.worker_name == workers.c.name)
        .where(devices.c.state != DeviceState.REMOVED.value)
        .scalar_subquery()
    )
    query = select(workers, count.label("device_count")).where(workers.c.name == name)
    r = (await conn.execute(query)).first()
    if r is None:
        return None
    return WorkerRow(
        name=r.name,
        endpoint=r.endpoint,
        version=r.version,
        modes=tuple(r.modes),
        labels=dict(r.labels),
        state=r.state,
        last_seen_time=r.last_seen_time,
        device_count=r.device_count,
    )


# ---------------------------------------------------------------- liveness and drains


async def mark_silent_workers_offline(conn: AsyncConnection, silent_since: datetime) -> list[str]:
    """Workers that registered over a stream and were silent since `silent_since` go OFFLINE.
    (Workers seeded without a session, generation 0, are never touched.)"""
    rows = await conn.execute(
        update(workers)
        .where(
            workers.c.session_generation >= 1,
            workers.c.state.in_([WorkerState.ONLINE.value, WorkerState.DRAINING.value]),
            workers.c.last_seen_time < silent_since,
        )
        .values(state=WorkerState.OFFLINE.value)
        .returning(workers.c.name)
    )
    return sorted(r.name for r in rows)


async def take_devices_offline(conn: AsyncConnection, worker: str, now: datetime) -> list[str]:
    """Every device of the worker that is still there goes OFFLINE, keeping its hold."""
    rows = await conn.execute(
        update(devices)
        .where(devices.c.worker_name == worker, devices.c.state.notin_(_NOT_OFFLINED))
        .values(state=DeviceState.OFFLINE.value, state_time=now)
        .returning(devices.c.id)
    )
    return sorted(r.id for r in rows)


async def held_devices_of_lost_workers(conn: AsyncConnection, lost_since: datetime) -> list[str]:
    """Held devices of workers (with sessions) offline and silent since before `lost_since`."""
    query = (
        select(devices.c.id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(
            workers.c.session_generation >= 1,
            workers.c.state == WorkerState.OFFLINE.value,
            workers.c.last_seen_time < lost_since,
            devices.c.reservation_id.is_not(None),
        )
        .order_by(devices.c.id)
    )
    return [r.id for r in await conn.execute(query)]


async def set_draining(conn: AsyncConnection, name: str, deadline: datetime) -> None:
    await conn.execute(
        update(workers)
        .where(workers.c.name == name)
        .values(state=WorkerState.DRAINING.value, drain_deadline=deadline)
    )


async def held_devices_of_overdue_drains(conn: AsyncConnection, now: datetime) -> list[str]:
    """Held devices of draining workers whose drain deadline has passed."""
    query = (
        select(devices.c.id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(
            workers.c.state == WorkerState.DRAINING.value,
            workers.c.drain_deadline <= now,
            devices.c.reservation_id.is_not(None),
        )
        .order_by(devices.c.id)
    )
    return [r.id for r in await conn.execute(query)]


async def finish_drains(conn: AsyncConnection, worker: str | None = None) -> list[str]:
    """Draining workers (all, or just `worker`) that hold no reservation any more finish their
    drain: the deadline is cleared, which also makes this happen once per drain."""
    holding = exists().where(
        devices.c.worker_name == workers.c.name, devices.c.reservation_id.is_not(None)
    )
    statement = (
        update(workers)
        .where(
            workers.c.state == WorkerState.DRAINING.value,
            workers.c.drain_deadline.is_not(None),
            ~holding,
        )
        .values(drain_deadline=None)
        .returning(workers.c.name)
    )
    if worker is not None:
        statement = statement.where(workers.c.name == worker)
    return sorted(r.name for r in await conn.execute(statement))


# ---------------------------------------------------------------- devices


async def worker_devices(conn: AsyncConnection, worker: str) -> list[DeviceRow]:
    """The worker's devices, locked, by id."""
    query = (
        device_select()
        .where(devices.c.worker_name == worker)
        .order_by(devices.c.id)
        .with_for_update(of=devices)
    )
    return [device_row(r) for r in await conn.execute(query)]


async def lock_device(conn: AsyncConnection, device_id: str) -> DeviceRow | None:
    query = device_select().where(devices.c.id == device_id).with_for_update(of=devices)
    row = (await conn.execute(query)).first()
    return device_row(row) if row else None


async def write_device(
    conn: AsyncConnection, device_id: str, *, exists_already: bool, values: dict[str, Any]
) -> None:
    """Insert the device or update the given columns."""
    if exists_already:
        await conn.execute(update(devices).where(devices.c.id == device_id).values(**values))
    else:
        await conn.execute(devices.insert().values(id=device_id, **values))


# ---------------------------------------------------------------- commands


async def open_commands(conn: AsyncConnection, worker: str) -> list[outbox.CommandRow]:
    """Commands for the worker not yet answered (PENDING or SENT), oldest first."""
    query = (
        select(worker_commands)
        .where(
            worker_commands.c.worker_name == worker,
            worker_commands.c.state.in_([outbox.PENDING, outbox.SENT]),
        )
        .order_by(worker_commands.c.id)
    )
    return [outbox.command_row(r) for r in await conn.execute(query)]


async def has_pending_commands(conn: AsyncConnection, worker: str) -> bool:
    query = (
        select(worker_commands.c.id)
        .where(worker_commands.c.worker_name == worker, worker_commands.c.state == outbox.PENDING)
        .limit(1)
    )
    return (await conn.execute(query)).first() is not None


async def time_out_commands(conn: AsyncConnection, now: datetime) -> list[outbox.CommandRow]:
    """SENT commands past their deadline become TIMED_OUT, except those of offline workers
    (they are sent again when the worker registers). Returns the ones timed out."""
    reachable = select(workers.c.name).where(workers.c.state != WorkerState.OFFLINE.value)
    rows = await conn.execute(
        update(worker_commands)
        .where(
            worker_commands.c.state == outbox.SENT,
            worker_commands.c.deadline < now,
            worker_commands.c.worker_name.in_(reachable),
        )
        .values(state=outbox.TIMED_OUT, done_time=now, error="no answer before the deadline")
        .returning(*worker_commands.c)
    )
    return [outbox.command_row(r) for r in rows]


async def offered_modes(conn: AsyncConnection) -> set[str]:
    """Every mode some worker advertised when it registered."""
    offered: set[str] = set()
    for (modes,) in await conn.execute(select(workers.c.modes)):
        offered.update(str(m) for m in modes or ())
    return offered
