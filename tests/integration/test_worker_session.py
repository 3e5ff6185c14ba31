"""WorkerSession: the handshake, one live session per name, device reports, and commands —
stand-in workers on real streams against a real control (both back ends)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from icefarm.tokens import TokenVerifier
from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import types_pb2 as tpb
from icefarm_control.storage import queries as q
from icefarm_control.storage import waiter_queries as waiter_q
from tests.grpc_errors import reason_of
from tests.integration.conftest import RunningControl
from tests.integration.worker_farm import (
    all_commands,
    device,
    events_of,
    eventually,
    free_ids,
    release,
    reserve,
    seconds,
    start_worker,
    state_is,
    worker_state,
)
from tests.standin_worker import StandinWorker


async def test_a_registered_worker_is_online_and_its_boards_are_free(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=2)
    assert worker.registered is not None and worker.registered.worker_name == "lab-a"
    timers = worker.registered.timers
    assert timers.heartbeat_interval.ToTimedelta() == timedelta(seconds=0.2)
    assert await free_ids(steady) == worker.device_ids
    async with steady.database.read() as conn:
        (row,) = await q.list_workers(conn)
    assert row.state == "ONLINE" and row.device_count == 2


async def test_the_registered_key_verifies_the_tokens_clients_are_given(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    assert worker.registered is not None
    verifier = TokenVerifier(worker.registered.token_verification_key)
    granted = await reserve(steady, "alice", count=1)
    claims = verifier.verify(granted.token, datetime.now(UTC))
    assert claims.reservation_id == granted.reservation.id
    assert claims.device_ids == tuple(d.id for d in granted.reservation.devices)
    assert claims.client_id == "alice"


# ---------------------------------------------------------------- handshake and names


async def test_a_stream_that_never_registers_is_closed_after_the_handshake_timeout(
    steady: RunningControl,
) -> None:
    worker = StandinWorker(steady.address, "lab-a")
    await worker.open()
    try:
        assert await worker.status() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no Register within 0.5 s" in await worker.details()
    finally:
        await worker.close()


async def test_a_stream_whose_first_message_is_not_register_is_refused(
    steady: RunningControl,
) -> None:
    worker = StandinWorker(steady.address, "lab-a")
    await worker.open()
    try:
        await worker.send(cpb.WorkerSessionRequest(heartbeat=cpb.Heartbeat(nonce=1)))
        assert await worker.status() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first message must be Register" in await worker.details()
    finally:
        await worker.close()


async def test_a_second_live_session_is_refused_and_a_dead_one_is_replaced(
    fast: RunningControl, workers: list[StandinWorker]
) -> None:
    first = await start_worker(fast, workers, devices=1)
    second = StandinWorker(fast.address, "lab-a", 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await second.start()
    await second.close()
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(refused.value) == "WORKER_ALREADY_CONNECTED"

    first.heartbeats = False  # hung: the stream stays open but the worker says nothing

    async def offline() -> bool:
        return await worker_state(fast) == tpb.WORKER_STATE_OFFLINE

    await eventually(offline, what="the silent worker going offline")
    assert await free_ids(fast) == []
    third = await start_worker(fast, workers, devices=1)
    assert third.registered is not None
    # The replaced stream is told to go away; the new one serves the boards.
    assert await first.status() == grpc.StatusCode.UNAVAILABLE
    assert await free_ids(fast) == third.device_ids


async def test_a_cleanly_closed_session_frees_the_name_at_once(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    first = await start_worker(steady, workers, devices=1)
    await first.close()
    again = await start_worker(steady, workers, devices=1)
    assert again.registered is not None


# ---------------------------------------------------------------- device updates


async def test_device_updates_merge_labels_and_properties(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    available = tpb.DEVICE_STATE_AVAILABLE
    await worker.report(
        board, available, labels={"firmware": "v1", "lab": "a"}, properties={"temp_c": 40}
    )
    await worker.report(
        board,
        available,
        labels={"firmware": "", "row": "3"},
        properties={"temp_c": 41.5, "volts": 3.3},
    )

    async def merged() -> bool:
        found = await device(steady, board)
        labels, properties = dict(found.labels), dict(found.properties)
        return labels == {"lab": "a", "row": "3"} and properties == {"temp_c": 41.5, "volts": 3.3}

    await eventually(merged, what="labels and properties merging")


async def test_an_illegal_transition_is_refused_and_not_applied(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    await worker.report(board, tpb.DEVICE_STATE_READY, labels={"bad": "1"})  # AVAILABLE → READY
    # Messages are handled in order: once this marker is applied, the bad one was handled.
    await worker.report(board, tpb.DEVICE_STATE_AVAILABLE, labels={"marker": "1"})

    async def marked() -> tpb.Device | None:
        found = await device(steady, board)
        return found if "marker" in found.labels else None

    found = await eventually(marked, what="the update after the illegal one")
    assert found.state == tpb.DEVICE_STATE_AVAILABLE
    assert "bad" not in found.labels  # refused whole, labels included
    assert not worker.ended.is_set()  # the stream goes on


# ---------------------------------------------------------------- commands


async def test_reserve_prepares_the_board_and_release_serves_a_waiting_reserve(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    grant = await reserve(
        steady, "alice", count=1, mode="pulsecount", mode_args={"clock": "12"}, duration=seconds(90)
    )
    reservation_id = grant.reservation.id

    prepare = (await worker.wait_for("prepare_device")).prepare_device
    assert (prepare.device_id, prepare.reservation_id) == (board, reservation_id)
    assert (prepare.client_id, prepare.mode) == ("alice", "pulsecount")
    assert dict(prepare.mode_args) == {"clock": "12"}
    assert prepare.lease_duration.ToTimedelta() == timedelta(seconds=90)

    async def ready() -> list[dict[str, object]]:
        return await events_of(steady.database, "alice", "device_ready")

    assert await eventually(ready, what="device_ready for the holder") == [
        {"reservation_id": reservation_id, "device_id": board, "worker_endpoint": worker.endpoint}
    ]
    assert await state_is(steady, board, tpb.DEVICE_STATE_READY)

    waiting = asyncio.create_task(reserve(steady, "bob", count=1, wait_timeout=seconds(20)))

    async def queued() -> bool:
        async with steady.database.read() as conn:
            return bool(await waiter_q.waiting(conn))

    await eventually(queued, what="bob's Reserve queueing")
    await release(steady, "alice", reservation_id)
    released = (await worker.wait_for("release_device")).release_device
    assert (released.device_id, released.reservation_id) == (board, reservation_id)
    served = await asyncio.wait_for(waiting, 20)
    assert [d.id for d in served.reservation.devices] == [board]
    await worker.wait_for(
        "prepare_device", lambda c: c.prepare_device.reservation_id == served.reservation.id
    )


async def test_commands_reach_the_worker_in_the_order_they_were_queued(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=3)
    grant = await reserve(steady, "alice", count=2)
    held = {d.id for d in grant.reservation.devices}
    spare = next(d for d in worker.device_ids if d not in held)
    await steady.control.RebootDevice(cpb.RebootDeviceRequest(device_id=spare))
    await release(steady, "alice", grant.reservation.id)

    async def five() -> bool:
        return len(worker.received) >= 5

    await eventually(five, what="five commands arriving")
    async with steady.database.read() as conn:
        queued = await all_commands(conn, "lab-a")
    assert [(c.WhichOneof("kind"), c.correlation_id) for c in worker.received] == queued
    assert worker.kinds() == ["prepare_device"] * 2 + ["reboot_device"] + ["release_device"] * 2


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("ignore", "prepare_device timed out"),
        ("refuse", "prepare_device failed: refused by the stand-in"),
    ],
)
async def test_a_prepare_that_is_never_answered_or_fails_breaks_the_board(
    steady: RunningControl, workers: list[StandinWorker], behaviour: str, error: str
) -> None:
    silent: set[str] = {"prepare_device"}
    refusing: set[str] = set()
    if behaviour == "refuse":
        silent, refusing = refusing, silent
    worker = await start_worker(steady, workers, devices=1, ignore=silent, refuse=refusing)
    (board,) = worker.device_ids
    grant = await reserve(steady, "alice", count=1)
    await worker.wait_for("prepare_device")

    async def broken() -> tpb.Device | None:
        found = await device(steady, board)
        return found if found.state == tpb.DEVICE_STATE_BROKEN else None

    found = await eventually(broken, what="the board breaking")
    assert found.error == error
    assert await events_of(steady.database, "alice", "device_failed") == [
        {"reservation_id": grant.reservation.id, "device_id": board, "error": error}
    ]
    # The holder keeps the broken board until it lets go.
    assert found.reservation_id == grant.reservation.id


async def test_reboot_device_reaches_the_worker(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    answer = await steady.control.RebootDevice(cpb.RebootDeviceRequest(device_id=board))
    assert answer.device.id == board
    reboot = (await worker.wait_for("reboot_device")).reboot_device
    assert reboot.device_id == board

    async def rebooted() -> bool:
        # The stand-in re-flashes and tests the free board; it comes back AVAILABLE.
        async with steady.database.read() as conn:
            done = [kind for kind, _ in await all_commands(conn, "lab-a")]
        return done == ["reboot_device"] and await state_is(
            steady, board, tpb.DEVICE_STATE_AVAILABLE
        )

    await eventually(rebooted, what="the reboot finishing")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await steady.control.RebootDevice(cpb.RebootDeviceRequest(device_id="no-such-board"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "DEVICE_NOT_FOUND"


async def test_a_mode_no_worker_offers_is_refused_before_any_board_is_touched(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=2)  # offers pulsecount and varmax
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(steady, "alice", count=1, mode="pulsecnt")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mode" in (caught.value.details() or "")
    assert "pulsecount" in (caught.value.details() or "")  # says what is offered
    assert await free_ids(steady) == worker.device_ids
    assert "prepare_device" not in worker.kinds()
    granted = await reserve(steady, "alice", count=1, mode="varmax")
    assert granted.reservation.mode == "varmax"
