"""Every statement the control runs, named, in one place. Each function takes an open
connection inside the caller's transaction; none commits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.selectors import Selector
from icefarm_control.domain.states import LOST_STATES, DeviceState, ReservationState, WorkerState
from icefarm_control.storage.models import (
    devices,
    has_open_session,
    reservation_devices,
    reservations,
    waiters,
    workers,
)
from icefarm_control.storage.records import (
    DeviceRow,
    ReservationRow,
    ReservedDeviceRow,
    WorkerRow,
)
from icefarm_control.storage.selector_sql import selector_clause
from icefarm_control.storage.waiter_queries import WAITING

# Serialises fair allocation across replicas (PostgreSQL transaction-level advisory lock).
ALLOCATION_LOCK_KEY = 0x1CEFA12


# ---------------------------------------------------------------- workers and devices


async def upsert_worker(
    conn: AsyncConnection,
    *,
    name: str,
    endpoint: str,
    version: str,
    modes: Sequence[str],
    labels: dict[str, str],
    state: WorkerState,
    now: datetime,
) -> None:
    values = {
        "endpoint": endpoint,
        "version": version,
        "modes": list(modes),
        "labels": labels,
        "state": state.value,
        "last_seen_time": now,
    }
    result = await conn.execute(update(workers).where(workers.c.name == name).values(**values))
    if result.rowcount == 0:
        await conn.execute(insert(workers).values(name=name, connect_time=now, **values))


async def set_worker_state(
    conn: AsyncConnection, name: str, state: WorkerState, now: datetime
) -> None:
    await conn.execute(
        update(workers).where(workers.c.name == name).values(state=state.value, last_seen_time=now)
    )


async def upsert_device(
    conn: AsyncConnection,
    *,
    device_id: str,
    worker: str,
    kind: str,
    state: DeviceState,
    labels: dict[str, str],
    properties: dict[str, float],
    reset_on_release: bool,
    now: datetime,
    error: str = "",
) -> None:
    values = {
        "worker_name": worker,
        "kind": kind,
        "state": state.value,
        "state_time": now,
        "labels": labels,
        "properties": properties,
        "reset_on_release": reset_on_release,
        "error": error,
    }
    result = await conn.execute(update(devices).where(devices.c.id == device_id).values(**values))
    if result.rowcount == 0:
        await conn.execute(insert(devices).values(id=device_id, **values))


async def set_device_state(
    conn: AsyncConnection,
    device_ids: Sequence[str],
    state: DeviceState,
    now: datetime,
    *,
    error: str | None = None,
    clear_reservation: bool = False,
) -> None:
    if not device_ids:
        return
    values: dict[str, Any] = {"state": state.value, "state_time": now}
    if error is not None:
        values["error"] = error
    if clear_reservation:
        values["reservation_id"] = None
    await conn.execute(update(devices).where(devices.c.id.in_(device_ids)).values(**values))


def device_select() -> Select[Any]:
    return (
        select(
            devices,
            workers.c.endpoint.label("worker_endpoint"),
            workers.c.state.label("worker_state"),
            reservations.c.client_id.label("holder"),
        )
        .join(workers, workers.c.name == devices.c.worker_name)
        .outerjoin(reservations, reservations.c.id == devices.c.reservation_id)
    )


def device_row(row: Any) -> DeviceRow:
    return DeviceRow(
        id=row.id,
        worker=row.worker_name,
        kind=row.kind,
        labels=dict(row.labels),
        properties={k: float(v) for k, v in row.properties.items()},
        state=row.state,
        state_time=row.state_time,
        error=row.error,
        reset_on_release=row.reset_on_release,
        reservation_id=row.reservation_id,
        worker_endpoint=row.worker_endpoint or "",
        worker_state=row.worker_state or "",
        holder=row.holder or "",
    )


async def get_device(
    conn: AsyncConnection, device_id: str, *, lock: bool = False
) -> DeviceRow | None:
    """One device; `lock`: its row stays locked until the transaction ends."""
    query = device_select().where(devices.c.id == device_id)
    if lock:
        query = query.with_for_update(of=devices)
    row = (await conn.execute(query)).first()
    return device_row(row) if row else None


async def list_devices(
    conn: AsyncConnection,
    *,
    selector: Selector | None = None,
    state: DeviceState | None = None,
    limit: int | None = None,
    after_id: str = "",
) -> list[DeviceRow]:
    query = device_select().order_by(devices.c.id)
    if selector is not None and not selector.is_empty:
        query = query.where(selector_clause(selector))
    if state is not None:
        query = query.where(devices.c.state == state.value)
    if after_id:
        query = query.where(devices.c.id > after_id)
    if limit is not None:
        query = query.limit(limit)
    return [device_row(r) for r in await conn.execute(query)]


async def existing_device_ids(conn: AsyncConnection, device_ids: Iterable[str]) -> set[str]:
    ids = list(device_ids)
    rows = await conn.execute(select(devices.c.id).where(devices.c.id.in_(ids)))
    return {r.id for r in rows}


async def unusable_devices(conn: AsyncConnection, device_ids: Iterable[str]) -> list[str]:
    """Of `device_ids`, "<id> is <why>" for each that no reservation can take until something
    changes (broken, removed, offline, or on a worker that is not online)."""
    query = (
        select(devices.c.id, devices.c.state, workers.c.state.label("worker_state"))
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(devices.c.id.in_(list(device_ids)))
        .order_by(devices.c.id)
    )
    unusable: list[str] = []
    for row in await conn.execute(query):
        if row.state in LOST_STATE_VALUES:
            unusable.append(f"{row.id} is {row.state.lower()}")
        elif row.worker_state != WorkerState.ONLINE.value:
            unusable.append(f"{row.id} is on a worker that is {row.worker_state.lower()}")
    return unusable


async def list_workers(
    conn: AsyncConnection, *, limit: int | None = None, after_name: str = ""
) -> list[WorkerRow]:
    count = (
        select(func.count())
        .where(devices.c.worker_name == workers.c.name)
        .where(devices.c.state != DeviceState.REMOVED.value)
        .scalar_subquery()
    )
    query = select(workers, count.label("device_count")).order_by(workers.c.name)
    if after_name:
        query = query.where(workers.c.name > after_name)
    if limit is not None:
        query = query.limit(limit)
    return [
        WorkerRow(
            name=r.name,
            endpoint=r.endpoint,
            version=r.version,
            modes=tuple(r.modes),
            labels=dict(r.labels),
            state=r.state,
            last_seen_time=r.last_seen_time,
            device_count=r.device_count,
        )
        for r in await conn.execute(query)
    ]


# ---------------------------------------------------------------- allocation


def _free_condition() -> ColumnElement[bool]:
    return and_(
        devices.c.state == DeviceState.AVAILABLE.value,
        devices.c.reservation_id.is_(None),
        workers.c.state == WorkerState.ONLINE.value,
    )


async def lock_allocation(conn: AsyncConnection) -> None:
    """Serialise fair allocation with every other replica until this transaction ends."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ALLOCATION_LOCK_KEY})


