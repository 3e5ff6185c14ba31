"""Injected faults end as specified: a failing board is rebooted once, then BROKEN with a
reason its holder hears about; its bitstreams rerun on the other boards; the stream lives."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from icefarm.states import DeviceState as State
from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.lifecycle import BoardFailed, BoardLifecycle, NotHeld
from icefarm_worker.simulator import Fault, FaultSpec, expected_pulse_count
from tests.grpc_errors import reason_of
from tests.integration.worker_farm import device, events_of, eventually, state_is
from tests.worker.daemon.harness import (
    ControlUnderTest,
    all_in_state,
    bitstream,
    evaluate,
    reserve_ready,
    simulated_worker,
    token_metadata,
    worker_stub,
)

FAST_FAILURE: dict[str, Any] = {"evaluate_timeout": 1.0, "flash_timeout": 2.0}


async def broken_device(control: ControlUnderTest, device_id: str) -> tpb.Device | None:
    found = await device(control, device_id)
    return found if found.state == tpb.DEVICE_STATE_BROKEN else None


def batch(count: int) -> dict[str, bytes]:
    return {f"b{i:03d}": bitstream(i) for i in range(count)}


def requests(data: dict[str, bytes]) -> list[wpb.Bitstream]:
    return [wpb.Bitstream(id=k, data=v) for k, v in data.items()]


@pytest.mark.parametrize("fault", [Fault.NO_ANSWER, Fault.SHORT_READ])
async def test_a_board_failing_after_its_reboot_is_broken_and_its_bitstreams_rerun(
    control: ControlUnderTest, sim_root: Path, fault: Fault
) -> None:
    async with simulated_worker(control.address, sim_root, 3, **FAST_FAILURE) as (worker, farm):
        await all_in_state(control, 3, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 3)
        victim = answer.reservation.devices[0].id
        farm.inject(victim, FaultSpec(fault, after=1))
        data = batch(30)
        channel, stub = worker_stub(worker)
        async with channel:
            results = await evaluate(stub, answer.token, requests(data))

        assert sorted(r.bitstream_id for r in results) == sorted(data)
        for result in results:
            assert result.error == "", result
            assert result.pulse_count == expected_pulse_count(data[result.bitstream_id])
        rerun = [r for r in results if r.attempt > 1]
        assert rerun and all(r.device_id != victim for r in rerun)
        broken = await eventually(lambda: broken_device(control, victim), what="BROKEN")
        assert "after a reboot" in broken.error
        failed = await events_of(control.database, "alice", "device_failed")
        assert [e["device_id"] for e in failed] == [victim]
        assert failed[0]["error"]


async def test_a_board_that_fails_once_is_rebooted_and_carries_on(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1, **FAST_FAILURE) as (worker, farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        board = answer.reservation.devices[0].id
        farm.inject(board, FaultSpec(Fault.SHORT_READ, after=2, once=True))
        data = batch(6)
        channel, stub = worker_stub(worker)
        async with channel:
            results = await evaluate(stub, answer.token, requests(data))

        assert all(r.error == "" for r in results)
        assert [r.attempt for r in results] == [1, 1, 2, 1, 1, 1]
        await eventually(lambda: state_is(control, board, tpb.DEVICE_STATE_READY))


async def test_an_unplugged_board_is_removed_and_its_bitstreams_rerun(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 2, **FAST_FAILURE) as (worker, farm):
        await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 2)
        victim = answer.reservation.devices[0].id
        farm.inject(victim, FaultSpec(Fault.UNPLUG, after=1))
        data = batch(10)
        channel, stub = worker_stub(worker)
        async with channel:
            results = await evaluate(stub, answer.token, requests(data))

        assert sorted(r.bitstream_id for r in results) == sorted(data)
        assert all(r.error == "" for r in results)
        await eventually(lambda: state_is(control, victim, tpb.DEVICE_STATE_REMOVED))


async def test_a_failed_reboot_breaks_the_board_and_the_holder_hears_of_it(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1, **FAST_FAILURE) as (worker, farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        board = answer.reservation.devices[0].id
        farm.inject(board, Fault.FLASH_FAILURE)
        channel, stub = worker_stub(worker)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.RebootDevice(
                    wpb.WorkerServiceRebootDeviceRequest(device_id=board),
                    metadata=token_metadata(answer.token),
                )
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(raised.value) == "DEVICE_FAILED"
            # The stream stays usable: what cannot run comes back as a failed result.
            results = await evaluate(stub, answer.token, requests(batch(2)))
            assert len(results) == 2
            assert all(r.error and r.device_id == "" for r in results)

        async def told() -> list[dict[str, str]]:
            return await events_of(control.database, "alice", "device_failed")

        failed = await eventually(told, what="device_failed event")
        assert failed[0]["device_id"] == board
        assert await state_is(control, board, tpb.DEVICE_STATE_BROKEN)


async def test_a_step_in_progress_ends_as_soon_as_its_board_is_unplugged(
    control: ControlUnderTest, sim_root: Path
) -> None:
    # The soak found it: an evaluation saw the port go away a moment before discovery's
    # REMOVE, rebooted the board, and that reboot waited out the whole flash timeout for a
    # drive of a board that was no longer there; the bitstream's rerun waited with it.
    async with simulated_worker(control.address, sim_root, 1, flash_timeout=60.0) as (
        worker,
        farm,
    ):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        answer = await reserve_ready(control, "alice", 1)
        board = worker.fleet.boards[answer.reservation.devices[0].id]
        await farm.emulator(board.device_id).power_off()  # gone; discovery has not said so yet
        reboot = asyncio.create_task(board.reboot_mode(answer.reservation.id))
        await eventually(lambda: _state_is(board, State.RESERVED), what="the reboot under way")
        await worker.fleet.removed(board.device_id)  # discovery's REMOVE
        async with asyncio.timeout(10):  # far less than the 60 s flash timeout
            with pytest.raises((BoardFailed, HardwareError, NotHeld)):
                await reboot
        assert board.state == State.REMOVED


async def _state_is(board: BoardLifecycle, state: State) -> bool:
    return board.state == state
