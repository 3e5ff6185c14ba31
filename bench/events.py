"""Client feeds: how fast a waiting client hears that boards are free, and how many idle
Sessions one control replica holds.

1. DevicesAvailable latency: from a board becoming available (the state_time the control
   stamps on it in the release transaction, before the commit) to a watching client's
   DevicesAvailable (WatchAvailability with count 1), p50/p99 over the rounds, with 1, 8 and
   32 waiting clients; also from the start of the holder's Release call, and the call itself.
   On one replica (SQLite, then PostgreSQL) and across two replicas on PostgreSQL (the
   Sessions on replica B, the releases through replica A).
2. Idle Sessions: open Sessions step by step up to 5,000 against one replica (SQLite), each
   pinging every 10 s, and print the control process's RSS (VmRSS) and the ping round trip.

Every control runs as its own process on loopback; the clients run here.
Usage: python bench/events.py [--rounds 100] [--sessions 500,1000,2000,5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icefarm.v1 import control_service_pb2 as cpb  # noqa: E402
from icefarm.v1 import control_service_pb2_grpc as cpb_grpc  # noqa: E402
from icefarm.v1 import reservation_service_pb2 as pb  # noqa: E402
from icefarm.v1 import reservation_service_pb2_grpc as pb_grpc  # noqa: E402
from icefarm_control.launch import start_control_process  # noqa: E402
from icefarm_control.storage.database import Database  # noqa: E402
from icefarm_control.storage.migrate import upgrade  # noqa: E402
from icefarm_control.storage.testing import seed_farm  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
HOLDER = (("icefarm-client-id", "holder"),)
PING_SECONDS = 10.0
CHANNELS = 50


def async_stub(channel: grpc.aio.Channel) -> pb_grpc.ReservationServiceAsyncStub:
    """The stub, typed for grpc.aio (the generated class serves both)."""
    stub: pb_grpc.ReservationServiceAsyncStub = pb_grpc.ReservationServiceStub(channel)
    return stub


def board(i: int) -> str:
    return f"board-0-{i:03d}"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


class Session:
    """One client's Session; `read` dispatches pongs and DevicesAvailable to waiters."""

    def __init__(self, stub: pb_grpc.ReservationServiceAsyncStub, client_id: str) -> None:
        self.call = stub.Session(metadata=(("icefarm-client-id", client_id),))
        self.pongs: dict[int, asyncio.Future[float]] = {}
        self.available: dict[str, asyncio.Future[float]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.call.write(pb.SessionRequest(hello=pb.Hello()))
        welcome = await self.call.read()
        assert isinstance(welcome, pb.SessionResponse) and welcome.HasField("welcome"), welcome
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while True:
                message = await self.call.read()
                if not isinstance(message, pb.SessionResponse):
                    return  # the stream ended
                now = time.time()  # wall clock: compared with the control's timestamps
                if message.WhichOneof("kind") == "pong":
                    future = self.pongs.pop(message.pong.nonce, None)
                elif message.event.WhichOneof("kind") == "devices_available":
                    future = self.available.pop(message.event.devices_available.selector, None)
                else:
                    future = None
                if future is not None and not future.done():
                    future.set_result(now)

    async def ping(self, nonce: int) -> float:
        """Round trip in seconds."""
        future = asyncio.get_running_loop().create_future()
        self.pongs[nonce] = future
        started = time.time()
        await self.call.write(pb.SessionRequest(ping=pb.Ping(nonce=nonce)))
        answered: float = await asyncio.wait_for(future, 30)
        return answered - started

    async def watch(self, selector: str) -> asyncio.Future[float]:
        """Watch for one free board; returns when the watch is in place (a ping behind it
        came back), with the future that gets the arrival time of DevicesAvailable."""
        future = asyncio.get_running_loop().create_future()
        self.available[selector] = future
        await self.call.write(pb.SessionRequest(watch=pb.WatchAvailability(selector=selector)))
        await self.ping(random.getrandbits(48))
        return future

    async def unwatch(self, selector: str) -> None:
        await self.call.write(pb.SessionRequest(unwatch=pb.UnwatchAvailability(selector=selector)))

    async def close(self) -> None:
        self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


# ------------------------------------------------------------ DevicesAvailable latency


async def availability_latency(
    session_address: str, release_address: str, clients: int, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """Seconds from each board becoming available (its state_time, stamped by the control in
    the release transaction, before the commit) to each waiting client's DevicesAvailable;
    seconds from the start of each Release call to the same; how long each Release took."""
    async with (
        grpc.aio.insecure_channel(session_address) as session_channel,
        grpc.aio.insecure_channel(release_address) as release_channel,
    ):
        holder = async_stub(release_channel)
        operator = cpb_grpc.ControlServiceStub(release_channel)
        held = []
        for i in range(rounds):
            answer = await holder.Reserve(pb.ReserveRequest(device_ids=[board(i)]), metadata=HOLDER)
            held.append(answer.reservation.id)
        stub = async_stub(session_channel)
        sessions = [Session(stub, f"waiter-{uuid.uuid4().hex[:8]}") for _ in range(clients)]
        await asyncio.gather(*(s.open() for s in sessions))
        latencies: list[float] = []
        from_call: list[float] = []
        releases: list[float] = []
        try:
            for i in range(rounds):
                selector = f"id={board(i)}"
                arrivals = await asyncio.gather(*(s.watch(selector) for s in sessions))
                started = time.time()
                await holder.Release(pb.ReleaseRequest(reservation_ids=[held[i]]), metadata=HOLDER)
                releases.append(time.time() - started)
                device = await operator.GetDevice(cpb.GetDeviceRequest(device_id=board(i)))
                available = device.device.state_time.ToDatetime().timestamp()
                for arrived in await asyncio.wait_for(asyncio.gather(*arrivals), 30):
                    latencies.append(arrived - available)
                    from_call.append(arrived - started)
                await asyncio.gather(*(s.unwatch(selector) for s in sessions))
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
        return latencies, from_call, releases


def report_latency(
    label: str, clients: int, latencies: list[float], from_call: list[float], releases: list[float]
) -> None:
    def ms(values: list[float]) -> str:
        p50, p99 = statistics.median(values) * 1000, percentile(values, 0.99) * 1000
        return f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"

    print(
        f"{label:<24} {clients:>3} waiting  board available → DevicesAvailable {ms(latencies)}"
        f"  ({len(latencies)} samples)  [from the start of the Release call: {ms(from_call)};"
        f" the Release call itself: {ms(releases)}]",
        flush=True,
    )


# ------------------------------------------------------------ idle Sessions


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def idle_sessions(address: str, pid: int, steps: list[int]) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    stubs = [async_stub(c) for c in channels]
    sessions: list[Session] = []
    round_trips: list[float] = []
    stop = asyncio.Event()

    async def keep_pinging(session: Session) -> None:
        await asyncio.sleep(random.uniform(0, PING_SECONDS))  # spread the pings out
        nonce = 0
        while not stop.is_set():
            nonce += 1
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                round_trips.append(await session.ping(nonce))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_SECONDS)

    pingers: list[asyncio.Task[None]] = []
    opening = asyncio.Semaphore(64)

    async def open_one(index: int) -> None:
        async with opening:
            session = Session(stubs[index % CHANNELS], f"idle-{index}")
            await session.open()
            sessions.append(session)
            pingers.append(asyncio.create_task(keep_pinging(session)))

    print(f"{'idle Sessions':<28} RSS before any: {rss_mb(pid):6.1f} MB", flush=True)
    try:
        for target in steps:
            began = time.perf_counter()
            await asyncio.gather(*(open_one(i) for i in range(len(sessions), target)))
            opened = time.perf_counter() - began
            # This process holds every client stream: keep its own GC pauses out of the
            # round trips (the control process is left as it is).
            gc.collect()
            gc.freeze()
            round_trips.clear()
            cpu_before = cpu_seconds(pid)
            await asyncio.sleep(PING_SECONDS + 1)  # one full ping period at this level
            cpu = (cpu_seconds(pid) - cpu_before) / (PING_SECONDS + 1)
            print(
                f"{'idle Sessions':<28} {len(sessions):>5} open (+{opened:5.1f} s to open)  "
                f"control RSS {rss_mb(pid):6.1f} MB  CPU {cpu:4.0%}  ping p50 "
                f"{statistics.median(round_trips) * 1000:6.1f} ms  p99 "
                f"{percentile(round_trips, 0.99) * 1000:6.1f} ms  ({len(round_trips)} pings)",
                flush=True,
            )
    finally:
        stop.set()
        await asyncio.gather(*pingers, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions))
        for channel in channels:
            await channel.close()


