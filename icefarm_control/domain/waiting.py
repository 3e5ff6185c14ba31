"""The queue of waiting Reserve calls: rows in `waiters`, served fairly by whichever replica
frees devices, each caller woken through the topic of its row. A collaborator of the
reservation engine: it plans and serves the queue and runs one caller's wait; it writes
reservations only through the ledger.

A waiter is either served (its caller gets the reservation) or withdrawn (nothing is held for
it), never both: planning reads the queue with its rows locked, serving re-checks that the row
is still queued, and a withdrawal that finds its row served returns that reservation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Hashable
from datetime import datetime, timedelta

from icefarm_control.domain.allocation import Demand, plan_allocation
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.ledger import ReservationLedger
from icefarm_control.domain.requests import ReserveSpec
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.settings import Timers
from icefarm_control.domain.states import EndReason
from icefarm_control.notifier import Notifier
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database, Transaction
from icefarm_control.storage.records import (
    DeviceRow,
    ReservationRow,
    ReservedDeviceRow,
    WaiterRow,
)

# The key of the request being made now, planned at the tail of the queue.
NEW_REQUEST = "new"


class WaitingLine:
    """Planning the queue, serving it, and one caller's wait in it."""

    def __init__(
        self,
        database: Database,
        ledger: ReservationLedger,
        clock: Clock,
        timers: Timers,
        notifier: Notifier,
        replica_id: str,
    ) -> None:
        self.db = database
        self.ledger = ledger
        self.clock = clock
        self.timers = timers
        self.notifier = notifier
        self.replica_id = replica_id
        # Queue entries whose Reserve call is waiting in this process, and the give-backs of
        # callers that went away.
        self._waiting: set[int] = set()
        self._abandoning: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ planning and serving

    async def allocate(
        self, tx: Transaction, now: datetime, extra: Demand | None = None
    ) -> list[ReservedDeviceRow] | None:
        """Plan the whole queue (plus `extra` at its tail) over every free device, serve the
        queued requests that can be served, and return what `extra` gets."""
        await q.lock_allocation(tx)
        await waiter_q.cancel_waiters_of_dead_replicas(tx, now - self.timers.replica_stale_after)
        free = await q.lock_free_devices(tx)
        if not free:
            return None
        queue = [w for w in await waiter_q.waiting(tx, lock=True) if w.deadline > now]
        if not queue and extra is None:
            return None
        demands: list[Demand] = [_demand(w) for w in queue]
        if extra is not None:
            demands.append(extra)
        plan = plan_allocation(demands, free)
        by_id = {d.id: d for d in free}
        for waiter in queue:
            ids = plan.get(waiter.id)
            if ids:
                await self._serve(tx, waiter, [as_reserved(by_id[i]) for i in ids], now)
        mine = plan.get(NEW_REQUEST)
        return None if mine is None else [as_reserved(by_id[i]) for i in mine]

    async def _serve(
        self,
        tx: Transaction,
        waiter: WaiterRow,
        taken: list[ReservedDeviceRow],
        now: datetime,
    ) -> None:
        reservation_id = uuid.uuid4().hex
        # Claimed first: a row withdrawn since it was read (impossible while the queue is read
        # locked, but cheap to make certain) is not served.
        if not await waiter_q.mark_waiter_served(tx, waiter.id, reservation_id):
            return
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
        await self.ledger.create(tx, waiter.client_id, spec, taken, now, reservation_id)
        outbox.touch(tx, outbox.waiter_topic(waiter.id))

    async def serve_waiters(self) -> None:
        """Give free devices to the queue (after devices became AVAILABLE or holds ended)."""
        async with self.db.write() as tx:
            await self.serve_if_queued(tx, self.clock.now())

    async def serve_if_queued(self, tx: Transaction, now: datetime) -> None:
        if await waiter_q.has_waiters(tx):
            await self.allocate(tx, now)

    # ------------------------------------------------------------ one caller's wait

    async def enqueue(self, tx: Transaction, client_id: str, spec: ReserveSpec) -> int:
        now = self.clock.now()
        waiter_id = await waiter_q.insert_waiter(
            tx,
            client_id=client_id,
            count=spec.count,
            device_ids=spec.device_ids,
            selector=spec.selector_text,
            mode=spec.mode,
            mode_args=spec.mode_args,
            lease_seconds=spec.lease.total_seconds(),
            request_id=spec.request_id,
            now=now,
            deadline=now + spec.wait,
            replica_id=self.replica_id,
        )
        self._waiting.add(waiter_id)
        return waiter_id

    async def adopt(self, tx: Transaction, client_id: str, spec: ReserveSpec) -> int | None:
        """A retry of a request still queued (its first attempt's replica died or its answer
        was lost) waits on that entry instead of queueing a second one, which would leave the
        first to be served for nobody."""
        if not spec.request_id:
            return None
        waiter_id = await waiter_q.adopt_waiter(
            tx,
            client_id=client_id,
            request_id=spec.request_id,
            replica_id=self.replica_id,
            deadline=self.clock.now() + spec.wait,
        )
        if waiter_id is not None:
            self._waiting.add(waiter_id)
        return waiter_id

    async def wait(self, waiter_id: int, deadline: datetime) -> ReservationRow | None:
        """Wait for our queue entry to be served; withdraw it on timeout (None: nothing is
        held) or cancellation (what the queue handed us meanwhile is given back). Whichever
        replica serves it wakes us through the notifier; we also re-read our entry now and
        then, so a lost wake-up only costs a little time."""
        try:
            with self.notifier.subscribe(outbox.waiter_topic(waiter_id)) as subscription:
                while True:
                    async with self.db.read() as tx:
                        waiter = await waiter_q.get_waiter(tx, waiter_id)
                    if waiter is not None and waiter.reservation_id is not None:
                        return await self._served_reservation(waiter.reservation_id)
                    if waiter is None or waiter.state == waiter_q.CANCELLED:
                        return None
                    remaining = (deadline - self.clock.now()).total_seconds()
                    if remaining <= 0:
                        break
                    poll = self.timers.waiter_poll_interval.total_seconds()
                    await subscription.wait(min(remaining, poll))
            reservation_id = await self._withdraw(waiter_id)
            if reservation_id is None:
                return None
            return await self._served_reservation(reservation_id)
        except asyncio.CancelledError:
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
        async with self.db.write() as tx:
            if await waiter_q.cancel_waiter(tx, waiter_id):
                return None
            waiter = await waiter_q.get_waiter(tx, waiter_id)
        return waiter.reservation_id if waiter else None

    async def _abandon(self, waiter_id: int) -> None:
        """The caller went away: withdraw, and give back a reservation served meanwhile."""
        async with self.db.write() as tx:
            waiter = await waiter_q.get_waiter(tx, waiter_id)
            if waiter is None or waiter.replica_id != self.replica_id:
                return  # a retry of the same request took the entry over: it is theirs now
            if await waiter_q.cancel_waiter(tx, waiter_id):
                return
            waiter = await waiter_q.get_waiter(tx, waiter_id)
            if waiter is None or waiter.reservation_id is None:
                return
            (row,) = await q.get_reservations(tx, [waiter.reservation_id], lock=True)
            await self.ledger.let_go(
                tx, {row.id: row.held_device_ids}, EndReason.CLIENT_LOST, {row.id: row}
            )
            await self.serve_if_queued(tx, self.clock.now())

    async def _served_reservation(self, reservation_id: str) -> ReservationRow:
        async with self.db.read() as tx:
            (row,) = await q.get_reservations(tx, [reservation_id])
        return row


def _demand(waiter: WaiterRow) -> Demand:
    selector = parse_selector(waiter.selector) if waiter.selector else None
    key: Hashable = waiter.id
    return Demand(key, waiter.count, waiter.device_ids, selector)


def as_reserved(device: DeviceRow) -> ReservedDeviceRow:
    return ReservedDeviceRow.newly_reserved(
        id=device.id,
        worker=device.worker,
        endpoint=device.worker_endpoint,
        kind=device.kind,
        reset_on_release=device.reset_on_release,
    )
