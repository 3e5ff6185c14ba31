"""The transactional outbox: events and worker commands written in the same transaction as
the state change that causes them, plus the wake-up topics that change touches.

Topics name who must look at the outbox after the commit: "client:<id>", "worker:<name>",
"waiter:<id>", "operator", and "devices" (free devices may have changed). They are defined
here and nowhere else. `Database.write` publishes them once the transaction commits
(in-process on SQLite, NOTIFY on PostgreSQL).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.models import event_sequences, events, worker_commands

TOPICS_KEY = "icefarm_topics"
OPERATOR = "operator"
DEVICES = "devices"
# Woken when operator events wait for their numbers (PostgreSQL; see storage/sequencer.py).
UNSEQUENCED = "operator:unsequenced"

PENDING = "PENDING"
SENT = "SENT"
DONE = "DONE"
FAILED = "FAILED"
TIMED_OUT = "TIMED_OUT"


CLIENT_PREFIX = "client:"
WORKER_PREFIX = "worker:"
WAITER_PREFIX = "waiter:"


def client_audience(client_id: str) -> str:
    return CLIENT_PREFIX + client_id


def worker_topic(worker: str) -> str:
    return WORKER_PREFIX + worker


def waiter_topic(waiter_id: int) -> str:
    """Woken when the queued Reserve request `waiter_id` is served."""
    return f"{WAITER_PREFIX}{waiter_id}"


def touch(conn: AsyncConnection, *topics: str) -> None:
    """Mark topics to wake once this transaction commits."""
    conn.info.setdefault(TOPICS_KEY, set()).update(topics)


def take_touched(conn: AsyncConnection) -> set[str]:
    touched: set[str] = conn.info.pop(TOPICS_KEY, set())
    return touched


@dataclass(frozen=True)
class EventRow:
    audience: str
    sequence: int
    type: str
    payload: dict[str, Any]
    create_time: datetime


@dataclass(frozen=True)
class CommandRow:
    id: int
    correlation_id: str
    worker: str
    device_id: str | None
    type: str
    payload: dict[str, Any]
    state: str
    create_time: datetime
    deadline: datetime | None


async def _next_sequence(conn: AsyncConnection, audience: str) -> int:
    """The audience's next sequence number. The counter row is locked until commit, so
    sequences are gapless and in commit order for each audience."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(event_sequences)
        .values(audience=audience, last_sequence=1)
        .on_conflict_do_update(
            index_elements=[event_sequences.c.audience],
            set_={"last_sequence": event_sequences.c.last_sequence + 1},
        )
        .returning(event_sequences.c.last_sequence)
    )
    sequence: int = (await conn.execute(statement)).scalar_one()
    return sequence


async def append_event(
    conn: AsyncConnection, audience: str, type_: str, payload: dict[str, Any], now: datetime
) -> int | None:
    """Append one event for an audience ("operator" or client_audience(id)); its sequence, or
    None for an operator event on PostgreSQL, which the sequencer numbers after the commit (so
    that no transaction queues on the operator counter, and the feed stays in causal order
    with the fast paths' operator events, which are numbered the same way)."""
    if audience == OPERATOR and conn.dialect.name == "postgresql":
        await conn.execute(
            insert(events).values(
                audience=audience, sequence=None, type=type_, payload=payload, create_time=now
            )
        )
        touch(conn, UNSEQUENCED)
        return None
    sequence = await _next_sequence(conn, audience)
    await conn.execute(
        insert(events).values(
            audience=audience, sequence=sequence, type=type_, payload=payload, create_time=now
        )
    )
    touch(conn, audience)
    return sequence


async def append_events(
    conn: AsyncConnection,
    audience: str,
    type_: str,
    payloads: Sequence[dict[str, Any]],
    now: datetime,
) -> None:
    """Append several events of one type for one audience in two statements (one counter
    bump, one insert): what a batch of device changes costs instead of two per device."""
    if not payloads:
        return
    rows: list[dict[str, Any]]
    if audience == OPERATOR and conn.dialect.name == "postgresql":
        rows = [
            {
                "audience": audience,
                "sequence": None,
                "type": type_,
                "payload": p,
                "create_time": now,
            }
            for p in payloads
        ]
        await conn.execute(insert(events), rows)
        touch(conn, UNSEQUENCED)
        return
    count = len(payloads)
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(event_sequences)
        .values(audience=audience, last_sequence=count)
        .on_conflict_do_update(
            index_elements=[event_sequences.c.audience],
            set_={"last_sequence": event_sequences.c.last_sequence + count},
        )
        .returning(event_sequences.c.last_sequence)
    )
    last: int = (await conn.execute(statement)).scalar_one()
    first = last - count + 1
    rows = [
        {
            "audience": audience,
            "sequence": first + i,
            "type": type_,
            "payload": payload,
            "create_time": now,
        }
        for i, payload in enumerate(payloads)
    ]
    await conn.execute(insert(events), rows)
    touch(conn, audience)


