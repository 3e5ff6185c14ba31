"""The statements behind worker sessions: sessions, liveness, drains, device reports, commands.

Like storage/queries.py, each function runs inside the caller's transaction and none commits.
Every change that more than one replica may attempt (going offline, finishing a drain, timing
out a command) is one conditional UPDATE … RETURNING, so exactly one replica acts on each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.states import DeviceState, WorkerState
from icefarm_control.storage import outbox
from icefarm_control.storage.models import devices, reservations, worker_commands, workers
from icefarm_control.storage.queries import device_row, device_select
from icefarm_control.storage.records import DeviceRow, WorkerRow
from icefarm_control.storage.replicas import live_replica_ids

# States a device keeps while its worker is away: already gone, nothing to record.
_NOT_OFFLINED = (DeviceState.OFFLINE.value, DeviceState.REMOVED.value)


class HoldsChanged(Exception):
    """A device gained a holder between reading its holders and locking it, and that holder's
    reservation is locked by someone else right now: roll back and run the transaction again
    (waiting for the lock here could deadlock against a release, which locks the reservation
    first and the device second)."""


@dataclass(frozen=True)
class DeadSession:
    """A worker whose session the caller decided is over, with the generation it decided on."""

    name: str
    generation: int


@dataclass(frozen=True)
class WorkerSessionRow:
    """The session bookkeeping of a worker row."""

    name: str
    state: str
    last_seen_time: datetime
    session_replica: str | None
    session_generation: int
    drain_deadline: datetime | None
    labels: dict[str, str] = field(default_factory=dict)


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
            workers.c.labels,
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
        dict(row.labels or {}),
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


async def end_session(conn: AsyncConnection, name: str, generation: int) -> bool:
    """The stream of `generation` ended: the worker is OFFLINE and its name free again, unless
    a newer session has it. True when this ended the current session."""
    result = await conn.execute(
        update(workers)
        .where(workers.c.name == name, workers.c.session_generation == generation)
        .values(session_replica=None, state=WorkerState.OFFLINE.value)
        .returning(workers.c.name)
    )
    return result.first() is not None


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


async def lock_dead_sessions(
    conn: AsyncConnection, *, silent_since: datetime, stale_since: datetime, replica_id: str
) -> list[DeadSession]:
    """Lock the workers (with a session; workers seeded for tests have generation 0) whose
    session is over although they are still ONLINE or DRAINING: silent since `silent_since`,
    or held by another replica that has not refreshed its row since `stale_since` (it died),
    or by none. Rows another transaction holds (a Register) are skipped: next sweep."""
    held_by_a_dead_replica = or_(
        workers.c.session_replica.is_(None),
        (workers.c.session_replica != replica_id)
        & workers.c.session_replica.notin_(live_replica_ids(stale_since)),
    )
    query = (
        select(workers.c.name, workers.c.session_generation)
        .where(
            workers.c.session_generation >= 1,
            workers.c.state.in_([WorkerState.ONLINE.value, WorkerState.DRAINING.value]),
            or_(workers.c.last_seen_time < silent_since, held_by_a_dead_replica),
        )
        .order_by(workers.c.name)
        .with_for_update(of=workers, skip_locked=True)
    )
    return [DeadSession(r.name, r.session_generation) for r in await conn.execute(query)]


async def set_offline(conn: AsyncConnection, name: str) -> None:
    """The worker's session is over (the caller holds its row): OFFLINE, name free."""
    await conn.execute(
        update(workers)
        .where(workers.c.name == name)
        .values(state=WorkerState.OFFLINE.value, session_replica=None)
    )


