"""The edge check: every request message, unary or streamed, is walked once before a servicer
sees it, so no field with a control character, a non-finite number or an out-of-range sequence
reaches the domain or the database (PostgreSQL refuses NUL in text; JSON has no Infinity).

The rules, one place for all messages (found through the descriptors, so a new field is
checked without anyone remembering to):
- strings: no control character (U+0000-U+001F, U+007F-U+009F); free-text fields
  (`FREE_TEXT`: error texts a worker reports) may keep tab and newline;
- doubles and floats: finite; NaN is allowed only where it means "remove this key"
  (`NAN_REMOVES`: DeviceUpdate.properties);
- event sequences (`SEQUENCE_FIELDS`, uint64 on the wire) fit the database's signed BIGINT.

`validated(servicer, service)` applies the check in front of each method of a servicer. A bad
unary request is INVALID_ARGUMENT naming the field. In a stream a bad first message ends the
stream the same way (the servicer's handshake sees an InvalidArgument); a bad later message is
refused and logged, and the stream goes on (one bad report must not cut off a worker that runs
many boards, nor a client's Session and its leases).
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc
import structlog
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.transport.errors import abort, domain_status

log = structlog.get_logger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
FREE_TEXT = frozenset({"icefarm.v1.DeviceUpdate.error", "icefarm.v1.CommandResult.error"})
NAN_REMOVES = frozenset({"icefarm.v1.DeviceUpdate.properties"})
SEQUENCE_FIELDS = frozenset({"resume_after"})
MAX_SEQUENCE = 2**63 - 1

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_UNSIGNED_64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def find_violation(message: Message, prefix: str = "") -> InvalidArgument | None:
    """The first field of `message` that breaks a rule (named by its path, such as
    `device_update.labels`), or None. Clean input costs one regex search per field."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        entry = _map_entry(field)
        if entry is not None:
            violation = _check_map(field, entry, list(value.items()), path)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else (value,)
            violation = next((v for m in items if (v := find_violation(m, f"{path}."))), None)
        elif field.is_repeated:
            violation = _check_all(field, field, path, list(value), lambda i: f"item {i}")
        else:
            violation = _check_all(field, field, path, [value], lambda _: "")
        if violation is not None:
            return violation
    return None


_MAP_ENTRIES: dict[str, tuple[FieldDescriptor, FieldDescriptor] | None] = {}


def _map_entry(field: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor] | None:
    """(key, value) fields when `field` is a map (looked up once per field)."""
    if field.full_name not in _MAP_ENTRIES:
        entry = field.message_type
        is_map = entry is not None and entry.GetOptions().map_entry
        _MAP_ENTRIES[field.full_name] = (
            (entry.fields_by_name["key"], entry.fields_by_name["value"])
            if entry is not None and is_map
            else None
        )
    return _MAP_ENTRIES[field.full_name]


def _check_map(
    field: FieldDescriptor,
    entry: tuple[FieldDescriptor, FieldDescriptor],
    items: list[tuple[Any, Any]],
    path: str,
) -> InvalidArgument | None:
    key_field, value_field = entry
    keys = [key for key, _ in items]

    def where(index: int) -> str:
        return f"key {_shown(keys[index])}"

    violation = _check_all(key_field, field, path, keys, where)
    if violation is not None:
        return violation
    values = [value for _, value in items]
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        return next((v for m in values if (v := find_violation(m, f"{path}."))), None)
    return _check_all(value_field, field, path, values, where)


def _check_all(
    scalar: FieldDescriptor,
    owner: FieldDescriptor,
    path: str,
    values: list[Any],
    where: Callable[[int], str],
) -> InvalidArgument | None:
    """Scalars of one kind; `owner` is the field whose rules apply (the map, for its keys and
    values); `where` names the position of a bad one."""
    if scalar.type == FieldDescriptor.TYPE_STRING:
        pattern = _CONTROL_IN_TEXT if owner.full_name in FREE_TEXT else _CONTROL
        if pattern.search("".join(values)) is None:
            return None
        for index, text in enumerate(values):
            if (found := pattern.search(text)) is not None:
                code = f"U+{ord(found.group()):04X}"
                detail = f"contains the control character {code} at position {found.start()}"
                return InvalidArgument(path, detail + _suffix(where(index)))
    elif scalar.type in _FLOATS:
        nan_removes = owner.full_name in NAN_REMOVES
        for index, number in enumerate(values):
            if not math.isfinite(number) and not (nan_removes and math.isnan(number)):
                detail = f"must be a finite number, not {number}"
                return InvalidArgument(path, detail + _suffix(where(index)))
    elif scalar.type in _UNSIGNED_64 and owner.name in SEQUENCE_FIELDS:
        for index, number in enumerate(values):
            if number > MAX_SEQUENCE:
                detail = f"must be at most {MAX_SEQUENCE}"
                return InvalidArgument(path, detail + _suffix(where(index)))
    return None


def _suffix(where: str) -> str:
    return f" ({where})" if where else ""


def _shown(text: Any) -> str:
    """A map key as it may appear in an answer: escaped, and short."""
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


# ------------------------------------------------------------ in front of the servicers

S = TypeVar("S")
Context = grpc.aio.ServicerContext[Any, Any]


class _Checked:
    """Stands in for a servicer at registration: each method checks its requests first."""


def validated(servicer: S, service: ServiceDescriptor) -> S:
    """`servicer` with the edge check in front of every method of `service`."""
    checked = _Checked()
    for method in service.methods:
        handler = getattr(servicer, method.name)
        if method.client_streaming:
            wrapped = _stream_requests(handler, method.full_name)
        elif method.server_streaming:
            wrapped = _unary_request_stream(handler)
        else:
            wrapped = _unary_request(handler)
        setattr(checked, method.name, wrapped)
    return cast(S, checked)


def _unary_request(handler: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Message, context: Context) -> Any:
        violation = find_violation(request)
        if violation is not None:
            await abort(context, domain_status(violation))
        return await handler(request, context)

    return checked


def _unary_request_stream(handler: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Message, context: Context) -> AsyncIterator[Any]:
        violation = find_violation(request)
        if violation is not None:
            await abort(context, domain_status(violation))
        async for response in handler(request, context):
            yield response

    return checked


def _stream_requests(handler: Callable[..., Any], rpc: str) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Message], context: Context) -> AsyncIterator[Any]:
        async for response in handler(checked_requests(requests, rpc), context):
            yield response

    return checked


async def checked_requests(requests: AsyncIterator[Message], rpc: str) -> AsyncIterator[Message]:
    """The messages of a stream that pass the check. A bad first message is raised (the
    servicer's handshake ends the stream with it); a bad later one is logged and skipped."""
    first = True
    async for request in requests:
        violation = find_violation(request)
        if violation is None:
            yield request
        elif first:
            raise violation
        else:
            log.warning(
                "request message refused",
                rpc=rpc,
                field=violation.field,
                error=violation.description,
            )
        first = False
