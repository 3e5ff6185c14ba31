"""32 clients looping reserve/release on 64 boards for 10 s: no double allocation, no failure
while enough boards are free (the original iCEFARM fails this)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc
from icefarm_control.storage import queries as q
from icefarm_control.storage.testing import seed_farm
from tests.integration.conftest import RunningControl, as_client

CLIENTS = 32
BOARDS = 64
SECONDS = 10.0


async def test_concurrent_clients_never_share_a_board_and_never_fail_spuriously(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, workers=4, boards_per_worker=BOARDS // 4)
    holders: dict[str, str] = {}
    double_allocations: list[str] = []
    failures: list[str] = []
    cycles = Counter[str]()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + SECONDS

    async def client(name: str, count: int) -> None:
        # One channel per client, as separate experiments would have.
        async with grpc.aio.insecure_channel(control.address) as channel:
            stub = reservation_service_pb2_grpc.ReservationServiceStub(channel)
            metadata = as_client(name)
            while loop.time() < stop_at:
                try:
                    answer = await stub.Reserve(rpb.ReserveRequest(count=count), metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    # At most 48 of 64 boards are ever held: every Reserve must succeed.
                    failures.append(f"{name}: {error.code().name} {error.details()}")
                    continue
                ids = [d.id for d in answer.reservation.devices]
                for device_id in ids:
                    if device_id in holders:
                        double_allocations.append(f"{device_id}: {holders[device_id]} and {name}")
                    holders[device_id] = name
                await asyncio.sleep(random.random() * 0.002)
                # Forget the boards before releasing: someone else may get them at once.
                for device_id in ids:
                    del holders[device_id]
                await stub.Release(
                    rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]), metadata=metadata
                )
                cycles[name] += 1

    await asyncio.gather(*(client(f"client-{i}", 1 + i % 2) for i in range(CLIENTS)))

    assert double_allocations == []
    assert failures == []
    assert all(cycles[f"client-{i}"] > 0 for i in range(CLIENTS)), cycles
    async with control.database.read() as conn:
        assert await q.active_reservation_ids(conn) == []
        devices = await q.list_devices(conn)
    assert all(d.reservation_id is None and d.state == "AVAILABLE" for d in devices)
    print(f"{sum(cycles.values())} reserve/release cycles in {SECONDS:.0f}s")
