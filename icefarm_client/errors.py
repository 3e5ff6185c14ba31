"""The client's exceptions, and the one place gRPC failures become them.

Every failure of a call to the control or a worker is translated by `translate` from the gRPC
status code and the `google.rpc.ErrorInfo` reason the servers attach (the names of
`icefarm.v1.ErrorReason` without the prefix). Nothing else in the client inspects status codes.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

Source = Literal["control", "worker"]

_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_INCIDENT = re.compile(r"incident ([0-9A-Za-z-]+)")


class IcefarmError(Exception):
    """Base of every error the client raises. `code` is the gRPC status name (e.g.
    "NOT_FOUND", "" when no call was involved), `reason` the server's ErrorInfo reason."""

    def __init__(self, message: str, *, code: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class NotEnoughDevices(IcefarmError):
    """Not enough matching devices were free (and the call did not wait). When the control
    says, `wanted` is how many were asked for, `matching` how many devices match the selector
    in any state, `free` how many of those were free (None when not told)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        reason: str = "",
        wanted: int | None = None,
        matching: int | None = None,
        free: int | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.wanted = wanted
        self.matching = matching
        self.free = free


class DeadlineExceeded(IcefarmError):
    """A call took longer than its deadline."""


class WaitTimeout(NotEnoughDevices, DeadlineExceeded):
    """A waiting reserve (or a wait for availability) ran out of time; nothing is held."""


class ReservationNotFound(IcefarmError):
    """No such reservation."""


class DeviceNotFound(IcefarmError):
    """No such device."""


class WorkerNotFound(IcefarmError):
    """No such worker."""


class PermissionDenied(IcefarmError):
    """The caller may not do this (its role, or a bad reservation token at a worker)."""


class NotHolder(PermissionDenied):
    """The reservation or device is held by someone else (or was released already)."""


class Unauthenticated(IcefarmError):
    """The call carried no valid identity."""


class InvalidArgument(IcefarmError):
    """A request field is malformed or out of range; `field` names it when the server did."""

    def __init__(self, message: str, *, field: str = "", code: str = "", reason: str = "") -> None:
        super().__init__(message, code=code, reason=reason)
        self.field = field


class InvalidSelector(InvalidArgument):
    """A selector does not parse; `position` is the 0-based offset of the error (-1: unknown)."""

    def __init__(
        self, message: str, *, field: str = "selector", position: int = -1, code: str = ""
    ) -> None:
        super().__init__(message, field=field, code=code, reason="INVALID_SELECTOR")
        self.position = position


class FailedPrecondition(IcefarmError):
    """The system is not in a state that allows this (a draining worker, an illegal state
    change, a mode the worker does not have)."""


class DeviceNotAvailable(FailedPrecondition):
    """A device named in a reserve is not free."""


class ReservationEnded(FailedPrecondition):
    """The reservation named has ended (released, expired, revoked ...); the message says
    when and why. Extending it cannot bring it back: reserve again."""


class LimitExceeded(IcefarmError):
    """A bound on what one caller may have or do was reached. `retry_delay`, when the control
    says, is how long until it will have passed (None: it will not pass by waiting)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        reason: str = "",
        retry_delay: timedelta | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.retry_delay = retry_delay


class InternalError(IcefarmError):
    """The server failed unexpectedly (a bug); `incident` names it in the server's log."""

    def __init__(
        self, message: str, *, code: str = "", reason: str = "", incident: str = ""
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.incident = incident


class DeviceFailed(IcefarmError):
    """A device failed; or an evaluation has no working device left to run on."""


class ControlUnavailable(IcefarmError):
    """The control cannot be reached (after the bounded retries)."""


class WorkerUnavailable(IcefarmError):
    """A worker cannot be reached."""


_BY_REASON: dict[str, type[IcefarmError]] = {
    "RESERVATION_NOT_FOUND": ReservationNotFound,
    "DEVICE_NOT_FOUND": DeviceNotFound,
    "WORKER_NOT_FOUND": WorkerNotFound,
    "NOT_HOLDER": NotHolder,
    "TOKEN_INVALID": PermissionDenied,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "DEVICE_FAILED": DeviceFailed,
    "DEVICE_NOT_AVAILABLE": DeviceNotAvailable,
    "RESERVATION_ENDED": ReservationEnded,
}

_BY_CODE: dict[grpc.StatusCode, type[IcefarmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


@dataclasses.dataclass
class _Details:
    """What the google.rpc details of a status say (empty when absent)."""

    reason: str = ""
    field: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    retry_delay: timedelta | None = None


def _details(error: grpc.RpcError) -> _Details:
    found = _Details()
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return found
    if status is None:
        return found
    for detail in status.details:
        if detail.type_url == _ERROR_INFO:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason = info.reason
            found.metadata = dict(info.metadata)
        elif detail.type_url == _BAD_REQUEST:
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                found.field = bad.field_violations[0].field
        elif detail.type_url == _RETRY_INFO:
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_delay = retry.retry_delay.ToTimedelta()
    return found


def reason_of(error: grpc.RpcError) -> str:
    """The ErrorInfo reason a server attached to a failed call ("" when none)."""
    return _details(error).reason


def _count(metadata: dict[str, str], key: str) -> int | None:
    value = metadata.get(key, "")
    return int(value) if value.isdigit() else None


def _position(message: str) -> int:
    marker = "at position "
    index = message.rfind(marker)
    if index < 0:
        return -1
    digits = ""
    for char in message[index + len(marker) :]:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else -1


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call: Any = error
    try:
        code = call.code()
        message = call.details() or ""
    except (AttributeError, TypeError):
        return grpc.StatusCode.UNKNOWN, str(error)
    return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), message


def translate(error: grpc.RpcError, source: Source = "control") -> IcefarmError:
    """The client exception for a failed gRPC call to the control or to a worker."""
    code, message = _status_of(error)
    details = _details(error)
    reason, name = details.reason, code.name
    where = "the control" if source == "control" else "a worker"
    if code is grpc.StatusCode.UNAVAILABLE:
        text = f"{where} is unavailable: {message}" if message else f"{where} is unavailable"
        if source == "control":
            return ControlUnavailable(text, code=name, reason=reason)
        return WorkerUnavailable(text, code=name, reason=reason)
    if reason == "NOT_ENOUGH_DEVICES":
        counts = {key: _count(details.metadata, key) for key in ("wanted", "matching", "free")}
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return WaitTimeout(message, code=name, reason=reason, **counts)
        return NotEnoughDevices(message, code=name, reason=reason, **counts)
    if reason == "INVALID_SELECTOR":
        return InvalidSelector(
            message, field=details.field or "selector", position=_position(message), code=name
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(message, field=details.field, code=name, reason=reason)
    if reason == "LIMIT_EXCEEDED":
        return LimitExceeded(
            message or name, code=name, reason=reason, retry_delay=details.retry_delay
        )
    if reason == "INTERNAL" or code is grpc.StatusCode.INTERNAL:
        incident = details.metadata.get("incident", "")
        if not incident and (match := _INCIDENT.search(message)):
            incident = match.group(1)
        return InternalError(message or name, code=name, reason=reason, incident=incident)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, IcefarmError)
    return cls(message or name, code=name, reason=reason)
