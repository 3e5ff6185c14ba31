"""Fixtures that run a real control: in this process on 127.0.0.1:0, or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from icefarm.v1 import control_service_pb2_grpc, reservation_service_pb2_grpc
from icefarm_control.app import ControlApp
from icefarm_control.config import ControlConfig
from icefarm_control.storage.database import Database
from tests.standin_worker import StandinWorker

BIN = Path(sys.executable).parent


def as_client(client_id: str) -> tuple[tuple[str, str], ...]:
    return (("icefarm-client-id", client_id),)


@dataclass
class RunningControl:
    app: ControlApp
    address: str
    channel: grpc.aio.Channel
    reservations: reservation_service_pb2_grpc.ReservationServiceStub
    control: control_service_pb2_grpc.ControlServiceStub

    @property
    def database(self) -> Database:
        return self.app.database


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[RunningControl]:
    """A control replica served in this process on a free loopback port."""
    config = ControlConfig(
        listen="127.0.0.1:0",
        database=database_url,
        shutdown_grace=timedelta(seconds=1),
        log_level="warning",
    )
    app = ControlApp(config)
    port = await app.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield RunningControl(
            app,
            address,
            channel,
            reservation_service_pb2_grpc.ReservationServiceStub(channel),
            control_service_pb2_grpc.ControlServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop()


@dataclass
class ControlProcess:
    process: subprocess.Popen[str]
    address: str
    database_url: str
    log_lines: list[str]


def start_control_process(
    database_url: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 30
) -> ControlProcess:
    """`icefarm-control serve` as a real subprocess; returns once it reports its port."""
    process = subprocess.Popen(
        [
            str(BIN / "icefarm-control"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            database_url,
            "--log-format",
            "json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "control serving":
            return ControlProcess(process, f"127.0.0.1:{record['port']}", database_url, lines)
    process.kill()
    raise AssertionError("control did not start:\n" + "".join(lines))


@pytest.fixture
def control_process_factory() -> Iterator[list[ControlProcess]]:
    started: list[ControlProcess] = []
    yield started
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
        proc.process.wait(timeout=10)
        if proc.process.stdout is not None:
            proc.process.stdout.close()


@pytest.fixture
async def fast(database_url: str) -> AsyncIterator[RunningControl]:
    """A control with fast worker timers (tests/integration/worker_farm.py: FAST)."""
    from tests.integration.worker_farm import fast_control

    async with fast_control(database_url) as control:
        yield control


@pytest.fixture
async def steady(database_url: str) -> AsyncIterator[RunningControl]:
    """Fast command timers but liveness timers long enough that a loaded machine never takes
    a worker offline behind a test's back: for tests whose subject is not liveness."""
    from tests.integration.worker_farm import fast_control

    async with fast_control(
        database_url, offline_timeout=timedelta(seconds=30), worker_grace=timedelta(seconds=60)
    ) as control:
        yield control


@pytest.fixture
async def workers() -> AsyncIterator[list[StandinWorker]]:
    """Stand-in workers started by the test (stopped at the end)."""
    from tests.integration.worker_farm import stand_ins

    async with stand_ins() as started:
        yield started
