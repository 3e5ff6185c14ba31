"""The one place domain errors become gRPC statuses (with google.rpc ErrorInfo/BadRequest)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError

from icefarm_control.domain import errors as e
from icefarm_control.domain.tokens import TokenInvalid

log = structlog.get_logger(__name__)
ERROR_DOMAIN = "icefarm.dev"

_CODES: list[tuple[type[e.IcefarmDomainError], grpc.StatusCode]] = [
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (TokenInvalid, grpc.StatusCode.PERMISSION_DENIED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.NotEnoughDevices, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.Internal, grpc.StatusCode.INTERNAL),
    (e.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code_for(error: e.IcefarmDomainError) -> grpc.StatusCode:
    if isinstance(error, e.NotEnoughDevices) and error.waited:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.ABORTED


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(
    code: grpc.StatusCode, message: str, reason: str, field: str = "", description: str = ""
) -> grpc.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=description or message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def domain_status(error: e.IcefarmDomainError) -> grpc.Status:
    if isinstance(error, e.InvalidArgument):
        return to_status(
            status_code_for(error),
            error.message,
            error.reason.value,
            error.field,
            error.description,
        )
    return to_status(status_code_for(error), error.message, error.reason.value)


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def translate_errors(method: Handler) -> Handler:
    """Wrap a unary servicer method: domain errors → their status; a lost database →
    UNAVAILABLE; anything else → INTERNAL with an id to find it in the log (never a traceback
    to the caller)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except e.IcefarmDomainError as error:
            await abort(context, domain_status(error))
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            log.warning("database connection lost", rpc=method.__name__)
            await abort(
                context,
                to_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "the control lost its database connection; retry",
                    e.Reason.SHUTTING_DOWN.value,
                ),
            )

    return wrapper  # type: ignore[return-value]


def internal_error_status(rpc: str) -> grpc.Status:
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error", rpc=rpc, incident=incident)
    return to_status(
        grpc.StatusCode.INTERNAL,
        f"internal error (incident {incident} in the control's log)",
        "INTERNAL",
    )
