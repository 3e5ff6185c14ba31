"""The client's exceptions, and the one place gRPC failures become them.

Every failure of a call to the control or a worker is translated by `translate` from the gRPC
status code and the `google.rpc.ErrorInfo` reason the servers attach (the names of
`icefarm.v1.ErrorReason` without the prefix). Nothing else in the client inspects status codes.
"""

from __future__ import annotations

from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

Source = Literal["control", "worker"]

_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


class IcefarmError(Exception):
    """Base of every error the client raises. `code` is the gRPC status name (e.g.
    "NOT_FOUND", "" when no call was involved), `reason` the server's ErrorInfo reason."""

    def __init__(self, message: str, *, code: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class NotEnoughDevices(IcefarmError):
    """Not enough matching devices were free (and the call did not wait)."""


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
}

_BY_CODE: dict[grpc.StatusCode, type[IcefarmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def _details(error: grpc.RpcError) -> tuple[str, str]:
    """(reason, field) from the status details, empty when absent."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return "", ""
    if status is None:
        return "", ""
    reason = field = ""
    for detail in status.details:
        if detail.type_url == _ERROR_INFO:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.type_url == _BAD_REQUEST:
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
    return reason, field


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
    reason, field = _details(error)
    name = code.name
    where = "the control" if source == "control" else "a worker"
    if code is grpc.StatusCode.UNAVAILABLE:
        text = f"{where} is unavailable: {message}" if message else f"{where} is unavailable"
        if source == "control":
            return ControlUnavailable(text, code=name, reason=reason)
        return WorkerUnavailable(text, code=name, reason=reason)
    if reason == "NOT_ENOUGH_DEVICES":
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return WaitTimeout(message, code=name, reason=reason)
        return NotEnoughDevices(message, code=name, reason=reason)
    if reason == "INVALID_SELECTOR":
        return InvalidSelector(
            message, field=field or "selector", position=_position(message), code=name
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(message, field=field, code=name, reason=reason)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, IcefarmError)
    return cls(message or name, code=name, reason=reason)
