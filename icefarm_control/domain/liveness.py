"""The worker timers (ARCHITECTURE §7): dead sessions go offline, lost workers' reservations
end, unanswered commands time out, drains complete. Every replica runs them every second.

Each decision is acted on in the transaction that takes it, with the worker rows it depends on
locked by the query that decides (FOR UPDATE SKIP LOCKED on PostgreSQL: a row a Register holds
is left for the next sweep; BEGIN IMMEDIATE serialises everything on SQLite). So a worker that
registers again is either seen by the sweep as back, or registers after the sweep has acted and
reconciles with its outcome — never kept and then ended by an older decision.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from icefarm_control.domain import events
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.device_changes import (
    DeviceChange,
    break_device,
    end_holds_in,
    record_changes,
    write_retrying,
)
from icefarm_control.domain.events import CommandType, EventType
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import DeviceState, EndReason, WorkerState
from icefarm_control.storage import outbox
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database, Transaction
from icefarm_control.storage.records import WorkerRow

log = structlog.get_logger(__name__)
# A failed or unanswered command of these kinds leaves its board in an unknown state: BROKEN.
BREAKING_COMMANDS = frozenset(
    {CommandType.PREPARE_DEVICE, CommandType.RELEASE_DEVICE, CommandType.REBOOT_DEVICE}
)


async def finish_drains(conn: Transaction, now: datetime, worker: str | None = None) -> list[str]:
    """Send DrainComplete (once) to every draining worker that holds no reservation any more."""
    done = await wq.finish_drains(conn, worker)
    for name in done:
        payload = events.drain_complete()
        await outbox.append_command(conn, name, CommandType.DRAIN_COMPLETE, payload, now)
        log.info("worker drained", worker=name)
    return done


async def worker_changed(conn: Transaction, worker: str, now: datetime) -> WorkerRow:
    """The operator's `worker_changed` for the worker as it is now; the worker."""
    row = await wq.get_worker(conn, worker)
    assert row is not None
    payload = events.worker_changed(row)
    await outbox.append_event(conn, outbox.OPERATOR, EventType.WORKER_CHANGED, payload, now)
    return row


async def take_dead_sessions_offline(
    conn: Transaction, now: datetime, timers: Timers, replica_id: str
) -> list[wq.DeadSession]:
    """Workers whose session is over (silent past the offline timeout, or held by a replica
    that is gone) go OFFLINE in the caller's transaction: from its commit on no Reserve hands
    out their boards. Their device rows follow in batches (take_devices_offline)."""
    dead = await wq.lock_dead_sessions(
        conn,
        silent_since=now - timers.offline_timeout,
        stale_since=now - timers.replica_stale_after,
        replica_id=replica_id,
    )
    for session in dead:
        await wq.set_offline(conn, session.name)
        await worker_changed(conn, session.name, now)
        log.warning("worker offline", worker=session.name)
    return dead


async def take_devices_offline(
    db: Database, session: wq.DeadSession, now: datetime, limits: Limits
) -> None:
    """The devices of a worker that went offline go OFFLINE too (holds kept), a bounded batch
    per transaction; each batch first checks, under the worker's lock, that the worker is
    still offline in the same session (a Register meanwhile brings them back itself)."""
    batch = limits.devices_per_transaction
    while True:
        async with db.write() as conn:
            row = await wq.lock_worker(conn, session.name)
            if (
                row is None
                or row.state != WorkerState.OFFLINE
                or row.session_generation != session.generation
            ):
                return
            taken = await wq.take_devices_offline(conn, session.name, now, batch)
            await record_changes(
                conn, [DeviceChange(d, None, DeviceState.OFFLINE) for d in taken], now
            )
        if len(taken) < batch:
            return


class WorkerLiveness:
    def __init__(
        self,
        database: Database,
        engine: ReservationEngine,
        clock: Clock,
        timers: Timers,
        replica_id: str = "",
        limits: Limits | None = None,
    ) -> None:
        self.db = database
        self.engine = engine
        self.clock = clock
        self.timers = timers
        self.replica_id = replica_id or engine.replica_id
        self.limits = limits or engine.limits

    async def sweep_liveness(self) -> list[str]:
        """Dead sessions go OFFLINE with their devices (holds kept); workers offline for
        longer than the grace lose their holds (WORKER_LOST). One transaction decides and
        acts; returns who went offline."""
        now = self.clock.now()
        lost_since = now - self.timers.worker_grace
        async with self.db.write() as conn:
            # Worker rows first, then (through the engine) reservations, then devices: the
            # order every other writer takes them in.
            dead = await take_dead_sessions_offline(conn, now, self.timers, self.replica_id)
            lost = await wq.lock_lost_workers(conn, lost_since)
            held = await wq.held_devices_of_lost_workers(conn, lost, lost_since)
            freed = await end_holds_in(conn, self.engine, {EndReason.WORKER_LOST: held})
            unfinished = await wq.offline_workers_with_live_devices(conn)
        if freed:
            await self.engine.serve_waiters()
        for session in {*dead, *unfinished}:
            await take_devices_offline(self.db, session, now, self.limits)
        return [session.name for session in dead]

    async def time_out_commands(self) -> list[outbox.CommandRow]:
        """SENT commands without an answer past their deadline: TIMED_OUT, board BROKEN."""
        now = self.clock.now()

        async def time_out(conn: Transaction) -> list[outbox.CommandRow]:
            timed_out = await wq.time_out_commands(conn, now)
            for command in timed_out:
                log.warning("command timed out", worker=command.worker, command=command.type)
                if command.type in BREAKING_COMMANDS and command.device_id:
                    await break_device(conn, command.device_id, f"{command.type} timed out", now)
            return timed_out

        return await write_retrying(self.db, time_out)

    async def check_drains(self) -> list[str]:
        """Drains past their deadline end the reservations left (WORKER_LOST: the worker is
        leaving); drains with nothing left to wait for complete."""
        now = self.clock.now()
        async with self.db.write() as conn:
            overdue = await wq.lock_overdue_drains(conn, now)
            held = await wq.held_devices_of(conn, overdue)
            freed = await end_holds_in(conn, self.engine, {EndReason.WORKER_LOST: held})
        if freed:
            await self.engine.serve_waiters()
        async with self.db.write() as conn:
            return await finish_drains(conn, now)
