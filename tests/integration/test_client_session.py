"""ReservationService.Session through real gRPC servers on loopback: the handshake, the event
feed and its resume point, client liveness, availability watches and lease warnings."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy import select

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2
from icefarm_control.domain import events as event_payloads
from icefarm_control.domain.clients import ClientSessions
from icefarm_control.domain.events import EventType
from icefarm_control.storage import outbox
from icefarm_control.storage.client_queries import SessionKey
from icefarm_control.storage.models import client_sessions
from icefarm_control.storage.testing import seed_farm
from tests.grpc_errors import bad_fields_of, reason_of
from tests.integration.conftest import RunningControl, as_client
from tests.integration.session_client import (
    SessionClient,
    eventually,
    kinds,
    start_control,
    stop_control,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def quick(database_url: str) -> AsyncIterator[RunningControl]:
    """A control with short timers: 1 s client grace, warnings 2 s before a lease ends, and
    0.5 s for the Hello."""
    control = await start_control(
        database_url,
        client_grace=timedelta(seconds=1),
        ending_soon_before=timedelta(seconds=2),
        handshake_timeout=timedelta(seconds=0.5),
    )
    try:
        yield control
    finally:
        await stop_control(control)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(timedelta(seconds=value))
    return d


async def reserve(control: RunningControl, client: str, **fields: object) -> types_pb2.Reservation:
    request = rpb.ReserveRequest(**fields)  # type: ignore[arg-type]
    answer = await control.reservations.Reserve(request, metadata=as_client(client))
    reservation: types_pb2.Reservation = answer.reservation
    return reservation


async def release(control: RunningControl, client: str, reservation_id: str) -> None:
    await control.reservations.Release(
        rpb.ReleaseRequest(reservation_ids=[reservation_id]), metadata=as_client(client)
    )


async def cycle(control: RunningControl, client: str) -> str:
    """Reserve one board and release it: one ReservationEnded for the client."""
    reservation = await reserve(control, client, count=1)
    await release(control, client, reservation.id)
    return reservation.id


async def reservations_of(control: RunningControl, client: str) -> dict[str, types_pb2.Reservation]:
    answer = await control.reservations.ListReservations(
        rpb.ListReservationsRequest(include_ended=True), metadata=as_client(client)
    )
    return {r.id: r for r in answer.reservations}


async def session_row(control: RunningControl, client: str) -> object | None:
    async with control.database.read() as conn:
        query = select(client_sessions).where(client_sessions.c.client_id == client)
        return (await conn.execute(query)).first()


# ------------------------------------------------------------ the handshake


async def test_hello_is_answered_with_welcome_and_a_ping_with_its_pong(
    control: RunningControl,
) -> None:
    session = await SessionClient.open(control.reservations, "alice")
    assert session.welcome.client_id == "alice"
    assert session.welcome.last_sequence == 0
    assert session.welcome.timers.client_grace.ToTimedelta() == timedelta(minutes=10)
    assert await session.ping(42) == []
    assert await session.ping(43) == []
    session.close()


async def test_a_session_that_sends_no_hello_is_closed_with_a_clear_error(
    quick: RunningControl,
) -> None:
    call = quick.reservations.Session(metadata=as_client("alice"))
    session = SessionClient(call, rpb.Welcome())
    error = await session.status()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send Hello as the first message within 0.5 s" in (error.details() or "")


async def test_the_first_message_must_be_hello(control: RunningControl) -> None:
    call = control.reservations.Session(metadata=as_client("alice"))
    await call.write(rpb.SessionRequest(ping=rpb.Ping(nonce=1)))
    error = await SessionClient(call, rpb.Welcome()).status()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be Hello" in (error.details() or "")


async def test_a_session_without_identity_is_unauthenticated(control: RunningControl) -> None:
    call = control.reservations.Session()
    await call.write(rpb.SessionRequest(hello=rpb.Hello()))
    error = await SessionClient(call, rpb.Welcome()).status()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(error) == "UNAUTHENTICATED"


async def test_a_newer_session_of_the_same_client_supersedes_the_older(
    control: RunningControl,
) -> None:
    first = await SessionClient.open(control.reservations, "alice")
    second = await SessionClient.open(control.reservations, "alice")
    error = await first.status()
    assert error.code() == grpc.StatusCode.ABORTED
    assert "superseded" in (error.details() or "")
    assert await second.ping(1) == []
    second.close()


async def test_sessions_are_told_to_reconnect_elsewhere_when_the_control_stops(
    database_url: str,
) -> None:
    control = await start_control(database_url)
    session = await SessionClient.open(control.reservations, "alice")
    try:
        stop = asyncio.ensure_future(control.app.stop())
        error = await session.status()
        await stop
    finally:
        await control.channel.close()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(error) == "SHUTTING_DOWN"


# ------------------------------------------------------------ the event feed


async def test_releases_and_revocations_reach_the_holders_session_in_order(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=2)
    session = await SessionClient.open(control.reservations, "alice")
    released = [await cycle(control, "alice"), await cycle(control, "alice")]
    events = await session.events(2)
    assert [e.sequence for e in events] == [1, 2]
    assert [e.reservation_ended.reservation_id for e in events] == released
    assert all(e.reservation_ended.reason == types_pb2.END_REASON_RELEASED for e in events)
    assert all(e.reservation_ended.reservation_closed for e in events)

    revoked = await reserve(control, "alice", count=2)
    await control.control.EndReservations(cpb.EndReservationsRequest(reservation_ids=[revoked.id]))
    event = await session.next_event()
    assert event.sequence == 3
    assert event.reservation_ended.reservation_id == revoked.id
    assert event.reservation_ended.reason == types_pb2.END_REASON_REVOKED
    assert sorted(event.reservation_ended.device_ids) == sorted(d.id for d in revoked.devices)
    session.close()


async def test_resume_after_delivers_exactly_the_missed_events_once_in_order(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    session = await SessionClient.open(control.reservations, "alice")
    await cycle(control, "alice")
    await cycle(control, "alice")
    assert [e.sequence for e in await session.events(2)] == [1, 2]
    session.close()

    missed = [await cycle(control, "alice"), await cycle(control, "alice")]
    resumed = await SessionClient.open(control.reservations, "alice", resume_after=2)
    assert resumed.welcome.last_sequence == 4
    events = await resumed.events(2)
    assert [e.sequence for e in events] == [3, 4]
    assert [e.reservation_ended.reservation_id for e in events] == missed
    # Nothing is sent twice: the next event is the next new one.
    await cycle(control, "alice")
    assert (await resumed.next_event()).sequence == 5
    resumed.close()


async def test_a_reconnect_without_resume_after_continues_after_the_last_delivered_event(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    session = await SessionClient.open(control.reservations, "alice")
    await cycle(control, "alice")
    assert (await session.next_event()).sequence == 1

    async def delivered() -> bool:
        row = await session_row(control, "alice")
        return row is not None and row.delivered_sequence == 1  # type: ignore[attr-defined]

    await eventually(delivered, what="the delivery to be recorded")
    session.close()
    await cycle(control, "alice")
    again = await SessionClient.open(control.reservations, "alice")
    assert (await again.next_event()).sequence == 2
    again.close()


# ------------------------------------------------------------ client liveness


async def test_a_killed_client_loses_its_reservations_after_the_grace(
    quick: RunningControl,
) -> None:
    await seed_farm(quick.database, boards_per_worker=2)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.session_holder",
        quick.address,
        "alice",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).decode().strip() == "welcomed alice"
        reservation = await reserve(quick, "alice", count=2)
    finally:
        holder.kill()  # SIGKILL: the client vanishes without a goodbye
        await holder.wait()

    async def ended() -> types_pb2.Reservation | None:
        row = (await reservations_of(quick, "alice"))[reservation.id]
        return row if row.state == types_pb2.RESERVATION_STATE_ENDED else None

    row = await eventually(ended, what="the reservation to end")
    assert row.end_reason == types_pb2.END_REASON_CLIENT_LOST
    free = await quick.reservations.GetAvailability(rpb.GetAvailabilityRequest())
    assert free.count == 2


async def test_a_reservation_made_without_an_open_session_lasts_its_lease(
    quick: RunningControl,
) -> None:
    """`icefarm reserve` makes a reservation and exits: only the lease bounds it. One made
    while a Session was open is ended once the grace has passed (same sweep, same moment)."""
    await seed_farm(quick.database, boards_per_worker=2)
    detached = await reserve(quick, "alice", count=1)
    session = await SessionClient.open(quick.reservations, "alice")
    attached = await reserve(quick, "alice", count=1)
    session.close()

    async def attached_ended() -> bool:
        rows = await reservations_of(quick, "alice")
        return rows[attached.id].state == types_pb2.RESERVATION_STATE_ENDED

    await eventually(attached_ended, what="the attached reservation to end")
    rows = await reservations_of(quick, "alice")
    assert rows[attached.id].end_reason == types_pb2.END_REASON_CLIENT_LOST
    assert rows[detached.id].state == types_pb2.RESERVATION_STATE_ACTIVE


async def test_a_client_back_within_the_grace_keeps_its_reservations_and_misses_no_event(
    quick: RunningControl,
) -> None:
    await seed_farm(quick.database, boards_per_worker=4)
    session = await SessionClient.open(quick.reservations, "alice")
    await cycle(quick, "alice")
    assert (await session.next_event()).sequence == 1
    kept = await reserve(quick, "alice", count=1)
    revoked = await reserve(quick, "alice", count=1)
    session.close()

    async def disconnected() -> bool:
        row = await session_row(quick, "alice")
        return row is not None and row.disconnect_time is not None  # type: ignore[attr-defined]

    await eventually(disconnected, what="the disconnect to be recorded")
    # While alice is away: one of her reservations is revoked, and carol reserves from a
    # Session she then drops: carol's grace runs out after alice's would have.
    await quick.control.EndReservations(cpb.EndReservationsRequest(reservation_ids=[revoked.id]))
    carol = await SessionClient.open(quick.reservations, "carol")
    canary = await reserve(quick, "carol", count=1)
    carol.close()
    back = await SessionClient.open(quick.reservations, "alice", resume_after=1)
    missed = await back.next_event()
    assert missed.sequence == 2
    assert missed.reservation_ended.reservation_id == revoked.id
    assert missed.reservation_ended.reason == types_pb2.END_REASON_REVOKED

    async def canary_lost() -> bool:
        row = (await reservations_of(quick, "carol"))[canary.id]
        return row.end_reason == types_pb2.END_REASON_CLIENT_LOST

    await eventually(canary_lost, what="the canary to be lost")
    mine = await reservations_of(quick, "alice")
    assert mine[kept.id].state == types_pb2.RESERVATION_STATE_ACTIVE
    # And nothing arrives twice: the next event is the next new one.
    await release(quick, "alice", kept.id)
    following = await back.next_event()
    assert following.sequence == 3
    assert following.reservation_ended.reservation_id == kept.id
    back.close()


# ------------------------------------------------------------ availability watches


async def test_a_waiting_client_hears_when_enough_matching_boards_are_free_and_not_before(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, workers=2, boards_per_worker=2)
    held = {
        r.devices[0].id: r.id for r in [await reserve(control, "bob", count=1) for _ in range(4)]
    }
    alice = await SessionClient.open(control.reservations, "alice")
    await alice.watch("worker=worker-1", 2)
    assert await alice.ping(1) == []
    # Boards of the other worker, then one matching board: still not enough.
    for board in ("board-0-000", "board-0-001", "board-1-000"):
        await release(control, "bob", held[board])
    await release(control, "bob", held["board-1-001"])
    event = await alice.next_event()
    # The first DevicesAvailable already names both boards: none was sent while one was free.
    assert event.WhichOneof("kind") == "devices_available"
    assert event.sequence == 0
    assert event.devices_available.selector == "worker=worker-1"
    assert event.devices_available.count == 2
    assert sorted(event.devices_available.device_ids) == ["board-1-000", "board-1-001"]
    alice.close()


async def test_a_watch_is_answered_at_once_when_enough_are_already_free(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=3)
    alice = await SessionClient.open(control.reservations, "alice")
    await alice.watch("", 3)
    event = await alice.next_event()
    assert event.devices_available.count == 3
    alice.close()


async def test_a_bad_watch_selector_ends_the_session_with_invalid_argument(
    control: RunningControl,
) -> None:
    alice = await SessionClient.open(control.reservations, "alice")
    await alice.watch("kind=>pico", 1)
    error = await alice.status()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(error) == "INVALID_SELECTOR"
    assert "position" in (error.details() or "")


# ------------------------------------------------------------ lease warnings


async def test_a_lease_about_to_end_is_announced_once_per_end_time(quick: RunningControl) -> None:
    await seed_farm(quick.database, boards_per_worker=1)
    alice = await SessionClient.open(quick.reservations, "alice")
    reservation = await reserve(quick, "alice", count=1, duration=seconds(3))
    warning = await alice.next_event()
    assert warning.WhichOneof("kind") == "reservation_ending_soon"
    assert warning.reservation_ending_soon.reservation_id == reservation.id
    assert warning.reservation_ending_soon.end_time == reservation.end_time
    # Extending re-arms the warning; the lease then runs out.
    await quick.reservations.Extend(
        rpb.ExtendRequest(reservation_ids=[reservation.id], duration=seconds(3)),
        metadata=as_client("alice"),
    )
    rest = await alice.events(3)
    assert kinds(rest) == ["reservation_extended", "reservation_ending_soon", "reservation_ended"]
    assert rest[2].reservation_ended.reason == types_pb2.END_REASON_EXPIRED
    assert [e.sequence for e in [warning, *rest]] == [1, 2, 3, 4]
    alice.close()


# ------------------------------------------------------------ several Sessions of one client


async def open_instance(
    control: RunningControl, client: str, instance: str, resume_after: int = 0
) -> SessionClient:
    """A Session of `client` as one of its Client objects (`instance`)."""
    call = control.reservations.Session(metadata=as_client(client))
    hello = rpb.Hello(resume_after=resume_after, instance=instance)
    await call.write(rpb.SessionRequest(hello=hello))
    first = await asyncio.wait_for(call.read(), 10)
    assert first.WhichOneof("kind") == "welcome", first
    return SessionClient(call, first.welcome)


async def instance_row(control: RunningControl, client: str, instance: str) -> object | None:
    async with control.database.read() as conn:
        query = select(client_sessions).where(
            client_sessions.c.client_id == client, client_sessions.c.instance == instance
        )
        return (await conn.execute(query)).first()


async def test_two_instances_of_one_client_coexist_and_both_get_its_events(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    first = await open_instance(control, "alice", "one")
    second = await open_instance(control, "alice", "two")
    assert second.welcome.client_id == "alice"
    released = await cycle(control, "alice")
    for session in (first, second):
        event = await session.next_event()
        assert event.sequence == 1
        assert event.reservation_ended.reservation_id == released
    # Neither replaced the other: both still answer.
    assert await first.ping(1) == []
    assert await second.ping(1) == []
    rows = [await instance_row(control, "alice", name) for name in ("one", "two")]
    assert [r.session_generation for r in rows] == [1, 1]  # type: ignore[union-attr]
    first.close()
    second.close()


async def test_each_instance_resumes_from_its_own_delivery_and_a_new_one_from_the_furthest(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    first = await open_instance(control, "alice", "one")
    await cycle(control, "alice")
    await cycle(control, "alice")
    assert [e.sequence for e in await first.events(2)] == [1, 2]

    async def delivered(instance: str, sequence: int) -> bool:
        row = await instance_row(control, "alice", instance)
        return row is not None and row.delivered_sequence == sequence  # type: ignore[attr-defined]

    await eventually(lambda: delivered("one", 2), what="one's delivery to be recorded")
    # A new Client object starts where the client's Sessions got to, not with the history.
    second = await open_instance(control, "alice", "two")
    await cycle(control, "alice")
    assert (await second.next_event()).sequence == 3
    assert (await first.next_event()).sequence == 3
    await eventually(lambda: delivered("two", 3), what="two's delivery to be recorded")
    second.close()
    await cycle(control, "alice")
    assert (await first.next_event()).sequence == 4
    # "two" was away for event 4: it resumes after its own delivery (3), not one's (4).
    again = await open_instance(control, "alice", "two")
    assert (await again.next_event()).sequence == 4
    first.close()
    again.close()


async def test_a_new_session_with_the_same_instance_supersedes_the_older_only(
    control: RunningControl,
) -> None:
    other = await open_instance(control, "alice", "two")
    first = await open_instance(control, "alice", "one")
    replacement = await open_instance(control, "alice", "one")
    error = await first.status()
    assert error.code() == grpc.StatusCode.ABORTED
    assert reason_of(error) == "CONFLICT"
    assert "superseded" in (error.details() or "")
    assert await replacement.ping(1) == []
    assert await other.ping(1) == []
    row = await instance_row(control, "alice", "one")
    assert row is not None and row.session_generation == 2  # type: ignore[attr-defined]
    other.close()
    replacement.close()


@pytest.mark.parametrize("instance", ["x" * 65, "has space", "tab\there", "é"])
async def test_a_malformed_instance_is_invalid_argument_naming_the_field(
    control: RunningControl, instance: str
) -> None:
    call = control.reservations.Session(metadata=as_client("alice"))
    await call.write(rpb.SessionRequest(hello=rpb.Hello(instance=instance)))
    error = await SessionClient(call, rpb.Welcome()).status()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields_of(error) == ["hello.instance"]
    assert await session_row(control, "alice") is None


async def test_the_client_grace_keeps_reservations_while_one_instance_is_live(
    quick: RunningControl,
) -> None:
    await seed_farm(quick.database, boards_per_worker=3)
    staying = await open_instance(quick, "alice", "staying")
    leaving = await open_instance(quick, "alice", "leaving")
    kept = await reserve(quick, "alice", count=1)
    leaving.close()

    async def disconnected() -> bool:
        row = await instance_row(quick, "alice", "leaving")
        return row is not None and row.disconnect_time is not None  # type: ignore[attr-defined]

    await eventually(disconnected, what="the disconnect to be recorded")
    # carol drops her only Session after alice's "leaving" did: once carol has lost her
    # reservation, alice's grace would have run out too, had "staying" not been live.
    carol = await SessionClient.open(quick.reservations, "carol")
    canary = await reserve(quick, "carol", count=1)
    carol.close()

    async def canary_lost() -> bool:
        row = (await reservations_of(quick, "carol"))[canary.id]
        return row.end_reason == types_pb2.END_REASON_CLIENT_LOST

    await eventually(canary_lost, what="the canary to be lost")
    assert (await reservations_of(quick, "alice"))[kept.id].state == (
        types_pb2.RESERVATION_STATE_ACTIVE
    )
    assert await staying.ping(1) == []

    # With the last Session gone the grace runs and the reservation ends as client lost.
    staying.close()

    async def kept_lost() -> bool:
        row = (await reservations_of(quick, "alice"))[kept.id]
        return row.end_reason == types_pb2.END_REASON_CLIENT_LOST

    await eventually(kept_lost, what="alice's reservation to be lost")


class _Later:
    """The control's clock, moved `ahead` into the future."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        return datetime.now(UTC) + self.ahead


