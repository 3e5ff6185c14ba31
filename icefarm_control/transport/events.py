"""The one place an outbox event becomes an `icefarm.v1.Event`.

Payload keys are the field names of the message that goes into the `Event.kind` oneof (see
`domain/events.py`), so most events are filled field by field from the message descriptor:
enum values arrive as domain names ("RELEASED" → `END_REASON_RELEASED`), times as ISO strings.
An unknown type or a payload that does not fit is logged and skipped: one odd event never ends
a stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from icefarm.v1 import types_pb2
from icefarm_control.domain.events import EventType
from icefarm_control.storage.outbox import EventRow
from icefarm_control.transport.convert import timestamp

log = structlog.get_logger(__name__)
# The upb and pure-Python descriptor classes share no typed base: descriptors are `Any` here.
Descriptor = Any

KINDS = frozenset(f.name for f in types_pb2.Event.DESCRIPTOR.oneofs_by_name["kind"].fields)


def event(row: EventRow) -> types_pb2.Event | None:
    """The message for one outbox row, or None (logged) when it cannot be built."""
    if row.type not in KINDS:
        log.warning("skipping an event of unknown type", type=row.type, sequence=row.sequence)
        return None
    adapt = _ADAPTERS.get(row.type, _as_is)
    message = types_pb2.Event(sequence=row.sequence, time=timestamp(row.create_time))
    kind: Message = getattr(message, row.type)
    kind.SetInParent()
    try:
        fill(kind, adapt(row))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        log.warning(
            "skipping an event whose payload does not fit its message",
            type=row.type,
            sequence=row.sequence,
            audience=row.audience,
            error=str(error),
        )
        return None
    return message


def devices_available(selector: str, device_ids: Sequence[str], now: datetime) -> types_pb2.Event:
    """The ephemeral event of a watched selector (sequence 0: never stored, never resumed)."""
    return types_pb2.Event(
        sequence=0,
        time=timestamp(now),
        devices_available=types_pb2.DevicesAvailable(
            selector=selector, count=len(device_ids), device_ids=list(device_ids)
        ),
    )


# ------------------------------------------------------------ payload shapes


def _as_is(row: EventRow) -> Mapping[str, Any]:
    return row.payload


def _reservation_created(row: EventRow) -> Mapping[str, Any]:
    """The payload is flat; the message carries a Reservation."""
    payload = row.payload
    reservation = {
        "id": payload.get("reservation_id", ""),
        "client_id": payload.get("client_id", ""),
        "mode": payload.get("mode", ""),
        "devices": [{"id": d} for d in payload.get("device_ids", ())],
        "create_time": row.create_time.isoformat(),
        "end_time": payload.get("end_time"),
        "state": "ACTIVE",
    }
    return {"reservation": {k: v for k, v in reservation.items() if v is not None}}


def _nested(key: str) -> Callable[[EventRow], Mapping[str, Any]]:
    """DeviceChanged/WorkerChanged: the payload is the device (worker) itself, or holds it."""

    def adapt(row: EventRow) -> Mapping[str, Any]:
        inner = row.payload.get(key)
        return {key: inner if isinstance(inner, Mapping) else row.payload}

    return adapt


_ADAPTERS: dict[str, Callable[[EventRow], Mapping[str, Any]]] = {
    EventType.RESERVATION_CREATED: _reservation_created,
    EventType.DEVICE_CHANGED: _nested("device"),
    EventType.WORKER_CHANGED: _nested("worker"),
}


# ------------------------------------------------------------ payload → message


def fill(message: Message, payload: Mapping[str, Any]) -> None:
    """Set each field of `message` named in `payload`; keys without a field are ignored."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in payload.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        if _is_map(field):
            _fill_map(getattr(message, key), field, value)
        elif field.is_repeated:
            _fill_repeated(getattr(message, key), field, value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill_message(getattr(message, key), value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, key, _enum(field.enum_type, value))
        else:
            setattr(message, key, value)


def _is_map(field: Descriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        field.message_type.GetOptions().map_entry
    )


def _fill_map(target: Any, field: Descriptor, value: Mapping[str, Any]) -> None:
    value_field = field.message_type.fields_by_name["value"]
    for key, item in value.items():
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill_message(target[key], item)
        elif value_field.type == FieldDescriptor.TYPE_ENUM:
            target[key] = _enum(value_field.enum_type, item)
        elif value_field.type == FieldDescriptor.TYPE_DOUBLE:
            target[key] = float(item)
        else:
            target[key] = item


def _fill_repeated(target: Any, field: Descriptor, value: Sequence[Any]) -> None:
    if isinstance(value, str | bytes):
        raise TypeError(f"{field.name}: a list was expected")
    for item in value:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill_message(target.add(), item)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            target.append(_enum(field.enum_type, item))
        else:
            target.append(item)


def _fill_message(target: Message, value: Any) -> None:
    if isinstance(target, timestamp_pb2.Timestamp):
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not an ISO 8601 time")
        target.FromDatetime(datetime.fromisoformat(value))
    elif isinstance(target, duration_pb2.Duration):
        target.FromNanoseconds(int(float(value) * 1e9))
    else:
        target.SetInParent()
        fill(target, value)


def _enum(enum_type: Descriptor, value: Any) -> int:
    """A domain name ("READY") or a full value name ("DEVICE_STATE_READY") → its number."""
    if isinstance(value, int):
        return value
    prefix = enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
    name = str(value).upper()
    found = enum_type.values_by_name.get(name) or enum_type.values_by_name.get(prefix + name)
    if found is None:
        raise ValueError(f"{value!r} is not a {enum_type.name}")
    return int(found.number)