async def take_devices_offline(
    conn: AsyncConnection, worker: str, now: datetime, limit: int
) -> list[str]:
    """Up to `limit` devices of the worker that are still there go OFFLINE, keeping their
    holds (the worker grace counts from now: see lock_lost_workers)."""
    batch = (
        select(devices.c.id)
        .where(devices.c.worker_name == worker, devices.c.state.notin_(_NOT_OFFLINED))
        .order_by(devices.c.id)
        .limit(limit)
    )
    rows = await conn.execute(
        update(devices)
        .where(devices.c.id.in_(batch.scalar_subquery()))
        .values(state=DeviceState.OFFLINE.value, state_time=now)
        .returning(devices.c.id)
    )
    return sorted(r.id for r in rows)


async def offline_workers_with_live_devices(conn: AsyncConnection) -> list[DeadSession]:
    """OFFLINE workers (with a session) some of whose devices were not taken offline yet (a
    replica stopped half-way through)."""
    query = (
        select(workers.c.name, workers.c.session_generation)
        .where(
            workers.c.session_generation >= 1,
            workers.c.state == WorkerState.OFFLINE.value,
            exists().where(
                devices.c.worker_name == workers.c.name, devices.c.state.notin_(_NOT_OFFLINED)
            ),
        )
        .order_by(workers.c.name)
    )
    return [DeadSession(r.name, r.session_generation) for r in await conn.execute(query)]


def _held_since(lost_since: datetime) -> Any:
    """A held device of the worker that has been where it is (OFFLINE, for a worker that is
    offline) since at least `lost_since`."""
    return (
        (devices.c.worker_name == workers.c.name)
        & devices.c.reservation_id.is_not(None)
        & (devices.c.state_time <= lost_since)
    )


async def lock_lost_workers(conn: AsyncConnection, lost_since: datetime) -> list[str]:
    """Lock the OFFLINE workers (with sessions) gone since at least `lost_since` (last heard
    from then, their boards offline since then) that still have held boards. The lock orders
    this against a Register bringing the worker back: whichever comes second sees the other's
    outcome. Rows another transaction holds are skipped (next sweep)."""
    query = (
        select(workers.c.name)
        .where(
            workers.c.session_generation >= 1,
            workers.c.state == WorkerState.OFFLINE.value,
            workers.c.last_seen_time <= lost_since,
            exists().where(_held_since(lost_since)),
        )
        .order_by(workers.c.name)
        .with_for_update(of=workers, skip_locked=True)
    )
    return [r.name for r in await conn.execute(query)]


