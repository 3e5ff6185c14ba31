"""Wall time per bitstream per board, and the worker's CPU and RSS, with simulated boards whose
circuit takes `--circuit-time` seconds per bitstream.

For each board count: a control on SQLite in a temporary directory, the simulated boards in
their own process (`python -m icefarm_worker.simulator serve`, so the emulators' CPU is not the
worker's), and a worker attached to them (`--simulate-root`). The client library reserves every
board in pulsecount mode and evaluates `--per-board` bitstreams per board (`in_flight` per
board queued, so the boards, not the client, set the pace); every result is checked against
the simulator's expected pulse count.

Columns: `s/bitstream` = wall time from the first submission to the last result * boards /
bitstreams; `overhead` = its excess over the circuit time; `device s` = the boards' own time
per bitstream, as the simulator measured it (from the first bytes of a bitstream received to
its answer sent: the transfer over the port and the circuit); `worker adds` = the excess of
`s/bitstream` over `device s` (the time boards sat idle for want of the worker, plus the start
of the run); `board run s` = the mean time the
worker spent per bitstream at a board (its `run_duration`); `1st wave s` = when every board had
answered once (the ramp: the client's first bitstreams crossing gRPC); CPU = % of one core
over the evaluation (utime + stime from /proc), RSS = the worker's VmRSS after it.

Target: the worker adds under 3% to the device's own time per bitstream (the original iCEFARM
published 1.87 s per 1 s circuit), and 64 boards fit in one worker under 50% of one core.
Usage: python bench/evaluate.py [--boards 8,64] [--circuit-time 1.0] [--per-board 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from icefarm_client.aio import AsyncClient  # noqa: E402
from icefarm_control.launch import start_control_process  # noqa: E402
from icefarm_worker.modes.protocol import BITSTREAM_SIZE  # noqa: E402
from icefarm_worker.simulator.firmware import expected_pulse_count  # noqa: E402

BIN = Path(sys.executable).parent
START_TIMEOUT = 120.0


def process_figures(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds used so far) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def bitstream(seed: str) -> bytes:
    """A deterministic pseudo-random 104090-byte bitstream."""
    out = bytearray()
    counter = 0
    while len(out) < BITSTREAM_SIZE:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:BITSTREAM_SIZE])


@dataclass
class Round:
    boards: int
    bitstreams: int
    elapsed: float
    run_mean: float
    first_wave: float
    worker_cpu: float
    simulator_cpu: float
    worker_rss: float
    wrong: int
    # The boards' own time per bitstream (transfer + circuit), from the simulator.
    device_seconds: float


def wait_for_line(log: Path, process: subprocess.Popen[bytes], accept: str) -> dict[str, object]:
    """The first JSON (or plain) line of `log` containing `accept`, or RuntimeError."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if accept in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    return {}
                return record if isinstance(record, dict) else {}
        time.sleep(0.05)
    raise RuntimeError(f"{accept!r} did not appear; see {log}")


