"""Reservation tokens: a genuine, unexpired token verifies; anything else is TokenInvalid."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from icefarm.tokens import TokenError, TokenVerifier
from icefarm_control.domain.errors import Reason
from icefarm_control.domain.tokens import TokenClaims, TokenInvalid, TokenSigner

KEY = b"k" * 32
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
SIGNER = TokenSigner(KEY)
CLAIMS = TokenClaims(
    reservation_id="r-1",
    client_id="alice",
    device_ids=("board-1", "board-2"),
    expires=NOW + timedelta(minutes=60),
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_signed_token_verifies_to_its_claims() -> None:
    signer = TokenSigner(KEY)
    assert signer.verify(signer.sign(CLAIMS), NOW) == CLAIMS


def test_a_token_signed_by_another_signer_with_the_same_key_verifies() -> None:
    assert TokenSigner(KEY).verify(TokenSigner(KEY).sign(CLAIMS), NOW) == CLAIMS


def test_a_token_with_a_changed_body_is_refused() -> None:
    signer = TokenSigner(KEY)
    body, mac = signer.sign(CLAIMS).split(".")
    claims = json.loads(unb64(body))
    claims["dev"].append("board-3")
    forged = b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    with pytest.raises(TokenInvalid) as caught:
        signer.verify(f"{forged}.{mac}", NOW)
    assert caught.value.reason == Reason.TOKEN_INVALID


def test_a_token_with_a_changed_signature_is_refused() -> None:
    signer = TokenSigner(KEY)
    body, mac = signer.sign(CLAIMS).split(".")
    raw = bytearray(unb64(mac))
    raw[0] ^= 0x01
    with pytest.raises(TokenInvalid):
        signer.verify(f"{body}.{b64(bytes(raw))}", NOW)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = TokenSigner(b"x" * 32).sign(CLAIMS)
    with pytest.raises(TokenInvalid):
        TokenSigner(KEY).verify(token, NOW)


def test_a_token_is_refused_once_its_lease_has_ended() -> None:
    signer = TokenSigner(KEY)
    token = signer.sign(CLAIMS)
    with pytest.raises(TokenInvalid, match="expired"):
        signer.verify(token, CLAIMS.expires)
    with pytest.raises(TokenInvalid, match="expired"):
        signer.verify(token, CLAIMS.expires + timedelta(seconds=1))


def test_a_token_is_accepted_until_just_before_its_lease_ends() -> None:
    signer = TokenSigner(KEY)
    token = signer.sign(CLAIMS)
    assert signer.verify(token, CLAIMS.expires - timedelta(seconds=1)).reservation_id == "r-1"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dot-at-all",
        ".",
        "a.b",
        "!!!.???",
        "a.b.c",
        "é.é",
        b64(b"not json") + "." + b64(b"mac"),
    ],
)
def test_malformed_tokens_are_token_invalid(token: str) -> None:
    with pytest.raises(TokenInvalid):
        TokenSigner(KEY).verify(token, NOW)


def test_a_correctly_signed_body_that_is_not_claims_is_token_invalid() -> None:
    """Claims in another format must not crash the verifier with a KeyError or a JSON error."""
    bodies = (
        b"not json",
        b"[]",
        b'{"rid": "r"}',
        b'{"rid":"r","cid":"c","dev":[],"exp":"x"}',
        b'{"rid":"r","cid":"c","dev":7,"exp":1}',
        b'{"rid":"r","cid":"c","dev":[],"exp":1e300}',
    )
    for body in bodies:
        mac = SIGNER._private.sign(body)
        with pytest.raises(TokenInvalid):
            TokenSigner(KEY).verify(f"{b64(body)}.{b64(mac)}", NOW)


def test_a_key_shorter_than_16_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenSigner(b"short")


def test_a_worker_verifies_with_the_public_key_alone() -> None:
    token = TokenSigner(KEY).sign(CLAIMS)
    assert TokenVerifier(TokenSigner(KEY).public_key).verify(token, NOW) == CLAIMS
    with pytest.raises(TokenError, match="signature"):
        TokenVerifier(TokenSigner(b"x" * 32).public_key).verify(token, NOW)


def test_a_verification_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 raw"):
        TokenVerifier(b"short")
