"""Reservation tokens: what a client presents to a worker's WorkerService.

Format: base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)). The claims name the
reservation, its client, its devices and when the token stops being valid (the lease end).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from icefarm_control.domain.errors import IcefarmDomainError, Reason


@dataclass(frozen=True)
class TokenClaims:
    reservation_id: str
    client_id: str
    device_ids: tuple[str, ...]
    expires: datetime


class TokenInvalid(IcefarmDomainError):
    reason = Reason.TOKEN_INVALID


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the token key must be at least 16 bytes")
        self._key = key

    def sign(self, claims: TokenClaims) -> str:
        body = json.dumps(
            {
                "rid": claims.reservation_id,
                "cid": claims.client_id,
                "dev": list(claims.device_ids),
                "exp": int(claims.expires.timestamp()),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(mac)}"

    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenInvalid otherwise."""
        try:
            body_text, mac_text = token.split(".", 1)
            body, mac = _unb64(body_text), _unb64(mac_text)
        except ValueError as exc:
            raise TokenInvalid("malformed reservation token") from exc
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise TokenInvalid("reservation token signature does not match")
        try:
            data = json.loads(body)
            claims = TokenClaims(
                reservation_id=data["rid"],
                client_id=data["cid"],
                device_ids=tuple(data["dev"]),
                expires=datetime.fromtimestamp(data["exp"], UTC),
            )
        except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            # Signed with our key but not claims we wrote (another format or version).
            raise TokenInvalid("malformed reservation token") from exc
        if claims.expires <= now:
            raise TokenInvalid("reservation token has expired")
        return claims
