"""What the outbox records when reservations start, change and end (the general path; the
PostgreSQL fast paths write the same rows in SQL)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from icefarm_control.domain import events
from icefarm_control.domain.events import CommandType, EventType
from icefarm_control.domain.states import EndReason
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Transaction
from icefarm_control.storage.records import ReservationRow, ReservedDeviceRow


async def record_created(
    conn: Transaction, row: ReservationRow, lease_seconds: float, now: datetime
) -> None:
    """Ask each device's worker to prepare it, and tell the operators."""
    for device in row.devices:
        payload = events.prepare_device(
            device_id=device.id,
            reservation_id=row.id,
            client_id=row.client_id,
            mode=row.mode,
            mode_args=row.mode_args,
            lease_seconds=lease_seconds,
        )
        await outbox.append_command(
            conn, device.worker, CommandType.PREPARE_DEVICE, payload, now, device_id=device.id
        )
    created = events.reservation_created(
        reservation_id=row.id,
        client_id=row.client_id,
        device_ids=[d.id for d in row.devices],
        mode=row.mode,
        end_time=row.end_time,
    )
    await outbox.append_event(conn, outbox.OPERATOR, EventType.RESERVATION_CREATED, created, now)


async def record_release(
    conn: Transaction,
    row: ReservationRow,
    devices: Sequence[ReservedDeviceRow],
    reason: EndReason,
    closed: bool,
    now: datetime,
) -> None:
    """Tell the holder and the operators, ask the workers to reset their boards, and wake
    whoever waits for free devices."""
    payload = events.reservation_ended(
        reservation_id=row.id, device_ids=[d.id for d in devices], reason=reason, closed=closed
    )
    ended = EventType.RESERVATION_ENDED
    await outbox.append_event(conn, outbox.client_audience(row.client_id), ended, payload, now)
    await outbox.append_event(
        conn, outbox.OPERATOR, ended, {**payload, "client_id": row.client_id}, now
    )
    for device in devices:
        command = events.release_device(device_id=device.id, reservation_id=row.id)
        await outbox.append_command(
            conn, device.worker, CommandType.RELEASE_DEVICE, command, now, device_id=device.id
        )
    outbox.touch(conn, outbox.DEVICES)


async def record_extended(conn: Transaction, row: ReservationRow, now: datetime) -> None:
    payload = events.reservation_extended(reservation_id=row.id, end_time=row.end_time)
    extended = EventType.RESERVATION_EXTENDED
    await outbox.append_event(conn, outbox.client_audience(row.client_id), extended, payload, now)
    await outbox.append_event(conn, outbox.OPERATOR, extended, payload, now)
