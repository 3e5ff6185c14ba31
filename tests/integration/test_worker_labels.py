"""A device carries its worker's labels (`--label room=b12`), so any selector matches them: the
control merges them into the device's labels when it writes them, the device's own label
winning. Real workers on simulated boards, a real Reserve on both back ends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from icefarm.v1 import types_pb2 as tpb
from icefarm_worker.app import WorkerApp
from icefarm_worker.backends import Hardware
from icefarm_worker.simulator import SimulatedFarm
from tests.integration.conftest import RunningControl
from tests.integration.worker_farm import device, eventually, fast_control, reserve
from tests.worker.daemon.harness import all_in_state, worker_config


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[RunningControl]:
    async with fast_control(database_url) as running:
        yield running


@contextlib.asynccontextmanager
async def labelled_worker(
    control: RunningControl, root: Path, name: str, labels: dict[str, str]
) -> AsyncIterator[WorkerApp]:
    """A real worker named `name` with one simulated board (`<name>-sim-000`)."""
    farm = SimulatedFarm(1, root, prefix=f"{name}-sim", watchdog=0.5)
    await farm.start()
    hardware = Hardware(farm.discovery, farm.board, farm.usbip, farm.firmware_paths())
    app = WorkerApp(worker_config(control.address, name=name, labels=labels), hardware)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)
        await farm.stop()


async def reserved_ids(control: RunningControl, selector: str) -> list[str]:
    answer = await reserve(control, f"user-{selector}", count=1, selector=selector)
    return [d.id for d in answer.reservation.devices]


async def test_a_selector_matches_the_labels_of_a_devices_worker(
    control: RunningControl, tmp_path: Path
) -> None:
    async with (
        labelled_worker(control, tmp_path / "a", "room-b12", {"room": "b12"}),
        labelled_worker(control, tmp_path / "b", "room-c3", {"room": "c3"}),
    ):
        await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
        listed = await device(control, "room-b12-sim-000")
        assert dict(listed.labels) == {"room": "b12", "simulated": "true"}

        assert await reserved_ids(control, "room=b12") == ["room-b12-sim-000"]
        assert await reserved_ids(control, "room!=b12") == ["room-c3-sim-000"]


async def test_the_devices_own_label_wins_over_its_workers(
    control: RunningControl, tmp_path: Path
) -> None:
    async with labelled_worker(control, tmp_path, "lab", {"simulated": "no", "rack": "7"}):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        listed = await device(control, "lab-sim-000")
        assert dict(listed.labels) == {"simulated": "true", "rack": "7"}


async def test_a_register_with_changed_worker_labels_re_merges_them(
    control: RunningControl, tmp_path: Path
) -> None:
    async with labelled_worker(control, tmp_path, "mover", {"room": "b12", "rack": "7"}):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
    async with labelled_worker(control, tmp_path, "mover", {"room": "c3"}):

        async def moved() -> bool:
            found = await device(control, "mover-sim-000")
            return found.state == tpb.DEVICE_STATE_AVAILABLE and dict(found.labels) == {
                "room": "c3",
                "simulated": "true",
            }

        await eventually(moved, timeout=30, what="the board carrying room=c3 only")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reserve(control, "old-room", count=1, selector="room=b12")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await reserved_ids(control, "room=c3") == ["mover-sim-000"]
