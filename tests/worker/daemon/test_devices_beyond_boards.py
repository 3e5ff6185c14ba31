"""Devices that are not USB boards, end to end with real processes: declared in the worker's
TOML (`[[devices]]`), found by NVML (a fake `pynvml` on PYTHONPATH), changed at run time with
`icefarm-worker set-device`, and reserved like a board (token and worker endpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from icefarm.v1 import types_pb2 as tpb
from tests.client.processes import Process, wait_for_log
from tests.client.processes import eventually as wait_until
from tests.integration.conftest import (
    BIN,
    ControlProcess,
    RunningControl,
    start_control_process,
)
from tests.integration.worker_farm import (
    FAST_FLAGS,
    connected,
    device,
    eventually,
    release,
    reserve,
)

WORKER = str(BIN / "icefarm-worker")
GPU_BOX = """
[[devices]]
id = "gpu-box-1"
kind = "gpu-server"
labels = { status = "idle", job = "none" }
properties = { gpu_memory_mb = 16384 }
"""
FAKE_PYNVML = '''
"""A stand-in for nvidia-ml-py: two GPUs."""
from types import SimpleNamespace

GPUS = [("GPU-1111aaaa", b"NVIDIA GeForce RTX 4090", 24564), ("GPU-2222bbbb", "Tesla T4", 15360)]


class NVMLError(Exception):
    pass


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index):
    return GPUS[index]


def nvmlDeviceGetUUID(handle):
    return handle[0]


def nvmlDeviceGetName(handle):
    return handle[1]


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=handle[2] * 1024 * 1024, free=0, used=0)
'''
BROKEN_PYNVML = """
class NVMLError(Exception):
    pass


def nvmlInit():
    raise NVMLError("Driver Not Loaded")
