"""The worker timers (ARCHITECTURE §7): silent workers go offline, lost workers' reservations
end, unanswered commands time out, drains complete. Every replica runs them every second; each
step is a conditional UPDATE, so exactly one replica acts on each row."""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain import events
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.device_changes import break_device, device_changed, end_holds
from icefarm_control.domain.events import CommandType, EventType
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Timers
from icefarm_control.domain.states import EndReason
from icefarm_control.storage import outbox
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database

log = structlog.get_logger(__name__)
# A failed or unanswered command of these kinds leaves its board in an unknown state: BROKEN.
BREAKING_COMMANDS = frozenset(
    {CommandType.PREPARE_DEVICE, CommandType.RELEASE_DEVICE, CommandType.REBOOT_DEVICE}
)


async def finish_drains(
    conn: AsyncConnection, now: datetime, worker: str | None = None
) -> list[str]:
    """Send DrainComplete (once) to every draining worker that holds no reservation any more."""
    done = await wq.finish_drains(conn, worker)
    for name in done:
        payload = events.drain_complete()
        await outbox.append_command(conn, name, CommandType.DRAIN_COMPLETE, payload, now)
        log.info("worker drained", worker=name)
    return done


class WorkerLiveness:
    def __init__(
        self, database: Database, engine: ReservationEngine, clock: Clock, timers: Timers
    ) -> None:
        self.db = database
        self.engine = engine
        self.clock = clock
        self.timers = timers

    async def sweep_liveness(self) -> list[str]:
        """Silent workers go OFFLINE with their devices (holds kept); workers offline for
        longer than the grace lose their holds (WORKER_LOST). Returns who went offline."""
        now = self.clock.now()
        silent_since = now - self.timers.offline_timeout
        async with self.db.write() as conn:
            gone = await wq.mark_silent_workers_offline(conn, silent_since)
            for name in gone:
                for device_id in await wq.take_devices_offline(conn, name, now):
                    await device_changed(conn, device_id, now)
                worker = await wq.get_worker(conn, name)
                assert worker is not None
                payload = events.worker_changed(worker)
                await outbox.append_event(
                    conn, outbox.OPERATOR, EventType.WORKER_CHANGED, payload, now
                )
                log.warning("worker offline", worker=name)
        async with self.db.read() as conn:
            lost = await wq.held_devices_of_lost_workers(
                conn, silent_since - self.timers.worker_grace
            )
        if lost:
            await end_holds(self.engine, lost, EndReason.WORKER_LOST)
        return gone

    async def time_out_commands(self) -> list[outbox.CommandRow]:
        """SENT commands without an answer past their deadline: TIMED_OUT, board BROKEN."""
        now = self.clock.now()
        async with self.db.write() as conn:
            timed_out = await wq.time_out_commands(conn, now)
            for command in timed_out:
                log.warning("command timed out", worker=command.worker, command=command.type)
                if command.type in BREAKING_COMMANDS and command.device_id:
                    await break_device(conn, command.device_id, f"{command.type} timed out", now)
        return timed_out

    async def check_drains(self) -> list[str]:
        """Drains past their deadline end the reservations left (WORKER_LOST: the worker is
        leaving); drains with nothing left to wait for complete."""
        now = self.clock.now()
        async with self.db.read() as conn:
            overdue = await wq.held_devices_of_overdue_drains(conn, now)
        if overdue:
            await end_holds(self.engine, overdue, EndReason.WORKER_LOST)
        async with self.db.write() as conn:
            return await finish_drains(conn, now)
