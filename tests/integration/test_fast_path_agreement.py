"""PostgreSQL's single-statement fast paths and the general path give the same answer on the
same farm: the same script of reserves and releases, run once with the fast paths and once
without on two identical farms, takes the same devices, fails the same way and leaves the same
devices, reservations, events and commands behind."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from icefarm_control.domain.errors import IcefarmDomainError
from icefarm_control.domain.requests import check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade
from icefarm_control.storage.testing import register_device, register_worker
from tests.conftest import create_pg_database, drop_pg_database

pytestmark = pytest.mark.postgres
NOW = datetime.now(UTC) + timedelta(minutes=1)


class FixedClock:
    def now(self) -> datetime:
        return NOW


# (client, count, device_ids, selector) to reserve, or (client, "release", index) to release
# the index-th reservation granted so far.
SCRIPT: list[tuple[object, ...]] = [
    ("ada", 2, (), "kind=pico2-ice"),
    ("bob", 1, (), "room=b12"),
    ("ada", 1, ("a3",), ""),
    ("cyd", 3, (), ""),
    ("bob", 9, (), ""),
    ("bob", 1, ("a0",), ""),
    ("ada", "release", 0),
    ("cyd", 2, (), "kind=pico2-ice,room notin (b12)"),
    ("bob", "release", 1),
    ("ada", "release", 1),
    ("dan", 1, (), "gpu_memory_mb>=16384"),
    ("dan", 1, (), "kind=machine"),
    ("eve", 4, (), ""),
    ("cyd", "release", 2),
    ("eve", 1, ("b2", "nope"), ""),
]


async def build_farm(database: Database) -> None:
    await register_worker(database, "lab-a", labels={"room": "b12"})
    await register_worker(database, "lab-b")
    for i in range(4):
        await register_device(database, f"a{i}", worker="lab-a", labels={"room": "b12"})
        await register_device(database, f"b{i}", worker="lab-b")
    await register_device(
        database, "gpu0", worker="lab-b", kind="machine", properties={"gpu_memory_mb": 16384}
    )


async def run_script(database: Database) -> list[object]:
    engine = ReservationEngine(
        database, signer=TokenSigner(b"k" * 32), clock=FixedClock(), limits=Limits()
    )
    answers: list[object] = []
    granted: list[tuple[str, str]] = []
    for step in SCRIPT:
        client = str(step[0])
        try:
            if step[1] == "release":
                index = int(str(step[2]))
                owner, reservation_id = granted[index]
                outcome = await engine.release(owner, reservation_ids=[reservation_id])
                answers.append(("released", sorted(outcome.device_ids)))
                continue
            spec = check_reserve(
                count=0 if step[2] else int(str(step[1])),
                device_ids=tuple(step[2]),  # type: ignore[arg-type]
                selector=str(step[3]),
                mode="",
                mode_args={},
                lease=None,
                wait=None,
                request_id="",
                default_lease=timedelta(minutes=60),
                limits=Limits(),
            )
            grant = await engine.reserve(client, spec)
            granted.append((client, grant.reservation.id))
            answers.append(("reserved", sorted(d.id for d in grant.reservation.devices)))
        except IcefarmDomainError as error:
            answers.append(("error", type(error).__name__, error.reason.value))
    return answers


async def leftovers(database: Database) -> dict[str, object]:
    async with database.read() as conn:
        devices = (
            await conn.execute(
                text("SELECT id, state, reservation_id IS NULL FROM devices ORDER BY id")
            )
        ).all()
        reservations = (
            await conn.execute(
                text("SELECT client_id, state, end_reason FROM reservations ORDER BY client_id")
            )
        ).all()
        events = (await conn.execute(text("SELECT audience, type FROM events"))).all()
        commands = (
            await conn.execute(text("SELECT worker_name, type, device_id FROM worker_commands"))
        ).all()
    return {
        "devices": [tuple(r) for r in devices],
        "reservations": Counter(tuple(r) for r in reservations),
        "events": Counter(tuple(r) for r in events),
        "commands": Counter(tuple(r) for r in commands),
    }


@pytest.fixture
async def two_farms() -> AsyncIterator[tuple[Database, Database]]:
    urls = [create_pg_database(), create_pg_database()]
    fast = Database(urls[0])
    general = Database(urls[1], single_statement_paths=False)
    try:
        for database in (fast, general):
            await upgrade(database)
            await build_farm(database)
        yield fast, general
    finally:
        for database in (fast, general):
            await database.dispose()
        for url in urls:
            drop_pg_database(url)


async def test_fast_and_general_paths_agree(two_farms: tuple[Database, Database]) -> None:
    fast, general = two_farms
    assert fast.single_statement_paths and not general.single_statement_paths
    fast_answers = await run_script(fast)
    general_answers = await run_script(general)
    assert fast_answers == general_answers
    assert ("error", "NotFound", "DEVICE_NOT_FOUND") in fast_answers
    assert any(a[0] == "reserved" for a in fast_answers)
    assert await leftovers(fast) == await leftovers(general)
