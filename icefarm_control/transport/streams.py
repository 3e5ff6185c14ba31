"""What the long-lived streams share: how a failure becomes a status, and how a database call
survives the stream being cancelled under it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from sqlalchemy.exc import DBAPIError

from icefarm_control.domain.errors import IcefarmDomainError, Reason
from icefarm_control.transport.errors import domain_status, internal_error_status, to_status

T = TypeVar("T")


def failure_status(error: Exception, rpc: str) -> grpc.Status:
    """A stream's failure as a status (call inside the `except` that caught it: an
    unexpected error is logged with its traceback and an incident id)."""
    if isinstance(error, IcefarmDomainError):
        return domain_status(error)
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return to_status(
            grpc.StatusCode.UNAVAILABLE,
            "the control lost its database connection; reconnect",
            Reason.SHUTTING_DOWN.value,
        )
    return internal_error_status(rpc)


async def to_completion(call: Coroutine[Any, Any, T]) -> T:
    """Await a database call that runs to its end even if the stream is cancelled meanwhile
    (the client went away): a driver call cancelled half-way leaves its pooled connection
    unusable. The cancellation still reaches the caller at once."""
    return await asyncio.shield(call)
