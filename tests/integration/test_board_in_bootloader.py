"""A board its worker left in the UF2 bootloader (the worker died between the 1200-baud touch
and the copy: a kill mid-flash) is found again when the worker restarts, flashed with the
default firmware and AVAILABLE — not REMOVED because its serial port is absent (the soak found
it: `w1-003=REMOVED` after a worker kill). Real processes: a control, a simulator, a worker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc
from icefarm_worker.hardware.serial_link import touch_1200
from icefarm_worker.simulator.farm import port_path
from tests.soak.farm import Farm, Sizes, wait_for

DEADLINE = 30.0


async def free_boards(target: str) -> set[str]:
    """The free boards; none while the control is not serving yet."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reservation_service_pb2_grpc.ReservationServiceStub(channel)
        try:
            answer = await stub.GetAvailability(
                rpb.GetAvailabilityRequest(), metadata=(("icefarm-client-id", "probe"),), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return set()
    return set(answer.device_ids)


async def until_free(target: str, boards: set[str], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not boards <= await free_boards(target):
        assert loop.time() < deadline, f"{sorted(boards - await free_boards(target))} not free"
        await asyncio.sleep(0.1)


async def test_a_board_left_in_its_bootloader_by_a_killed_worker_is_available_again(
    tmp_path: Path,
) -> None:
    farm = Farm(
        tmp_path, "sqlite", Sizes(replicas=1, workers=1, boards=2, clients=0), 1, use_netns=False
    )
    try:
        await asyncio.to_thread(farm.start)
        boards = set(farm.board_ids(0))
        await until_free(farm.target, boards, DEADLINE)
        await asyncio.to_thread(farm.kill, farm.workers[0])
        # What the dead worker left: board 1 touched into its bootloader, waiting for a UF2.
        root = farm.sim_root(0)
        assert touch_1200(str(port_path(root, 1)))
        drive = root / "drives" / "RP2350-1"
        await asyncio.to_thread(
            wait_for, lambda: drive.is_dir() and not os.path.exists(port_path(root, 1)), 10, "drive"
        )
        await asyncio.to_thread(farm.start_worker, 0)
        await until_free(farm.target, boards, DEADLINE)
        assert port_path(root, 1).exists()
    finally:
        await asyncio.to_thread(farm.close)
