"""Helpers for the worker-session tests: a control with second-scale timers, stand-in workers
(in this process or as real processes), and polling instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import control_service_pb2_grpc, reservation_service_pb2_grpc
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2 as tpb
from icefarm_control.app import ControlApp
from icefarm_control.config import ControlConfig
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.models import worker_commands
from tests.integration.conftest import RunningControl, as_client
from tests.standin_worker import StandinWorker

FAST = ControlConfig(
    listen="127.0.0.1:0",
    shutdown_grace=timedelta(seconds=1),
    log_level="warning",
    heartbeat_interval=timedelta(seconds=0.2),
    offline_timeout=timedelta(seconds=1),
    worker_grace=timedelta(seconds=1),
    command_timeout=timedelta(seconds=1),
    handshake_timeout=timedelta(seconds=0.5),
)
# The same timers for `icefarm-control serve` (command timeout left long: kill tests are slow).
FAST_FLAGS = ("--offline-timeout", "1s", "--worker-grace", "1s", "--heartbeat-interval", "0.2s")
REPOSITORY = Path(__file__).resolve().parents[2]


def fast_config(database_url: str, **changes: Any) -> ControlConfig:
    return dataclasses.replace(FAST, database=database_url, **changes)


@contextlib.asynccontextmanager
async def fast_control(database_url: str, **changes: Any) -> AsyncIterator[RunningControl]:
    """A control served in this process with second-scale timers (`changes` to FAST)."""
    app = ControlApp(fast_config(database_url, **changes))
    port = await app.start()
    try:
        async with connected(f"127.0.0.1:{port}", app) as control:
            yield control
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def connected(address: str, app: ControlApp | None = None) -> AsyncIterator[RunningControl]:
    """Stubs for a control at `address` (`app` None: it runs in another process)."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield RunningControl(
            app,  # type: ignore[arg-type]
            address,
            channel,
            reservation_service_pb2_grpc.ReservationServiceStub(channel),
            control_service_pb2_grpc.ControlServiceStub(channel),
        )


@contextlib.asynccontextmanager
async def stand_ins() -> AsyncIterator[list[StandinWorker]]:
    """Stand-in workers a test starts; each is closed at the end."""
    started: list[StandinWorker] = []
    try:
        yield started
    finally:
        for worker in started:
            await worker.close()


async def start_worker(
    control: RunningControl, workers: list[StandinWorker], name: str = "lab-a", **options: Any
) -> StandinWorker:
    worker = StandinWorker(control.address, name, **options)
    workers.append(worker)
    await worker.start()
    return worker


async def start_worker_process(address: str, name: str, devices: int) -> asyncio.subprocess.Process:
    """`python -m tests.standin_worker` as a real process; returns once it has registered."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.standin_worker",
        "--control",
        address,
        "--name",
        name,
        "--devices",
        str(devices),
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        assert line, "the stand-in worker exited before registering"
        if json.loads(line).get("event") == "registered":
            return process


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 10, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy (returned); fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def device(control: RunningControl, device_id: str) -> tpb.Device:
    answer = await control.control.GetDevice(cpb.GetDeviceRequest(device_id=device_id))
    found: tpb.Device = answer.device
    return found


async def state_is(control: RunningControl, device_id: str, state: int) -> bool:
    return (await device(control, device_id)).state == state


async def free_ids(control: RunningControl) -> list[str]:
    answer = await control.reservations.GetAvailability(rpb.GetAvailabilityRequest())
    return list(answer.device_ids)


async def free_are(control: RunningControl, boards: list[str]) -> bool:
    return await free_ids(control) == boards


async def worker_state(control: RunningControl) -> int:
    answer = await control.control.ListWorkers(cpb.ListWorkersRequest())
    state: int = answer.workers[0].state
    return state


async def client_events(database: Database, client: str) -> list[outbox.EventRow]:
    async with database.read() as conn:
        return await outbox.events_after(conn, outbox.client_audience(client), 0)


async def events_of(database: Database, client: str, kind: str) -> list[dict[str, Any]]:
    return [e.payload for e in await client_events(database, client) if e.type == kind]


async def all_commands(conn: AsyncConnection, worker: str) -> list[tuple[str, str]]:
    """(type, correlation id) of every command queued for the worker, in queue order."""
    wc = worker_commands
    rows = await conn.execute(
        select(wc.c.type, wc.c.correlation_id).where(wc.c.worker_name == worker).order_by(wc.c.id)
    )
    return [(r.type, r.correlation_id) for r in rows]


async def reserve(control: RunningControl, client: str, **fields: Any) -> rpb.ReserveResponse:
    answer: rpb.ReserveResponse = await control.reservations.Reserve(
        rpb.ReserveRequest(**fields), metadata=as_client(client)
    )
    return answer


async def release(control: RunningControl, client: str, reservation_id: str) -> None:
    await control.reservations.Release(
        rpb.ReleaseRequest(reservation_ids=[reservation_id]), metadata=as_client(client)
    )