"""


@pytest.fixture
def control_process(database_url: str) -> Iterator[ControlProcess]:
    process = start_control_process(database_url, *FAST_FLAGS)
    yield process
    process.process.kill()
    process.process.wait(timeout=10)
    assert process.process.stdout is not None
    process.process.stdout.close()


@pytest.fixture
def started() -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.kill()


def start_worker(
    started: list[Process],
    root: Path,
    control: str,
    *args: str,
    pythonpath: Path | None = None,
) -> Process:
    """`icefarm-worker run` logging JSON to a file; returns once it serves."""
    log = root / f"worker-{len(started)}.log"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *sys.path])
    command = [
        WORKER, "run", "--control", control, "--listen", "127.0.0.1:0",
        "--log-format", "json", "--reconnect-max", "0.5s", *args,
    ]  # fmt: skip
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    process = Process(popen, "", log)
    started.append(process)
    process.address = str(wait_for_log(process, "worker serving")["endpoint"])
    return process


async def available(control: RunningControl, device_id: str) -> tpb.Device | None:
    """The device once it is AVAILABLE (None before, also while the control has not heard of
    it yet)."""
    try:
        found = await device(control, device_id)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return found if found.state == tpb.DEVICE_STATE_AVAILABLE else None


def set_device(worker: Process, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WORKER, "set-device", *args, "--worker", worker.address],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_declared_device_is_available_at_once_and_reserved_like_a_board(
    control_process: ControlProcess, tmp_path: Path, started: list[Process]
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(GPU_BOX)
    worker = start_worker(
        started, tmp_path, control_process.address, "--simulate", "1", "--name", "gpu-host",
        "--config", str(config),
    )  # fmt: skip
    async with connected(control_process.address) as control:
        declared = await eventually(
            lambda: available(control, "gpu-box-1"), timeout=30, what="gpu-box-1 AVAILABLE"
        )
        assert declared.kind == "gpu-server"
        assert dict(declared.labels) == {"status": "idle", "job": "none"}
        assert dict(declared.properties) == {"gpu_memory_mb": 16384.0}
        assert declared.worker == "gpu-host"

        answer = await reserve(control, "alice", count=1, selector="gpu_memory_mb>=16384")
        assert [d.id for d in answer.reservation.devices] == ["gpu-box-1"]
        assert answer.reservation.devices[0].worker_endpoint == worker.address
        assert answer.token
        await release(control, "alice", answer.reservation.id)


async def test_set_device_changes_what_selectors_see_within_a_second(
    control_process: ControlProcess, tmp_path: Path, started: list[Process]
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(GPU_BOX)
    worker = start_worker(
        started, tmp_path, control_process.address, "--boards", "none", "--name", "gpu-host",
        "--config", str(config),
    )  # fmt: skip
    async with connected(control_process.address) as control:
        await eventually(
            lambda: available(control, "gpu-box-1"), timeout=30, what="gpu-box-1 AVAILABLE"
        )
        done = set_device(
            worker, "gpu-box-1", "--label", "status=busy", "--label", "job=", "--property",
            "load=0.7",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "device_id": "gpu-box-1",
            "labels": {"status": "busy"},
            "properties": {"gpu_memory_mb": 16384.0, "load": 0.7},
        }

        async def reserved(selector: str) -> str:
            try:
                answer = await reserve(control, "bob", count=1, selector=selector)
            except grpc.aio.AioRpcError:
                return ""
            await release(control, "bob", answer.reservation.id)
            return answer.reservation.devices[0].id

        selector = "status=busy,!job,load>0.5"
        assert await eventually(lambda: reserved(selector), timeout=1.0, what="busy matches")

        done = set_device(worker, "gpu-box-1", "--label", "status=", "--property", "load=")
        assert done.returncode == 0, done.stderr

        async def missed() -> bool:
            return not await reserved("status=busy") and not await reserved("load")

        await eventually(missed, timeout=1.0, what="the selector missing")
        found = await device(control, "gpu-box-1")
        assert dict(found.labels) == {}
        assert dict(found.properties) == {"gpu_memory_mb": 16384.0}


async def test_gpus_found_by_nvml_are_devices_with_their_memory(
    control_process: ControlProcess, tmp_path: Path, started: list[Process]
) -> None:
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    start_worker(
        started, tmp_path, control_process.address, "--boards", "none", "--name", "gpus",
        pythonpath=fake,
    )  # fmt: skip
    async with connected(control_process.address) as control:

        async def both_available() -> bool:
            return all([await available(control, g) for g in ("GPU-1111aaaa", "GPU-2222bbbb")])

        await eventually(both_available, timeout=30, what="both GPUs AVAILABLE")
        gpu = await device(control, "GPU-1111aaaa")
        assert gpu.kind == "gpu"
        assert dict(gpu.labels) == {
            "name": "NVIDIA GeForce RTX 4090",
            "model": "nvidia-geforce-rtx-4090",
            "gpu_index": "0",
        }
        assert dict(gpu.properties) == {"gpu_memory_mb": 24564.0}
        answer = await reserve(control, "carol", count=1, selector="kind=gpu,gpu_memory_mb>=20000")
        assert [d.id for d in answer.reservation.devices] == ["GPU-1111aaaa"]


def test_a_failing_nvml_means_no_gpus_and_one_info_line(
    control_process: ControlProcess, tmp_path: Path, started: list[Process]
) -> None:
    fake = tmp_path / "broken-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(BROKEN_PYNVML)
    worker = start_worker(
        started, tmp_path, control_process.address, "--simulate", "1", "--name", "no-gpu",
        pythonpath=fake,
    )  # fmt: skip
    serving = wait_for_log(worker, "worker serving")
    assert serving["boards"] == 1
    records = [json.loads(line) for line in worker.log.read_text().splitlines() if "{" in line]
    nvml = [r for r in records if "NVML" in str(r.get("event"))]
    assert [(r["event"], r["level"]) for r in nvml] == [("NVML did not start: no GPUs", "info")]
    assert "Driver Not Loaded" in nvml[0]["error"]
    assert not [r for r in records if r.get("level") in ("error", "critical")]


def start_simulator(started: list[Process], root: Path) -> None:
    """`python -m icefarm_worker.simulator serve` with one board; returns once it serves."""
    log = root.parent / "simulator.log"
    command = [
        sys.executable, "-m", "icefarm_worker.simulator", "serve", "--count", "1",
        "--root", str(root), "--prefix", "served",
    ]  # fmt: skip
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    started.append(Process(popen, "", log))
    wait_until((root / "farm.json").exists, timeout=30, what="the simulator serving")


async def test_declared_devices_join_the_boards_of_a_simulator_process(
    control_process: ControlProcess, tmp_path: Path, started: list[Process]
) -> None:
    root = tmp_path / "farm"
    start_simulator(started, root)
    config = tmp_path / "worker.toml"
    config.write_text(GPU_BOX)
    start_worker(
        started, tmp_path, control_process.address, "--simulate-root", str(root), "--name",
        "attached", "--config", str(config),
    )  # fmt: skip
    async with connected(control_process.address) as control:
        for device_id in ("served-000", "gpu-box-1"):
            await eventually(
                lambda d=device_id: available(control, d), timeout=30, what=f"{device_id} up"
            )