async def take_free_devices_fast(
    conn: AsyncConnection,
    *,
    selector: Selector | None,
    count: int,
    device_ids: Sequence[str],
) -> list[ReservedDeviceRow] | None:
    """The fast path: lock `count` free matching devices (or exactly `device_ids`), least
    recently used first, skipping rows other transactions hold right now.

    Returns None when that is not enough or somebody is queued: the caller then takes the
    slow path, which waits for those locks and plans fairly, so a shortage is only reported
    when the devices are really gone (never because a competing transaction held them briefly).
    """
    query = (
        select(
            devices.c.id,
            devices.c.worker_name,
            devices.c.kind,
            devices.c.reset_on_release,
            workers.c.endpoint,
        )
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(_free_condition())
        .where(~exists().where(waiters.c.state == WAITING))
        .order_by(devices.c.state_time, devices.c.id)
        .with_for_update(of=devices, skip_locked=True)
    )
    if device_ids:
        query = query.where(devices.c.id.in_(list(device_ids)))
    else:
        if selector is not None and not selector.is_empty:
            query = query.where(selector_clause(selector))
        query = query.limit(count)
    rows = [
        ReservedDeviceRow.newly_reserved(
            id=r.id,
            worker=r.worker_name,
            endpoint=r.endpoint,
            kind=r.kind,
            reset_on_release=r.reset_on_release,
        )
        for r in await conn.execute(query)
    ]
    return rows if len(rows) == (len(device_ids) or count) else None


