"""The worker's stream to the control: it survives a control that is not there yet or
restarts, reconciles what its boards are doing, answers re-sent commands without doing them
twice, and drains when the control asks."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import types_pb2 as tpb
from icefarm_control.domain.events import CommandType
from tests.integration.worker_farm import (
    all_commands,
    eventually,
    release,
    seconds,
    state_is,
    worker_state,
)
from tests.worker.daemon.harness import (
    ControlUnderTest,
    all_in_state,
    reserve_ready,
    running_control,
    simulated_worker,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_control_that_is_not_there_at_start_is_waited_for(
    database_url: str, sim_root: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with simulated_worker(address, sim_root, 2) as (worker, _farm):
        assert not worker.session.connected.is_set()
        async with running_control(database_url, listen=address) as control:
            await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
            # The control commits the registration before its Registered reaches the worker,
            # so the boards can be AVAILABLE a moment before the worker knows it is connected.
            await asyncio.wait_for(worker.session.connected.wait(), 10)
            assert worker.session.registrations == 1


async def test_after_a_control_restart_the_worker_registers_again_and_keeps_its_holds(
    database_url: str, sim_root: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with simulated_worker(address, sim_root, 2) as (worker, _farm):
        async with running_control(database_url, listen=address) as control:
            await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
            answer = await reserve_ready(control, "alice", 1)
        board = answer.reservation.devices[0].id
        async with running_control(database_url, listen=address) as control:

            async def registered_again() -> bool:
                return worker.session.registrations >= 2 and worker.session.connected.is_set()

            await eventually(registered_again, what="a second registration")
            device = await control.control.GetDevice(cpb.GetDeviceRequest(device_id=board))
            assert device.device.state == tpb.DEVICE_STATE_READY
            assert device.device.reservation_id == answer.reservation.id


async def test_a_command_sent_again_is_answered_without_doing_it_twice(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1) as (worker, _farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        board = answer.reservation.devices[0]
        async with control.database.read() as conn:
            commands = await all_commands(conn, "lab-a")
        prepare_id = next(cid for kind, cid in commands if kind == CommandType.PREPARE_DEVICE)
        lifecycle = worker.fleet.boards[board.id]
        ready_since = lifecycle.since
        answered: list[cpb.CommandResult] = []
        send = worker.session.result

        def record(result: cpb.CommandResult) -> None:
            answered.append(result)
            send(result)

        worker.commands.send_result = record

        again = cpb.WorkerCommand(correlation_id=prepare_id)
        again.prepare_device.CopyFrom(
            cpb.PrepareDeviceCommand(
                device_id=board.id, reservation_id=answer.reservation.id, mode="pulsecount"
            )
        )
        worker.commands.handle(again)

        assert [(r.correlation_id, r.ok) for r in answered] == [(prepare_id, True)]
        assert lifecycle.since == ready_since  # not flashed again
        assert await state_is(control, board.id, tpb.DEVICE_STATE_READY)


async def test_an_operator_drain_waits_for_the_last_reservation(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1) as (worker, _farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        await control.control.DrainWorker(  # type: ignore[misc]
            cpb.DrainWorkerRequest(worker="lab-a", timeout=seconds(30))
        )

        async def draining() -> bool:
            return worker.draining

        await eventually(draining, what="the worker hears of the drain")
        assert await worker_state(control) == tpb.WORKER_STATE_DRAINING
        assert not worker.drained.is_set()
        await release(control, "alice", answer.reservation.id)
        await asyncio.wait_for(worker.drained.wait(), 15)


async def test_a_draining_worker_stays_draining_across_a_control_restart_and_a_new_one_does_not(
    database_url: str, sim_root: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with simulated_worker(address, sim_root, 2) as (worker, _farm):
        async with running_control(database_url, listen=address) as control:
            await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
            await reserve_ready(control, "alice", 1)
            worker.begin_drain(60.0)  # SIGTERM: the worker drains itself

            async def draining() -> bool:
                return await worker_state(control) == tpb.WORKER_STATE_DRAINING

            await eventually(draining, what="the control hearing of the drain")
        async with running_control(database_url, listen=address) as control:
            # Its Register says it is draining: no window in which its free board is handed out.
            async def registered_again() -> bool:
                return worker.session.registrations >= 2 and worker.session.connected.is_set()

            await eventually(registered_again, what="a second registration")
            assert await worker_state(control) == tpb.WORKER_STATE_DRAINING
    # The process ended with its drain unfinished (alice still held a board); a new one starts.
    async with (
        running_control(database_url, listen=address) as control,
        simulated_worker(address, sim_root, 2) as (fresh, _farm),
    ):
        await asyncio.wait_for(fresh.session.connected.wait(), 15)
        assert await worker_state(control) == tpb.WORKER_STATE_ONLINE