# ------------------------------------------------------------ databases and processes


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp}/bench.db"
        return
    name = f"icefarm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def seed(url: str, boards: int) -> None:
    db = Database(url)
    await upgrade(db)
    await seed_farm(db, workers=1, boards_per_worker=boards)
    await db.dispose()


@contextlib.contextmanager
def controls(
    url: str, tmp: Path, count: int
) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for i in range(count):
            started.append(start_control_process(url, tmp / f"control-{i}.log"))
        yield started
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def run_latency(backend: str, replicas: int, levels: list[int], rounds: int) -> None:
    label = f"{backend}, {replicas} replica{'s' if replicas > 1 else ''}"
    for clients in levels:
        with tempfile.TemporaryDirectory() as tmp, database(backend, Path(tmp)) as url:
            asyncio.run(seed(url, rounds))
            with controls(url, Path(tmp), replicas) as running:
                sessions_at, releases_at = running[-1][1], running[0][1]
                latencies, from_call, releases = asyncio.run(
                    availability_latency(sessions_at, releases_at, clients, rounds)
                )
                report_latency(label, clients, latencies, from_call, releases)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100, help="releases per level (≤ 500)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--sessions", default="500,1000,2000,5000")
    parser.add_argument("--skip", default="", help="latency,idle")
    parser.add_argument("--idle-backend", default="sqlite", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    rounds = max(1, min(args.rounds, 500))
    levels = [int(x) for x in args.clients.split(",")]
    if "latency" not in args.skip:
        run_latency("sqlite", 1, levels, rounds)
        run_latency("postgresql", 1, levels, rounds)
        run_latency("postgresql", 2, levels, rounds)
    if "idle" not in args.skip:
        steps = sorted(min(int(x), 5000) for x in args.sessions.split(","))
        with tempfile.TemporaryDirectory() as tmp, database(args.idle_backend, Path(tmp)) as url:
            asyncio.run(seed(url, 1))
            with controls(url, Path(tmp), 1) as running:
                process, address = running[0]
                asyncio.run(idle_sessions(address, process.pid, steps))


if __name__ == "__main__":
    main()
