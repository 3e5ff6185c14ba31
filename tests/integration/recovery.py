"""Faults and the time until the farm serves again, shared by tests/integration/
test_worker_faults.py and bench/recovery.py: real control processes, a real stand-in worker
process, and a Reserve that needs the worker's boards, polled with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import grpc

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc
from tests.integration.conftest import ControlProcess, as_client, start_control_process
from tests.integration.worker_farm import REPOSITORY
from tests.pg_cluster import free_port


async def try_reserve(address: str, count: int) -> bool:
    """One Reserve of `count` boards (released again at once); True when it was granted. A
    fresh channel each time: a channel that failed to connect backs off by itself."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reservation_service_pb2_grpc.ReservationServiceStub(channel)
        metadata = as_client("recovery-probe")
        try:
            answer = await stub.Reserve(
                rpb.ReserveRequest(count=count), metadata=metadata, timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Release(
                rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]),
                metadata=metadata,
                timeout=2,
            )
        return True


async def seconds_until_reserved(
    addresses: Sequence[str], count: int, since: float, deadline: float
) -> float:
    """Poll Reserve on each address until one grants `count` boards; seconds from `since`
    (a loop.time()). AssertionError once `deadline` seconds have passed since `since`."""
    loop = asyncio.get_running_loop()
    while True:
        for address in addresses:
            if await try_reserve(address, count):
                return loop.time() - since
        if loop.time() - since > deadline:
            raise AssertionError(f"no Reserve of {count} board(s) within {deadline} s")
        await asyncio.sleep(0.05)


def start_control(database_url: str, port: int, *extra: str) -> ControlProcess:
    """`icefarm-control serve` on a fixed port (so a restart is found at the same address),
    with the default timers (offline timeout 30 s) unless `extra` says otherwise."""
    return start_control_process(database_url, "--listen", f"127.0.0.1:{port}", *extra)


def stop_control(control: ControlProcess) -> None:
    if control.process.poll() is None:
        control.process.kill()
    control.process.wait(timeout=10)
    if control.process.stdout is not None:
        control.process.stdout.close()


@contextlib.asynccontextmanager
async def standin_worker(
    addresses: Sequence[str], name: str, devices: int
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m tests.standin_worker` (registers again, address after address, whenever its
    stream ends); yields once it has registered, stops it at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.standin_worker",
        "--control",
        ",".join(addresses),
        "--name",
        name,
        "--devices",
        str(devices),
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    drain: asyncio.Task[None] | None = None
    try:
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), 15)
            assert line, "the stand-in worker exited before registering"
            if json.loads(line).get("event") == "registered":
                break
        # Keep reading what it prints, so it never blocks on a full pipe.
        drain = asyncio.create_task(_drain(process.stdout))
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


__all__ = [
    "free_port",
    "seconds_until_reserved",
    "standin_worker",
    "start_control",
    "stop_control",
    "try_reserve",
]
