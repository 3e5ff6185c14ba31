"""One soak run: start the farm, run the clients and the fault injector for the given time,
let the farm settle, judge every invariant, and build the report (tests/soak/report.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icefarm_control.storage.database import Database
from icefarm_worker.simulator.attached import FIRED_FILE
from tests.soak import netns
from tests.soak.checks import Seen, check_reservations, check_results, check_rss, check_sequences
from tests.soak.farm import Farm, Sizes
from tests.soak.faults import FaultRecord, Injector
from tests.soak.monitor import Break, Monitor

# After the last fault every healthy plugged-in board must be AVAILABLE within this.
SETTLE = 60.0
CLIENT_EXIT = 60.0


@dataclass
class Options:
    seconds: float
    seed: int
    backend: str = "postgresql"
    sizes: Sizes = field(default_factory=Sizes)
    gap: tuple[float, float] = (2.0, 8.0)
    keep: bool = False


@dataclass
class Outcome:
    options: Options
    network_cut: str
    records: list[FaultRecord]
    seen: Seen
    monitor: Monitor
    breaks: dict[str, list[Break]]
    reservations: list[dict[str, object]]
    rss_peak: dict[str, int]
    wall: float
    root: Path
    # What the simulators recorded of each fault that fired ({"device", "fault", "t"}).
    firings: list[dict[str, Any]] = field(default_factory=list)


async def soak(options: Options) -> Outcome:
    use_netns = netns.available()
    root = Path(tempfile.mkdtemp(prefix="icefarm-soak-"))
    farm = Farm(root, options.backend, options.sizes, options.seed, use_netns)
    started = time.time()
    try:
        await asyncio.to_thread(farm.start)
        return await _run(farm, options, started)
    finally:
        await asyncio.to_thread(farm.close)
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)


async def _run(farm: Farm, options: Options, started: float) -> Outcome:
    database = Database(farm.database_url)
    monitor = Monitor(farm, database)
    stop = asyncio.Event()
    watch = asyncio.create_task(monitor.run(stop))
    try:
        await _wait_all_available(farm, monitor, 60.0)
        until = time.time() + options.seconds
        farm.until = until + 30
        for index in range(options.sizes.clients):
            await asyncio.to_thread(farm.start_client, index)
        injector = Injector(farm, monitor, random.Random(options.seed), bool(farm.namespaces))
        await injector.run(until, options.gap)
        monitor.note("faults over; clients asked to stop")
        await _stop_clients(farm)
        last_fault = injector.last_fault_end or time.time()
        settle_breaks = await _settle(farm, monitor, last_fault)
        await monitor.check_once()
        stop.set()
        await watch
        reservations = await monitor.reservations()
        _write_story(farm, monitor, injector.records)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await watch
        await database.dispose()
    seen = Seen.read(farm.root / "clients", _kill_lives(injector.records, farm))
    rss_breaks, peak = check_rss(monitor.rss)
    breaks = {
        "no board held by two reservations (and the database's other invariants; no process "
        "exited that the soak did not end)": monitor.breaks,
        "every bitstream got exactly one result (value matches, or a failure with a reason)": (
            check_results(seen)
        ),
        "every reservation ended exactly once, with the reason that happened; "
        "nobody told nothing held while something was": check_reservations(seen, reservations),
        "every healthy plugged-in board AVAILABLE within 60 s of the last fault": settle_breaks,
        "no Session event lost or duplicated": check_sequences(seen),
        "control and worker memory does not grow": rss_breaks,
    }
    return Outcome(
        options,
        "ip netns (link down)" if farm.namespaces else "SIGSTOP (ip netns not allowed here)",
        injector.records,
        seen,
        monitor,
        breaks,
        reservations,
        peak,
        time.time() - started,
        farm.root,
        _firings(farm),
    )


def _firings(farm: Farm) -> list[dict[str, Any]]:
    """Every simulator's `fired.jsonl`: when each injected board fault actually fired."""
    found: list[dict[str, Any]] = []
    for index in range(farm.sizes.workers):
        path = farm.sim_root(index) / FIRED_FILE
        if path.exists():
            found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


def _kill_lives(records: list[FaultRecord], farm: Farm) -> dict[tuple[int, int], float]:
    """(client index, the life that was killed) → when (targets are soak-INDEX-LIFE)."""
    killed: dict[tuple[int, int], float] = {}
    for record in records:
        if record.kind != "client-kill" or not record.target:
            continue
        _, index, life = record.target.split("-")
        killed[(int(index), int(life))] = record.t
    return killed


async def _wait_all_available(farm: Farm, monitor: Monitor, timeout: float) -> None:
    boards = set(farm.all_boards())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(monitor.state_at(b) == "AVAILABLE" for b in boards):
            return
        await asyncio.sleep(0.2)
    missing = sorted(b for b in boards if monitor.state_at(b) != "AVAILABLE")
    raise TimeoutError(f"boards not AVAILABLE at start: {missing[:8]}")


async def _stop_clients(farm: Farm) -> None:
    farm.stop_file.touch()
    deadline = time.monotonic() + CLIENT_EXIT
    # Polling exit statuses: a process's exit is not an asyncio event here.
    while time.monotonic() < deadline and any(p.alive() for p in farm.clients.values()):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    for proc in farm.clients.values():
        if proc.alive():
            await asyncio.to_thread(farm.kill, proc)


async def _settle(farm: Farm, monitor: Monitor, last_fault: float) -> list[Break]:
    """Every board AVAILABLE again within SETTLE of the last fault (all are plugged in and
    healthy by then: board faults fire once, unplugged boards were plugged back)."""
    boards = set(farm.all_boards())
    while time.time() - last_fault < SETTLE:
        if all(monitor.state_at(b) == "AVAILABLE" for b in boards):
            return []
        await asyncio.sleep(0.5)
    stuck = sorted(b for b in boards if monitor.state_at(b) != "AVAILABLE")
    named = ", ".join(f"{b}={monitor.state_at(b)}" for b in stuck[:10])
    detail = f"{len(stuck)} board(s) not AVAILABLE: {named}"
    return [
        Break(
            time.time(),
            "board not AVAILABLE 60 s after the last fault",
            detail,
            devices=tuple(stuck[:10]),
        )
    ]


def _write_story(farm: Farm, monitor: Monitor, records: list[FaultRecord]) -> None:
    """The faults, the soak's notes and every board state change, kept with the logs."""
    story = {
        "faults": [dataclasses.asdict(r) for r in records],
        "notes": monitor.notes,
        "board_states": monitor.changes,
    }
    (farm.root / "story.json").write_text(json.dumps(story, default=str))
