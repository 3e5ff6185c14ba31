"""The transactional outbox: every state change writes its events and worker commands in the
same transaction, numbered gaplessly per audience, on both back ends and through both paths."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from icefarm_control.domain import events
from icefarm_control.domain.clock import SystemClock
from icefarm_control.domain.errors import NotEnoughDevices
from icefarm_control.domain.requests import check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.notifier import Notifier, PostgresAnnouncer, PostgresListener, stop_task
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.testing import operator_feed, seed_farm
from tests.conftest import create_pg_database, drop_pg_database


def make_engine(database: Database) -> ReservationEngine:
    return ReservationEngine(database, signer=TokenSigner(b"k" * 32), clock=SystemClock())


def spec(count: int, wait: float = 0):  # type: ignore[no-untyped-def]
    return check_reserve(
        count=count,
        device_ids=(),
        selector="",
        mode="pulsecount",
        mode_args={"clock": "12"},
        lease=timedelta(minutes=5),
        wait=timedelta(seconds=wait),
        request_id="",
        default_lease=timedelta(hours=1),
        limits=Limits(),
    )


async def read_events(database: Database, audience: str) -> list[outbox.EventRow]:
    if audience == outbox.OPERATOR:
        return await operator_feed(database)
    async with database.read() as conn:
        return await outbox.events_after(conn, audience, 0)


async def read_commands(database: Database, worker: str) -> list[outbox.CommandRow]:
    async with database.read() as conn:
        return await outbox.pending_commands(conn, worker)


async def test_reserve_and_release_write_commands_and_events(database: Database) -> None:
    await seed_farm(database, workers=1, boards_per_worker=2)
    engine = make_engine(database)
    grant = await engine.reserve("alice", spec(2))
    reservation = grant.reservation
    await engine.release("alice", reservation_ids=[reservation.id])

    commands = await read_commands(database, "worker-0")
    assert [c.type for c in commands] == ["prepare_device"] * 2 + ["release_device"] * 2
    ids = sorted(d.id for d in reservation.devices)
    assert sorted(c.device_id or "" for c in commands[:2]) == ids
    assert commands[0].payload == events.prepare_device(
        device_id=commands[0].device_id or "",
        reservation_id=reservation.id,
        client_id="alice",
        mode="pulsecount",
        mode_args={"clock": "12"},
        lease_seconds=300.0,
    )
    assert commands[2].payload == events.release_device(
        device_id=commands[2].device_id or "", reservation_id=reservation.id
    )

    operator = await read_events(database, outbox.OPERATOR)
    assert [e.type for e in operator] == ["reservation_created", "reservation_ended"]
    assert [e.sequence for e in operator] == [1, 2]
    assert operator[0].payload == events.reservation_created(
        reservation_id=reservation.id,
        client_id="alice",
        device_ids=ids,
        mode="pulsecount",
        end_time=reservation.end_time,
    )
    ended = events.reservation_ended(
        reservation_id=reservation.id, device_ids=ids, reason="RELEASED", closed=True
    )
    assert operator[1].payload == {**ended, "client_id": "alice"}
    (client_event,) = await read_events(database, outbox.client_audience("alice"))
    assert client_event.type == "reservation_ended" and client_event.sequence == 1
    assert client_event.payload == ended


async def test_a_failed_reserve_writes_nothing(database: Database) -> None:
    await seed_farm(database, workers=1, boards_per_worker=1)
    engine = make_engine(database)
    with pytest.raises(NotEnoughDevices):
        await engine.reserve("alice", spec(2))
    assert await read_commands(database, "worker-0") == []
    assert await read_events(database, outbox.OPERATOR) == []


async def test_sequences_stay_gapless_under_concurrent_writers(database: Database) -> None:
    await seed_farm(database, workers=2, boards_per_worker=8)
    engine = make_engine(database)

    async def cycle(client: str) -> None:
        for _ in range(5):
            grant = await engine.reserve(client, spec(1))
            await engine.release(client, reservation_ids=[grant.reservation.id])

    await asyncio.gather(*(cycle(f"c{i}") for i in range(8)))
    operator = await read_events(database, outbox.OPERATOR)
    assert [e.sequence for e in operator] == list(range(1, 81))
    for i in range(8):
        mine = await read_events(database, outbox.client_audience(f"c{i}"))
        assert [e.sequence for e in mine] == [1, 2, 3, 4, 5]


async def test_committed_changes_wake_their_topics(database: Database) -> None:
    await seed_farm(database, workers=1, boards_per_worker=1)
    notifier = Notifier()
    database.on_commit = notifier.wake
    engine = make_engine(database)
    with (
        notifier.subscribe("worker:worker-0") as worker,
        notifier.subscribe(outbox.client_audience("alice")) as client,
    ):
        grant = await engine.reserve("alice", spec(1))
        assert await worker.wait(5)
        assert not client.event.is_set()
        await engine.release("alice", reservation_ids=[grant.reservation.id])
        assert await client.wait(5)


@pytest.mark.postgres
async def test_listener_reconnects_after_its_backend_is_killed_and_loses_nothing() -> None:
    url = create_pg_database()
    database = Database(url)
    try:
        from icefarm_control.storage.migrate import upgrade

        await upgrade(database)
        await seed_farm(database, workers=1, boards_per_worker=1)
        notifier = Notifier()  # only the listener wakes it: NOTIFY is the path under test
        announcer = PostgresAnnouncer(url)
        announcing = asyncio.create_task(announcer.run())
        database.on_commit = announcer.announce
        listener = PostgresListener(url, notifier)
        task = asyncio.create_task(listener.run())
        await asyncio.wait_for(listener.connected.wait(), 10)
        first_pid = listener.backend_pid
        engine = make_engine(database)
        with notifier.subscribe("worker:worker-0") as worker:
            worker.event.clear()
            grant = await engine.reserve("alice", spec(1))
            assert await worker.wait(5), "NOTIFY did not arrive"

            with psycopg.connect(
                "host=127.0.0.1 user=postgres dbname=postgres", autocommit=True
            ) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
            # While it reconnects, a change commits; the re-read after reconnecting wakes us.
            await engine.release("alice", reservation_ids=[grant.reservation.id])
            deadline = asyncio.get_running_loop().time() + 15
            while listener.backend_pid == first_pid or not listener.connected.is_set():
                assert asyncio.get_running_loop().time() < deadline, "listener did not reconnect"
                await asyncio.sleep(0.05)
            assert await worker.wait(5)
            commands = await read_commands(database, "worker-0")
            assert [c.type for c in commands] == ["prepare_device", "release_device"]

            worker.event.clear()
            await engine.reserve("bob", spec(1))
            assert await worker.wait(5), "NOTIFY did not arrive after the reconnect"
        await stop_task(task)
        await stop_task(announcing)
    finally:
        await database.dispose()
        drop_pg_database(url)


def test_notify_payload_falls_back_to_everyone_when_too_long() -> None:
    from icefarm_control.notifier import EVERYONE, notify_payload

    assert notify_payload(["b", "a", "a"]) == "a b"
    assert notify_payload([f"client:{i:05d}" for i in range(1000)]) == EVERYONE


def test_timestamps_in_payloads_are_iso() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert events.iso(moment) == "2026-01-02T03:04:05+00:00"


@pytest.mark.postgres
async def test_a_replica_skips_its_own_announcements_but_hears_the_others() -> None:
    url = create_pg_database()
    try:
        mine, theirs = PostgresAnnouncer(url), PostgresAnnouncer(url)
        notifier = Notifier()
        listener = PostgresListener(url, notifier, mine)
        tasks = [asyncio.create_task(t.run()) for t in (mine, theirs, listener)]
        await asyncio.wait_for(listener.connected.wait(), 10)
        with notifier.subscribe("worker:a") as a, notifier.subscribe("worker:b") as b:
            a.event.clear()
            b.event.clear()
            mine.announce({"worker:a"})
            await mine.flush(5)
            theirs.announce({"worker:b"})
            assert await b.wait(5), "another replica's NOTIFY did not arrive"
            # Both went through the one channel in order: ours would have arrived first.
            assert not a.event.is_set()
        for task in tasks:
            await stop_task(task)
    finally:
        drop_pg_database(url)
