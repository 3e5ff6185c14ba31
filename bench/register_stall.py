"""The longest stall other writers of a SQLite control see while one worker registers
thousands of boards (issue 9, defect 9: a Register is reconciled in bounded transactions).

    .venv/bin/python bench/register_stall.py [--devices 4000] [--database sqlite|postgresql]

While the Register runs, another task commits a tiny write transaction in a loop (what a
heartbeat or a Reserve needs); the figures are its latencies during the Register.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icefarm.logs import configure_logging
from icefarm_control.domain.clock import SystemClock
from icefarm_control.domain.device_reports import DeviceReport
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits, Timers
from icefarm_control.domain.states import DeviceState
from icefarm_control.domain.tokens import TokenSigner
from icefarm_control.domain.workers import Registration, WorkerRegistry
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade
from tests.conftest import create_pg_database, drop_pg_database


async def measure(url: str, devices: int) -> None:
    db = Database(url)
    await upgrade(db)
    clock = SystemClock()
    engine = ReservationEngine(db, signer=TokenSigner(b"k" * 32), clock=clock)
    registry = WorkerRegistry(db, engine, clock, Timers(), Limits(), engine.replica_id)
    await registry.start_replica()
    reports = tuple(
        DeviceReport(f"big-{i:05d}", kind="pico2-ice", state=DeviceState.AVAILABLE)
        for i in range(devices)
    )
    latencies: list[float] = []
    done = asyncio.Event()

    async def other_writer() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await registry.refresh_replica()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(other_writer())
    started = time.perf_counter()
    session = await registry.register(Registration(name="big", devices=reports))
    registered = time.perf_counter() - started
    started = time.perf_counter()
    await registry.end_session(session)  # and every board goes offline
    offline = time.perf_counter() - started
    done.set()
    await writer
    await db.dispose()
    ms = sorted(x * 1000 for x in latencies)
    print(f"back end            {db.dialect}")
    print(f"devices             {devices}")
    print(f"register took       {registered:.2f} s")
    print(f"offline took        {offline:.2f} s")
    print(f"other writes        {len(ms)}")
    print(f"their median        {statistics.median(ms):.1f} ms")
    print(f"their p99           {ms[int(len(ms) * 0.99) - 1]:.1f} ms")
    print(f"their longest stall {ms[-1]:.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    configure_logging("console", "error")
    if args.database == "postgresql":
        url = create_pg_database()
        try:
            await measure(url, args.devices)
        finally:
            drop_pg_database(url)
        return
    with tempfile.TemporaryDirectory() as directory:
        await measure(f"sqlite+aiosqlite:///{directory}/control.db", args.devices)


if __name__ == "__main__":
    asyncio.run(main())
