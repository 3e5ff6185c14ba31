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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    union,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.events import CommandType, EventType, iso
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.states import (
    HELD_STATES,
    DeviceState,
    ReservationState,
    WorkerState,
    state_after_release,
)
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.models import (
    JsonDocument,
    UtcDateTime,
    devices,
    event_sequences,
    events,
    has_open_session,
    reservation_devices,
    reservations,
    waiters,
    worker_commands,
    workers,
)
from icefarm_control.storage.outbox import DEVICES, OPERATOR
from icefarm_control.storage.records import ReservedDeviceRow
from icefarm_control.storage.selector_sql import selector_clause
from icefarm_control.storage.sequencer import UNSEQUENCED

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
                "attached",
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
                has_open_session(bindparam("p_client_id", type_=String())),
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
    commands = _insert_commands(
        taken,
        CommandType.PREPARE_DEVICE,
        func.jsonb_build_object(
            "device_id", taken.c.id,
            "reservation_id", bindparam("p_reservation_id", type_=String()),
            "client_id", bindparam("p_client_id", type_=String()),
            "mode", bindparam("p_mode", type_=String()),
            "mode_args", bindparam("p_mode_args", type_=JsonDocument),
            "lease_seconds", bindparam("p_lease_seconds", type_=Float()),
        ),
    )  # fmt: skip
    created_event = _insert_event(
        created,
        literal(OPERATOR, String()),
        EventType.RESERVATION_CREATED,
        func.jsonb_build_object(
            "reservation_id", bindparam("p_reservation_id", type_=String()),
            "client_id", bindparam("p_client_id", type_=String()),
            "device_ids", _sorted_ids(picked.c.id),
            "mode", bindparam("p_mode", type_=String()),
            "end_time", bindparam("p_end_time_iso", type_=String()),
        ),
        numbered=False,
    )  # fmt: skip
    return (
        select(
            taken,
            workers.c.endpoint,
            _topics(literal(OPERATOR, String()), commands, created_event).label("topics"),
        )
        .join(workers, workers.c.name == taken.c.worker_name)
        .order_by(taken.c.id)
    )


def _sorted_ids(column: ColumnElement[str]) -> ColumnElement[Any]:
    """A JSON array of ids in code-point order (Python's `sorted`), whatever the collation."""
    return select(func.jsonb_agg(aggregate_order_by(column, column.collate("C")))).scalar_subquery()


def _insert_commands(devices_cte: Any, type_: CommandType, payload: ColumnElement[Any]) -> Any:
    """One PENDING command per row of `devices_cte` (which has `id` and `worker_name`)."""
    return (
        insert(worker_commands)
        .from_select(
            ["correlation_id", "worker_name", "device_id", "type", "payload", "state",
             "create_time", "error"],
            select(
                func.replace(cast(func.gen_random_uuid(), String()), "-", ""),
                devices_cte.c.worker_name,
                devices_cte.c.id,
                literal(type_.value, String()),
                payload,
                literal(outbox.PENDING, String()),
                bindparam("p_now", type_=UtcDateTime()),
                literal("", String()),
            ),
        )
        .returning(worker_commands.c.worker_name)
        .cte(f"{type_.value}_commands")
    )  # fmt: skip


def _insert_event(
    when: Any,
    audience: ColumnElement[str],
    type_: EventType,
    payload: ColumnElement[Any],
    *,
    numbered: bool = True,
) -> Any:
    """Append one event for `audience` if `when` has a row, numbered from its counter row;
    or, with `numbered=False` (the operator feed), left for the sequencer to number."""
    name = f"{type_.value}_{abs(hash(str(audience))) % 10_000}"
    number: Any = literal(None, BigInteger())
    source = when
    if numbered:
        sequence = (
            postgresql.insert(event_sequences)
            .from_select(
                ["audience", "last_sequence"], select(audience, literal(1)).select_from(when)
            )
            .on_conflict_do_update(
                index_elements=[event_sequences.c.audience],
                set_={"last_sequence": event_sequences.c.last_sequence + 1},
            )
            .returning(event_sequences.c.last_sequence)
            .cte(f"{name}_sequence")
        )
        number, source = sequence.c.last_sequence, sequence
    return (
        insert(events)
        .from_select(
            ["audience", "sequence", "type", "payload", "create_time"],
            select(
                audience,
                number,
                literal(type_.value, String()),
                payload,
                bindparam("p_now", type_=UtcDateTime()),
            ).select_from(source),
        )
        .returning(events.c.audience)
        .cte(f"{name}_event")
    )


