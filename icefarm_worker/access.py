"""Who may touch a board: the worker is the final arbiter (ARCHITECTURE §2).

A call must carry a reservation token the control signed (verified with the public key from
`Registered.token_verification_key`) that names the board, and the reservation it names must
hold the board now on this worker, as the control's PrepareDevice/ReleaseDevice commands said.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import grpc

from icefarm.metadata import TOKEN_METADATA_KEY
from icefarm.states import DeviceState as State
from icefarm.tokens import TokenClaims, TokenError, TokenVerifier
from icefarm_worker.errors import (
    SHUTTING_DOWN,
    TOKEN_INVALID,
    ServiceError,
    invalid_field,
    permission_denied,
)
from icefarm_worker.fleet import Fleet
from icefarm_worker.lifecycle import BoardLifecycle

Metadata = Iterable[tuple[str, str | bytes]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Access:
    """Checks tokens and holds for WorkerService calls."""

    def __init__(self, fleet: Fleet, now: Callable[[], datetime] = _utc_now) -> None:
        self.fleet = fleet
        self.now = now
        self.verifier: TokenVerifier | None = None

    def set_key(self, public_key: bytes) -> None:
        """The control's token verification key (from each Registered)."""
        self.verifier = TokenVerifier(public_key)

    def claims(self, context: grpc.aio.ServicerContext[Any, Any]) -> TokenClaims:
        """The claims of the call's token; PERMISSION_DENIED/TOKEN_INVALID otherwise."""
        return self.check_token(context.invocation_metadata() or ())

    def check_token(self, metadata: Metadata) -> TokenClaims:
        """The claims of the token in `metadata`; ServiceError otherwise."""
        token = next((str(v) for k, v in metadata if k == TOKEN_METADATA_KEY), "")
        if not token:
            raise permission_denied(
                f"no reservation token (metadata {TOKEN_METADATA_KEY!r})", TOKEN_INVALID
            )
        if self.verifier is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "the worker has not registered with the control yet; retry",
                SHUTTING_DOWN,
            )
        try:
            return self.verifier.verify(token, self.now())
        except TokenError as exc:
            raise permission_denied(str(exc), TOKEN_INVALID) from exc

    def board(
        self, claims: TokenClaims, device_id: str, field: str = "device_id"
    ) -> BoardLifecycle:
        """The board `device_id` if the token's reservation holds it now; INVALID_ARGUMENT for
        an empty or unknown id, PERMISSION_DENIED/NOT_HOLDER when it is not the caller's."""
        if not device_id:
            raise invalid_field(field, "is required")
        board = self.fleet.boards.get(device_id)
        if board is None or board.state == State.REMOVED:
            raise invalid_field(field, f"no device {device_id!r} on this worker")
        if device_id not in claims.device_ids:
            raise permission_denied(f"the reservation token does not name device {device_id}")
        if not board.holds(claims.reservation_id):
            raise permission_denied(
                f"reservation {claims.reservation_id} does not hold device {device_id} now"
            )
        return board

    def held_boards(self, claims: TokenClaims) -> list[BoardLifecycle]:
        """The boards on this worker that the token names and its reservation holds now
        (whatever their state: a BROKEN board stays held until released)."""
        return [
            b for b in self.fleet.held_by(claims.reservation_id) if b.device_id in claims.device_ids
        ]
