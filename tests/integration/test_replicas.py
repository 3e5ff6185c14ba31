"""Two control replicas on one PostgreSQL: a worker's stream on replica A, a client's on
replica B. Commands and events cross replicas through the outbox and NOTIFY; when replica A is
SIGKILLed the worker moves to B and nothing is lost or duplicated."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc, types_pb2
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import (
    ControlProcess,
    as_client,
    start_control_process,
)
from tests.integration.session_client import SessionClient
from tests.integration.worker_farm import REPOSITORY, eventually

pytestmark = pytest.mark.postgres

TIMERS = (
    "--heartbeat-interval", "0.3s", "--offline-timeout", "3s", "--worker-grace", "60s",
    "--client-grace", "60s", "--token-key", "a-shared-secret-for-replicas",
)  # fmt: skip


@pytest.fixture
def shared_database() -> AsyncIterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


class WorkerProcess:
    """`python -m tests.standin_worker` with a fail-over list; collects what it prints."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(json.loads(raw))

    def registrations(self) -> list[str]:
        return [line["control"] for line in self.lines if line["event"] == "registered"]

    def commands(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == "command"]

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 10)
        await self.reader


async def test_worker_and_client_on_different_replicas_survive_killing_one(
    shared_database: str, control_process_factory: list[ControlProcess]
) -> None:
    a = start_control_process(shared_database, *TIMERS)
    control_process_factory.append(a)
    b = start_control_process(shared_database, *TIMERS)
    control_process_factory.append(b)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.standin_worker", "--control", f"{a.address},{b.address}",
        "--name", "lab-a", "--devices", "2",
        cwd=REPOSITORY, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    worker = WorkerProcess(process)
    try:
        await eventually(lambda: _true(worker.registrations() == [a.address]), what="register on A")
        async with grpc.aio.insecure_channel(b.address) as channel:
            stub = reservation_service_pb2_grpc.ReservationServiceStub(channel)
            session = await SessionClient.open(stub, "ada")
            free = await eventually(
                lambda: _count(stub), what="the worker's boards to be available on B"
            )
            assert free == 2

            granted = await stub.Reserve(
                rpb.ReserveRequest(count=2, mode="pulsecount"), metadata=as_client("ada")
            )
            # PrepareDevice goes out on A's stream; the worker's READY comes back through A;
            # the client on B hears of it.
            ready = await session.events(2, timeout=15)
            assert {e.WhichOneof("kind") for e in ready} == {"device_ready"}
            assert {e.device_ready.device_id for e in ready} == {
                d.id for d in granted.reservation.devices
            }

            a.process.send_signal(signal.SIGKILL)
            await eventually(
                lambda: _true(worker.registrations()[-1:] == [b.address]),
                timeout=20,
                what="the worker to move to B",
            )
            listed = await stub.ListReservations(
                rpb.ListReservationsRequest(), metadata=as_client("ada")
            )
            (kept,) = listed.reservations
            assert kept.state == types_pb2.RESERVATION_STATE_ACTIVE
            assert len([d for d in kept.devices if not d.released_reason]) == 2

            await stub.Release(
                rpb.ReleaseRequest(reservation_ids=[granted.reservation.id]),
                metadata=as_client("ada"),
            )
            # If the move took longer than the offline timeout, the boards went OFFLINE and
            # came back READY: the holder hears that (device_ready again), which is news, not
            # a duplicate. Whatever came, it came once each, numbered without a gap.
            tail = [await session.next_event(timeout=15)]
            while tail[-1].WhichOneof("kind") == "device_ready":
                tail.append(await session.next_event(timeout=15))
            ended = tail[-1]
            assert ended.WhichOneof("kind") == "reservation_ended"
            assert ended.reservation_ended.reason == types_pb2.END_REASON_RELEASED
            numbers = [e.sequence for e in [*ready, *tail]]
            assert numbers == list(range(1, len(numbers) + 1))
            await eventually(lambda: _count(stub), timeout=15, what="boards back on B")
            session.close()

        # Delivery is at least once (a command sent by A whose answer A never stored goes
        # again from B); the correlation id makes carrying it out exactly once.
        carried_out = [c for c in worker.commands() if not c["repeat"]]
        assert (
            sorted(c["kind"] for c in carried_out)
            == ["prepare_device"] * 2 + ["release_device"] * 2
        )
        assert len({c["id"] for c in carried_out}) == 4
        repeats = [c for c in worker.commands() if c["repeat"]]
        assert {c["id"] for c in repeats} <= {c["id"] for c in carried_out}
    finally:
        await worker.stop()


async def _count(stub: reservation_service_pb2_grpc.ReservationServiceStub) -> int:
    answer = await stub.GetAvailability(rpb.GetAvailabilityRequest())
    return answer.count


async def _true(value: bool) -> bool:
    return value
