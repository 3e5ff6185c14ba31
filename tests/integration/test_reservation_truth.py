"""What the reservation engine tells a caller is true: a waiter is served or withdrawn, never
both; a removed board is held by nobody; ended reservations and unknown ids are named; a request
the farm can never meet fails at once. On SQLite and PostgreSQL, without gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from icefarm_control.domain.errors import (
    NotEnoughDevices,
    NotFound,
    Reason,
    ReservationEnded,
)
from icefarm_control.domain.inventory import Inventory
from icefarm_control.domain.requests import ReserveSpec, check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import DeviceState
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.storage import queries as q
from icefarm_control.storage import replicas
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database, Transaction
from icefarm_control.storage.testing import register_device, register_worker, seed_farm


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@pytest.fixture
async def engine(database: Database) -> AsyncIterator[ReservationEngine]:
    engine = ReservationEngine(
        database,
        signer=TokenSigner(b"k" * 32),
        clock=Clock(),
        timers=Timers(waiter_poll_interval=timedelta(seconds=0.2)),
        limits=Limits(),
    )
    database.on_commit = engine.notifier.wake
    yield engine
    await engine.close()


def spec(
    count: int = 1,
    *,
    device_ids: tuple[str, ...] = (),
    selector: str = "",
    wait: float = 0,
    wait_for_new_devices: bool = False,
) -> ReserveSpec:
    return check_reserve(
        count=0 if device_ids else count,
        device_ids=device_ids,
        selector=selector,
        mode="",
        mode_args={},
        lease=None,
        wait=timedelta(seconds=wait),
        request_id="",
        default_lease=timedelta(minutes=60),
        limits=Limits(),
        wait_for_new_devices=wait_for_new_devices,
    )


async def active_reservation_ids(database: Database) -> set[str]:
    async with database.read() as conn:
        return set(await q.active_reservation_ids(conn))


async def test_a_waiter_told_it_timed_out_holds_nothing(
    database: Database, engine: ReservationEngine
) -> None:
    """16 callers, 4 boards, count=1 with a short wait in a loop: whatever a caller was told
    is what it holds. Every reservation still active at the end was handed to a caller."""
    await seed_farm(database, boards_per_worker=4)
    told: set[str] = set()
    stop = time.monotonic() + 4.0

    async def caller(index: int) -> None:
        while time.monotonic() < stop:
            try:
                grant = await engine.reserve(f"client-{index}", spec(1, wait=0.25))
            except NotEnoughDevices:
                continue
            told.add(grant.reservation.id)
            await asyncio.sleep(0.2)  # holding the board (work), not synchronisation
            await engine.release(f"client-{index}", reservation_ids=[grant.reservation.id])

    await asyncio.gather(*(caller(i) for i in range(16)))
    leaked = await active_reservation_ids(database)
    assert leaked == set(), f"reservations nobody was told about: {sorted(leaked)}"
    async with database.read() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT w.id FROM waiters w JOIN reservations r ON r.id = w.reservation_id "
                    "WHERE w.state = 'CANCELLED'"
                )
            )
        ).all()
    assert rows == [], "a withdrawn waiter was served"
    assert len(await engine.availability("")) == 4


async def test_a_withdrawn_waiter_is_never_served(
    database: Database, engine: ReservationEngine
) -> None:
    """Serving the queue re-reads each waiter under its lock: one withdrawn meanwhile is skipped."""
    ids = await seed_farm(database, boards_per_worker=1)
    first = await engine.reserve("alice", spec(1))
    waiting = asyncio.create_task(engine.reserve("bob", spec(1, wait=30)))
    await _until(database, lambda n: n == 1)
    async with database.read() as conn:
        (queued,) = await waiter_q.waiting(conn)
    async with database.write() as conn:
        assert await waiter_q.cancel_waiter(conn, queued.id)
    # An allocator that planned from an earlier read, still showing the waiter queued.
    async with database.write() as conn:
        assert not await waiter_q.mark_waiter_served(conn, queued.id, "r-late")
    async with database.read() as conn:
        row = await waiter_q.get_waiter(conn, queued.id)
    assert row is not None and row.state == waiter_q.CANCELLED and row.reservation_id is None
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await engine.release("alice", reservation_ids=[first.reservation.id])
    assert await active_reservation_ids(database) == set()
    assert await engine.availability("") == ids


async def test_a_request_queued_through_a_replica_that_died_is_withdrawn_not_served(
    database: Database, engine: ReservationEngine
) -> None:
    """Its caller is gone (or retried elsewhere and was told its own answer): serving it would
    hold a board for nobody (found by the soak: "refused yet holds")."""
    ids = await seed_farm(database, boards_per_worker=1)
    first = await engine.reserve("alice", spec(1))
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    async with database.write() as conn:
        await replicas.refresh(conn, "dead-replica", long_ago)
        orphan = await queue_for_bob(conn, replica_id="dead-replica", request_id=None, now=long_ago)
    await engine.release("alice", reservation_ids=[first.reservation.id])
    await engine.serve_waiters()
    async with database.read() as conn:
        row = await waiter_q.get_waiter(conn, orphan)
    assert row is not None and row.state == waiter_q.CANCELLED and row.reservation_id is None
    assert await active_reservation_ids(database) == set()
    assert await engine.availability("") == ids


async def test_a_retried_reserve_waits_on_its_first_attempts_queue_entry(
    database: Database, engine: ReservationEngine
) -> None:
    """The first attempt's replica died with the request queued; the client retries (same
    request id) on another replica before the first is known dead: one entry, one answer."""
    ids = await seed_farm(database, boards_per_worker=1)
    first = await engine.reserve("alice", spec(1))
    async with database.write() as conn:
        orphan = await queue_for_bob(
            conn, replica_id="just-died", request_id="retry-me", now=datetime.now(UTC)
        )
    retry = check_reserve(
        count=1,
        device_ids=(),
        selector="",
        mode="",
        mode_args={},
        lease=None,
        wait=timedelta(seconds=30),
        request_id="retry-me",
        default_lease=timedelta(minutes=60),
        limits=Limits(),
    )
    waiting = asyncio.create_task(engine.reserve("bob", retry))
    deadline = time.monotonic() + 10
    while True:  # until the retry has taken the entry over
        async with database.read() as conn:
            row = await waiter_q.get_waiter(conn, orphan)
        if row is not None and row.replica_id == engine.replica_id:
            break
        assert time.monotonic() < deadline, "the retry never took the queue entry over"
        await asyncio.sleep(0.02)
    await engine.release("alice", reservation_ids=[first.reservation.id])
    grant = await asyncio.wait_for(waiting, 10)
    async with database.read() as conn:
        served = await waiter_q.get_waiter(conn, orphan)
        all_waiters = await waiter_q.waiting(conn)
    assert served is not None and served.reservation_id == grant.reservation.id
    assert all_waiters == []
    assert await active_reservation_ids(database) == {grant.reservation.id}
    assert [d.id for d in grant.reservation.devices] == ids


async def test_removing_a_board_while_a_request_waits_leaves_nobody_holding_it(
    database: Database, engine: ReservationEngine
) -> None:
    await register_worker(database, "lab-a")
    await register_device(database, "a1", worker="lab-a")
    held = await engine.reserve("alice", spec(1))
    waiting = asyncio.create_task(engine.reserve("bob", spec(1, wait=5)))
    await _until(database, lambda n: n == 1)
    inventory = Inventory(database, engine, Clock(), Limits())
    await inventory.remove_device("a1")
    with pytest.raises(NotEnoughDevices):
        await waiting
    async with database.read() as conn:
        device = await q.get_device(conn, "a1")
        (ended,) = await q.get_reservations(conn, [held.reservation.id])
    assert device is not None
    assert device.state == DeviceState.REMOVED
    assert device.reservation_id is None
    assert ended.state == "ENDED"
    assert await active_reservation_ids(database) == set()


async def test_extending_an_ended_reservation_names_it_and_why(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    grant = await engine.reserve("alice", spec(1))
    await engine.release("alice", reservation_ids=[grant.reservation.id])
    with pytest.raises(ReservationEnded) as caught:
        await engine.extend("alice", reservation_ids=[grant.reservation.id])
    assert grant.reservation.id in caught.value.message
    assert "RELEASED" in caught.value.message


async def test_unknown_ids_are_not_found_everywhere(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    with pytest.raises(NotFound) as release:
        await engine.release("alice", device_ids=["nope"])
    assert release.value.reason == Reason.DEVICE_NOT_FOUND
    with pytest.raises(NotFound) as reserve:
        await engine.reserve("alice", spec(device_ids=("nope",)))
    assert reserve.value.reason == Reason.DEVICE_NOT_FOUND
    with pytest.raises(NotFound) as end:
        await engine.end_reservations(device_ids=["nope"])
    assert end.value.reason == Reason.DEVICE_NOT_FOUND
    with pytest.raises(NotFound) as release_reservation:
        await engine.release("alice", reservation_ids=["r-nope"])
    assert release_reservation.value.reason == Reason.RESERVATION_NOT_FOUND


async def test_more_devices_than_the_farm_has_fail_at_once_with_the_counts(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    await engine.reserve("alice", spec(1))
    started = time.monotonic()
    with pytest.raises(NotEnoughDevices) as caught:
        await engine.reserve("bob", spec(3, wait=30))
    assert time.monotonic() - started < 10, "waited for devices that do not exist"
    assert caught.value.counts == {"wanted": 3, "matching": 2, "free": 1}
    assert not caught.value.waited
    assert "3" in caught.value.message and "2" in caught.value.message
    async with database.read() as conn:
        assert not await waiter_q.has_waiters(conn)


async def test_a_shortage_without_waiting_reports_the_counts(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    await engine.reserve("alice", spec(1))
    with pytest.raises(NotEnoughDevices) as caught:
        await engine.reserve("bob", spec(2))
    assert caught.value.counts == {"wanted": 2, "matching": 2, "free": 1}


async def test_waiting_for_new_devices_queues_beyond_the_farm(
    database: Database, engine: ReservationEngine
) -> None:
    await register_worker(database, "lab-a")
    await register_device(database, "a1", worker="lab-a")
    waiting = asyncio.create_task(
        engine.reserve("bob", spec(2, wait=30, wait_for_new_devices=True))
    )
    await _until(database, lambda n: n == 1)
    await register_device(database, "a2", worker="lab-a")
    await engine.serve_waiters()
    grant = await asyncio.wait_for(waiting, 10)
    assert sorted(d.id for d in grant.reservation.devices) == ["a1", "a2"]


async def queue_for_bob(
    conn: Transaction, *, replica_id: str, request_id: str | None, now: datetime
) -> int:
    """A request of bob's for one device queued through `replica_id`, as its Reserve would."""
    return await waiter_q.insert_waiter(
        conn,
        client_id="bob",
        count=1,
        device_ids=(),
        selector="",
        mode="",
        mode_args={},
        lease_seconds=3600,
        request_id=request_id,
        now=now,
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        replica_id=replica_id,
    )


async def _until(database: Database, predicate: object, timeout: float = 10) -> None:
    """Until the number of queued waiters satisfies `predicate` (polled with a deadline)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with database.read() as conn:
            if predicate(len(await waiter_q.waiting(conn))):
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the queue never reached the expected length")
