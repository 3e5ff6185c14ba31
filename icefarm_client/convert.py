"""Generated messages → the client's dataclasses, and what callers pass as a duration → a
timedelta or a protobuf Duration (the one place the client reads durations)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_client.errors import InvalidArgument
from icefarm_client.models import (
    BoardInfo,
    Device,
    DeviceState,
    EndReason,
    Event,
    EventType,
    Reservation,
    ReservationState,
    ReservedDevice,
    Result,
    Worker,
    WorkerState,
)

# A duration as the API takes it: a timedelta, seconds, or text such as "90s", "5m", "1h30m".
DurationLike = timedelta | int | float | str
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d)")
_TEXT = re.compile(rf"\s*(?:{_NUMBER}|(?:{_NUMBER}\s*(?:ms|s|m|h|d)\s*)+)\s*")
_EXAMPLES = "e.g. 90, 90s, 1500ms, 5m, 2h, 1d, 1h30m"


def _seconds_of_text(text: str, field: str) -> float:
    if not _TEXT.fullmatch(text):
        if text.strip().startswith("-"):
            raise InvalidArgument(f"{field}: must not be negative, got {text!r}", field=field)
        raise InvalidArgument(f"{field}: {text!r} is not a duration ({_EXAMPLES})", field=field)
    parts = _PART.findall(text)
    if not parts:  # a plain number: seconds
        return float(text)
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def to_timedelta(value: DurationLike, field: str = "duration") -> timedelta:
    """`value` as a timedelta: a timedelta, a number of seconds, or text ("90", "90s",
    "1500ms", "5m", "2h", "1d", compounds like "1h30m"). Anything else, or a negative
    duration, is InvalidArgument naming `field`."""
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        kind = type(value).__name__
        raise InvalidArgument(
            f"{field}: a duration is a timedelta, seconds or text like '5m', not {kind}",
            field=field,
        )
    else:
        seconds = _seconds_of_text(value, field) if isinstance(value, str) else float(value)
        if not math.isfinite(seconds):
            raise InvalidArgument(f"{field}: must be finite, got {value!r}", field=field)
        try:
            result = timedelta(seconds=seconds)
        except OverflowError:
            raise InvalidArgument(f"{field}: {value!r} is too long", field=field) from None
    if result < timedelta(0):
        raise InvalidArgument(f"{field}: must not be negative, got {value!r}", field=field)
    return result


def optional_timedelta(value: DurationLike | None, field: str) -> timedelta | None:
    """`to_timedelta`, with None left as None (the server's default)."""
    return None if value is None else to_timedelta(value, field)


def duration(value: DurationLike, field: str = "duration") -> duration_pb2.Duration:
    """A protobuf Duration (InvalidArgument naming `field` for a bad value)."""
    message = duration_pb2.Duration()
    try:
        message.FromTimedelta(to_timedelta(value, field))
    except (OverflowError, ValueError):
        raise InvalidArgument(f"{field}: {value!r} is too long", field=field) from None
    return message


def timedelta_of(value: duration_pb2.Duration) -> timedelta:
    """A timedelta from a protobuf Duration."""
    return value.ToTimedelta()


def _time(message: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return message.ToDatetime(tzinfo=UTC) if present else None


def device_state(value: int) -> DeviceState:
    """The client enum for a wire DeviceState."""
    name = tpb.DeviceState.Name(value)  # type: ignore[arg-type]
    return DeviceState(name.removeprefix("DEVICE_STATE_"))


def device_state_value(state: DeviceState) -> tpb.DeviceState.ValueType:
    """The wire DeviceState for a client enum."""
    return tpb.DeviceState.Value(f"DEVICE_STATE_{state.value}")


def _worker_state(value: int) -> WorkerState:
    return WorkerState(tpb.WorkerState.Name(value).removeprefix("WORKER_STATE_"))  # type: ignore[arg-type]


def _end_reason(value: int) -> EndReason:
    return EndReason(tpb.EndReason.Name(value).removeprefix("END_REASON_"))  # type: ignore[arg-type]


def device(message: tpb.Device) -> Device:
    """A Device."""
    return Device(
        id=message.id,
        worker=message.worker,
        kind=message.kind,
        state=device_state(message.state),
        labels=dict(message.labels),
        properties=dict(message.properties),
        state_time=_time(message.state_time, message.HasField("state_time")),
        error=message.error,
        worker_endpoint=message.worker_endpoint,
        reservation_id=message.reservation_id,
        holder=message.holder,
    )


def worker(message: tpb.Worker) -> Worker:
    """A Worker."""
    return Worker(
        name=message.name,
        endpoint=message.endpoint,
        version=message.version,
        modes=tuple(message.modes),
        labels=dict(message.labels),
        state=_worker_state(message.state),
        last_seen_time=_time(message.last_seen_time, message.HasField("last_seen_time")),
        device_count=message.device_count,
    )


def reservation(message: tpb.Reservation, token: str = "") -> Reservation:
    """A Reservation (with the worker token when the call handed one out)."""
    return Reservation(
        id=message.id,
        client_id=message.client_id,
        mode=message.mode,
        mode_args=dict(message.mode_args),
        devices=tuple(
            ReservedDevice(
                id=d.id,
                worker=d.worker,
                worker_endpoint=d.worker_endpoint,
                state=device_state(d.state),
                kind=d.kind,
                released_reason=_end_reason(d.released_reason),
            )
            for d in message.devices
        ),
        create_time=_time(message.create_time, message.HasField("create_time")),
        end_time=_time(message.end_time, message.HasField("end_time")),
        state=ReservationState(
            tpb.ReservationState.Name(message.state).removeprefix("RESERVATION_STATE_")
        ),
        end_reason=_end_reason(message.end_reason),
        ended_time=_time(message.ended_time, message.HasField("ended_time")),
        selector=message.selector,
        token=token,
    )


def board_info(message: wpb.DeviceInfo) -> BoardInfo:
    """What a worker says about a held board."""
    return BoardInfo(
        device_id=message.device_id,
        kind=message.kind,
        state=device_state(message.state),
        mode=message.mode,
        reservation_id=message.reservation_id,
        firmware=message.firmware,
        error=message.error,
    )


def result(message: wpb.EvaluateResult, worker_name: str) -> Result:
    """One evaluation result."""
    which = message.WhichOneof("value")
    return Result(
        bitstream_id=message.bitstream_id,
        device_id=message.device_id,
        pulse_count=message.pulse_count if which == "pulse_count" else None,
        variance=message.variance if which == "variance" else None,
        error=message.error,
        attempt=message.attempt or 1,
        queue_duration=timedelta_of(message.queue_duration),
        run_duration=timedelta_of(message.run_duration),
        worker=worker_name,
    )


def event(message: tpb.Event) -> Event:
    """The client Event for a wire Event (operator or client feed)."""
    kind = message.WhichOneof("kind")
    seq, at = message.sequence, _time(message.time, message.HasField("time"))
    if kind == "device_ready":
        e = message.device_ready
        return Event(
            EventType.DEVICE_READY,
            reservation_id=e.reservation_id,
            device_id=e.device_id,
            device_ids=(e.device_id,),
            worker_endpoint=e.worker_endpoint,
            sequence=seq,
            time=at,
        )
    if kind == "device_failed":
        f = message.device_failed
        return Event(
            EventType.DEVICE_FAILED,
            reservation_id=f.reservation_id,
            device_id=f.device_id,
            device_ids=(f.device_id,),
            error=f.error,
            sequence=seq,
            time=at,
        )
    if kind == "reservation_ending_soon":
        s = message.reservation_ending_soon
        return Event(
            EventType.RESERVATION_ENDING_SOON,
            reservation_id=s.reservation_id,
            end_time=_time(s.end_time, s.HasField("end_time")),
            sequence=seq,
            time=at,
        )
    if kind == "reservation_ended":
        n = message.reservation_ended
        return Event(
            EventType.RESERVATION_ENDED,
            reservation_id=n.reservation_id,
            device_ids=tuple(n.device_ids),
            reason=_end_reason(n.reason),
            reservation_closed=n.reservation_closed,
            client_id=n.client_id,
            sequence=seq,
            time=at,
        )
    if kind == "devices_available":
        a = message.devices_available
        return Event(
            EventType.DEVICES_AVAILABLE,
            selector=a.selector,
            count=a.count,
            device_ids=tuple(a.device_ids),
            sequence=seq,
            time=at,
        )
    if kind == "worker_draining":
        w = message.worker_draining
        return Event(
            EventType.WORKER_DRAINING,
            worker=w.worker,
            device_ids=tuple(w.device_ids),
            reservation_ids=tuple(w.reservation_ids),
            sequence=seq,
            time=at,
        )
    if kind == "reservation_created":
        r = reservation(message.reservation_created.reservation)
        return Event(
            EventType.RESERVATION_CREATED,
            reservation_id=r.id,
            device_ids=r.device_ids,
            client_id=r.client_id,
            reservation=r,
            sequence=seq,
            time=at,
        )
    if kind == "reservation_extended":
        x = message.reservation_extended
        return Event(
            EventType.RESERVATION_EXTENDED,
            reservation_id=x.reservation_id,
            end_time=_time(x.end_time, x.HasField("end_time")),
            sequence=seq,
            time=at,
        )
    if kind == "device_changed":
        d = device(message.device_changed.device)
        return Event(
            EventType.DEVICE_CHANGED,
            device_id=d.id,
            device_ids=(d.id,),
            worker=d.worker,
            reservation_id=d.reservation_id,
            error=d.error,
            device=d,
            sequence=seq,
            time=at,
        )
    w2 = worker(message.worker_changed.worker)
    return Event(EventType.WORKER_CHANGED, seq, at, worker=w2.name, worker_info=w2)
