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
    `device_update.labels`), or None."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            violation = _check_message_field(field, value, path)
        elif field.is_repeated:
            violation = next(
                (v for i, item in enumerate(value) if (v := _check(field, item, path, i))), None
            )
        else:
            violation = _check(field, value, path)
        if violation is not None:
            return violation
    return None


def _check_message_field(field: FieldDescriptor, value: Any, path: str) -> InvalidArgument | None:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field = entry.fields_by_name["key"]
        value_field = entry.fields_by_name["value"]
        for key, item in value.items():
            where = f"key {_shown(key)}"
            violation = _check(key_field, key, path, where=where, owner=field)
            if violation is None and value_field.type == FieldDescriptor.TYPE_MESSAGE:
                violation = find_violation(item, f"{path}.")
            elif violation is None:
                violation = _check(value_field, item, path, where=where, owner=field)
            if violation is not None:
                return violation
        return None
    if field.is_repeated:
        return next((v for item in value if (v := find_violation(item, f"{path}."))), None)
    return find_violation(value, f"{path}.")


def _check(
    field: FieldDescriptor,
    value: Any,
    path: str,
    index: int | None = None,
    *,
    where: str = "",
    owner: FieldDescriptor | None = None,
) -> InvalidArgument | None:
    """One scalar. `owner` is the map field a key or value belongs to (its rules apply)."""
    name = (owner or field).full_name
    if index is not None:
        where = f"item {index}"
    suffix = f" ({where})" if where else ""
    if field.type == FieldDescriptor.TYPE_STRING:
        pattern = _CONTROL_IN_TEXT if name in FREE_TEXT else _CONTROL
        found = pattern.search(value)
        if found is None:
            return None
        code = f"U+{ord(found.group()):04X}"
        return InvalidArgument(
            path, f"contains the control character {code} at position {found.start()}{suffix}"
        )
    if field.type in _FLOATS and not math.isfinite(value):
        if math.isnan(value) and name in NAN_REMOVES:
            return None
        return InvalidArgument(path, f"must be a finite number, not {value}{suffix}")
    if field.type in _UNSIGNED_64 and field.name in SEQUENCE_FIELDS and value > MAX_SEQUENCE:
        return InvalidArgument(path, f"must be at most {MAX_SEQUENCE}{suffix}")
    return None


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
