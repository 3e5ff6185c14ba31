"""Storage rows and domain values ↔ icefarm.v1 messages."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from icefarm.v1 import types_pb2
from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.domain.settings import Timers
from icefarm_control.domain.states import DeviceState
from icefarm_control.storage.records import DeviceRow, ReservationRow, WorkerRow


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def duration(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def optional_duration(
    field: str, message: duration_pb2.Duration, present: bool
) -> timedelta | None:
    """A request Duration, or None when unset. Negative or malformed ones are INVALID_ARGUMENT."""
    if not present:
        return None
    if message.seconds < 0 or message.nanos < 0:
        raise InvalidArgument(field, "must not be negative")
    if message.nanos >= 1_000_000_000:
        raise InvalidArgument(field, "nanos must be below one second")
    try:
        return message.ToTimedelta()
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(field, "is out of range") from exc


def device_state(value: str) -> types_pb2.DeviceState.ValueType:
    return types_pb2.DeviceState.Value(f"DEVICE_STATE_{value}")


def parse_device_state(
    value: types_pb2.DeviceState.ValueType, field: str = "state"
) -> DeviceState | None:
    if value == types_pb2.DEVICE_STATE_UNSPECIFIED:
        return None
    try:
        name = types_pb2.DeviceState.Name(value)
    except ValueError as exc:
        raise InvalidArgument(field, f"unknown device state {value}") from exc
    return DeviceState(name.removeprefix("DEVICE_STATE_"))


def _end_reason(value: str | None) -> types_pb2.EndReason.ValueType:
    if not value:
        return types_pb2.END_REASON_UNSPECIFIED
    return types_pb2.EndReason.Value(f"END_REASON_{value}")


def device(row: DeviceRow) -> types_pb2.Device:
    return types_pb2.Device(
        id=row.id,
        worker=row.worker,
        kind=row.kind,
        state=device_state(row.state),
        labels=row.labels,
        properties=row.properties,
        state_time=timestamp(row.state_time),
        error=row.error,
        worker_endpoint=row.worker_endpoint,
        reservation_id=row.reservation_id or "",
        holder=row.holder,
        reset_on_release=row.reset_on_release,
    )


def worker(row: WorkerRow) -> types_pb2.Worker:
    return types_pb2.Worker(
        name=row.name,
        endpoint=row.endpoint,
        version=row.version,
        modes=row.modes,
        labels=row.labels,
        state=types_pb2.WorkerState.Value(f"WORKER_STATE_{row.state}"),
        last_seen_time=timestamp(row.last_seen_time),
        device_count=row.device_count,
    )


def reservation(row: ReservationRow) -> types_pb2.Reservation:
    return types_pb2.Reservation(
        id=row.id,
        client_id=row.client_id,
        mode=row.mode,
        mode_args=row.mode_args,
        devices=[
            types_pb2.ReservedDevice(
                id=d.id,
                worker=d.worker,
                worker_endpoint=d.worker_endpoint,
                state=device_state(d.state) if d.state else types_pb2.DEVICE_STATE_UNSPECIFIED,
                kind=d.kind,
                released_reason=_end_reason(d.released_reason),
            )
            for d in row.devices
        ],
        create_time=timestamp(row.create_time),
        end_time=timestamp(row.end_time),
        state=types_pb2.ReservationState.Value(f"RESERVATION_STATE_{row.state}"),
        end_reason=_end_reason(row.end_reason),
        ended_time=timestamp(row.ended_time),
        selector=row.selector,
    )


def timers(value: Timers) -> types_pb2.Timers:
    return types_pb2.Timers(
        heartbeat_interval=duration(value.heartbeat_interval),
        offline_timeout=duration(value.offline_timeout),
        worker_grace=duration(value.worker_grace),
        client_grace=duration(value.client_grace),
        default_lease_duration=duration(value.default_lease),
        ending_soon_before=duration(value.ending_soon_before),
    )
