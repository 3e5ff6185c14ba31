"""The statements behind client sessions, client liveness and lease warnings. Each takes an
open connection inside the caller's transaction; none commits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    Select,
    and_,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
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
class SessionKey:
    """One Session identity: the client (who owns the reservations) and the instance (which of
    its Client objects; "" for a caller that names none)."""

    client_id: str
    instance: str = ""


@dataclass(frozen=True)
class FeedPosition:
    """Where one Session's feed stands in the database: which generation owns the session row,
    and the newest event of the client's feed (shared by all its Sessions)."""

    key: SessionKey
    generation: int
    last_sequence: int


@dataclass(frozen=True)
class DueWarning:
    reservation_id: str
    client_id: str
    end_time: datetime


def _furthest_delivery(client_id: str) -> ScalarSelect[Any]:
    """How far any Session of the client got: a new instance starts there, as a new Session
    of a client with one row always did (not with the whole retained history)."""
    return (
        select(func.coalesce(func.max(client_sessions.c.delivered_sequence), 0))
        .where(client_sessions.c.client_id == client_id)
        .scalar_subquery()
    )


async def open_session(
    conn: AsyncConnection, key: SessionKey, replica_id: str, now: datetime
) -> OpenedSession:
    """Take over the session row of this client and instance (creating it the first time): a
    new generation, so an older stream of the same instance, on any replica, finds it is no
    longer the owner. Other instances of the client keep their own rows."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(client_sessions)
        .values(
            client_id=key.client_id,
            instance=key.instance,
            replica_id=replica_id,
            session_generation=1,
            connect_time=now,
            disconnect_time=None,
            last_seen_time=now,
            delivered_sequence=_furthest_delivery(key.client_id),
        )
        .on_conflict_do_update(
            index_elements=[client_sessions.c.client_id, client_sessions.c.instance],
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


def _row(key: SessionKey) -> ColumnElement[bool]:
    return and_(
        client_sessions.c.client_id == key.client_id,
        client_sessions.c.instance == key.instance,
    )


def _owned(key: SessionKey, generation: int) -> ColumnElement[bool]:
    return and_(_row(key), client_sessions.c.session_generation == generation)


def _keys_in(keys: Sequence[SessionKey]) -> ColumnElement[bool]:
    pairs = [(k.client_id, k.instance) for k in keys]
    return tuple_(client_sessions.c.client_id, client_sessions.c.instance).in_(pairs)


async def session_generation(conn: AsyncConnection, key: SessionKey) -> int:
    query = select(client_sessions.c.session_generation).where(_row(key))
    value: int | None = (await conn.execute(query)).scalar()
    return value or 0


async def record_delivery(
    conn: AsyncConnection, key: SessionKey, generation: int, sequence: int, now: datetime
) -> bool:
    """The stream of `generation` has sent events up to `sequence`; False when a newer
    session of the same instance owns the row (then nothing changes)."""
    result = await conn.execute(
        update(client_sessions)
        .where(_owned(key, generation))
        .values(delivered_sequence=sequence, last_seen_time=now)
    )
    return bool(result.rowcount)


async def close_session(
    conn: AsyncConnection, key: SessionKey, generation: int, delivered: int, now: datetime
) -> bool:
    """The stream of `generation` ended: this Session counts as gone from now (if it still owns
    the row); the client's grace starts once none of its Sessions is live."""
    result = await conn.execute(
        update(client_sessions)
        .where(_owned(key, generation))
        .values(
            replica_id=None,
            disconnect_time=now,
            last_seen_time=now,
            delivered_sequence=delivered,
        )
    )
    return bool(result.rowcount)


async def refresh_replica_sessions(
    conn: AsyncConnection, replica_id: str, keys: Sequence[SessionKey], now: datetime
) -> None:
    """Keep the named live sessions of a replica fresh; a replica that dies stops refreshing,
    and its sessions then count as gone since their last refresh."""
    if not keys:
        return
    await conn.execute(
        update(client_sessions)
        .where(
            client_sessions.c.replica_id == replica_id,
            client_sessions.c.disconnect_time.is_(None),
            _keys_in(keys),
        )
        .values(last_seen_time=now)
    )


async def feed_positions(conn: AsyncConnection, keys: Sequence[SessionKey]) -> list[FeedPosition]:
    """Session generation of each Session named, and the last event sequence of its client."""
    if not keys:
        return []
    audience = literal(client_audience("")) + client_sessions.c.client_id
    query = (
        select(
            client_sessions.c.client_id,
            client_sessions.c.instance,
            client_sessions.c.session_generation,
            event_sequences.c.last_sequence,
        )
        .outerjoin(event_sequences, event_sequences.c.audience == audience)
        .where(_keys_in(keys))
    )
    return [
        FeedPosition(
            SessionKey(r.client_id, r.instance), r.session_generation, r.last_sequence or 0
        )
        for r in await conn.execute(query)
    ]


async def prune_sessions(conn: AsyncConnection, before: datetime) -> int:
    """Drop the session rows last seen before `before` (every Client object leaves one behind);
    how many. A live Session is refreshed far more often than the retention, so it is never
    among them; a pruned one counts as gone, which it had been anyway."""
    result = await conn.execute(
        delete(client_sessions).where(client_sessions.c.last_seen_time < before)
    )
    return int(result.rowcount or 0)


async def lost_client_reservations(
    conn: AsyncConnection, cutoff: datetime, limit: int, among: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """(reservation id, client id) of active reservations made while their client had a
    Session open (`attached`), created before `cutoff`, whose client has had no live Session
    since before `cutoff`: none of its Sessions (one per Client object) is open and fresh, nor
    closed after `cutoff`. One live Session is enough to keep them all."""
    sessions = client_sessions.c
    live_since_cutoff = or_(
        and_(sessions.disconnect_time.is_not(None), sessions.disconnect_time > cutoff),
        and_(sessions.disconnect_time.is_(None), sessions.last_seen_time > cutoff),
    )
    some_live_session = (
        exists().where(sessions.client_id == reservations.c.client_id).where(live_since_cutoff)
    )
    query = (
        select(reservations.c.id, reservations.c.client_id)
        .where(
            reservations.c.state == ACTIVE,
            reservations.c.attached.is_(True),
            reservations.c.create_time <= cutoff,
            ~some_live_session,
        )
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