def device_time(root: Path, simulator: int, after: int) -> tuple[int, int, float]:
    """Ask the simulator for its boards' busy time (SIGUSR1) and wait for that dump:
    (dump number, evaluations, busy seconds)."""
    os.kill(simulator, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data = json.loads((root / "device_time.json").read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("dump", 0) > after:
            return int(data["dump"]), int(data["evaluations"]), float(data["busy_seconds"])
        time.sleep(0.01)
    raise RuntimeError("the simulator did not report its device time")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def evaluate(
    address: str, boards: int, args: argparse.Namespace, worker: int, simulator: int, root: Path
) -> list[Round]:
    rounds = []
    dump = 0
    async with AsyncClient(address, client_id="bench-evaluate") as client:
        await client.wait_available(
            boards, "kind=pico2-ice", timeout=timedelta(seconds=START_TIMEOUT)
        )
        async with client.reserve(boards, mode="pulsecount") as farm:
            for number in range(args.rounds):
                count = args.per_board * boards
                items = {f"{boards}-{number}-{i}": bitstream(f"{boards}/{number}/{i}")
                         for i in range(count)}  # fmt: skip
                _, worker_before = process_figures(worker)
                _, simulator_before = process_figures(simulator)
                dump, evaluations_before, busy_before = device_time(root, simulator, dump)
                started = time.monotonic()
                wrong = 0
                runs = []
                first: dict[str, float] = {}
                async for result in farm.evaluate(items.items(), in_flight=args.in_flight):
                    first.setdefault(result.device_id, time.monotonic() - started)
                    runs.append(result.run_duration.total_seconds())
                    if result.pulse_count != expected_pulse_count(items[result.bitstream_id]):
                        wrong += 1
                elapsed = time.monotonic() - started
                rss, worker_after = process_figures(worker)
                _, simulator_after = process_figures(simulator)
                dump, evaluations, busy = device_time(root, simulator, dump)
                device_seconds = (busy - busy_before) / max(1, evaluations - evaluations_before)
                rounds.append(
                    Round(
                        boards, count, elapsed, statistics.fmean(runs), max(first.values()),
                        (worker_after - worker_before) / elapsed * 100,
                        (simulator_after - simulator_before) / elapsed * 100,
                        rss, wrong + count - len(runs), device_seconds,
                    )
                )  # fmt: skip
    return rounds


def run(boards: int, args: argparse.Namespace, runner: asyncio.Runner) -> list[Round]:
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
                     "--count", str(boards), "--root", str(root / "farm"),
                     "--circuit-time", str(args.circuit_time)],
                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                )  # fmt: skip
            processes.append(simulator)
            wait_for_line(log, simulator, "simulator serving")
            log = root / "worker.log"
            with log.open("wb") as out:
                worker = subprocess.Popen(
                    [str(BIN / "icefarm-worker"), "run", "--control", address,
                     "--simulate-root", str(root / "farm"), "--name", f"bench-{boards}",
                     "--listen", "127.0.0.1:0", "--log-format", "json",
                     "--log-level", args.log_level],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(worker)
            wait_for_line(log, worker, "worker serving")
            rss, _ = process_figures(worker.pid)
            print(f"{boards} boards: worker pid {worker.pid} ({rss:.0f} MB RSS at start), "
                  f"simulator pid {simulator.pid}", flush=True)  # fmt: skip
            return runner.run(
                evaluate(address, boards, args, worker.pid, simulator.pid, root / "farm")
            )
        finally:
            for process in reversed(processes):
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boards", default="8,64", help="board counts, comma-separated")
    parser.add_argument("--circuit-time", type=float, default=1.0, help="seconds per bitstream")
    parser.add_argument("--per-board", type=int, default=10, help="bitstreams per board")
    parser.add_argument("--rounds", type=int, default=2, help="evaluations per board count")
    parser.add_argument("--in-flight", type=int, default=2, help="bitstreams queued per board")
    parser.add_argument("--log-level", default="info", help="the worker's log level")
    args = parser.parse_args()
    circuit = args.circuit_time
    header = (
        f"{'boards':>6} {'round':>5} {'bitstreams':>10} {'wall s':>7} {'s/bitstream':>11} "
        f"{'overhead':>8} {'device s':>8} {'worker adds':>11} {'board run s':>11} "
        f"{'1st wave s':>10} {'worker CPU':>10} "
        f"{'worker RSS':>10} "
        f"{'sim CPU':>8} {'wrong':>5}"
    )
    results: list[Round] = []
    with asyncio.Runner() as runner:  # one event loop: grpc.aio keeps to the first one
        for boards in (int(b) for b in args.boards.split(",")):
            results += run(boards, args, runner)
    print(f"\ncircuit time {circuit:g} s, {args.per_board} bitstreams per board, "
          f"in_flight {args.in_flight}; CPU is % of one core over the evaluation")  # fmt: skip
    print(header)
    seen: dict[int, int] = {}
    for r in results:
        seen[r.boards] = seen.get(r.boards, 0) + 1
        per_bitstream = r.elapsed * r.boards / r.bitstreams
        overhead = (per_bitstream - circuit) / circuit * 100 if circuit else float("nan")
        adds = (per_bitstream - r.device_seconds) / r.device_seconds * 100
        print(
            f"{r.boards:>6} {seen[r.boards]:>5} {r.bitstreams:>10} {r.elapsed:7.2f} "
            f"{per_bitstream:11.3f} {overhead:7.2f}% {r.device_seconds:8.3f} {adds:10.2f}% "
            f"{r.run_mean:11.3f} {r.first_wave:10.3f} "
            f"{r.worker_cpu:9.1f}% "
            f"{r.worker_rss:7.0f} MB {r.simulator_cpu:7.1f}% {r.wrong:>5}"
        )
    if any(r.wrong for r in results):
        sys.exit("some results were wrong or missing")


if __name__ == "__main__":
    main()
