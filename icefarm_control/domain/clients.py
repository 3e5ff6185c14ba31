"""Clients: their Session bookkeeping (who owns the feed, how far it was delivered), their
liveness (no Session for longer than the grace loses the reservations), lease warnings, and
the age limit of the outbox.

A client (the identity that owns reservations) may have several Sessions at once, one per
Client object (its instance): each has its own session row, generation, replica and resume
point, and all read the one feed of the client. Every rule here holds with several replicas
on one database: a session row names the replica and generation that own it, and the sweeps
lock or re-check what they change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog

from icefarm_control.domain import events
from icefarm_control.domain.events import EventType
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.states import EndReason
from icefarm_control.storage import client_queries as cq
from icefarm_control.storage import outbox
from icefarm_control.storage.client_queries import FeedPosition, SessionKey
from icefarm_control.storage.database import Transaction
from icefarm_control.storage.outbox import EventRow

log = structlog.get_logger(__name__)

FEED_BATCH = 200
SWEEP_BATCH = 100
# Sessions named per statement by the per-replica upkeep.
POSITIONS_CHUNK = 500
# A session row is kept at least this long after its last sign of life (and at least as long
# as the events it could resume from, and the client grace it stands for).
SESSION_ROW_KEEP = timedelta(hours=1)
# Feeds woken together up to this many read at once; more are checked in one query first.
SMALL_WAKE_BATCH = 8


@dataclass(frozen=True)
class SessionStart:
    """What a new Session needs: whose and which it is, the generation it owns, where its
    feed resumes, and the client's newest event sequence (for Welcome)."""

    key: SessionKey
    generation: int
    resume_after: int
    last_sequence: int


@dataclass(frozen=True)
class FeedBatch:
    events: list[EventRow]
    # A newer Session of the same client and instance took over (on this replica or another).
    superseded: bool


class FeedReader(Protocol):
    """A Session's feed as the gate sees it: whose it is, which generation, how far read."""

    key: SessionKey
    generation: int
    cursor: int


def needs_reading(position: FeedPosition | None, reader: FeedReader) -> bool:
    """True when the database holds something for this feed: newer events, or a newer
    Session of the same instance that took it over (or no row at all)."""
    return (
        position is None
        or position.generation != reader.generation
        or position.last_sequence > reader.cursor
    )


