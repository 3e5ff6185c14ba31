"""Who is calling. Every RPC asks this one function; the security issue swaps its body for
bearer tokens and roles without touching the domain."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from icefarm_control.domain.errors import Unauthenticated

CLIENT_ID_HEADER = "icefarm-client-id"
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,256}")


@dataclass(frozen=True)
class Caller:
    client_id: str
    # Roles arrive with bearer tokens; for now every caller may use every RPC.
    roles: frozenset[str] = frozenset({"client", "worker", "admin"})


def caller_identity(context: grpc.aio.ServicerContext[Any, Any], *, required: bool) -> Caller:
    """The caller's identity from metadata; Unauthenticated when required and missing."""
    return Caller(client_id=client_id_from(context.invocation_metadata() or (), required=required))


def client_id_from(metadata: Iterable[tuple[str, Any]], *, required: bool) -> str:
    """The client id in `metadata` ("" when absent and not required). The whole value must be
    printable ASCII: a trailing newline or a NUL never becomes part of an owner's name."""
    client_id = next((str(v) for k, v in metadata if k == CLIENT_ID_HEADER), "")
    if not client_id:
        if required:
            raise Unauthenticated(f"send your client id in the {CLIENT_ID_HEADER!r} metadata")
        return ""
    if not _CLIENT_ID.fullmatch(client_id):
        raise Unauthenticated(f"{CLIENT_ID_HEADER} must be 1-256 printable ASCII characters")
    return client_id