async def events_after(
    conn: AsyncConnection, audience: str, after: int, limit: int = 500
) -> list[EventRow]:
    query = (
        select(events)
        .where(events.c.audience == audience, events.c.sequence > after)
        .order_by(events.c.sequence)
        .limit(limit)
    )
    return [
        EventRow(r.audience, r.sequence, r.type, dict(r.payload), r.create_time)
        for r in await conn.execute(query)
    ]


async def last_sequence(conn: AsyncConnection, audience: str) -> int:
    query = select(event_sequences.c.last_sequence).where(event_sequences.c.audience == audience)
    value: int | None = (await conn.execute(query)).scalar()
    return value or 0


async def append_command(
    conn: AsyncConnection,
    worker: str,
    type_: str,
    payload: dict[str, Any],
    now: datetime,
    *,
    device_id: str | None = None,
) -> str:
    """Queue a command for a worker; returns its correlation id."""
    correlation_id = uuid.uuid4().hex
    await conn.execute(
        insert(worker_commands).values(
            correlation_id=correlation_id,
            worker_name=worker,
            device_id=device_id,
            type=type_,
            payload=payload,
            state=PENDING,
            create_time=now,
        )
    )
    touch(conn, worker_topic(worker))
    return correlation_id


def command_row(r: Any) -> CommandRow:
    return CommandRow(
        id=r.id,
        correlation_id=r.correlation_id,
        worker=r.worker_name,
        device_id=r.device_id,
        type=r.type,
        payload=dict(r.payload),
        state=r.state,
        create_time=r.create_time,
        deadline=r.deadline,
    )


async def pending_commands(
    conn: AsyncConnection, worker: str, limit: int = 100
) -> list[CommandRow]:
    """Commands not yet sent to the worker, oldest first."""
    query = (
        select(worker_commands)
        .where(worker_commands.c.worker_name == worker, worker_commands.c.state == PENDING)
        .order_by(worker_commands.c.id)
        .limit(limit)
    )
    return [command_row(r) for r in await conn.execute(query)]


async def mark_sent(
    conn: AsyncConnection, command_ids: Sequence[int], now: datetime, deadline: datetime
) -> None:
    if command_ids:
        await conn.execute(
            update(worker_commands)
            .where(worker_commands.c.id.in_(list(command_ids)))
            .values(state=SENT, sent_time=now, deadline=deadline)
        )


async def complete_command(
    conn: AsyncConnection,
    correlation_id: str,
    *,
    worker: str,
    ok: bool,
    error: str,
    now: datetime,
) -> CommandRow | None:
    """Record `worker`'s answer to one of its own commands; the command, or None (nothing
    changed) if it is unknown, already finished, or another worker's."""
    row = (
        await conn.execute(
            update(worker_commands)
            .where(
                worker_commands.c.correlation_id == correlation_id,
                worker_commands.c.worker_name == worker,
                worker_commands.c.state.in_([PENDING, SENT]),
            )
            .values(state=DONE if ok else FAILED, error=error, done_time=now)
            .returning(*worker_commands.c)
        )
    ).first()
    return command_row(row) if row else None


async def command_owner(conn: AsyncConnection, correlation_id: str) -> str | None:
    """The worker a command was queued for (None if there is no such command)."""
    query = select(worker_commands.c.worker_name).where(
        worker_commands.c.correlation_id == correlation_id
    )
    owner: str | None = (await conn.execute(query)).scalar()
    return owner


async def time_out_commands(conn: AsyncConnection, now: datetime) -> list[CommandRow]:
    """SENT commands past their deadline become TIMED_OUT; returns them."""
    rows = (
        await conn.execute(
            update(worker_commands)
            .where(worker_commands.c.state == SENT, worker_commands.c.deadline < now)
            .values(state=TIMED_OUT, done_time=now, error="no answer before the deadline")
            .returning(*worker_commands.c)
        )
    ).all()
    return [command_row(r) for r in rows]


async def requeue_sent_commands(conn: AsyncConnection, worker: str) -> None:
    """A worker reconnected: what was sent on the old stream but not answered goes again."""
    await conn.execute(
        update(worker_commands)
        .where(worker_commands.c.worker_name == worker, worker_commands.c.state == SENT)
        .values(state=PENDING, sent_time=None, deadline=None)
    )


async def prune(conn: AsyncConnection, before: datetime) -> None:
    """Drop events and finished commands older than `before`."""
    await conn.execute(delete(events).where(events.c.create_time < before))
    await conn.execute(
        delete(worker_commands).where(
            worker_commands.c.state.in_([DONE, FAILED, TIMED_OUT]),
            worker_commands.c.create_time < before,
        )
    )
