"""The worker's memory while an Evaluate stream's reader never reads (issue 9, defect 9).

A control on SQLite, simulated boards in their own process (slow circuits, so results hardly
drain) and a worker attached to them, each a separate process so the worker's RSS is its own.
The client reserves every board, opens one Evaluate stream, writes `--bitstreams` bitstreams
of 104090 bytes as fast as gRPC takes them and reads nothing. Once the writer has sent them all
or has been held back for `--settle` seconds, the worker's RSS growth since before the stream
opened is printed.

Two rows: the worker as configured (`--evaluate-queue-per-board`, default the worker's own)
and, for comparison, a worker whose bound is so large it never applies (what the worker did
before the bound existed).
Usage: python bench/evaluate_backpressure.py [--bitstreams 3000] [--boards 2]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402
from evaluate import bitstream, process_figures, stop, wait_for_line  # noqa: E402

from icefarm.metadata import TOKEN_METADATA_KEY  # noqa: E402
from icefarm.v1 import worker_service_pb2 as wpb  # noqa: E402
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc  # noqa: E402
from icefarm_client.aio import AsyncClient  # noqa: E402
from icefarm_control.launch import start_control_process  # noqa: E402
from icefarm_worker.config import WorkerConfig  # noqa: E402

BIN = Path(sys.executable).parent
UNBOUNDED = 1_000_000


@dataclass
class Row:
    queue_per_board: int
    sent: int
    rss_before: float
    rss_after: float


async def flood(address: str, args: argparse.Namespace, worker_pid: int, bound: int) -> Row:
    """Reserve every board, write bitstreams without reading; the worker's RSS around it."""
    async with AsyncClient(address, client_id="bench-backpressure") as client:
        await client.wait_available(args.boards, "kind=pico2-ice", timeout=timedelta(minutes=2))
        async with client.reserve(args.boards, mode="pulsecount") as farm:
            endpoint = farm.reservation.devices[0].worker_endpoint
            data = bitstream("backpressure")
            sent = 0

            async def requests() -> AsyncIterator[wpb.EvaluateRequest]:
                nonlocal sent
                for index in range(args.bitstreams):
                    yield wpb.EvaluateRequest(bitstream=wpb.Bitstream(id=str(index), data=data))
                    sent += 1

            rss_before, _ = process_figures(worker_pid)
            async with grpc.aio.insecure_channel(endpoint) as channel:
                call = wpb_grpc.WorkerServiceStub(channel).Evaluate(
                    requests(), metadata=((TOKEN_METADATA_KEY, farm.reservation.token),)
                )
                last, since = -1, time.monotonic()
                while sent < args.bitstreams and time.monotonic() - since < args.settle:
                    await asyncio.sleep(0.1)
                    if sent != last:
                        last, since = sent, time.monotonic()
                rss_after, _ = process_figures(worker_pid)
                call.cancel()
    return Row(bound, sent, rss_before, rss_after)


def run(args: argparse.Namespace, bound: int, runner: asyncio.Runner) -> Row:
    with tempfile.TemporaryDirectory(prefix="icefarm-bench-") as tmp:
        root = Path(tmp)
        control, address = start_control_process(
            f"sqlite:///{root / 'control.db'}", root / "control.log"
        )
        processes = [control]
        try:
            log = root / "simulator.log"
            with log.open("wb") as out:
                simulator = subprocess.Popen(
                    [sys.executable, "-m", "icefarm_worker.simulator", "serve",
                     "--count", str(args.boards), "--root", str(root / "farm"),
                     "--circuit-time", str(args.circuit_time)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                )  # fmt: skip
            processes.append(simulator)
            wait_for_line(log, simulator, "simulator serving")
            log = root / "worker.log"
            with log.open("wb") as out:
                worker = subprocess.Popen(
                    [str(BIN / "icefarm-worker"), "run", "--control", address,
                     "--simulate-root", str(root / "farm"), "--name", "bench-backpressure",
                     "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "warning",
                     "--evaluate-timeout", f"{args.circuit_time + 30}s",
                     "--evaluate-queue-per-board", str(bound)],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(worker)
            return runner.run(flood(address, args, worker.pid, bound))
        finally:
            for process in reversed(processes):
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bitstreams", type=int, default=3000, help="bitstreams written")
    parser.add_argument("--boards", type=int, default=2, help="simulated boards reserved")
    parser.add_argument("--circuit-time", type=float, default=30.0, help="seconds per bitstream")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds held back = stalled")
    parser.add_argument(
        "--evaluate-queue-per-board", type=int, default=WorkerConfig.evaluate_queue_per_board
    )
    args = parser.parse_args()
    rows = []
    with asyncio.Runner() as runner:  # one event loop: grpc.aio keeps to the first one
        for bound in (args.evaluate_queue_per_board, UNBOUNDED):
            rows.append(run(args, bound, runner))
    print(f"\n{args.boards} boards, {args.bitstreams} bitstreams written, none of the results read")
    print(f"{'queue/board':>11} {'written':>8} {'RSS before':>10} {'RSS after':>9} "
          f"{'growth':>8} {'per bitstream':>13}")  # fmt: skip
    for row in rows:
        growth = row.rss_after - row.rss_before
        label = "unbounded" if row.queue_per_board == UNBOUNDED else str(row.queue_per_board)
        print(
            f"{label:>11} {row.sent:>8} {row.rss_before:7.0f} MB {row.rss_after:6.0f} MB "
            f"{growth:5.0f} MB {growth * 1024 / max(1, row.sent):10.1f} KB"
        )


if __name__ == "__main__":
    main()
