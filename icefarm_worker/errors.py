"""Errors WorkerService answers with: a gRPC status carrying google.rpc ErrorInfo (and
BadRequest for a bad field), built the way the control builds its own (same domain, and
reasons from icefarm.v1.ErrorReason), so one client-side translation covers both."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "icefarm.dev"
# icefarm.v1.ErrorReason names without the prefix (the control's domain/errors.py Reason).
TOKEN_INVALID = "TOKEN_INVALID"
NOT_HOLDER = "NOT_HOLDER"
INVALID_FIELD = "INVALID_FIELD"
DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
MODE_UNSUPPORTED = "MODE_UNSUPPORTED"
DEVICE_FAILED = "DEVICE_FAILED"
WORKER_DRAINING = "WORKER_DRAINING"
SHUTTING_DOWN = "SHUTTING_DOWN"


class ServiceError(Exception):
    """Raised by the service's checks; the servicer aborts the call with `status`."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        field: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field

    @property
    def status(self) -> grpc.Status:
        """The grpc.Status to abort the call with."""
        return to_status(self.code, self.message, self.reason, self.field)


def invalid_field(field: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT naming the field (BadRequest) with reason INVALID_FIELD."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", INVALID_FIELD, field
    )


def permission_denied(message: str, reason: str = NOT_HOLDER) -> ServiceError:
    """PERMISSION_DENIED with `reason` (NOT_HOLDER unless told)."""
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, reason)


def failed_precondition(message: str, reason: str = DEVICE_FAILED) -> ServiceError:
    """FAILED_PRECONDITION with `reason` (DEVICE_FAILED unless told)."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(code: grpc.StatusCode, message: str, reason: str, field: str = "") -> grpc.Status:
    """A grpc.Status with ErrorInfo(reason, domain) and, for a field, a BadRequest."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> NoReturn:
    """End the call with the error's rich status."""
    await context.abort_with_status(error.status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover
