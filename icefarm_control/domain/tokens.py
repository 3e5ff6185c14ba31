"""Reservation tokens on the control's side: the shared Ed25519 format of `icefarm.tokens`,
with a domain error (reason TOKEN_INVALID) for a token that does not verify."""

from __future__ import annotations

from datetime import datetime

from icefarm import tokens
from icefarm.tokens import TokenClaims
from icefarm_control.domain.errors import IcefarmDomainError, Reason

__all__ = ["TokenClaims", "TokenInvalid", "TokenSigner"]


class TokenInvalid(IcefarmDomainError):
    reason = Reason.TOKEN_INVALID


class TokenSigner(tokens.TokenSigner):
    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenInvalid otherwise."""
        try:
            return super().verify(token, now)
        except tokens.TokenError as exc:
            raise TokenInvalid(str(exc)) from exc
