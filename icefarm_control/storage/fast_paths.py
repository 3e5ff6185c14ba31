"""PostgreSQL single-statement fast paths for the two hottest calls.

A reserve and a release each become one statement of data-modifying CTEs, run in autocommit:
one round trip instead of a dozen, and atomic because a statement is its own transaction.
When a fast path cannot answer (somebody is queued, not enough free devices, an id that is not
the caller's), it changes nothing and returns None, and the engine takes the general path,
which gives the precise answer or error. The general path is the specification; these only
have to agree with it (the same engine tests run through both).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.states import (
    HELD_STATES,
    DeviceState,
    ReservationState,
    WorkerState,
    state_after_release,
)
from icefarm_control.storage.models import (
    JsonDocument,
    UtcDateTime,
    devices,
    reservation_devices,
    reservations,
    waiters,
    workers,
)
from icefarm_control.storage.records import ReservedDeviceRow
from icefarm_control.storage.selector_sql import selector_clause

WAITING = "WAITING"


@functools.lru_cache(maxsize=256)
def _reserve_statement(selector_text: str, by_ids: bool) -> Select[Any]:
    """The reserve statement for one selector (or for explicit ids), built once: building
    these CTEs costs more CPU than running them."""
    picked_query = (
        select(devices.c.id)
        .join(workers, workers.c.name == devices.c.worker_name)
        .where(
            devices.c.state == DeviceState.AVAILABLE.value,
            devices.c.reservation_id.is_(None),
            workers.c.state == WorkerState.ONLINE.value,
            ~exists().where(waiters.c.state == WAITING),
        )
        .order_by(devices.c.state_time, devices.c.id)
        .with_for_update(of=devices, skip_locked=True)
    )
    if by_ids:
        picked_query = picked_query.where(devices.c.id.in_(bindparam("p_ids", expanding=True)))
    else:
        if selector_text:
            picked_query = picked_query.where(selector_clause(parse_selector(selector_text)))
        picked_query = picked_query.limit(bindparam("p_needed", type_=Integer()))
    picked = picked_query.cte("picked")
    enough = select(func.count()).select_from(picked).scalar_subquery() == bindparam(
        "p_needed", type_=Integer()
    )
    created = (
        insert(reservations)
        .from_select(
            [
                "id",
                "client_id",
                "mode",
                "mode_args",
                "selector",
                "create_time",
                "end_time",
                "state",
                "request_id",
                "ending_soon_sent",
            ],
            select(
                bindparam("p_reservation_id", type_=String()),
                bindparam("p_client_id", type_=String()),
                bindparam("p_mode", type_=String()),
                bindparam("p_mode_args", type_=JsonDocument),
                literal(selector_text, String()),
                bindparam("p_now", type_=UtcDateTime()),
                bindparam("p_end_time", type_=UtcDateTime()),
                literal(ReservationState.ACTIVE.value, String()),
                bindparam("p_request_id", type_=String()),
                literal(False, Boolean()),
            ).where(enough),
        )
        .returning(reservations.c.id)
        .cte("created")
    )
    linked = (
        insert(reservation_devices)
        .from_select(
            ["reservation_id", "device_id"],
            select(created.c.id, picked.c.id).select_from(created.join(picked, true())),
        )
        .returning(reservation_devices.c.device_id)
        .cte("linked")
    )
    taken = (
        update(devices)
        .where(devices.c.id == linked.c.device_id)
        .values(
            state=DeviceState.RESERVED.value,
            state_time=bindparam("p_now", type_=UtcDateTime()),
            reservation_id=bindparam("p_reservation_id", type_=String()),
        )
        .returning(devices.c.id, devices.c.worker_name, devices.c.kind, devices.c.reset_on_release)
        .cte("taken")
    )
    return (
        select(taken, workers.c.endpoint)
        .join(workers, workers.c.name == taken.c.worker_name)
        .order_by(taken.c.id)
    )


async def reserve_in_one_statement(
    conn: AsyncConnection,
    *,
    reservation_id: str,
    client_id: str,
    mode: str,
    mode_args: dict[str, str],
    selector_text: str,
    count: int,
    device_ids: Sequence[str],
    now: datetime,
    end_time: datetime,
    request_id: str | None,
) -> list[ReservedDeviceRow] | None:
    """Take `count` free devices matching the selector (or exactly `device_ids`) when nobody
    is queued; else None, having changed nothing."""
    needed = len(device_ids) or count
    params: dict[str, Any] = {
        "p_reservation_id": reservation_id,
        "p_client_id": client_id,
        "p_mode": mode,
        "p_mode_args": mode_args,
        "p_now": now,
        "p_end_time": end_time,
        "p_request_id": request_id,
        "p_needed": needed,
    }
    if device_ids:
        params["p_ids"] = list(device_ids)
    statement = _reserve_statement("" if device_ids else selector_text, bool(device_ids))
    rows = (await conn.execute(statement, params)).all()
    if len(rows) != needed:
        return None
    return [
        ReservedDeviceRow.newly_reserved(
            id=r.id,
            worker=r.worker_name,
            endpoint=r.endpoint,
            kind=r.kind,
            reset_on_release=r.reset_on_release,
        )
        for r in rows
    ]


def _state_after_release_sql() -> ColumnElement[str]:
    """`state_after_release` as SQL, generated from the one transition table."""
    whens = [
        (
            and_(devices.c.state == held.value, devices.c.reset_on_release.is_(reset)),
            literal(state_after_release(held, reset_on_release=reset).value, String()),
        )
        for held in sorted(HELD_STATES)
        for reset in (True, False)
    ]
    return case(*whens, else_=devices.c.state)


@functools.lru_cache(maxsize=1)
def _release_statement() -> Select[Any]:
    target = (
        select(reservations.c.id)
        .where(
            reservations.c.id.in_(bindparam("p_ids", expanding=True)),
            reservations.c.client_id == bindparam("p_client_id", type_=String()),
            reservations.c.state == ReservationState.ACTIVE.value,
        )
        .with_for_update()
        .cte("target")
    )
    all_mine = select(func.count()).select_from(target).scalar_subquery() == bindparam(
        "p_expected", type_=Integer()
    )
    reason = bindparam("p_reason", type_=String())
    now = bindparam("p_now", type_=UtcDateTime())
    ended = (
        update(reservations)
        .where(reservations.c.id == target.c.id, all_mine)
        .values(state=ReservationState.ENDED.value, end_reason=reason, ended_time=now)
        .returning(reservations.c.id)
        .cte("ended")
    )
    unlinked = (
        update(reservation_devices)
        .where(
            reservation_devices.c.reservation_id == ended.c.id,
            reservation_devices.c.released_reason.is_(None),
        )
        .values(released_reason=reason, released_time=now)
        .returning(reservation_devices.c.device_id)
        .cte("unlinked")
    )
    freed = (
        update(devices)
        .where(devices.c.id == unlinked.c.device_id)
        .values(state=_state_after_release_sql(), state_time=now, reservation_id=None)
        .returning(devices.c.id)
        .cte("freed")
    )
    return select(
        select(func.count()).select_from(ended).scalar_subquery().label("ended"),
        select(func.array_agg(freed.c.id)).scalar_subquery().label("freed"),
        exists().where(waiters.c.state == WAITING).label("queued"),
    )


async def release_in_one_statement(
    conn: AsyncConnection,
    *,
    client_id: str,
    reservation_ids: Sequence[str],
    reason: str,
    now: datetime,
) -> tuple[list[str], bool] | None:
    """End the caller's active reservations `reservation_ids` whole: (device ids let go,
    whether anybody is queued). None, changing nothing, unless all are the caller's and active."""
    ids = list(reservation_ids)
    params = {
        "p_ids": ids,
        "p_client_id": client_id,
        "p_expected": len(ids),
        "p_reason": reason,
        "p_now": now,
    }
    row = (await conn.execute(_release_statement(), params)).one()
    if row.ended != len(ids):
        return None
    return list(row.freed or []), bool(row.queued)
