"""The operator feed (ControlService.WatchEvents), and client feeds across control processes:
two replicas on one PostgreSQL, and a replica that dies while holding Sessions."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import control_service_pb2_grpc as cpb_grpc
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc
from icefarm.v1 import types_pb2
from icefarm_control.storage.database import Database
from icefarm_control.storage.testing import seed_farm
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import (
    ControlProcess,
    RunningControl,
    as_client,
    start_control_process,
)
from tests.integration.session_client import WAIT, SessionClient, eventually, kinds


async def watch(control: RunningControl, resume_after: int) -> AsyncIterator[types_pb2.Event]:
    call = control.control.WatchEvents(cpb.WatchEventsRequest(resume_after=resume_after))
    try:
        while True:
            response = await asyncio.wait_for(call.read(), WAIT)
            assert response is not grpc.aio.EOF
            yield response.event
    finally:
        call.cancel()


async def cycle(stub: rpb_grpc.ReservationServiceStub, client: str) -> str:
    answer = await stub.Reserve(rpb.ReserveRequest(count=1), metadata=as_client(client))
    await stub.Release(
        rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]), metadata=as_client(client)
    )
    return answer.reservation.id


# ------------------------------------------------------------ WatchEvents


async def test_watch_events_replays_after_resume_after_then_streams_new_events(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=2)
    first = await cycle(control.reservations, "alice")  # operator events 1 and 2
    second = await cycle(control.reservations, "bob")  # 3 and 4
    feed = watch(control, resume_after=1)
    replayed = [await anext(feed) for _ in range(3)]
    assert [e.sequence for e in replayed] == [2, 3, 4]
    assert kinds(replayed) == ["reservation_ended", "reservation_created", "reservation_ended"]
    assert replayed[0].reservation_ended.reservation_id == first
    created = replayed[1].reservation_created.reservation
    assert created.id == second and created.client_id == "bob" and len(created.devices) == 1

    live = await control.reservations.Reserve(
        rpb.ReserveRequest(count=2), metadata=as_client("carol")
    )
    await control.control.EndReservations(
        cpb.EndReservationsRequest(reservation_ids=[live.reservation.id])
    )
    streamed = [await anext(feed) for _ in range(2)]
    assert [e.sequence for e in streamed] == [5, 6]
    assert streamed[0].reservation_created.reservation.id == live.reservation.id
    assert streamed[1].reservation_ended.reason == types_pb2.END_REASON_REVOKED
    await feed.aclose()


async def test_watch_events_from_zero_sends_only_what_happens_next(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    await cycle(control.reservations, "alice")
    call = control.control.WatchEvents(cpb.WatchEventsRequest())
    # The stream is open once the server answers with headers.
    await asyncio.wait_for(call.initial_metadata(), WAIT)
    reserved = await control.reservations.Reserve(
        rpb.ReserveRequest(count=1), metadata=as_client("bob")
    )
    response = await asyncio.wait_for(call.read(), WAIT)
    assert response.event.sequence == 3
    assert response.event.reservation_created.reservation.id == reserved.reservation.id
    call.cancel()


# ------------------------------------------------------------ several control processes


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


async def seed(url: str, boards: int) -> None:
    database = Database(url)
    try:
        await seed_farm(database, boards_per_worker=boards)
    finally:
        await database.dispose()


def stubs(
    channel: grpc.aio.Channel,
) -> tuple[rpb_grpc.ReservationServiceStub, cpb_grpc.ControlServiceStub]:
    return rpb_grpc.ReservationServiceStub(channel), cpb_grpc.ControlServiceStub(channel)


@pytest.mark.postgres
async def test_a_session_on_one_replica_hears_what_happens_through_another(
    pg_url: str, control_process_factory: list[ControlProcess]
) -> None:
    a = start_control_process(pg_url)  # migrates the database
    control_process_factory.append(a)
    await seed(pg_url, boards=2)
    b = start_control_process(pg_url)
    control_process_factory.append(b)
    async with (
        grpc.aio.insecure_channel(a.address) as channel_a,
        grpc.aio.insecure_channel(b.address) as channel_b,
    ):
        reservations_a, _ = stubs(channel_a)
        reservations_b, _ = stubs(channel_b)
        alice = await SessionClient.open(reservations_b, "alice")
        carol = await SessionClient.open(reservations_b, "carol")

        released = await cycle(reservations_a, "alice")
        ended = await alice.next_event()
        assert ended.sequence == 1
        assert ended.reservation_ended.reservation_id == released
        assert ended.reservation_ended.reason == types_pb2.END_REASON_RELEASED

        held = await reservations_a.Reserve(rpb.ReserveRequest(count=2), metadata=as_client("bob"))
        await carol.watch("", 2)
        assert await carol.ping(1) == []
        await reservations_a.Release(
            rpb.ReleaseRequest(reservation_ids=[held.reservation.id]), metadata=as_client("bob")
        )
        available = await carol.next_event()
        assert available.devices_available.count == 2

        # A newer Session on replica A takes over alice's feed; B's stream ends.
        taken_over = await SessionClient.open(reservations_a, "alice")
        error = await alice.status()
        assert error.code() == grpc.StatusCode.ABORTED
        assert await taken_over.ping(2) == []
        taken_over.close()
        carol.close()


async def test_a_client_whose_replica_died_loses_its_reservations_after_the_grace(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    first = start_control_process(database_url, "--client-grace", "1s")
    control_process_factory.append(first)
    await seed(database_url, boards=1)
    async with grpc.aio.insecure_channel(first.address) as channel:
        reservations, _ = stubs(channel)
        session = await SessionClient.open(reservations, "alice")
        reserved = await reservations.Reserve(
            rpb.ReserveRequest(count=1), metadata=as_client("alice")
        )
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        session.close()
    # The replica that takes over never heard from alice: her session row goes stale.
    second = start_control_process(database_url, "--client-grace", "1s")
    control_process_factory.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        reservations, _ = stubs(channel)

        async def lost() -> bool:
            answer = await reservations.ListReservations(
                rpb.ListReservationsRequest(include_ended=True), metadata=as_client("alice")
            )
            (row,) = answer.reservations
            assert row.id == reserved.reservation.id
            return row.end_reason == types_pb2.END_REASON_CLIENT_LOST

        await eventually(lost, what="alice's reservation to end")
