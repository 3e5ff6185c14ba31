"""The one place every failure becomes a gRPC status: domain errors with google.rpc ErrorInfo
(BadRequest, RetryInfo), database trouble as a status to retry, the rest INTERNAL."""

from __future__ import annotations

import functools
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

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
    code: grpc.StatusCode,
    message: str,
    reason: str,
    field: str = "",
    description: str = "",
    *,
    metadata: Mapping[str, str] | None = None,
    retry_after: float | None = None,
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=description or message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(retry_after, 0.0) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def domain_status(error: e.IcefarmDomainError) -> grpc.Status:
    code = status_code_for(error)
    reason = error.reason.value
    if isinstance(error, e.InvalidArgument):
        return to_status(code, error.message, reason, error.field, error.description)
    if isinstance(error, e.NotEnoughDevices):
        counts = {name: str(count) for name, count in error.counts.items()}
        return to_status(code, error.message, reason, metadata=counts)
    if isinstance(error, e.LimitExceeded):
        return to_status(code, error.message, reason, retry_after=error.retry_after)
    return to_status(code, error.message, reason)


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


# ------------------------------------------------------------ failures that are not ours

# PostgreSQL's "try the transaction again": deadlock_detected, serialization_failure.
RETRY_SQLSTATES = frozenset({"40P01", "40001"})
# What a database that is gone or out of reach looks like, from the pool, SQLAlchemy, the
# driver, or the socket under it.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    ConnectionError,
    socket.gaierror,
)

DATABASE_UNAVAILABLE = to_status(
    grpc.StatusCode.UNAVAILABLE,
    "the control cannot reach its database right now; retry",
    e.Reason.SHUTTING_DOWN.value,
)
TRANSACTION_CONFLICT = to_status(
    grpc.StatusCode.ABORTED,
    "a conflicting change ran at the same time and nothing was applied; retry",
    e.Reason.CONFLICT.value,
)


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (SQLAlchemy wraps the driver's error)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return chain


def is_transaction_conflict(error: BaseException) -> bool:
    return any(getattr(c, "sqlstate", None) in RETRY_SQLSTATES for c in _causes(error))


def is_database_unreachable(error: BaseException) -> bool:
    for cause in _causes(error):
        if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, _UNREACHABLE):
            return True
    return False


def failure_status(error: BaseException, rpc: str) -> grpc.Status:
    """Any failure of an RPC, unary or stream, as the status to answer with (call inside the
    `except` that caught it: an unexpected error is logged with its traceback). Domain errors
    keep their own status; a deadlock is ABORTED/CONFLICT and a lost database UNAVAILABLE,
    both safe to retry since nothing was committed; anything else is INTERNAL with an incident
    id, and nothing of the exception goes on the wire."""
    if isinstance(error, e.IcefarmDomainError) and not isinstance(error, e.Internal):
        return domain_status(error)
    if is_transaction_conflict(error):
        log.info("transaction conflict; the caller retries", rpc=rpc)
        return TRANSACTION_CONFLICT
    if is_database_unreachable(error):
        log.warning("database unreachable", rpc=rpc, error=type(error).__name__)
        return DATABASE_UNAVAILABLE
    return internal_error_status(rpc)


def internal_error_status(rpc: str) -> grpc.Status:
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error", rpc=rpc, incident=incident)
    return to_status(
        grpc.StatusCode.INTERNAL,
        f"internal error (incident {incident} in the control's log)",
        e.Reason.INTERNAL.value,
    )


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def translate_errors(method: Handler) -> Handler:
    """Wrap a unary servicer method: every exception becomes its status (`failure_status`)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method answered already
        except Exception as error:
            await abort(context, failure_status(error, method.__name__))

    return wrapper  # type: ignore[return-value]
