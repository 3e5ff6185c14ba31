"""What the farm has: workers and devices, as operators see and change them."""

from __future__ import annotations

from dataclasses import dataclass

from icefarm_control.domain import events, paging
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.device_changes import device_changed
from icefarm_control.domain.errors import InvalidArgument, NotFound, Reason
from icefarm_control.domain.events import CommandType
from icefarm_control.domain.ledger import ReleaseOutcome
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.selectors import parse_selector
from icefarm_control.domain.settings import Limits
from icefarm_control.domain.states import DeviceState, EndReason, check_transition
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage.database import Database
from icefarm_control.storage.records import DeviceRow, WorkerRow


@dataclass(frozen=True)
class DevicePage:
    devices: list[DeviceRow]
    next_page_token: str


@dataclass(frozen=True)
class WorkerPage:
    workers: list[WorkerRow]
    next_page_token: str


class Inventory:
    def __init__(
        self, database: Database, engine: ReservationEngine, clock: Clock, limits: Limits
    ) -> None:
        self.db = database
        self.engine = engine
        self.clock = clock
        self.limits = limits

    async def list_devices(
        self, selector_text: str, state: DeviceState | None, page_size: int, page_token: str
    ) -> DevicePage:
        """Devices matching a selector (and a state), ordered by id; page_token is the last id."""
        selector = parse_selector(selector_text)
        size = paging.page_size(page_size, self.limits)
        async with self.db.read() as conn:
            rows = await q.list_devices(
                conn, selector=selector, state=state, limit=size + 1, after_id=page_token
            )
        token = rows[size - 1].id if len(rows) > size else ""
        return DevicePage(rows[:size], token)

    async def get_device(self, device_id: str) -> DeviceRow:
        if not device_id:
            raise InvalidArgument("device_id", "is required")
        async with self.db.read() as conn:
            device = await q.get_device(conn, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}", reason=Reason.DEVICE_NOT_FOUND)
        return device

    async def list_workers(self, page_size: int, page_token: str) -> WorkerPage:
        size = paging.page_size(page_size, self.limits)
        async with self.db.read() as conn:
            rows = await q.list_workers(conn, limit=size + 1, after_name=page_token)
        token = rows[size - 1].name if len(rows) > size else ""
        return WorkerPage(rows[:size], token)

    async def remove_device(self, device_id: str) -> DeviceRow:
        """Take a device out of the farm; a reservation holding it loses it (DEVICE_REMOVED).
        Ending the hold and marking the device REMOVED are one transaction, so the queue can
        never be handed a device that is being removed."""
        if not device_id:
            raise InvalidArgument("device_id", "is required")
        async with self.db.write() as tx:
            ended = await self.engine.end_reservations_in(
                tx, device_ids=[device_id], reason=EndReason.DEVICE_REMOVED
            )
            current = await q.get_device(tx, device_id, lock=True)
            assert current is not None  # end_reservations_in refused an unknown device
            if current.reservation_id is not None:
                # Reserved between our first look and the lock: end that hold too.
                more = await self.engine.end_reservations_in(
                    tx, device_ids=[device_id], reason=EndReason.DEVICE_REMOVED
                )
                ended = ReleaseOutcome(ended.device_ids + more.device_ids, [])
            now = self.clock.now()
            check_transition(device_id, DeviceState(current.state), DeviceState.REMOVED)
            await q.set_device_state(
                tx, [device_id], DeviceState.REMOVED, now, clear_reservation=True
            )
            # The worker stops using the board; the operators see it go.
            await outbox.append_command(
                tx,
                current.worker,
                CommandType.REMOVE_DEVICE,
                events.remove_device(device_id=device_id),
                now,
                device_id=device_id,
            )
            removed = await device_changed(tx, device_id, now)
        if ended.device_ids:
            await self.engine.serve_waiters()
        return removed
