"""Reservation tokens: what a client presents to a worker's WorkerService.

The control signs, workers verify. Format: base64url(JSON claims) "." base64url(Ed25519
signature over the claims bytes). The claims name the reservation, its client, its devices and
when the token stops being valid (the lease end; `Extend` hands out fresh tokens).

Ed25519 rather than a shared HMAC secret: a worker holds only the public key (sent in
`Registered.token_verification_key`), so a compromised worker cannot mint tokens for boards on
other workers. The control keeps its signing key in its database (every replica of one database
signs with it); each token's claims name the key that signed it (`kid`, a fingerprint of the
public key), so a verifier that knows several keys picks the right one and a worker can tell the
key id of the public key it was sent.

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
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)


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


def key_id(public_key: bytes) -> str:
    """The key id of a raw Ed25519 public key: 32 hex digits of its SHA-256. Derived from the
    key, so whoever holds the public key knows its id without being told."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def derive_private_key(secret: bytes) -> Ed25519PrivateKey:
    """The key a `token_key` secret (16+ bytes) stands for: SHA-256 of it is the seed (the
    derivation every earlier version used, so a configured secret keeps its public key)."""
    if len(secret) < 16:
        raise ValueError("the token key must be at least 16 bytes")
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"icefarm-token-v1:" + secret).digest()
    )


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_to_text(key: Ed25519PrivateKey) -> str:
    """The stored form of a private key: unencrypted PKCS#8 PEM (a standard, self-describing
    form, not the bare seed; whoever reads it can still sign, so the store is a secret)."""
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


def private_key_from_text(text: str) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("the stored signing key is not a PEM Ed25519 private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the stored signing key is not a PEM Ed25519 private key")
    return key


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class TokenVerifier:
    """Checks tokens with the control's public keys (32 raw Ed25519 bytes each, the current
    one first). The token's `kid` picks the key; a token without one (handed out before key
    ids existed) is checked with the current key."""

    def __init__(self, public_key: bytes, *older: bytes) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for raw in (public_key, *older):
            try:
                self._keys[key_id(raw)] = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as exc:
                raise ValueError("a token verification key must be 32 raw Ed25519 bytes") from exc
        self._current = key_id(public_key)

    def verify(self, token: str, now: datetime) -> TokenClaims:
        """The claims of a genuine, unexpired token; TokenError otherwise."""
        try:
            body_text, signature_text = token.split(".", 1)
            body, signature = _unb64(body_text), _unb64(signature_text)
            # Read before the signature is checked only to choose the key; nothing else in
            # the body is trusted until then.
            data = json.loads(body)
            kid = data.get("kid", self._current) if isinstance(data, dict) else self._current
        except (ValueError, RecursionError) as exc:  # deep nesting: unsigned input, refused
            raise TokenError("malformed reservation token") from exc
        if not isinstance(kid, str):
            raise TokenError("malformed reservation token")
        key = self._keys.get(kid)
        if key is None:
            raise TokenError(f"reservation token is signed by an unknown key {kid[:32]}")
        try:
            key.verify(signature, body)
        except InvalidSignature as exc:
            raise TokenError("reservation token signature does not match") from exc
        try:
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
    """Signs tokens with one private key (given, or derived from a secret of 16+ bytes) and
    verifies them with it and any `older` public keys."""

    def __init__(self, key: Ed25519PrivateKey | bytes, older: tuple[bytes, ...] = ()) -> None:
        self._private = key if isinstance(key, Ed25519PrivateKey) else derive_private_key(key)
        self.public_key = _public_bytes(self._private)
        self.key_id = key_id(self.public_key)
        super().__init__(self.public_key, *older)

    def sign(self, claims: TokenClaims) -> str:
        body = json.dumps(
            {
                "kid": self.key_id,
                "rid": claims.reservation_id,
                "cid": claims.client_id,
                "dev": list(claims.device_ids),
                "exp": int(claims.expires.timestamp()),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        return f"{_b64(body)}.{_b64(self._private.sign(body))}"
