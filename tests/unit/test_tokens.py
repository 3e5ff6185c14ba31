"""Reservation tokens: a genuine, unexpired token verifies; anything else is TokenInvalid."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from icefarm.tokens import (
    TokenError,
    TokenVerifier,
    derive_private_key,
    generate_private_key,
    key_id,
    private_key_from_text,
    private_key_to_text,
)
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
        b64(b"[" * 5000 + b"]" * 5000) + "." + b64(b"mac"),
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
        b'{"kid":7,"rid":"r","cid":"c","dev":[],"exp":1}',
        b'{"kid":["a"],"rid":"r","cid":"c","dev":[],"exp":1}',
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
    with pytest.raises(TokenError, match="unknown key"):
        TokenVerifier(TokenSigner(b"x" * 32).public_key).verify(token, NOW)


def test_a_verification_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 raw"):
        TokenVerifier(b"short")


# ---------------------------------------------------------------- key ids and key storage


def test_a_token_carries_the_key_id_of_the_key_that_signed_it() -> None:
    token = SIGNER.sign(CLAIMS)
    claims = json.loads(unb64(token.split(".")[0]))
    assert claims["kid"] == SIGNER.key_id == key_id(SIGNER.public_key)
    assert len(SIGNER.key_id) == 32 and SIGNER.key_id != TokenSigner(b"x" * 32).key_id


def test_a_verifier_picks_the_key_named_by_the_token() -> None:
    old, new = TokenSigner(b"o" * 32), TokenSigner(b"n" * 32)
    verifier = TokenVerifier(new.public_key, old.public_key)
    assert verifier.verify(old.sign(CLAIMS), NOW) == CLAIMS
    assert verifier.verify(new.sign(CLAIMS), NOW) == CLAIMS


def test_a_token_from_a_key_the_verifier_does_not_know_names_the_key_id() -> None:
    stranger = TokenSigner(b"x" * 32)
    with pytest.raises(TokenError, match=f"unknown key {stranger.key_id}"):
        TokenVerifier(SIGNER.public_key).verify(stranger.sign(CLAIMS), NOW)


def test_a_token_that_claims_another_key_id_is_refused() -> None:
    """The key id only selects a key: a token relabelled with the verifier's key id still has
    to carry that key's signature."""
    stranger = TokenSigner(b"x" * 32)
    body, mac = stranger.sign(CLAIMS).split(".")
    claims = json.loads(unb64(body))
    claims["kid"] = SIGNER.key_id
    relabelled = b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    with pytest.raises(TokenError, match="signature does not match"):
        TokenVerifier(SIGNER.public_key).verify(f"{relabelled}.{mac}", NOW)


def test_a_token_without_a_key_id_verifies_with_the_current_key() -> None:
    """Tokens handed out before key ids existed stay valid until their lease ends."""
    body = json.dumps(
        {
            "rid": "r-1",
            "cid": "alice",
            "dev": ["board-1", "board-2"],
            "exp": int(CLAIMS.expires.timestamp()),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    token = f"{b64(body)}.{b64(SIGNER._private.sign(body))}"
    assert TokenVerifier(SIGNER.public_key).verify(token, NOW) == CLAIMS


def test_a_private_key_survives_its_stored_form_which_is_not_the_raw_seed() -> None:
    generated = generate_private_key()
    stored = private_key_to_text(generated)
    assert stored.startswith("-----BEGIN PRIVATE KEY-----")
    raw_seed = generated.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert raw_seed.hex() not in stored
    again = TokenSigner(private_key_from_text(stored))
    assert again.public_key == TokenSigner(generated).public_key
    assert again.verify(TokenSigner(generated).sign(CLAIMS), NOW) == CLAIMS


def test_a_stored_key_that_is_not_an_ed25519_private_key_is_refused() -> None:
    with pytest.raises(ValueError, match="Ed25519 private key"):
        private_key_from_text("not a key")


def test_the_key_derived_from_a_secret_is_the_one_it_always_was() -> None:
    """Deployments that set token_key keep their public key (and their workers' tokens)."""
    expected = hashlib.sha256(b"icefarm-token-v1:" + KEY).digest()
    derived = derive_private_key(KEY).private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert derived == expected
