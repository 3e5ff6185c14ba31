"""Reservation tokens: what a client presents to a worker's WorkerService.

The control signs, workers verify. Format: base64url(JSON claims) "." base64url(Ed25519
signature over the claims bytes). The claims name the reservation, its client, its devices and
when the token stops being valid (the lease end; `Extend` hands out fresh tokens).

Ed25519 rather than a shared HMAC secret: a worker holds only the public key (sent in
`Registered.token_verification_key`), so a compromised worker cannot mint tokens for boards on
other workers. The signing key is derived from the control's `token_key` secret, so replicas
that share the secret sign with the same key.

This module is shared by the control and the worker; it depends on nothing else in the project.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# Metadata key under which a client sends its token to a worker.
TOKEN_METADATA_KEY = "icefarm-reservation-token"


@dataclass(frozen=True)
class TokenClaims:
    reservation_id: str
    client_id: str
    device_ids: tuple[str, ...]
    expires: datetime


class TokenError(ValueError):
    """The token is malformed, not signed by the control, or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenVerifier:
    """Checks tokens with the control's public key (32 raw Ed25519 bytes)."""

    def __init__(self, public_key: bytes) -> None:
        try:
            self._key = Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError as exc:
            raise ValueError("the token verification key must be 32 raw Ed25519 bytes") from exc

    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenError otherwise."""
        try:
            body_text, signature_text = token.split(".", 1)
            body, signature = _unb64(body_text), _unb64(signature_text)
        except ValueError as exc:
            raise TokenError("malformed reservation token") from exc
        try:
            self._key.verify(signature, body)
        except InvalidSignature as exc:
            raise TokenError("reservation token signature does not match") from exc
        try:
            data = json.loads(body)
            claims = TokenClaims(
                reservation_id=str(data["rid"]),
                client_id=str(data["cid"]),
                device_ids=tuple(str(d) for d in data["dev"]),
                expires=datetime.fromtimestamp(data["exp"], UTC),
            )
        except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            # Signed with our key but not claims we wrote (another format or version).
            raise TokenError("malformed reservation token") from exc
        if claims.expires <= now:
            raise TokenError("reservation token has expired")
        return claims


class TokenSigner(TokenVerifier):
    """Signs tokens; the key is derived from a secret of at least 16 bytes."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token key must be at least 16 bytes")
        self._private = Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"icefarm-token-v1:" + secret).digest()
        )
        self.public_key = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        super().__init__(self.public_key)

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
        return f"{_b64(body)}.{_b64(self._private.sign(body))}"
