"""Recovery after faults: seconds from the fault until a Reserve that needs the worker's boards
succeeds again (issue 9, defect 5). Real control processes with the default timers (offline
timeout 30 s), a stand-in worker process with 2 boards.

    .venv/bin/python bench/recovery.py [--runs 3] [--case NAME ...]

Cases: control-kill-sqlite, control-kill-postgresql (SIGKILL, then restarted at once on the
same database and port), postgresql-restart (a private cluster, `pg_ctl restart -m fast`; the
control keeps running), replica-death (two replicas on one database, the worker's is
SIGKILLed). "serving" is the seconds from the control (or database) being back to the Reserve.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icefarm.logs import configure_logging
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.recovery import (
    free_port,
    seconds_until_reserved,
    standin_worker,
    start_control,
    stop_control,
)
from tests.pg_cluster import private_cluster

BOARDS = 2
DEADLINE = 60.0
# (seconds from the fault, seconds from serving again)
Figures = tuple[float, float]


async def control_kill(database_url: str) -> Figures:
    port = free_port()
    address = f"127.0.0.1:{port}"
    controls = [start_control(database_url, port)]
    try:
        async with standin_worker([address], "lab-a", BOARDS):
            await seconds_until_reserved([address], BOARDS, time.monotonic(), DEADLINE)
            loop = asyncio.get_running_loop()
            fault = loop.time()
            controls[0].process.kill()
            controls[0].process.wait()
            controls.append(await asyncio.to_thread(start_control, database_url, port))
            serving = loop.time()
            took = await seconds_until_reserved([address], BOARDS, fault, DEADLINE)
            return took, took - (serving - fault)
    finally:
        for control in controls:
            stop_control(control)


async def control_kill_sqlite() -> Figures:
    with tempfile.TemporaryDirectory() as directory:
        return await control_kill(f"sqlite+aiosqlite:///{directory}/control.db")


async def control_kill_postgresql() -> Figures:
    url = create_pg_database()
    try:
        return await control_kill(url)
    finally:
        drop_pg_database(url)


async def postgresql_restart() -> Figures:
    with private_cluster() as cluster:
        port = free_port()
        address = f"127.0.0.1:{port}"
        control = start_control(cluster.create_database(), port)
        try:
            async with standin_worker([address], "lab-a", BOARDS):
                await seconds_until_reserved([address], BOARDS, time.monotonic(), DEADLINE)
                loop = asyncio.get_running_loop()
                fault = loop.time()
                await asyncio.to_thread(cluster.restart)
                back = loop.time()
                took = await seconds_until_reserved([address], BOARDS, fault, DEADLINE)
                return took, took - (back - fault)
        finally:
            stop_control(control)


async def replica_death() -> Figures:
    url = create_pg_database()
    ports = free_port(), free_port()
    addresses = [f"127.0.0.1:{port}" for port in ports]
    a, b = (start_control(url, port) for port in ports)
    try:
        async with standin_worker(addresses, "lab-a", BOARDS):
            await seconds_until_reserved(addresses[1:], BOARDS, time.monotonic(), DEADLINE)
            loop = asyncio.get_running_loop()
            fault = loop.time()
            a.process.kill()
            a.process.wait()
            took = await seconds_until_reserved(addresses[1:], BOARDS, fault, DEADLINE)
            return took, took  # replica B never stopped serving
    finally:
        stop_control(a)
        stop_control(b)
        drop_pg_database(url)


CASES: dict[str, Callable[[], Awaitable[Figures]]] = {
    "control-kill-sqlite": control_kill_sqlite,
    "control-kill-postgresql": control_kill_postgresql,
    "postgresql-restart": postgresql_restart,
    "replica-death": replica_death,
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    args = parser.parse_args()
    configure_logging("console", "error")
    print(f"{'case':26} {'from fault (s)':>26} {'from serving (s)':>26}")
    for name in args.case or list(CASES):
        runs = [await CASES[name]() for _ in range(args.runs)]
        fault = [r[0] for r in runs]
        serving = [r[1] for r in runs]
        print(f"{name:26} {_summary(fault):>26} {_summary(serving):>26}", flush=True)


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):5.2f} max {max(values):5.2f}"


if __name__ == "__main__":
    asyncio.run(main())
