"""What the long-lived streams share: how a failure becomes a status (the same function as for
unary calls), and how a database call survives the stream being cancelled under it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from icefarm_control.transport.errors import failure_status

__all__ = ["failure_status", "to_completion"]

T = TypeVar("T")


async def to_completion(call: Coroutine[Any, Any, T]) -> T:
    """Await a database call that runs to its end even if the stream is cancelled meanwhile
    (the client went away): a driver call cancelled half-way leaves its pooled connection
    unusable. The cancellation still reaches the caller at once."""
    return await asyncio.shield(call)
