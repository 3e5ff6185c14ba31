"""Workers coming and going: reconnects, drains, a killed worker process, a restarted or
stopping control — stand-in workers against real controls (in this process or as processes)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import types_pb2 as tpb
from icefarm_control.app import ControlApp
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database
from tests.grpc_errors import reason_of
from tests.integration.conftest import ControlProcess, RunningControl, start_control_process
from tests.integration.worker_farm import (
    FAST_FLAGS,
    connected,
    device,
    events_of,
    eventually,
    fast_config,
    free_are,
    free_ids,
    release,
    reserve,
    seconds,
    start_worker,
    start_worker_process,
    state_is,
    worker_state,
)
from tests.standin_worker import StandinWorker


async def ready(control: RunningControl, board: str) -> None:
    async def check() -> bool:
        return await state_is(control, board, tpb.DEVICE_STATE_READY)

    await eventually(check, what=f"{board} becoming READY")


# ---------------------------------------------------------------- reconnecting


async def test_a_worker_that_reconnects_holding_the_board_keeps_the_reservation(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    grant = await reserve(steady, "alice", count=1)
    await ready(steady, board)
    await worker.close()

    again = StandinWorker(steady.address, "lab-a", [board])
    again.boards[board].state = tpb.DEVICE_STATE_READY
    again.boards[board].reservation_id = grant.reservation.id
    workers.append(again)
    await again.start()
    found = await device(steady, board)
    assert (found.state, found.reservation_id) == (tpb.DEVICE_STATE_READY, grant.reservation.id)
    assert await events_of(steady.database, "alice", "reservation_ended") == []


async def test_a_worker_that_reconnects_without_the_hold_loses_it(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    (board,) = worker.device_ids
    grant = await reserve(steady, "alice", count=1)
    await ready(steady, board)
    await worker.close()

    forgetful = await start_worker(steady, workers, devices=1)  # reports the board AVAILABLE
    released = (await forgetful.wait_for("release_device")).release_device
    assert released.reservation_id == grant.reservation.id
    assert await events_of(steady.database, "alice", "reservation_ended") == [
        {
            "reservation_id": grant.reservation.id,
            "device_ids": [board],
            "reason": "WORKER_LOST",
            "reservation_closed": True,
        }
    ]

    async def free_again() -> bool:
        return await free_are(steady, [board])

    await eventually(free_again, what="the board being free again")


async def test_a_dropped_stream_takes_the_boards_out_at_once_and_a_reconnect_brings_them_back(
    database_url: str, workers: list[StandinWorker]
) -> None:
    # The offline timeout is long: only the stream's end can take the boards out this fast.
    app = ControlApp(fast_config(database_url, offline_timeout=timedelta(seconds=30)))
    port = await app.start()
    try:
        async with connected(f"127.0.0.1:{port}", app) as control:
            worker = await start_worker(control, workers, devices=2)
            grant = await reserve(control, "alice", count=1)
            (held,) = [d.id for d in grant.reservation.devices]
            await ready(control, held)
            await worker._stop()  # the connection drops: no goodbye on the stream

            async def gone() -> bool:
                return await free_ids(control) == [] and (
                    await worker_state(control) == tpb.WORKER_STATE_OFFLINE
                )

            await eventually(gone, timeout=3, what="the boards leaving availability")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reserve(control, "bob", count=1)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            found = await device(control, held)
            assert (found.state, found.reservation_id) == (
                tpb.DEVICE_STATE_OFFLINE,
                grant.reservation.id,
            )  # the hold waits out the worker grace

            again = StandinWorker(control.address, "lab-a", worker.device_ids)
            again.boards = worker.boards  # it still runs alice's reservation
            workers.append(again)
            await again.start()
            assert len(await free_ids(control)) == 1
            found = await device(control, held)
            assert (found.state, found.reservation_id) == (
                tpb.DEVICE_STATE_READY,
                grant.reservation.id,
            )
    finally:
        await app.stop()


# ---------------------------------------------------------------- drain


async def test_drain_worker_stops_new_reservations_tells_holders_and_completes(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=2)
    grant = await reserve(steady, "alice", count=1)
    (held,) = [d.id for d in grant.reservation.devices]
    await worker.wait_for("prepare_device")

    answer = await steady.control.DrainWorker(
        cpb.DrainWorkerRequest(worker="lab-a", timeout=seconds(30))
    )
    assert answer.worker.state == tpb.WORKER_STATE_DRAINING
    assert await free_ids(steady) == []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reserve(steady, "bob", count=1)  # one board is free, but its worker is draining
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(refused.value) == "NOT_ENOUGH_DEVICES"

    assert await events_of(steady.database, "alice", "worker_draining") == [
        {"worker": "lab-a", "device_ids": [held], "reservation_ids": [grant.reservation.id]}
    ]
    drain = (await worker.wait_for("drain")).drain
    assert 29 <= drain.timeout.ToTimedelta().total_seconds() <= 30
    assert "drain_complete" not in worker.kinds()

    await release(steady, "alice", grant.reservation.id)
    await worker.wait_for("drain_complete")
    assert worker.kinds().count("drain_complete") == 1


async def test_a_worker_that_drains_itself_gets_drain_complete_but_no_drain(
    steady: RunningControl, workers: list[StandinWorker]
) -> None:
    worker = await start_worker(steady, workers, devices=1)
    grant = await reserve(steady, "alice", count=1)
    await worker.wait_for("prepare_device")
    await worker.draining(60)

    async def told() -> list[dict[str, object]]:
        return await events_of(steady.database, "alice", "worker_draining")

    await eventually(told, what="the holder hearing of the drain")
    assert await worker_state(steady) == tpb.WORKER_STATE_DRAINING
    await release(steady, "alice", grant.reservation.id)
    await worker.wait_for("drain_complete")
    assert "drain" not in worker.kinds()


async def test_drain_worker_of_an_unknown_worker_is_not_found(fast: RunningControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fast.control.DrainWorker(cpb.DrainWorkerRequest(worker="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "WORKER_NOT_FOUND"


# ---------------------------------------------------------------- real processes


async def test_a_killed_worker_goes_offline_loses_its_holds_and_reconciles_on_return(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    server = start_control_process(database_url, *FAST_FLAGS)
    control_process_factory.append(server)
    database = Database(database_url)
    worker = await start_worker_process(server.address, "lab-k", 2)
    boards = ["lab-k-000", "lab-k-001"]
    try:
        async with connected(server.address) as control:

            async def all_free() -> bool:
                return await free_are(control, boards)

            async def none_free() -> bool:
                return await free_are(control, [])

            await eventually(all_free, what="the boards registering")
            grant = await reserve(control, "alice", count=1)
            (held,) = [d.id for d in grant.reservation.devices]
            await ready(control, held)

            worker.kill()  # SIGKILL: no goodbye on the stream
            await worker.wait()
            loop = asyncio.get_running_loop()
            killed = loop.time()
            await eventually(none_free, what="the boards vanishing")
            assert loop.time() - killed < 3.5  # offline timeout 1 s + a sweep (every 1 s)
            assert await worker_state(control) == tpb.WORKER_STATE_OFFLINE

            async def worker_lost() -> list[dict[str, object]]:
                return await events_of(database, "alice", "reservation_ended")

            assert await eventually(worker_lost, what="the hold ending after the grace") == [
                {
                    "reservation_id": grant.reservation.id,
                    "device_ids": [held],
                    "reason": "WORKER_LOST",
                    "reservation_closed": True,
                }
            ]

            worker = await start_worker_process(server.address, "lab-k", 2)
            await eventually(all_free, what="the boards coming back")
            assert await worker_state(control) == tpb.WORKER_STATE_ONLINE
    finally:
        if worker.returncode is None:
            worker.terminate()
            await worker.wait()
        await database.dispose()


async def test_a_restarted_control_sends_unanswered_commands_again(
    database_url: str, control_process_factory: list[ControlProcess]
) -> None:
    first = start_control_process(database_url, *FAST_FLAGS)
    control_process_factory.append(first)
    silent = StandinWorker(first.address, "lab-r", 1, ignore={"prepare_device"})
    await silent.start()
    async with connected(first.address) as control:
        grant = await reserve(control, "alice", count=1)
    sent = await silent.wait_for("prepare_device")
    first.process.kill()  # the command stays SENT, unanswered, in the database
    first.process.wait()
    await silent.close()

    second = start_control_process(database_url, *FAST_FLAGS)
    control_process_factory.append(second)
    worker = StandinWorker(second.address, "lab-r", 1)

    async def registered() -> bool:
        # On PostgreSQL refused (ALREADY_EXISTS) until the dead replica's row is stale (~3 s);
        # on SQLite the new control knows at start that every session in the file is dead.
        try:
            await worker.start()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            await worker.close()
            return False
        return True

    await eventually(registered, what="the worker registering with the new control")
    try:
        again = await worker.wait_for("prepare_device")
        assert again.correlation_id == sent.correlation_id
        assert again.prepare_device.reservation_id == grant.reservation.id
        async with connected(second.address) as control:
            await ready(control, worker.device_ids[0])
    finally:
        await worker.close()


async def test_shutting_down_tells_worker_streams_to_reconnect_at_once(database_url: str) -> None:
    app = ControlApp(fast_config(database_url, shutdown_grace=timedelta(seconds=10)))
    port = await app.start()
    worker = StandinWorker(f"127.0.0.1:{port}", "lab-a", 1)
    await worker.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await app.stop()
    assert loop.time() - started < 5  # not the whole grace: the stream was ended, not awaited
    assert await worker.status() == grpc.StatusCode.UNAVAILABLE
    assert worker.error is not None and reason_of(worker.error) == "SHUTTING_DOWN"
    await worker.close()
    database = Database(database_url)
    try:
        async with database.read() as conn:
            row = await wq.lock_worker(conn, "lab-a")
        assert row is not None and row.session_replica is None  # free to register elsewhere
    finally:
        await database.dispose()
