"""Helpers for the worker daemon tests: start a control and a worker on a simulated farm,
reserve boards, open Evaluate streams. Waiting is done by polling with a deadline."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from icefarm.limits import PICO2_ICE_BITSTREAM_BYTES
from icefarm.metadata import TOKEN_METADATA_KEY
from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_control.app import ControlApp
from icefarm_worker.app import WorkerApp
from icefarm_worker.backends import Hardware
from icefarm_worker.config import WorkerConfig
from icefarm_worker.simulator import Fault, FaultSpec, SimulatedFarm
from tests.integration.conftest import RunningControl
from tests.integration.worker_farm import connected, eventually, fast_config, reserve

ControlUnderTest = RunningControl
BITSTREAM_SIZE = PICO2_ICE_BITSTREAM_BYTES
S = tpb


@contextlib.asynccontextmanager
async def running_control(database_url: str, listen: str = "127.0.0.1:0") -> AsyncIterator[Any]:
    """A control in this process: 0.2 s heartbeats, 30 s to answer a command."""
    config = fast_config(database_url, listen=listen, command_timeout=timedelta(seconds=30))
    app = ControlApp(config)
    port = await app.start()
    try:
        async with connected(f"127.0.0.1:{port}", app) as running:
            yield running
    finally:
        await app.stop()


def worker_config(control_address: str, name: str = "lab-a", **changes: Any) -> WorkerConfig:
    base = WorkerConfig(
        control=(control_address,),
        name=name,
        listen="127.0.0.1:0",
        flash_timeout=10.0,
        test_timeout=5.0,
        ready_timeout=5.0,
        evaluate_timeout=2.0,
        reconnect_max=0.5,
        drain_timeout=30.0,
    )
    return dataclasses.replace(base, **changes)


@contextlib.asynccontextmanager
async def simulated_worker(
    control_address: str,
    root: Path,
    count: int,
    faults: dict[str, Fault | FaultSpec] | None = None,
    *,
    circuit_seconds: float = 0.0,
    **changes: Any,
) -> AsyncIterator[tuple[WorkerApp, SimulatedFarm]]:
    """The real worker on `count` simulated boards (each evaluation taking `circuit_seconds`
    once received); stopped (and the farm with it) at the end."""
    farm = SimulatedFarm(count, root, faults, watchdog=0.5, circuit_seconds=circuit_seconds)
    await farm.start()
    hardware = Hardware(farm.discovery, farm.board, farm.usbip, farm.firmware_paths())
    app = WorkerApp(worker_config(control_address, **changes), hardware)
    await app.start()
    try:
        yield app, farm
    finally:
        await app.stop(grace=0.5)
        await farm.stop()


async def devices(control: RunningControl) -> list[tpb.Device]:
    answer: cpb.ListDevicesResponse = await control.control.ListDevices(  # type: ignore[misc]
        cpb.ListDevicesRequest()
    )
    return list(answer.devices)


async def all_in_state(control: RunningControl, count: int, state: int) -> list[tpb.Device]:
    """Wait until `count` devices are in `state`; the devices."""

    async def check() -> list[tpb.Device] | None:
        found = [d for d in await devices(control) if d.state == state]
        return found if len(found) == count else None

    result: list[tpb.Device] = await eventually(check, timeout=30, what=f"{count} in {state}")
    return result


async def reserve_ready(
    control: RunningControl, client: str, count: int, mode: str = "pulsecount", **fields: Any
) -> rpb.ReserveResponse:
    """Reserve `count` boards in `mode` and wait until all are READY."""
    answer = await reserve(control, client, count=count, mode=mode, **fields)
    ids = [d.id for d in answer.reservation.devices]

    async def ready() -> bool:
        states = {d.id: d.state for d in await devices(control)}
        return all(states[i] == S.DEVICE_STATE_READY for i in ids)

    await eventually(ready, timeout=30, what="boards READY")
    return answer


def bitstream(seed: int) -> bytes:
    """A 104090-byte pseudo-random bitstream, different for each seed."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (BITSTREAM_SIZE // len(block) + 1))[:BITSTREAM_SIZE]


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),)


def worker_stub(app: WorkerApp) -> tuple[grpc.aio.Channel, wpb_grpc.WorkerServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, wpb_grpc.WorkerServiceStub(channel)


async def evaluate(
    stub: wpb_grpc.WorkerServiceAsyncStub, token: str, items: Iterable[wpb.Bitstream]
) -> list[wpb.EvaluateResult]:
    """Stream every bitstream in, collect every result."""

    async def requests() -> AsyncIterator[wpb.EvaluateRequest]:
        for item in items:
            yield wpb.EvaluateRequest(bitstream=item)

    call = stub.Evaluate(requests(), metadata=token_metadata(token))
    return [response.result async for response in call]


def device_ids(answer: rpb.ReserveResponse) -> Sequence[str]:
    return [d.id for d in answer.reservation.devices]