async def lock_free_devices(conn: AsyncConnection) -> list[DeviceRow]:
    """Every free device, locked (waiting for other transactions' locks), least recently used
    first: what fair planning works from. Call lock_allocation first."""
    query = (
        device_select()
        .where(_free_condition())
        .order_by(devices.c.state_time, devices.c.id)
        .with_for_update(of=devices)
    )
    return [device_row(r) for r in await conn.execute(query)]


async def count_free_devices(conn: AsyncConnection, selector: Selector | None) -> list[str]:
    query = (
        select(devices.c.id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(_free_condition())
        .order_by(devices.c.id)
    )
    if selector is not None and not selector.is_empty:
        query = query.where(selector_clause(selector))
    return [r.id for r in await conn.execute(query)]


async def count_matching_devices(conn: AsyncConnection, selector: Selector | None) -> int:
    """Devices in the farm (any state but REMOVED) that match: what a request could ever get."""
    query = (
        select(func.count())
        .select_from(devices.join(workers, workers.c.name == devices.c.worker_name))
        .where(devices.c.state != DeviceState.REMOVED.value)
    )
    if selector is not None and not selector.is_empty:
        query = query.where(selector_clause(selector))
    return int((await conn.execute(query)).scalar_one())


# ---------------------------------------------------------------- reservations


async def insert_reservation(
    conn: AsyncConnection,
    *,
    reservation_id: str,
    client_id: str,
    mode: str,
    mode_args: dict[str, str],
    selector: str,
    device_ids: Sequence[str],
    now: datetime,
    end_time: datetime,
    request_id: str | None,
) -> None:
    await conn.execute(
        insert(reservations).values(
            id=reservation_id,
            client_id=client_id,
            mode=mode,
            mode_args=mode_args,
            selector=selector,
            create_time=now,
            end_time=end_time,
            state=ReservationState.ACTIVE.value,
            request_id=request_id,
            ending_soon_sent=False,
            attached=has_open_session(client_id),
        )
    )
    await conn.execute(
        insert(reservation_devices),
        [{"reservation_id": reservation_id, "device_id": d} for d in device_ids],
    )
    await conn.execute(
        update(devices)
        .where(devices.c.id.in_(list(device_ids)))
        .values(state=DeviceState.RESERVED.value, state_time=now, reservation_id=reservation_id)
    )


LOST_STATE_VALUES = frozenset(state.value for state in LOST_STATES)


def _reservation_select() -> Select[Any]:
    return select(reservations)


async def _attach_devices(conn: AsyncConnection, rows: Sequence[Any]) -> list[ReservationRow]:
    if not rows:
        return []
    ids = [r.id for r in rows]
    held: dict[str, list[ReservedDeviceRow]] = {i: [] for i in ids}
    device_rows = await conn.execute(
        select(
            reservation_devices.c.reservation_id,
            reservation_devices.c.released_reason,
            devices.c.id,
            devices.c.worker_name,
            devices.c.state,
            devices.c.kind,
            devices.c.reset_on_release,
            workers.c.endpoint,
        )
        .join(devices, devices.c.id == reservation_devices.c.device_id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(reservation_devices.c.reservation_id.in_(ids))
        .order_by(devices.c.id)
    )
    for d in device_rows:
        still_held = d.released_reason is None
        held[d.reservation_id].append(
            ReservedDeviceRow(
                id=d.id,
                worker=d.worker_name,
                worker_endpoint=d.endpoint,
                # Once let go, the device's current state is someone else's business.
                state=d.state if still_held else "",
                kind=d.kind,
                released_reason=d.released_reason,
                reset_on_release=d.reset_on_release,
            )
        )
    return [
        ReservationRow(
            id=r.id,
            client_id=r.client_id,
            mode=r.mode,
            mode_args=dict(r.mode_args),
            selector=r.selector,
            create_time=r.create_time,
            end_time=r.end_time,
            state=r.state,
            end_reason=r.end_reason,
            ended_time=r.ended_time,
            request_id=r.request_id,
            devices=tuple(held[r.id]),
        )
        for r in rows
    ]


async def get_reservations(
    conn: AsyncConnection, reservation_ids: Sequence[str], *, lock: bool = False
) -> list[ReservationRow]:
    query = _reservation_select().where(reservations.c.id.in_(list(reservation_ids)))
    if lock:
        query = query.with_for_update()
    return await _attach_devices(conn, (await conn.execute(query)).all())


async def reservation_by_request(
    conn: AsyncConnection, client_id: str, request_id: str
) -> ReservationRow | None:
    query = _reservation_select().where(
        reservations.c.client_id == client_id, reservations.c.request_id == request_id
    )
    found = await _attach_devices(conn, (await conn.execute(query)).all())
    return found[0] if found else None


async def active_reservation_ids(
    conn: AsyncConnection,
    *,
    client_id: str | None = None,
    device_ids: Sequence[str] = (),
    reservation_ids: Sequence[str] = (),
) -> list[str]:
    """Active reservations matching every filter given (client, holding one of the devices,
    one of the ids)."""
    query = select(reservations.c.id).where(reservations.c.state == ReservationState.ACTIVE.value)
    if client_id is not None:
        query = query.where(reservations.c.client_id == client_id)
    if reservation_ids:
        query = query.where(reservations.c.id.in_(list(reservation_ids)))
    if device_ids:
        holding = select(reservation_devices.c.reservation_id).where(
            reservation_devices.c.device_id.in_(list(device_ids)),
            reservation_devices.c.released_reason.is_(None),
        )
        query = query.where(reservations.c.id.in_(holding))
    return [r.id for r in await conn.execute(query.order_by(reservations.c.id))]


async def list_reservations(
    conn: AsyncConnection,
    *,
    client_id: str | None,
    include_ended: bool,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[ReservationRow]:
    """Newest first; `before` is the (create_time, id) of the last row of the previous page."""
    query = _reservation_select().order_by(
        reservations.c.create_time.desc(), reservations.c.id.desc()
    )
    if client_id is not None:
        query = query.where(reservations.c.client_id == client_id)
    if not include_ended:
        query = query.where(reservations.c.state == ReservationState.ACTIVE.value)
    if before is not None:
        time, rid = before
        query = query.where(
            (reservations.c.create_time < time)
            | and_(reservations.c.create_time == time, reservations.c.id < rid)
        )
    rows = (await conn.execute(query.limit(limit))).all()
    return await _attach_devices(conn, rows)


async def mark_devices_released(
    conn: AsyncConnection,
    reservation_id: str,
    device_ids: Sequence[str],
    reason: str,
    now: datetime,
) -> None:
    await conn.execute(
        update(reservation_devices)
        .where(
            reservation_devices.c.reservation_id == reservation_id,
            reservation_devices.c.device_id.in_(list(device_ids)),
            reservation_devices.c.released_reason.is_(None),
        )
        .values(released_reason=reason, released_time=now)
    )


async def free_devices(
    conn: AsyncConnection, targets: dict[DeviceState, list[str]], now: datetime
) -> None:
    """Let devices go: each group moves to its state and loses its reservation."""
    for state, ids in targets.items():
        await set_device_state(conn, ids, state, now, clear_reservation=True)


async def end_reservation(
    conn: AsyncConnection, reservation_id: str, reason: str, now: datetime
) -> None:
    await conn.execute(
        update(reservations)
        .where(reservations.c.id == reservation_id)
        .values(state=ReservationState.ENDED.value, end_reason=reason, ended_time=now)
    )


async def set_end_time(
    conn: AsyncConnection, reservation_ids: Sequence[str], end_time: datetime
) -> None:
    await conn.execute(
        update(reservations)
        .where(reservations.c.id.in_(list(reservation_ids)), reservations.c.end_time < end_time)
        .values(end_time=end_time, ending_soon_sent=False)
    )


async def due_reservation_ids(conn: AsyncConnection, now: datetime, limit: int) -> list[str]:
    """Active reservations whose lease has run out, locked (other replicas skip them)."""
    query = (
        select(reservations.c.id)
        .where(
            reservations.c.state == ReservationState.ACTIVE.value,
            reservations.c.end_time <= now,
        )
        .order_by(reservations.c.end_time)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [r.id for r in await conn.execute(query)]
