"""The reservation engine against real databases (SQLite and PostgreSQL), without gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from icefarm_control.domain.errors import (
    NotEnoughDevices,
    NotFound,
    PermissionDenied,
    Reason,
)
from icefarm_control.domain.requests import ReserveSpec, check_reserve
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import DeviceState, EndReason, WorkerState
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from icefarm_control.storage.database import Database
from icefarm_control.storage.testing import register_device, register_worker, seed_farm


class SteppedClock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
async def engine(database: Database, clock: SteppedClock) -> AsyncIterator[ReservationEngine]:
    timers = Timers(waiter_poll_interval=timedelta(seconds=30))  # wake-ups must do the work
    engine = ReservationEngine(
        database, signer=TokenSigner(b"k" * 32), clock=clock, timers=timers, limits=Limits()
    )
    database.on_commit = engine.notifier.wake
    yield engine


def spec(
    count: int = 1,
    *,
    device_ids: tuple[str, ...] = (),
    selector: str = "",
    wait: float = 0,
    lease: float | None = None,
    request_id: str = "",
) -> ReserveSpec:
    return check_reserve(
        count=0 if device_ids else count,
        device_ids=device_ids,
        selector=selector,
        mode="pulsecount",
        mode_args={},
        lease=None if lease is None else timedelta(seconds=lease),
        wait=timedelta(seconds=wait),
        request_id=request_id,
        default_lease=timedelta(minutes=60),
        limits=Limits(),
    )


async def held_by(database: Database, device_id: str) -> str | None:
    async with database.read() as conn:
        device = await q.get_device(conn, device_id)
    assert device is not None
    return device.reservation_id


async def test_reserve_takes_count_devices_and_marks_them_reserved(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=4)
    grant = await engine.reserve("alice", spec(3))
    assert len(grant.reservation.devices) == 3
    assert {d.state for d in grant.reservation.devices} == {DeviceState.RESERVED}
    assert grant.reservation.client_id == "alice"
    assert grant.token
    for d in grant.reservation.devices:
        assert await held_by(database, d.id) == grant.reservation.id


async def test_reserve_is_all_or_nothing(database: Database, engine: ReservationEngine) -> None:
    await seed_farm(database, boards_per_worker=2)
    with pytest.raises(NotEnoughDevices) as caught:
        await engine.reserve("alice", spec(3))
    assert caught.value.reason == Reason.NOT_ENOUGH_DEVICES
    assert len(await engine.availability("")) == 2


async def test_reserve_honours_the_selector(database: Database, engine: ReservationEngine) -> None:
    await register_worker(database, "lab-a")
    await register_device(database, "a1", worker="lab-a", labels={"firmware": "new"})
    await register_device(database, "a2", worker="lab-a", labels={"firmware": "old"})
    grant = await engine.reserve("alice", spec(1, selector="firmware!=old"))
    assert [d.id for d in grant.reservation.devices] == ["a1"]
    with pytest.raises(NotEnoughDevices):
        await engine.reserve("bob", spec(1, selector="firmware=new"))


async def test_reserve_explicit_devices(database: Database, engine: ReservationEngine) -> None:
    ids = await seed_farm(database, boards_per_worker=3)
    grant = await engine.reserve("alice", spec(device_ids=(ids[2], ids[0])))
    assert sorted(d.id for d in grant.reservation.devices) == sorted([ids[0], ids[2]])
    with pytest.raises(NotEnoughDevices):
        await engine.reserve("bob", spec(device_ids=(ids[0], ids[1])))
    assert await held_by(database, ids[1]) is None


async def test_unknown_device_id_is_not_found_and_writes_nothing(
    database: Database, engine: ReservationEngine
) -> None:
    ids = await seed_farm(database, boards_per_worker=1)
    with pytest.raises(NotFound) as caught:
        await engine.reserve("alice", spec(device_ids=(ids[0], "nope")))
    assert caught.value.reason == Reason.DEVICE_NOT_FOUND
    assert await held_by(database, ids[0]) is None


async def test_devices_of_offline_or_draining_workers_are_not_handed_out(
    database: Database, engine: ReservationEngine
) -> None:
    await register_worker(database, "gone", state=WorkerState.OFFLINE)
    await register_worker(database, "leaving", state=WorkerState.DRAINING)
    await register_device(database, "g1", worker="gone")
    await register_device(database, "l1", worker="leaving")
    assert await engine.availability("") == []
    with pytest.raises(NotEnoughDevices):
        await engine.reserve("alice", spec(1))


async def test_last_board_race_has_exactly_one_winner(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    results = await asyncio.gather(
        *(engine.reserve(f"client-{i}", spec(1)) for i in range(8)), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(e, NotEnoughDevices) for e in losers)


async def test_release_frees_devices_and_ends_the_reservation(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    grant = await engine.reserve("alice", spec(2))
    first, second = (d.id for d in grant.reservation.devices)
    partial = await engine.release("alice", device_ids=[first])
    assert partial.device_ids == [first] and partial.ended_reservation_ids == []
    done = await engine.release("alice", reservation_ids=[grant.reservation.id])
    assert done.device_ids == [second]
    assert done.ended_reservation_ids == [grant.reservation.id]
    assert len(await engine.availability("")) == 2
    page = await engine.list_reservations("alice", include_ended=True, page_size=0, page_token="")
    (row,) = page.reservations
    assert row.end_reason == EndReason.RELEASED and row.ended_time is not None


async def test_release_by_a_non_holder_is_denied(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    grant = await engine.reserve("alice", spec(1))
    device_id = grant.reservation.devices[0].id
    with pytest.raises(PermissionDenied) as caught:
        await engine.release("mallory", device_ids=[device_id])
    assert caught.value.reason == Reason.NOT_HOLDER
    with pytest.raises(PermissionDenied):
        await engine.release("mallory", reservation_ids=[grant.reservation.id])
    assert await held_by(database, device_id) == grant.reservation.id


async def test_release_of_unknown_reservation_is_not_found(
    database: Database, engine: ReservationEngine
) -> None:
    with pytest.raises(NotFound) as caught:
        await engine.release("alice", reservation_ids=["missing"])
    assert caught.value.reason == Reason.RESERVATION_NOT_FOUND


async def test_release_all_releases_only_the_callers(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=4)
    await engine.reserve("alice", spec(1))
    await engine.reserve("alice", spec(1))
    bob = await engine.reserve("bob", spec(1))
    outcome = await engine.release("alice", everything=True)
    assert len(outcome.ended_reservation_ids) == 2
    assert await held_by(database, bob.reservation.devices[0].id) == bob.reservation.id


async def test_release_returns_boards_needing_a_reset_to_flashing(
    database: Database, engine: ReservationEngine
) -> None:
    await register_worker(database, "w")
    await register_device(database, "b1", worker="w", reset_on_release=True)
    grant = await engine.reserve("alice", spec(1))
    await engine.release("alice", reservation_ids=[grant.reservation.id])
    async with database.read() as conn:
        device = await q.get_device(conn, "b1")
    assert device is not None and device.state == DeviceState.FLASHING
    assert await engine.availability("") == []


async def test_extend_moves_the_end_and_never_shortens(
    database: Database, engine: ReservationEngine, clock: SteppedClock
) -> None:
    await seed_farm(database, boards_per_worker=1)
    grant = await engine.reserve("alice", spec(1, lease=60))
    before = grant.reservation.end_time
    (longer,) = await engine.extend(
        "alice", reservation_ids=[grant.reservation.id], lease=timedelta(hours=2)
    )
    assert longer.reservation.end_time > before + timedelta(minutes=100)
    (same,) = await engine.extend(
        "alice", reservation_ids=[grant.reservation.id], lease=timedelta(seconds=10)
    )
    assert same.reservation.end_time == longer.reservation.end_time
    with pytest.raises(PermissionDenied):
        await engine.extend("bob", reservation_ids=[grant.reservation.id])


async def test_expired_leases_end_without_anyone_calling(
    database: Database, engine: ReservationEngine, clock: SteppedClock
) -> None:
    await seed_farm(database, boards_per_worker=2)
    short = await engine.reserve("alice", spec(1, lease=30))
    long = await engine.reserve("alice", spec(1, lease=3600))
    assert await engine.expire_due() == []
    clock.advance(timedelta(seconds=31))
    assert await engine.expire_due() == [short.reservation.id]
    page = await engine.list_reservations("alice", include_ended=True, page_size=0, page_token="")
    ended = {r.id: r for r in page.reservations}
    assert ended[short.reservation.id].end_reason == EndReason.EXPIRED
    assert ended[long.reservation.id].state == "ACTIVE"
    assert len(await engine.availability("")) == 1


async def test_waiter_is_served_when_boards_free_up(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    holder = await engine.reserve("alice", spec(2))
    waiting = asyncio.create_task(engine.reserve("bob", spec(2, wait=30)))
    await _until_queued(database, 1)
    assert not waiting.done()
    await engine.release("alice", everything=True)
    grant = await asyncio.wait_for(waiting, 10)
    assert grant.reservation.client_id == "bob"
    assert {d.id for d in grant.reservation.devices} == {d.id for d in holder.reservation.devices}


async def test_waiters_are_served_in_arrival_order(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    await engine.reserve("holder", spec(1))
    first = asyncio.create_task(engine.reserve("first", spec(1, wait=30)))
    await _until_queued(database, 1)
    second = asyncio.create_task(engine.reserve("second", spec(1, wait=30)))
    await _until_queued(database, 2)
    await engine.release("holder", everything=True)
    grant = await asyncio.wait_for(first, 10)
    assert not second.done()
    await engine.release("first", reservation_ids=[grant.reservation.id])
    assert (await asyncio.wait_for(second, 10)).reservation.client_id == "second"


async def test_a_large_waiter_is_not_starved_by_small_requests(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    a = await engine.reserve("a", spec(1))
    await engine.reserve("b", spec(1))
    big = asyncio.create_task(engine.reserve("big", spec(2, wait=30)))
    await _until_queued(database, 1)
    await engine.release("a", everything=True)
    # One board is free but promised to the queue: a newcomer may not take it.
    with pytest.raises(NotEnoughDevices):
        await engine.reserve("newcomer", spec(1))
    assert await held_by(database, a.reservation.devices[0].id) is None
    await engine.release("b", everything=True)
    assert len((await asyncio.wait_for(big, 10)).reservation.devices) == 2


async def test_waiter_timeout_raises_and_holds_nothing(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    await engine.reserve("alice", spec(1))
    with pytest.raises(NotEnoughDevices) as caught:
        await engine.reserve("bob", spec(1, wait=0.5))
    assert caught.value.waited
    await engine.release("alice", everything=True)
    assert len(await engine.availability("")) == 1
    page = await engine.list_reservations("bob", include_ended=True, page_size=0, page_token="")
    assert page.reservations == []


async def test_cancelled_waiter_leaves_the_queue(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    await engine.reserve("alice", spec(1))
    waiting = asyncio.create_task(engine.reserve("bob", spec(1, wait=30)))
    await _until_queued(database, 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with database.read() as conn:
        assert not await waiter_q.has_waiters(conn)
    await engine.release("alice", everything=True)
    assert len(await engine.availability("")) == 1


async def test_request_id_makes_reserve_idempotent(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    first = await engine.reserve("alice", spec(1, request_id="r-1"))
    again = await engine.reserve("alice", spec(1, request_id="r-1"))
    assert again.reservation.id == first.reservation.id
    assert len(await engine.availability("")) == 1


async def test_list_reservations_pages_newest_first(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=5)
    made = [(await engine.reserve("alice", spec(1))).reservation.id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await engine.list_reservations(
            "alice", include_ended=False, page_size=2, page_token=token
        )
        seen.extend(r.id for r in page.reservations)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5


async def _until_queued(database: Database, n: int, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with database.read() as conn:
            if len(await waiter_q.waiting(conn)) >= n:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} waiters queued within {timeout}s")


async def test_release_naming_someone_elses_reservation_releases_nothing(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    mine = await engine.reserve("alice", spec(1))
    theirs = await engine.reserve("bob", spec(1))
    with pytest.raises(PermissionDenied):
        await engine.release("alice", reservation_ids=[mine.reservation.id, theirs.reservation.id])
    assert await held_by(database, mine.reservation.devices[0].id) == mine.reservation.id
    assert await held_by(database, theirs.reservation.devices[0].id) == theirs.reservation.id


async def test_releasing_an_ended_reservation_again_is_harmless(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=1)
    grant = await engine.reserve("alice", spec(1))
    await engine.release("alice", reservation_ids=[grant.reservation.id])
    again = await engine.release("alice", reservation_ids=[grant.reservation.id])
    assert again.device_ids == [] and again.ended_reservation_ids == []


async def test_end_reservations_rechecks_inside_its_transaction(
    database: Database, engine: ReservationEngine
) -> None:
    await seed_farm(database, boards_per_worker=2)
    kept = await engine.reserve("alice", spec(1))
    ended = await engine.reserve("bob", spec(1))
    seen: list[list[str]] = []

    async def only_bobs(conn: object, ids: list[str]) -> set[str]:
        seen.append(ids)
        return {ended.reservation.id}

    outcome = await engine.end_reservations(
        reservation_ids=[kept.reservation.id, ended.reservation.id],
        reason=EndReason.CLIENT_LOST,
        still_due=only_bobs,  # type: ignore[arg-type]
    )
    assert seen == [sorted([kept.reservation.id, ended.reservation.id])]
    assert outcome.ended_reservation_ids == [ended.reservation.id]
    assert await held_by(database, kept.reservation.devices[0].id) == kept.reservation.id
