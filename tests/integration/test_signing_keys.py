"""The key that signs reservation tokens lives in the database, so every replica of one database
signs alike (defect 11 of issue 9): replicas without a token_key, replicas starting at once, a
restarted SQLite control, and a token_key that disagrees with the database (refused)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from icefarm.tokens import TokenVerifier, key_id
from icefarm_control.app import ControlApp
from icefarm_control.domain.clock import SystemClock
from icefarm_control.domain.tokens import SigningKeyMismatch, TokenSigner, load_signer
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade
from icefarm_control.storage.models import signing_keys
from tests.integration.conftest import start_control_process
from tests.integration.worker_farm import connected, fast_config, reserve, stand_ins
from tests.standin_worker import StandinWorker

CONTROL = Path(sys.executable).parent / "icefarm-control"


def kid_of(token: str) -> str:
    body = token.split(".")[0]
    kid: str = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["kid"]
    return kid


async def stored_key_ids(url: str) -> list[str]:
    database = Database(url)
    try:
        async with database.read() as conn:
            rows = await conn.execute(select(signing_keys.c.key_id))
            return [row.key_id for row in rows]
    finally:
        await database.dispose()


@pytest.fixture
async def migrated(database_url: str) -> AsyncIterator[str]:
    database = Database(database_url)
    await upgrade(database)
    await database.dispose()
    yield database_url


# ---------------------------------------------------------------- replicas of one database


async def serve(url: str) -> ControlApp:
    app = ControlApp(fast_config(url))
    await app.start()
    return app


async def token_and_key(app: ControlApp, name: str) -> tuple[str, bytes]:
    """A token Reserve hands out on `app`, and the key `app` tells a registering worker."""
    async with stand_ins() as workers, connected(f"127.0.0.1:{app.port}", app) as control:
        worker = StandinWorker(control.address, name, devices=1)
        workers.append(worker)
        await worker.start()
        assert worker.registered is not None
        granted = await reserve(control, f"client-of-{name}", count=1)
        return granted.token, worker.registered.token_verification_key


async def test_replicas_without_a_token_key_sign_tokens_the_others_workers_accept(
    database_url: str,
) -> None:
    """PostgreSQL: two replicas at once. SQLite (one control per file): a restarted control."""
    first = await serve(database_url)
    try:
        first_token, first_key = await token_and_key(first, "lab-a")
        if database_url.startswith("sqlite"):
            await first.stop()
        second = await serve(database_url)
        try:
            second_token, second_key = await token_and_key(second, "lab-b")
        finally:
            await second.stop()
    finally:
        if not database_url.startswith("sqlite"):
            await first.stop()
    now = datetime.now(UTC)
    assert first_key == second_key
    assert TokenVerifier(second_key).verify(first_token, now).client_id == "client-of-lab-a"
    assert TokenVerifier(first_key).verify(second_token, now).client_id == "client-of-lab-b"
    assert kid_of(first_token) == kid_of(second_token) == key_id(first_key)
    assert await stored_key_ids(database_url) == [key_id(first_key)]


async def test_replicas_starting_at_the_same_moment_end_with_one_key(migrated: str) -> None:
    """Each replica has its own engine (own pool, own SQLite write lock): only the database
    serialises them."""
    databases = [Database(migrated) for _ in range(4)]
    try:
        signers = await asyncio.gather(*(load_signer(db, "", SystemClock()) for db in databases))
    finally:
        for db in databases:
            await db.dispose()
    assert len({signer.key_id for signer in signers}) == 1
    assert await stored_key_ids(migrated) == [signers[0].key_id]


async def test_a_token_key_seeds_the_database_key_and_later_replicas_need_none(
    migrated: str,
) -> None:
    secret = "a-shared-secret-for-replicas"
    database = Database(migrated)
    try:
        seeded = await load_signer(database, secret, SystemClock())
        assert seeded.public_key == TokenSigner(secret.encode()).public_key
        assert (await load_signer(database, "", SystemClock())).key_id == seeded.key_id
        assert (await load_signer(database, secret, SystemClock())).key_id == seeded.key_id
        with pytest.raises(SigningKeyMismatch, match=seeded.key_id):
            await load_signer(database, "another-secret-of-16+", SystemClock())
        async with database.read() as conn:
            count = (await conn.execute(select(func.count()).select_from(signing_keys))).scalar()
        assert count == 1
    finally:
        await database.dispose()


# ---------------------------------------------------------------- `icefarm-control serve`


def refused_start(url: str, token_key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONTROL), "serve", "--listen", "127.0.0.1:0", "--database", url],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ICEFARM_TOKEN_KEY": token_key},
        check=False,
    )


def stop(process: subprocess.Popen[str]) -> None:
    # The key was stored before the control said it serves; how it ends does not matter here.
    process.kill()
    process.wait(timeout=15)
    if process.stdout is not None:
        process.stdout.close()


@pytest.mark.parametrize("first_key", ["", "the-secret-it-was-seeded-with"])
def test_a_token_key_that_disagrees_with_the_database_refuses_to_start(
    database_url: str, first_key: str
) -> None:
    """Whether the database's key was generated or seeded by another token_key: exit 1, one
    line on stderr naming the setting and the database's key id, no traceback."""
    first = start_control_process(database_url, env={"ICEFARM_TOKEN_KEY": first_key})
    stop(first.process)
    (stored,) = asyncio.run(stored_key_ids(database_url))

    result = refused_start(database_url, "a-different-secret-entirely")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icefarm-control: ")
    assert "token_key" in lines[0] and stored in lines[0]
    assert "control serving" not in result.stdout