async def held_devices_of_lost_workers(
    conn: AsyncConnection, names: Sequence[str], lost_since: datetime
) -> list[str]:
    """Held devices of the given (locked, OFFLINE) workers, offline since `lost_since`."""
    if not names:
        return []
    query = (
        select(devices.c.id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(
            workers.c.name.in_(list(names)),
            workers.c.state == WorkerState.OFFLINE.value,
            _held_since(lost_since),
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


async def lock_overdue_drains(conn: AsyncConnection, now: datetime) -> list[str]:
    """Lock the draining workers past their drain deadline that still hold boards."""
    holding = exists().where(
        devices.c.worker_name == workers.c.name, devices.c.reservation_id.is_not(None)
    )
    query = (
        select(workers.c.name)
        .where(
            workers.c.state == WorkerState.DRAINING.value,
            workers.c.drain_deadline <= now,
            holding,
        )
        .order_by(workers.c.name)
        .with_for_update(of=workers, skip_locked=True)
    )
    return [r.name for r in await conn.execute(query)]


async def held_devices_of(conn: AsyncConnection, names: Sequence[str]) -> list[str]:
    """Held devices of the given workers."""
    if not names:
        return []
    query = (
        select(devices.c.id)
        .where(devices.c.worker_name.in_(list(names)), devices.c.reservation_id.is_not(None))
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
    """The worker's devices, by id (not locked: lock the ones to change with lock_devices)."""
    query = device_select().where(devices.c.worker_name == worker).order_by(devices.c.id)
    return [device_row(r) for r in await conn.execute(query)]


async def get_devices(conn: AsyncConnection, device_ids: Sequence[str]) -> dict[str, DeviceRow]:
    """The devices (those that exist) as they are now, by id."""
    if not device_ids:
        return {}
    query = device_select().where(devices.c.id.in_(sorted(set(device_ids))))
    return {r.id: device_row(r) for r in await conn.execute(query)}


async def lock_devices(conn: AsyncConnection, device_ids: Sequence[str]) -> dict[str, DeviceRow]:
    """Lock the devices (those that exist) and the reservations holding them, reservations
    first: the order a release takes them in (it locks its reservation, then frees the
    devices), so a transaction that ends holds of the devices it changes never deadlocks
    with one. Raises HoldsChanged when the order cannot be kept (see there)."""
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    holders = select(devices.c.reservation_id).where(
        devices.c.id.in_(ids), devices.c.reservation_id.is_not(None)
    )
    locked = {
        r.id
        for r in await conn.execute(
            select(reservations.c.id)
            .where(reservations.c.id.in_(holders.scalar_subquery()))
            .order_by(reservations.c.id)
            .with_for_update(of=reservations)
        )
    }
    query = (
        device_select()
        .where(devices.c.id.in_(ids))
        .order_by(devices.c.id)
        .with_for_update(of=devices)
    )
    rows = {r.id: device_row(r) for r in await conn.execute(query)}
    newer = sorted({d.reservation_id for d in rows.values() if d.reservation_id} - locked)
    if newer:
        # Reserved in between: lock those too, but only without waiting.
        taken = await conn.execute(
            select(reservations.c.id)
            .where(reservations.c.id.in_(newer))
            .order_by(reservations.c.id)
            .with_for_update(of=reservations, skip_locked=True)
        )
        if len(taken.all()) < len(newer):
            raise HoldsChanged(f"devices were reserved meanwhile: {newer}")
    return rows


async def lock_device(conn: AsyncConnection, device_id: str) -> DeviceRow | None:
    """Lock one device and the reservation holding it (see lock_devices)."""
    return (await lock_devices(conn, [device_id])).get(device_id)


async def write_devices(
    conn: AsyncConnection, writes: Sequence[tuple[str, bool, dict[str, Any]]]
) -> None:
    """Insert or update many devices, each (id, exists already, columns to set): one
    executemany per set of columns, not a round trip per device."""
    inserts = [{"id": device_id, **values} for device_id, exists_already, values in writes
               if not exists_already]  # fmt: skip
    if inserts:
        await conn.execute(devices.insert(), inserts)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for device_id, exists_already, values in writes:
        if exists_already:
            row = {"b_id": device_id, **{f"b_{k}": v for k, v in values.items()}}
            groups.setdefault(tuple(sorted(values)), []).append(row)
    for columns, rows in groups.items():
        statement = (
            update(devices)
            .where(devices.c.id == bindparam("b_id"))
            .values({c: bindparam(f"b_{c}", type_=devices.c[c].type) for c in columns})
        )
        await conn.execute(statement, rows)


async def write_device(
    conn: AsyncConnection, device_id: str, *, exists_already: bool, values: dict[str, Any]
) -> None:
    """Insert the device or update the given columns."""
    if exists_already:
        await conn.execute(update(devices).where(devices.c.id == device_id).values(**values))
    else:
        await conn.execute(devices.insert().values(id=device_id, **values))


# ---------------------------------------------------------------- commands


async def open_commands(
    conn: AsyncConnection, worker: str, device_ids: Sequence[str] | None = None
) -> list[outbox.CommandRow]:
    """Commands for the worker (about the given devices, when given) not yet answered
    (PENDING or SENT), oldest first."""
    query = (
        select(worker_commands)
        .where(
            worker_commands.c.worker_name == worker,
            worker_commands.c.state.in_([outbox.PENDING, outbox.SENT]),
        )
        .order_by(worker_commands.c.id)
    )
    if device_ids is not None:
        query = query.where(worker_commands.c.device_id.in_(list(device_ids)))
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
