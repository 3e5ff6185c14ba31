"""After a fault the farm serves again within seconds, not after the 30 s offline timeout
(issue 9, defect 5): a killed control restarted on the same database, a restarted
PostgreSQL, a dead replica. Real control processes with the default timers, a real stand-in
worker process, and a Reserve that needs the worker's boards."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import ControlProcess
from tests.integration.recovery import (
    free_port,
    seconds_until_reserved,
    standin_worker,
    start_control,
    stop_control,
)
from tests.pg_cluster import PgCluster, pg_cluster  # noqa: F401 - the fixture

# Well under the offline timeout (30 s), which is what a locked-out worker waits for.
DEADLINE = 12.0
BOARDS = 2


async def test_a_killed_control_restarted_on_its_database_serves_its_workers_boards_again(
    database_url: str,
) -> None:
    port = free_port()
    controls: list[ControlProcess] = [start_control(database_url, port)]
    address = f"127.0.0.1:{port}"
    try:
        async with standin_worker([address], "lab-a", BOARDS):
            assert await seconds_until_reserved([address], BOARDS, 0, 1e9) >= 0
            controls[0].process.kill()  # SIGKILL: no stream is ended, nothing is recorded
            controls[0].process.wait()
            controls.append(start_control(database_url, port))
            loop = asyncio.get_running_loop()
            serving = loop.time()
            took = await seconds_until_reserved([address], BOARDS, serving, DEADLINE)
            assert took < DEADLINE
    finally:
        for control in controls:
            stop_control(control)


@pytest.mark.postgres
async def test_after_postgresql_restarts_the_workers_boards_are_reservable_again(
    pg_cluster: PgCluster,  # noqa: F811
) -> None:
    database_url = pg_cluster.create_database()
    port = free_port()
    control = start_control(database_url, port)
    address = f"127.0.0.1:{port}"
    try:
        async with standin_worker([address], "lab-a", BOARDS):
            assert await seconds_until_reserved([address], BOARDS, 0, 1e9) >= 0
            await asyncio.to_thread(pg_cluster.restart)
            loop = asyncio.get_running_loop()
            back = loop.time()
            took = await seconds_until_reserved([address], BOARDS, back, DEADLINE)
            assert took < DEADLINE
            assert control.process.poll() is None  # the control rode it out
    finally:
        stop_control(control)


@pytest.mark.postgres
async def test_when_a_replica_dies_its_workers_boards_are_served_by_another_within_seconds() -> (
    None
):
    database_url = create_pg_database()
    ports = free_port(), free_port()
    a, b = (start_control(database_url, port) for port in ports)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        async with standin_worker(addresses, "lab-a", BOARDS):  # registers with A first
            assert await seconds_until_reserved(addresses[1:], BOARDS, 0, 1e9) >= 0
            a.process.kill()
            a.process.wait()
            loop = asyncio.get_running_loop()
            killed = loop.time()
            took = await seconds_until_reserved(addresses[1:], BOARDS, killed, DEADLINE)
            assert took < DEADLINE
    finally:
        stop_control(a)
        stop_control(b)
        drop_pg_database(database_url)