async def test_pruning_drops_old_session_rows_and_keeps_the_live_ones(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    gone = await open_instance(control, "alice", "gone")
    gone.close()

    async def disconnected() -> bool:
        row = await instance_row(control, "alice", "gone")
        return row is not None and row.disconnect_time is not None  # type: ignore[attr-defined]

    await eventually(disconnected, what="the disconnect to be recorded")
    live = await open_instance(control, "alice", "live")
    # Two days on, with the live Session refreshed by its replica all along.
    later = ClientSessions(control.app.engine)
    later.clock = _Later(timedelta(days=2))
    await later.refresh([SessionKey("alice", "live")])
    await later.prune_events()
    assert await instance_row(control, "alice", "gone") is None
    assert await instance_row(control, "alice", "live") is not None
    released = await cycle(control, "alice")
    assert (await live.next_event()).reservation_ended.reservation_id == released
    live.close()


async def test_many_sessions_of_one_client_woken_together_all_read_the_event(
    control: RunningControl,
) -> None:
    """More feeds woken at once than SMALL_WAKE_BATCH: the gate checks them in one query,
    by client and instance."""
    await seed_farm(control.database, boards_per_worker=1)
    sessions = [await open_instance(control, "alice", f"run-{n}") for n in range(12)]
    released = await cycle(control, "alice")
    for session in sessions:
        assert (await session.next_event()).reservation_ended.reservation_id == released
    for session in sessions:
        session.close()


async def test_the_upkeep_refreshes_and_wakes_every_session_of_a_client(
    control: RunningControl,
) -> None:
    first = await open_instance(control, "alice", "one")
    second = await open_instance(control, "alice", "two")
    rows = [await instance_row(control, "alice", name) for name in ("one", "two")]
    await control.app.clients.refresh([SessionKey("alice", "one"), SessionKey("alice", "two")])
    refreshed = [await instance_row(control, "alice", name) for name in ("one", "two")]
    for before, after in zip(rows, refreshed, strict=True):
        assert after.last_seen_time > before.last_seen_time  # type: ignore[union-attr]
    # An event whose wake-up is lost (as a NOTIFY can be): the upkeep finds it.
    async with control.database.write() as conn:
        payload = event_payloads.reservation_ending_soon(
            reservation_id="r-1", end_time=datetime.now(UTC)
        )
        await outbox.append_event(
            conn,
            outbox.client_audience("alice"),
            EventType.RESERVATION_ENDING_SOON,
            payload,
            datetime.now(UTC),
        )
        outbox.take_touched(conn)
    await control.app.sessions.upkeep()
    for session in (first, second):
        event = await session.next_event()
        assert event.reservation_ending_soon.reservation_id == "r-1"
    first.close()
    second.close()
