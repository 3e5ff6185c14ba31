"""Reserve+release cycles/s and Reserve latency at 1, 8 and 32 concurrent clients, on SQLite
and PostgreSQL, next to the ceiling: a minimal grpc.aio server doing one PostgreSQL
`UPDATE … RETURNING` per call.

Each server runs as its own process; the clients run here, one channel each.
Usage: python bench/reserve_release.py [--seconds 5] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icefarm.v1 import reservation_service_pb2 as pb  # noqa: E402
from icefarm.v1 import reservation_service_pb2_grpc as pb_grpc  # noqa: E402
from icefarm_control.launch import start_control_process  # noqa: E402
from icefarm_control.storage.database import Database  # noqa: E402
from icefarm_control.storage.migrate import upgrade  # noqa: E402
from icefarm_control.storage.testing import seed_farm  # noqa: E402

BIN = Path(sys.executable).parent
BOARDS = 64
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@dataclass
class Figures:
    clients: int
    cycles_per_second: float
    p50_ms: float
    p99_ms: float
    failures: int


async def drive(address: str, clients: int, seconds: float) -> Figures:
    latencies: list[float] = []
    cycles = 0
    failures = 0
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def client(index: int) -> None:
        nonlocal cycles, failures
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ReservationServiceStub(channel)
            metadata = (("icefarm-client-id", f"bench-{index}"),)
            await channel.channel_ready()
            while loop.time() < stop_at:
                started = time.perf_counter()
                try:
                    answer = await stub.Reserve(pb.ReserveRequest(count=1), metadata=metadata)
                except grpc.aio.AioRpcError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - started)
                await stub.Release(
                    pb.ReleaseRequest(reservation_ids=[answer.reservation.id]), metadata=metadata
                )
                cycles += 1

    began = loop.time()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = loop.time() - began
    latencies.sort()
    return Figures(
        clients=clients,
        cycles_per_second=cycles / elapsed,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        failures=failures,
    )


def create_pg_database() -> tuple[str, str]:
    name = f"icefarm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def seed(url: str) -> None:
    database = Database(url)
    await upgrade(database)
    await seed_farm(database, workers=4, boards_per_worker=BOARDS // 4)
    await database.dispose()


def start_ceiling(url: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling_server.py"), url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


def report(label: str, rows: list[Figures]) -> None:
    for f in rows:
        print(
            f"{label:<12} {f.clients:>3} clients  {f.cycles_per_second:8.1f} cycles/s  "
            f"Reserve p50 {f.p50_ms:6.1f} ms  p99 {f.p99_ms:6.1f} ms  failures {f.failures}",
            flush=True,
        )


async def measure(address: str, seconds: float, levels: list[int]) -> list[Figures]:
    await drive(address, 4, min(1.0, seconds))  # warm up connections and caches
    return [await drive(address, n, seconds) for n in levels]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    parser.add_argument("--backends", default="sqlite,postgresql,ceiling")
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    results: dict[str, list[Figures]] = {}
    for backend in args.backends.split(","):
        pg_name = None
        with tempfile.TemporaryDirectory() as tmp:
            if backend == "sqlite":
                url = f"sqlite+aiosqlite:///{tmp}/bench.db"
            else:
                pg_name, url = create_pg_database()
            try:
                if backend == "ceiling":
                    process, address = start_ceiling(url)
                else:
                    asyncio.run(seed(url))
                    process, address = start_control_process(url, Path(tmp) / "control.log")
                try:
                    results[backend] = asyncio.run(measure(address, args.seconds, levels))
                    report(backend, results[backend])
                finally:
                    process.terminate()
                    process.wait(timeout=30)
            finally:
                if pg_name:
                    drop_pg_database(pg_name)
    if "postgresql" in results and "ceiling" in results:
        ours = {f.clients: f for f in results["postgresql"]}
        ceiling = {f.clients: f for f in results["ceiling"]}
        for n in levels:
            share = ours[n].cycles_per_second / ceiling[n].cycles_per_second
            print(f"postgresql at {n} clients: {share:.0%} of the ceiling's cycles/s")


if __name__ == "__main__":
    main()
