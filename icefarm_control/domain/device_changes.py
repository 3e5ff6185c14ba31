"""Writing a change to a device and everything it causes, inside the caller's transaction:
the operator's `device_changed`, the holder's `device_ready`/`device_failed`, and the holds the
change ends. Decisions and their effects commit together (issue 9): only serving the waiting
queue comes after the commit, and it re-plans under its own locks."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import structlog

from icefarm_control.domain import events
from icefarm_control.domain.device_reports import (
    DeviceReport,
    carry_worker_labels,
    merge_labels,
    merge_properties,
)
from icefarm_control.domain.errors import InvalidArgument, Unavailable
from icefarm_control.domain.events import EventType
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.states import DeviceState, EndReason, can_transition
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database, Transaction
from icefarm_control.storage.records import DeviceRow

log = structlog.get_logger(__name__)
T = TypeVar("T")
# The engine is handed at most this many device ids per call.
_BATCH = 1000
# A transaction whose lock order was upset (storage/worker_queries.py: HoldsChanged) runs
# again; this many times at most, then the caller is told to retry.
_ATTEMPTS = 5


async def write_retrying(db: Database, step: Callable[[Transaction], Awaitable[T]]) -> T:
    """Run `step` in a write transaction; again (from the start) when a device was reserved
    between reading its holders and locking it."""
    for attempt in itertools.count(1):
        try:
            async with db.write() as conn:
                return await step(conn)
        except wq.HoldsChanged as changed:
            if attempt >= _ATTEMPTS:
                raise Unavailable("the devices are changing too fast; try again") from changed
            log.debug("devices reserved meanwhile; running the transaction again", attempt=attempt)
    raise AssertionError("unreachable")


async def end_holds_in(
    conn: Transaction,
    engine: ReservationEngine,
    holds: Mapping[EndReason, Sequence[str]],
) -> bool:
    """End the holds on the devices (by reason) in the caller's transaction. True when a
    device was let go: the caller serves the queue after its commit."""
    freed = False
    for reason, device_ids in holds.items():
        ids = sorted(set(device_ids))
        for start in range(0, len(ids), _BATCH):
            outcome = await engine.end_reservations_in(
                conn, device_ids=ids[start : start + _BATCH], reason=reason
            )
            if outcome.device_ids:
                freed = True
                log.info("holds ended", reason=reason.value, devices=outcome.device_ids)
    return freed


@dataclass(frozen=True)
class DeviceChange:
    """A device row written in this transaction: its state before (None: a new device, or
    not read) and after."""

    device_id: str
    before: DeviceState | None
    after: DeviceState


@dataclass(frozen=True)
class WorkerLabels:
    """The labels of the reporting worker, which its devices carry (`previous`: its labels
    before the Register being reconciled, None outside a Register)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    previous: Mapping[str, str] | None = None

    def onto(self, labels: dict[str, str], own: dict[str, str]) -> dict[str, str]:
        """`labels` (a device's, `own` the ones its report names) with the worker's."""
        if not self.labels and not self.previous:
            return labels
        previous = dict(self.previous) if self.previous is not None else None
        return carry_worker_labels(labels, own, dict(self.labels), previous)


@dataclass(frozen=True)
class DeviceWrite:
    """What a report changes in a device row (`values`), and the change it records."""

    change: DeviceChange
    exists_already: bool
    values: dict[str, Any]


def plan_report(
    worker: str,
    existing: DeviceRow | None,
    report: DeviceReport,
    state: DeviceState | None,
    now: datetime,
    worker_labels: WorkerLabels | None = None,
) -> DeviceWrite | None:
    """What the report changes (labels and properties merge, the worker's labels carried over;
    `state` None keeps the state); None when nothing changes."""
    carried = worker_labels or WorkerLabels()
    if existing is None:
        if not report.kind:
            raise InvalidArgument("device_update.kind", "is required for a new device")
        new_state = state or DeviceState.DISCOVERED
        values: dict[str, Any] = {
            "worker_name": worker,
            "kind": report.kind,
            "labels": carried.onto(merge_labels({}, report.labels), report.labels),
            "properties": merge_properties({}, report.properties),
            "state": new_state.value,
            "state_time": now,
            "error": report.error if new_state == DeviceState.BROKEN else "",
            "reset_on_release": report.reset_on_release,
        }
        return DeviceWrite(DeviceChange(report.device_id, None, new_state), False, values)
    current = DeviceState(existing.state)
    new_state = state or current
    values = _changed_values(existing, worker, report, new_state, carried)
    if new_state != current:
        values.update(state=new_state.value, state_time=now)
    if not values:
        return None
    return DeviceWrite(DeviceChange(existing.id, current, new_state), True, values)