class ClientSessions:
    """Client sessions, client liveness and lease warnings for one replica."""

    def __init__(self, engine: ReservationEngine) -> None:
        self.engine = engine
        self.db = engine.db
        self.clock = engine.clock
        self.timers = engine.timers
        self.replica_id = engine.replica_id

    @property
    def refresh_interval(self) -> float:
        """How often this replica marks its live sessions as seen. A session whose replica
        died counts as gone from its last refresh, so a client then gets between 3/4 of the
        grace and the whole of it (at most 30 s less); refreshing more often only writes more
        rows (one per live session each time)."""
        grace = self.timers.client_grace.total_seconds()
        return 30.0 if grace <= 0 else max(0.05, min(30.0, grace / 4))

    # ------------------------------------------------------------ sessions

    async def open(self, key: SessionKey, resume_after: int) -> SessionStart:
        """Take over the feed of this client and instance. It resumes after `resume_after`
        when given, else after the last event sent on an earlier Session of the instance (a
        new instance: as far as any Session of the client got). An older Session of the same
        instance is woken to notice; other instances keep theirs."""
        audience = outbox.client_audience(key.client_id)
        async with self.db.write() as conn:
            opened = await cq.open_session(conn, key, self.replica_id, self.clock.now())
            last = await outbox.last_sequence(conn, audience)
            outbox.touch(conn, audience)
        resume = resume_after if resume_after > 0 else opened.delivered_sequence
        log.debug(
            "client session opened",
            client=key.client_id,
            instance=key.instance,
            generation=opened.generation,
        )
        return SessionStart(key, opened.generation, resume, last)

    async def read_feed(
        self, key: SessionKey, generation: int, after: int, limit: int = FEED_BATCH
    ) -> FeedBatch:
        """The client's events after `after`, in order, unless a newer Session of the same
        instance owns the feed."""
        async with self.db.read() as conn:
            if await cq.session_generation(conn, key) != generation:
                return FeedBatch([], superseded=True)
            audience = outbox.client_audience(key.client_id)
            rows = await outbox.events_after(conn, audience, after, limit)
        return FeedBatch(rows, superseded=False)

    async def record_delivery(self, key: SessionKey, generation: int, sequence: int) -> bool:
        """Remember how far the feed was sent (the resume point of a Hello without one);
        False when a newer Session of the same instance owns the feed."""
        async with self.db.write() as conn:
            return await cq.record_delivery(conn, key, generation, sequence, self.clock.now())

    async def close(self, key: SessionKey, generation: int, delivered: int) -> None:
        """The Session ended (if no newer one of the instance owns it): the client grace
        starts once none of the client's Sessions is live."""
        async with self.db.write() as conn:
            closed = await cq.close_session(conn, key, generation, delivered, self.clock.now())
        log.debug(
            "client session closed",
            client=key.client_id,
            instance=key.instance,
            generation=generation,
            ours=closed,
        )

    async def refresh(self, keys: Sequence[SessionKey]) -> None:
        """Mark the live sessions of this replica as seen (a statement per 500). A row whose
        stream is gone without a goodbye is not refreshed, so it goes stale."""
        now = self.clock.now()
        async with self.db.write() as conn:
            for start in range(0, len(keys), POSITIONS_CHUNK):
                chunk = keys[start : start + POSITIONS_CHUNK]
                await cq.refresh_replica_sessions(conn, self.replica_id, chunk, now)

    async def positions(self, keys: Sequence[SessionKey]) -> dict[SessionKey, FeedPosition]:
        found: dict[SessionKey, FeedPosition] = {}
        async with self.db.read() as conn:
            for start in range(0, len(keys), POSITIONS_CHUNK):
                chunk = keys[start : start + POSITIONS_CHUNK]
                found.update((p.key, p) for p in await cq.feed_positions(conn, chunk))
        return found

    # ------------------------------------------------------------ sweeps (every replica)

    async def sweep_client_liveness(self) -> list[str]:
        """End the active reservations of clients that have had no live Session (none of
        their Client objects' Sessions) for longer than the client grace (counted from the
        later of the last disconnect and the reservation's creation); the ids ended. Two
        replicas sweeping at once end each lease once: the engine locks the rows and skips
        what has ended."""
        grace = self.timers.client_grace
        if grace <= timedelta(0):
            return []
        cutoff = self.clock.now() - grace
        async with self.db.read() as conn:
            lost = await cq.lost_client_reservations(conn, cutoff, SWEEP_BATCH)
        if not lost:
            return []
        # By reservation, not by client: a lease created since the cutoff keeps its own grace.

        async def still_lost(conn: Transaction, ids: list[str]) -> set[str]:
            # A client that reconnected since the read above keeps its leases.
            again = await cq.lost_client_reservations(conn, cutoff, len(ids), among=ids)
            return {reservation_id for reservation_id, _ in again}

        outcome = await self.engine.end_reservations(
            reservation_ids=[reservation_id for reservation_id, _ in lost],
            reason=EndReason.CLIENT_LOST,
            still_due=still_lost,
        )
        if outcome.ended_reservation_ids:
            log.info(
                "clients lost their reservations",
                clients=sorted({client for _, client in lost}),
                reservations=outcome.ended_reservation_ids,
            )
        return outcome.ended_reservation_ids

    async def sweep_ending_soon(self) -> int:
        """Warn each holder once that a lease ends within `ending_soon_before` (extending it
        re-arms the warning); how many were warned."""
        before = self.timers.ending_soon_before
        if before <= timedelta(0):
            return 0
        now = self.clock.now()
        async with self.db.read() as conn:
            # A cheap look first: on SQLite every write transaction takes the one write lock.
            if not await cq.due_warnings_exist(conn, now, now + before):
                return 0
        async with self.db.write() as conn:
            due = await cq.take_due_warnings(conn, now, now + before, SWEEP_BATCH)
            for warning in due:
                payload = events.reservation_ending_soon(
                    reservation_id=warning.reservation_id, end_time=warning.end_time
                )
                await outbox.append_event(
                    conn,
                    outbox.client_audience(warning.client_id),
                    EventType.RESERVATION_ENDING_SOON,
                    payload,
                    now,
                )
        return len(due)

    async def prune_events(self) -> None:
        """Drop events (and finished worker commands) older than the retention, and session
        rows not seen for longer than that, the client grace and SESSION_ROW_KEEP (each
        Client object leaves a row; a live one is refreshed far more often)."""
        now = self.clock.now()
        keep = max(self.timers.event_retention, self.timers.client_grace, SESSION_ROW_KEEP)
        async with self.db.write() as conn:
            await outbox.prune(conn, now - self.timers.event_retention)
            await cq.prune_sessions(conn, now - keep)


class FeedGate:
    """Lets a woken feed read its outbox only when there is something to read, checked for
    every feed woken together in one query per 500. A wake-up for everyone (the PostgreSQL
    listener's periodic resync) then costs a few queries, not one read per Session; a feed
    woken on its own passes straight through."""

    def __init__(self, sessions: ClientSessions, small_batch: int = SMALL_WAKE_BATCH) -> None:
        self.sessions = sessions
        self.small_batch = small_batch
        self._asking: dict[FeedReader, asyncio.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def worth_reading(self, reader: FeedReader) -> bool:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        self._asking[reader] = answer
        if len(self._asking) == 1:
            # Checked on the next turn of the loop, once the rest of the burst has asked too.
            loop.call_soon(self._start_check)
        return await answer

    def _start_check(self) -> None:
        task = asyncio.create_task(self._check(), name="feed-gate")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self) -> None:
        asking, self._asking = self._asking, {}
        verdicts = dict.fromkeys(asking, True)
        if len(asking) > self.small_batch:
            try:
                positions = await self.sessions.positions([r.key for r in asking])
                verdicts = {r: needs_reading(positions.get(r.key), r) for r in asking}
            except Exception:
                log.exception("checking woken feeds failed; they read anyway")
        for reader, answer in asking.items():
            if not answer.done():
                answer.set_result(verdicts[reader])
