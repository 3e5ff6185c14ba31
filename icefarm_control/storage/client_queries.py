"""The statements behind client sessions, client liveness and lease warnings. Each takes an
open connection inside the caller's transaction; none commits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.states import ReservationState
from icefarm_control.storage.models import client_sessions, event_sequences, reservations
from icefarm_control.storage.outbox import client_audience

ACTIVE = ReservationState.ACTIVE.value


@dataclass(frozen=True)
class OpenedSession:
    generation: int
    delivered_sequence: int


@dataclass(frozen=True)
class FeedPosition:
    """Where a client's feed stands in the database: who owns its session, how far it goes."""

    client_id: str
    generation: int
    last_sequence: int


@dataclass(frozen=True)
class DueWarning:
    reservation_id: str
    client_id: str
    end_time: datetime


async def open_session(
    conn: AsyncConnection, client_id: str, replica_id: str, now: datetime
) -> OpenedSession:
    """Take over the client's session row (creating it the first time): a new generation, so
    any older stream of this client, on any replica, finds it is no longer the owner."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(client_sessions)
        .values(
            client_id=client_id,
            replica_id=replica_id,
            session_generation=1,
            connect_time=now,
            disconnect_time=None,
            last_seen_time=now,
            delivered_sequence=0,
        )
        .on_conflict_do_update(
            index_elements=[client_sessions.c.client_id],
            set_={
                "replica_id": replica_id,
                "session_generation": client_sessions.c.session_generation + 1,
                "connect_time": now,
                "disconnect_time": None,
                "last_seen_time": now,
            },
        )
        .returning(client_sessions.c.session_generation, client_sessions.c.delivered_sequence)
    )
    row = (await conn.execute(statement)).one()
    return OpenedSession(row.session_generation, row.delivered_sequence)


def _owned(client_id: str, generation: int) -> ColumnElement[bool]:
    return and_(
        client_sessions.c.client_id == client_id,
        client_sessions.c.session_generation == generation,
    )


async def session_generation(conn: AsyncConnection, client_id: str) -> int:
    query = select(client_sessions.c.session_generation).where(
        client_sessions.c.client_id == client_id
    )
    value: int | None = (await conn.execute(query)).scalar()
    return value or 0


async def record_delivery(
    conn: AsyncConnection, client_id: str, generation: int, sequence: int, now: datetime
) -> bool:
    """The stream of `generation` has sent events up to `sequence`; False when a newer
    session owns the row (then nothing changes)."""
    result = await conn.execute(
        update(client_sessions)
        .where(_owned(client_id, generation))
        .values(delivered_sequence=sequence, last_seen_time=now)
    )
    return bool(result.rowcount)


async def close_session(
    conn: AsyncConnection, client_id: str, generation: int, delivered: int, now: datetime
) -> bool:
    """The stream of `generation` ended: the client's grace starts now (if it still owns it)."""
    result = await conn.execute(
        update(client_sessions)
        .where(_owned(client_id, generation))
        .values(
            replica_id=None,
            disconnect_time=now,
            last_seen_time=now,
            delivered_sequence=delivered,
        )
    )
    return bool(result.rowcount)


async def refresh_replica_sessions(
    conn: AsyncConnection, replica_id: str, client_ids: Sequence[str], now: datetime
) -> None:
    """Keep the named live sessions of a replica fresh; a replica that dies stops refreshing,
    and its sessions then count as gone since their last refresh."""
    await conn.execute(
        update(client_sessions)
        .where(
            client_sessions.c.replica_id == replica_id,
            client_sessions.c.disconnect_time.is_(None),
            client_sessions.c.client_id.in_(list(client_ids)),
        )
        .values(last_seen_time=now)
    )


async def feed_positions(conn: AsyncConnection, client_ids: Sequence[str]) -> list[FeedPosition]:
    """Session generation and last event sequence of each client named."""
    if not client_ids:
        return []
    audience = literal(client_audience("")) + client_sessions.c.client_id
    query = (
        select(
            client_sessions.c.client_id,
            client_sessions.c.session_generation,
            event_sequences.c.last_sequence,
        )
        .outerjoin(event_sequences, event_sequences.c.audience == audience)
        .where(client_sessions.c.client_id.in_(list(client_ids)))
    )
    return [
        FeedPosition(r.client_id, r.session_generation, r.last_sequence or 0)
        for r in await conn.execute(query)
    ]


async def lost_client_reservations(
    conn: AsyncConnection, cutoff: datetime, limit: int, among: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """(reservation id, client id) of active reservations made while their client had a
    Session open (`attached`), created before `cutoff`, whose client has had no live session
    since before `cutoff`: closed it, or its replica stopped refreshing it."""
    sessions = client_sessions.c
    no_live_session = or_(
        sessions.client_id.is_(None),
        and_(sessions.disconnect_time.is_not(None), sessions.disconnect_time <= cutoff),
        and_(sessions.disconnect_time.is_(None), sessions.last_seen_time <= cutoff),
    )
    query = (
        select(reservations.c.id, reservations.c.client_id)
        .outerjoin(client_sessions, sessions.client_id == reservations.c.client_id)
        .where(
            reservations.c.state == ACTIVE,
            reservations.c.attached.is_(True),
            reservations.c.create_time <= cutoff,
        )
        .where(no_live_session)
        .order_by(reservations.c.create_time, reservations.c.id)
        .limit(limit)
    )
    if among:
        query = query.where(reservations.c.id.in_(list(among)))
    return [(r.id, r.client_id) for r in await conn.execute(query)]


def _due_warnings(now: datetime, warn_until: datetime) -> Select[Any]:
    return select(reservations.c.id).where(
        reservations.c.state == ACTIVE,
        reservations.c.ending_soon_sent.is_(False),
        reservations.c.end_time <= warn_until,
        reservations.c.end_time > now,
    )


async def due_warnings_exist(conn: AsyncConnection, now: datetime, warn_until: datetime) -> bool:
    query = _due_warnings(now, warn_until).limit(1)
    return (await conn.execute(query)).first() is not None


async def take_due_warnings(
    conn: AsyncConnection, now: datetime, warn_until: datetime, limit: int
) -> list[DueWarning]:
    """Active reservations ending by `warn_until` (but not yet ended) whose holder has not been
    warned; marked warned in this transaction. Rows another replica is warning are skipped."""
    due = (
        _due_warnings(now, warn_until)
        .order_by(reservations.c.end_time)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = [r.id for r in await conn.execute(due)]
    if not ids:
        return []
    # The flag is re-checked here, so two replicas can never both warn about one lease.
    rows = await conn.execute(
        update(reservations)
        .where(reservations.c.id.in_(ids), reservations.c.ending_soon_sent.is_(False))
        .values(ending_soon_sent=True)
        .returning(reservations.c.id, reservations.c.client_id, reservations.c.end_time)
    )
    warnings = [DueWarning(r.id, r.client_id, r.end_time) for r in rows]
    return sorted(warnings, key=lambda w: (w.end_time, w.reservation_id))