async def write_planned(conn: Transaction, writes: Sequence[DeviceWrite]) -> list[DeviceChange]:
    """Write the planned device rows (a few statements for the whole batch); their changes,
    whose events the caller records (record_changes)."""
    await wq.write_devices(conn, [(w.change.device_id, w.exists_already, w.values) for w in writes])
    return [w.change for w in writes]


async def store_report(
    conn: Transaction,
    worker: str,
    existing: DeviceRow | None,
    report: DeviceReport,
    state: DeviceState | None,
    now: datetime,
    worker_labels: WorkerLabels | None = None,
) -> DeviceChange | None:
    """Write what one report changes at once (plan_report); None when nothing changed."""
    write = plan_report(worker, existing, report, state, now, worker_labels)
    if write is None:
        return None
    (change,) = await write_planned(conn, [write])
    return change


def _changed_values(
    existing: DeviceRow,
    worker: str,
    report: DeviceReport,
    new_state: DeviceState,
    carried: WorkerLabels,
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    labels = carried.onto(merge_labels(existing.labels, report.labels), report.labels)
    if labels != existing.labels:
        values["labels"] = labels
    properties = merge_properties(existing.properties, report.properties)
    if properties != existing.properties:
        values["properties"] = properties
    if report.kind and report.kind != existing.kind:
        values["kind"] = report.kind
    if existing.worker != worker:
        values["worker_name"] = worker
    if report.reset_on_release != existing.reset_on_release and report.kind:
        # A report without a kind is a partial update that says nothing about resets.
        values["reset_on_release"] = report.reset_on_release
    # `error` says why a device is BROKEN; a board that recovered has none.
    error = (report.error or existing.error) if new_state == DeviceState.BROKEN else ""
    if error != existing.error:
        values["error"] = error
    return values


async def break_device(
    conn: Transaction, device_id: str, error: str, now: datetime
) -> DeviceRow | None:
    """A command on the device failed or timed out: BROKEN with the reason, holder told.
    Devices that are gone (offline, removed) are left alone."""
    device = await wq.lock_device(conn, device_id)
    if device is None:
        return None
    current = DeviceState(device.state)
    if current in (DeviceState.OFFLINE, DeviceState.REMOVED) or not can_transition(
        current, DeviceState.BROKEN
    ):
        return None
    values = {"state": DeviceState.BROKEN.value, "state_time": now, "error": error}
    await wq.write_device(conn, device_id, exists_already=True, values=values)
    log.warning("device broken", device=device_id, error=error)
    await record_changes(conn, [DeviceChange(device_id, current, DeviceState.BROKEN)], now)
    return device


async def device_changed(conn: Transaction, device_id: str, now: datetime) -> DeviceRow:
    """The operator's `device_changed` for the device as it is now; the device."""
    device = await q.get_device(conn, device_id)
    assert device is not None
    payload = events.device_changed(device)
    await outbox.append_event(conn, outbox.OPERATOR, EventType.DEVICE_CHANGED, payload, now)
    return device


async def record_changes(conn: Transaction, changes: Sequence[DeviceChange], now: datetime) -> bool:
    """The events of the changes written in this transaction: the operators'
    `device_changed` for each (in one insert), the holder's `device_ready`/`device_failed`.
    True when a device became free (the caller serves the queue after its commit)."""
    if not changes:
        return False
    rows = await wq.get_devices(conn, [c.device_id for c in changes])
    payloads = [events.device_changed(rows[c.device_id]) for c in changes]
    await outbox.append_events(conn, outbox.OPERATOR, EventType.DEVICE_CHANGED, payloads, now)
    freed = False
    for change in changes:
        if change.after == change.before:
            continue
        if change.after == DeviceState.AVAILABLE:
            freed = True
            outbox.touch(conn, outbox.DEVICES)
        await _tell_holder(conn, rows[change.device_id], change.after, now)
    return freed


async def _tell_holder(
    conn: Transaction, device: DeviceRow, state: DeviceState, now: datetime
) -> None:
    if device.reservation_id is None:
        return
    holder = outbox.client_audience(device.holder)
    if state == DeviceState.READY:
        payload = events.device_ready(
            reservation_id=device.reservation_id,
            device_id=device.id,
            worker_endpoint=device.worker_endpoint,
        )
        await outbox.append_event(conn, holder, EventType.DEVICE_READY, payload, now)
    elif state == DeviceState.BROKEN:
        payload = events.device_failed(
            reservation_id=device.reservation_id, device_id=device.id, error=device.error
        )
        await outbox.append_event(conn, holder, EventType.DEVICE_FAILED, payload, now)