def _topics(fixed_topics: ColumnElement[str], commands: Any, *event_ctes: Any) -> Any:
    """The wake-up topics the statement touched: the fixed ones, the workers that got commands
    and the event audiences. Selecting them also keeps those data-modifying CTEs in the
    statement (SQLAlchemy renders only the CTEs the final SELECT refers to)."""
    listed = union(
        select(fixed_topics.label("topic")),
        select(literal(outbox.WORKER_PREFIX, String()) + commands.c.worker_name),
        *(select(event_cte.c.audience) for event_cte in event_ctes),
    ).subquery()
    return select(func.string_agg(listed.c.topic, " ")).scalar_subquery()


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
        "p_lease_seconds": (end_time - now).total_seconds(),
        "p_end_time_iso": iso(end_time),
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
    """End one reservation of the caller's whole, with its outbox rows, in one statement."""
    target = (
        select(reservations.c.id, reservations.c.client_id)
        .where(
            reservations.c.id == bindparam("p_reservation_id", type_=String()),
            reservations.c.client_id == bindparam("p_client_id", type_=String()),
            reservations.c.state == ReservationState.ACTIVE.value,
        )
        .with_for_update()
        .cte("target")
    )
    reason = bindparam("p_reason", type_=String())
    now = bindparam("p_now", type_=UtcDateTime())
    ended = (
        update(reservations)
        .where(reservations.c.id == target.c.id)
        .values(state=ReservationState.ENDED.value, end_reason=reason, ended_time=now)
        .returning(reservations.c.id, reservations.c.client_id)
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
        .returning(devices.c.id, devices.c.worker_name)
        .cte("freed")
    )
    commands = _insert_commands(
        freed,
        CommandType.RELEASE_DEVICE,
        func.jsonb_build_object(
            "device_id", freed.c.id,
            "reservation_id", bindparam("p_reservation_id", type_=String()),
        ),
    )  # fmt: skip
    payload = func.jsonb_build_object(
        "reservation_id", bindparam("p_reservation_id", type_=String()),
        "device_ids", _sorted_ids(unlinked.c.device_id),
        "reason", reason,
        "reservation_closed", literal(True),
    )  # fmt: skip
    client_event = _insert_event(
        ended,
        literal(outbox.CLIENT_PREFIX, String()) + bindparam("p_client_id", type_=String()),
        EventType.RESERVATION_ENDED,
        payload,
    )
    operator_event = _insert_event(
        ended,
        literal(OPERATOR, String()),
        EventType.RESERVATION_ENDED,
        payload.op("||")(
            func.jsonb_build_object("client_id", bindparam("p_client_id", type_=String()))
        ),
        numbered=False,
    )
    queued = exists().where(waiters.c.state == WAITING)
    topics = (
        select(_topics(literal(DEVICES, String()), commands, client_event, operator_event))
        .select_from(ended)
        .scalar_subquery()
    )
    return select(
        select(func.count()).select_from(ended).scalar_subquery().label("ended"),
        select(func.array_agg(freed.c.id)).scalar_subquery().label("freed"),
        select(func.array_agg(func.distinct(freed.c.worker_name)))
        .scalar_subquery()
        .label("workers"),
        queued.label("queued"),
        topics.label("topics"),
    )


@dataclass(frozen=True)
class Released:
    device_ids: list[str]
    workers: list[str]
    queued: bool


async def release_in_one_statement(
    conn: AsyncConnection,
    *,
    client_id: str,
    reservation_id: str,
    reason: str,
    now: datetime,
) -> Released | None:
    """End the caller's active reservation whole. None, changing nothing, unless it is the
    caller's and active."""
    params = {
        "p_reservation_id": reservation_id,
        "p_client_id": client_id,
        "p_reason": reason,
        "p_now": now,
    }
    row = (await conn.execute(_release_statement(), params)).one()
    if row.ended != 1:
        return None
    return Released(sorted(row.freed or []), list(row.workers or []), bool(row.queued))


# ---------------------------------------------------------------- the choice of path


async def try_reserve(
    db: Database,
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
    """The devices taken by the one-statement reserve; None (nothing changed) where there is
    no such path (SQLite) or it cannot answer: the engine then takes the general path."""
    if not db.single_statement_paths:
        return None
    try:
        async with db.fast_lane, db.autocommit() as conn:
            taken = await reserve_in_one_statement(
                conn,
                reservation_id=reservation_id,
                client_id=client_id,
                mode=mode,
                mode_args=mode_args,
                selector_text=selector_text,
                count=count,
                device_ids=device_ids,
                now=now,
                end_time=end_time,
                request_id=request_id,
            )
    except IntegrityError:
        return None  # a retried request_id: the general path returns the first answer
    if taken is not None:
        db.published({UNSEQUENCED} | {outbox.worker_topic(d.worker) for d in taken})
    return taken


async def try_release(
    db: Database, *, client_id: str, reservation_id: str, reason: str, now: datetime
) -> Released | None:
    """The one-statement release of a whole reservation of the caller's; None where there is
    no such path or it cannot answer (the general path gives the precise answer)."""
    if not db.single_statement_paths:
        return None
    async with db.fast_lane, db.autocommit() as conn:
        released = await release_in_one_statement(
            conn, client_id=client_id, reservation_id=reservation_id, reason=reason, now=now
        )
    if released is not None:
        topics = {outbox.client_audience(client_id), UNSEQUENCED, outbox.DEVICES}
        db.published(topics | {outbox.worker_topic(w) for w in released.workers})
    return released
