"""The queue of waiting Reserve calls: rows in `waiters`, served fairly by whichever replica
frees devices, each caller woken through the topic of its row (a mixin of ReservationEngine,
kept apart because it is a whole concern of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.allocation import Demand, plan_allocation
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.errors import NotEnoughDevices
from icefarm_control.domain.requests import ReserveSpec
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.settings import Timers
from icefarm_control.domain.states import EndReason
from icefarm_control.notifier import Notifier
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database
from icefarm_control.storage.records import (
    DeviceRow,
    ReservationRow,
    ReservedDeviceRow,
    WaiterRow,
)

# The key of the request being made now, planned at the tail of the queue.
NEW_REQUEST = "new"


def waiter_topic(waiter_id: int) -> str:
    return f"waiter:{waiter_id}"


class WaitingLine:
    """Planning the queue, serving it, and one caller's wait in it."""

    db: Database
    clock: Clock
    timers: Timers
    notifier: Notifier
    # Queue entries whose Reserve call is waiting in this process, and the give-backs of
    # callers that went away.
    _waiting: set[int]
    _abandoning: set[asyncio.Task[None]]

    # Provided by ReservationEngine.
    async def _create(
        self,
        conn: AsyncConnection,
        client_id: str,
        spec: ReserveSpec,
        taken: Sequence[ReservedDeviceRow],
        now: datetime,
    ) -> ReservationRow:
        raise NotImplementedError

    async def _let_go(
        self,
        conn: AsyncConnection,
        targets: dict[str, list[str]],
        reason: EndReason,
        loaded: dict[str, ReservationRow] | None = None,
    ) -> object:
        raise NotImplementedError

    def _shortage(self, spec: ReserveSpec) -> str:
        raise NotImplementedError

    async def _allocate(
        self, conn: AsyncConnection, now: datetime, extra: Demand | None = None
    ) -> list[ReservedDeviceRow] | None:
        """The slow path: plan the whole queue (plus `extra` at its tail) over every free device,
        serve the queued requests that can be served, and return what `extra` gets."""
        await q.lock_allocation(conn)
        free = await q.lock_free_devices(conn)
        queue = [w for w in await waiter_q.waiting(conn) if w.deadline > now]
        if not free or (not queue and extra is None):
            return None
        demands: list[Demand] = [self._demand(w) for w in queue]
        if extra is not None:
            demands.append(extra)
        plan = plan_allocation(demands, free)
        by_id = {d.id: d for d in free}
        for waiter in queue:
            ids = plan.get(waiter.id)
            if ids:
                await self._serve(conn, waiter, [as_reserved(by_id[i]) for i in ids], now)
        mine = plan.get(NEW_REQUEST)
        return None if mine is None else [as_reserved(by_id[i]) for i in mine]

    @staticmethod
    def _demand(waiter: WaiterRow) -> Demand:
        selector = parse_selector(waiter.selector) if waiter.selector else None
        key: Hashable = waiter.id
        return Demand(key, waiter.count, waiter.device_ids, selector)

    async def _serve(
        self,
        conn: AsyncConnection,
        waiter: WaiterRow,
        taken: list[ReservedDeviceRow],
        now: datetime,
    ) -> None:
        spec = ReserveSpec(
            count=waiter.count,
            device_ids=waiter.device_ids,
            selector=None,
            mode=waiter.mode,
            mode_args=waiter.mode_args,
            lease=timedelta(seconds=waiter.lease_seconds),
            wait=timedelta(0),
            request_id=waiter.request_id,
            selector_text=waiter.selector,
        )
        reservation = await self._create(conn, waiter.client_id, spec, taken, now)
        await waiter_q.mark_waiter_served(conn, waiter.id, reservation.id)
        outbox.touch(conn, waiter_topic(waiter.id))

    async def serve_waiters(self) -> None:
        """Give newly free devices to the queue (called when devices become AVAILABLE)."""
        async with self.db.write() as conn:
            await self._serve_if_queued(conn, self.clock.now())

    async def _serve_if_queued(self, conn: AsyncConnection, now: datetime) -> None:
        if await waiter_q.has_waiters(conn):
            await self._allocate(conn, now)

    async def _wait(self, waiter_id: int, spec: ReserveSpec, deadline: datetime) -> ReservationRow:
        """Wait for our queue entry to be served; withdraw it on timeout or cancellation.
        Whichever replica serves it wakes us through the notifier; we also re-read our entry
        now and then, so a lost wake-up only costs a little time."""
        try:
            with self.notifier.subscribe(waiter_topic(waiter_id)) as subscription:
                while True:
                    async with self.db.read() as conn:
                        waiter = await waiter_q.get_waiter(conn, waiter_id)
                    if waiter is not None and waiter.reservation_id is not None:
                        return await self._served_reservation(waiter.reservation_id)
                    if waiter is None or waiter.state == waiter_q.CANCELLED:
                        raise NotEnoughDevices(self._shortage(spec), waited=True)
                    remaining = (deadline - self.clock.now()).total_seconds()
                    if remaining <= 0:
                        break
                    poll = self.timers.waiter_poll_interval.total_seconds()
                    await subscription.wait(min(remaining, poll))
            reservation_id = await self._withdraw(waiter_id)
            if reservation_id is None:
                raise NotEnoughDevices(self._shortage(spec), waited=True)
            return await self._served_reservation(reservation_id)
        except asyncio.CancelledError:
            # The caller went away: give back whatever the queue handed it meanwhile.
            task = asyncio.ensure_future(self._abandon(waiter_id))
            self._abandoning.add(task)
            task.add_done_callback(self._abandoning.discard)
            await asyncio.shield(task)
            raise
        finally:
            self._waiting.discard(waiter_id)

    async def close(self) -> None:
        """Before the database closes: finish giving back what cancelled waiters were handed,
        and take every request of ours still queued out of the queue (its caller is gone)."""
        await asyncio.gather(*self._abandoning, return_exceptions=True)
        for waiter_id in list(self._waiting):
            await self._abandon(waiter_id)

    async def _withdraw(self, waiter_id: int) -> str | None:
        """Leave the queue; the reservation id if we were served in the meantime."""
        async with self.db.write() as conn:
            if await waiter_q.cancel_waiter(conn, waiter_id):
                return None
            waiter = await waiter_q.get_waiter(conn, waiter_id)
        return waiter.reservation_id if waiter else None

    async def _abandon(self, waiter_id: int) -> None:
        reservation_id = await self._withdraw(waiter_id)
        if reservation_id is None:
            return
        async with self.db.write() as conn:
            (row,) = await q.get_reservations(conn, [reservation_id], lock=True)
            await self._let_go(
                conn, {row.id: row.held_device_ids}, EndReason.CLIENT_LOST, {row.id: row}
            )
            await self._serve_if_queued(conn, self.clock.now())

    async def _served_reservation(self, reservation_id: str) -> ReservationRow:
        async with self.db.read() as conn:
            (row,) = await q.get_reservations(conn, [reservation_id])
        return row


def as_reserved(device: DeviceRow) -> ReservedDeviceRow:
    return ReservedDeviceRow.newly_reserved(
        id=device.id,
        worker=device.worker,
        endpoint=device.worker_endpoint,
        kind=device.kind,
        reset_on_release=device.reset_on_release,
    )
