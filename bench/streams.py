"""How many idle streams one control replica holds with heartbeats flowing: worker sessions
(Register, then a Heartbeat every heartbeat interval) plus client sessions (Hello, then a Ping
every 10 s), stepping up to the target, printing the control's RSS and CPU at each step.

Target: 1,000 workers and 5,000 client sessions with the control under 300 MB RSS.
Usage: python bench/streams.py [--workers 1000] [--clients 5000] [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icefarm.v1 import control_service_pb2 as cpb  # noqa: E402
from icefarm.v1 import control_service_pb2_grpc as cpb_grpc  # noqa: E402
from icefarm.v1 import reservation_service_pb2 as rpb  # noqa: E402
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc  # noqa: E402
from icefarm.v1 import types_pb2  # noqa: E402
from icefarm_control.launch import start_control_process  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
CHANNELS = 64  # streams are multiplexed over this many connections from the bench process
PING_SECONDS = 10.0


def process_figures(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds used so far) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


class Farm:
    def __init__(self, address: str, heartbeat: float) -> None:
        self.channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
        self.heartbeat = heartbeat
        self.tasks: list[asyncio.Task[None]] = []
        self.failures = 0
        self.live = 0

    def channel(self, index: int) -> grpc.aio.Channel:
        return self.channels[index % CHANNELS]

    async def worker(self, index: int, registered: asyncio.Event) -> None:
        stub = cpb_grpc.ControlServiceStub(self.channel(index))
        call = stub.WorkerSession()
        name = f"bench-worker-{index:05d}"
        device = cpb.DeviceUpdate(
            device_id=f"{name}-board", kind="pico2-ice", state=types_pb2.DEVICE_STATE_AVAILABLE
        )
        try:
            await call.write(
                cpb.WorkerSessionRequest(
                    register=cpb.Register(
                        name=name, endpoint="127.0.0.1:1", version="bench", devices=[device]
                    )
                )
            )
            first = await call.read()
            assert first != grpc.aio.EOF and first.WhichOneof("kind") == "registered"
            self.live += 1
            registered.set()
            nonce = 0
            while True:
                await asyncio.sleep(self.heartbeat)
                nonce += 1
                await call.write(cpb.WorkerSessionRequest(heartbeat=cpb.Heartbeat(nonce=nonce)))
        except (grpc.aio.AioRpcError, AssertionError):
            self.failures += 1
            registered.set()

    async def client(self, index: int, opened: asyncio.Event) -> None:
        stub = rpb_grpc.ReservationServiceStub(self.channel(index))
        call = stub.Session(metadata=(("icefarm-client-id", f"bench-client-{index:05d}"),))
        try:
            await call.write(rpb.SessionRequest(hello=rpb.Hello()))
            first = await call.read()
            assert first != grpc.aio.EOF and first.WhichOneof("kind") == "welcome"
            self.live += 1
            opened.set()
            nonce = 0
            while True:
                await asyncio.sleep(PING_SECONDS)
                nonce += 1
                await call.write(rpb.SessionRequest(ping=rpb.Ping(nonce=nonce)))
                await call.read()  # the pong
        except (grpc.aio.AioRpcError, AssertionError):
            self.failures += 1
            opened.set()

    async def add(self, kind: str, start: int, count: int, concurrency: int = 100) -> None:
        """Open `count` streams of one kind, `concurrency` handshakes at a time."""
        for base in range(start, start + count, concurrency):
            ready = []
            for index in range(base, min(base + concurrency, start + count)):
                event = asyncio.Event()
                job = self.worker if kind == "worker" else self.client
                self.tasks.append(asyncio.create_task(job(index, event)))
                ready.append(event.wait())
            await asyncio.wait_for(asyncio.gather(*ready), 120)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


async def measure(address: str, pid: int, workers: int, clients: int, heartbeat: float) -> None:
    farm = Farm(address, heartbeat)
    rss, _ = process_figures(pid)
    print(f"{'workers':>8} {'clients':>8} {'RSS MB':>8} {'CPU % (idle, 10 s)':>19}  failures")
    print(f"{0:>8} {0:>8} {rss:8.1f} {'':>19}  0", flush=True)
    steps = [(min(workers, w), min(clients, c)) for w, c in
             ((250, 0), (1000, 0), (1000, 1000), (1000, 2500), (1000, 5000))]  # fmt: skip
    steps = sorted(set(steps))
    opened_workers = opened_clients = 0
    try:
        for want_workers, want_clients in steps:
            await farm.add("worker", opened_workers, want_workers - opened_workers)
            opened_workers = want_workers
            await farm.add("client", opened_clients, want_clients - opened_clients)
            opened_clients = want_clients
            _, cpu_before = process_figures(pid)
            started = time.monotonic()
            await asyncio.sleep(10)  # a measurement window with heartbeats and pings flowing
            rss, cpu_after = process_figures(pid)
            busy = (cpu_after - cpu_before) / (time.monotonic() - started) * 100
            print(
                f"{opened_workers:>8} {opened_clients:>8} {rss:8.1f} {busy:18.1f}%  "
                f"{farm.failures}",
                flush=True,
            )
    finally:
        await farm.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="worker heartbeat, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg_name = ""
        if args.database == "postgresql":
            pg_name = f"icefarm_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{pg_name}"')
            url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_name}"
        else:
            url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        # As an operator deploys: the schema first, then the control (which then never loads
        # the migration tooling).
        subprocess.run(
            [sys.executable, "-m", "icefarm_control.cli", "db", "upgrade", "--database", url],
            check=True,
            cwd=ROOT,
        )
        process, address = start_control_process(
            url, Path(tmp) / "control.log",
            "--heartbeat-interval", f"{args.heartbeat}s",
        )  # fmt: skip
        try:
            print(f"control on {args.database}, pid {process.pid}")
            asyncio.run(measure(address, process.pid, args.workers, args.clients, args.heartbeat))
        finally:
            process.terminate()
            process.wait(timeout=60)
            if pg_name:
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
