"""Reservation tokens on the control's side: the shared Ed25519 format of `icefarm.tokens`,
with a domain error (reason TOKEN_INVALID) for a token that does not verify, and the signing
key every replica of one database shares (kept in the database, storage/signing_keys.py)."""

from __future__ import annotations

from datetime import datetime

import structlog

from icefarm import tokens
from icefarm.tokens import TokenClaims
from icefarm_control.domain.clock import Clock
from icefarm_control.domain.errors import IcefarmDomainError, Reason
from icefarm_control.storage import signing_keys
from icefarm_control.storage.database import Database

__all__ = ["SigningKeyMismatch", "TokenClaims", "TokenInvalid", "TokenSigner", "load_signer"]

log = structlog.get_logger(__name__)


class TokenInvalid(IcefarmDomainError):
    reason = Reason.TOKEN_INVALID


class SigningKeyMismatch(ValueError):
    """The configured token_key is not the key the database's replicas sign with: starting
    would hand out tokens the other replicas' workers refuse."""


class TokenSigner(tokens.TokenSigner):
    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenInvalid otherwise."""
        try:
            return super().verify(token, now)
        except tokens.TokenError as exc:
            raise TokenInvalid(str(exc)) from exc


async def load_signer(database: Database, token_key: str, clock: Clock) -> TokenSigner:
    """The signer of this replica: the database's newest unretired key (older unretired keys
    still verify). A database without a key gets one, derived from `token_key` when set, else
    random. A `token_key` that does not match the database's key is SigningKeyMismatch."""
    configured = tokens.derive_private_key(token_key.encode()) if token_key else None

    def new_key() -> signing_keys.SigningKeyRow:
        private = configured if configured is not None else tokens.generate_private_key()
        return signing_keys.SigningKeyRow(
            key_id=TokenSigner(private).key_id,
            private_key=tokens.private_key_to_text(private),
            create_time=clock.now(),
        )

    rows, created = await signing_keys.load_or_create(database, new_key)
    current, *older = (tokens.private_key_from_text(row.private_key) for row in rows)
    signer = TokenSigner(current, tuple(TokenSigner(key).public_key for key in older))
    if configured is not None and TokenSigner(configured).key_id != signer.key_id:
        raise SigningKeyMismatch(
            f"token_key does not match the database's token signing key {signer.key_id}: "
            "the key is kept in the database, so unset token_key (or set the one that "
            "created it)"
        )
    if created:
        log.info(
            "created the token signing key",
            key_id=signer.key_id,
            seeded_by="token_key" if configured is not None else "random",
        )
    return signer
