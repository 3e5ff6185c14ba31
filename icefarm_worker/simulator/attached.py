"""A simulated farm in its own process, and the discovery a worker uses to attach to it.

`serve()` (`python -m icefarm_worker.simulator serve --count N --root DIR`) runs a
`SimulatedFarm` until SIGTERM and writes `root/farm.json` (`prefix`, `count`, `pid`) once every
board is up. A worker started with `--simulate-root DIR` reads that file and finds the boards
with `AttachedDiscovery`, which watches `root/dev` for the `ttyICE{i}` ports; the real
`SerialBoard` flashes them through `root/drives`, as in `--simulate`. The emulators' CPU time is
then the simulator process's, not the worker's.

At run time SIGUSR2 makes `serve()` apply the commands in `root/inject.json`
(`{"seq": N, "commands": [{"device": ID, "fault": NAME, "after", "once", "delay"} |
{"device": ID, "fault": null} | {"device": ID, "action": "unplug" | "plug"}]}`) and then write
`root/inject.done` holding N, so a soak can give a served farm faults while it runs. Every
fault that fires adds `{"device", "fault", "t"}` to `root/fired.jsonl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from icefarm_worker.hardware import flashing
from icefarm_worker.hardware.base import ChangeKind, DeviceChange, DiscoveredDevice
from icefarm_worker.hardware.changes import ChangeFeed
from icefarm_worker.simulator.farm import SimulatedFarm, drive_path, port_path, simulated_device
from icefarm_worker.simulator.faults import Fault, parse_faults
from icefarm_worker.simulator.firmware import DEVICE_TIME

MANIFEST = "farm.json"
DEVICE_TIME_FILE = "device_time.json"
INJECT_FILE = "inject.json"
INJECT_DONE_FILE = "inject.done"
FIRED_FILE = "fired.jsonl"
WATCH_INTERVAL = 0.05


@dataclass(frozen=True)
class Manifest:
    """What a serving simulator says about its farm."""

    prefix: str
    count: int
    pid: int


def read_manifest(root: Path) -> Manifest:
    """`root/farm.json`; OSError or ValueError when no simulator serves there."""
    data = json.loads((root / MANIFEST).read_text())
    return Manifest(str(data["prefix"]), int(data["count"]), int(data["pid"]))


def _write_manifest(root: Path, manifest: Manifest) -> None:
    temporary = root / (MANIFEST + ".new")
    temporary.write_text(json.dumps(manifest.__dict__))
    temporary.replace(root / MANIFEST)


def _write_device_time(root: Path, dump: int) -> None:
    """SIGUSR1: `root/device_time.json` with the boards' busy time so far (numbered dumps)."""
    data = {"dump": dump, **dataclasses.asdict(DEVICE_TIME)}
    temporary = root / (DEVICE_TIME_FILE + ".new")
    temporary.write_text(json.dumps(data))
    temporary.replace(root / DEVICE_TIME_FILE)


async def serve(
    count: int, root: Path, *, prefix: str = "sim", circuit_seconds: float = 0.0
) -> None:
    """Run `count` simulated boards under `root` (an existing directory) until SIGTERM or
    SIGINT; SIGUSR1 writes `root/device_time.json` (how long the boards were busy so far)."""
    farm = SimulatedFarm(count, root, prefix=prefix, circuit_seconds=circuit_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    dumps = itertools.count(1)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _write_device_time(root, next(dumps)))
    injections: set[asyncio.Task[None]] = set()

    def inject() -> None:
        task = asyncio.create_task(_apply_injections(farm, root))
        injections.add(task)
        task.add_done_callback(injections.discard)

    loop.add_signal_handler(signal.SIGUSR2, inject)
    farm.on_fault_fired(functools.partial(_record_firing, root))
    await farm.start()
    try:
        _write_manifest(root, Manifest(prefix, count, os.getpid()))
        print(f"simulator serving {count} boards in {root}", flush=True)
        await stop.wait()
    finally:
        (root / MANIFEST).unlink(missing_ok=True)
        await farm.stop()


def _record_firing(root: Path, device_id: str, fault: Fault) -> None:
    """A line in `root/fired.jsonl` per fault that fired: when the board misbehaved."""
    line = json.dumps({"device": device_id, "fault": fault.value, "t": time.time()})
    with (root / FIRED_FILE).open("a") as out:
        out.write(line + "\n")


async def _apply_injections(farm: SimulatedFarm, root: Path) -> None:
    """SIGUSR2: the faults, unplugs and plugs in `root/inject.json`, then `root/inject.done`.
    A bad command is skipped (printed), the rest still apply: the file is the soak's, not a
    user's, and a served farm must not die of it."""
    try:
        data = json.loads((root / INJECT_FILE).read_text())
        seq, commands = int(data["seq"]), list(data["commands"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"simulator: unreadable {INJECT_FILE}: {exc}", flush=True)
        return
    for command in commands:
        try:
            await _apply_one(farm, command)
        except (KeyError, ValueError, TypeError) as exc:
            print(f"simulator: injection {command!r} skipped: {exc}", flush=True)
    temporary = root / (INJECT_DONE_FILE + ".new")
    temporary.write_text(str(seq))
    temporary.replace(root / INJECT_DONE_FILE)


async def _apply_one(farm: SimulatedFarm, command: dict[str, object]) -> None:
    device = str(command["device"])
    action = command.get("action")
    if action == "unplug":
        await farm.unplug(device)
    elif action == "plug":
        await farm.plug(device)
    elif action is not None:
        raise ValueError(f"unknown action {action!r}")
    elif command.get("fault") is None:
        farm.inject(device, None)
    else:
        spec = {key: value for key, value in command.items() if key != "device"}
        farm.inject(device, parse_faults({device: spec})[device])


class AttachedDiscovery:
    """The boards of a simulator serving in `root`: a port in `root/dev`, or a drive in
    `root/drives` (a board sitting in its bootloader), is a plugged board.

    The port vanishing while this worker flashes the board is hidden (as `UdevDiscovery` does);
    if it is still gone when the flash ends, REMOVE is reported then."""

    def __init__(self, root: Path, interval: float = WATCH_INTERVAL) -> None:
        manifest = read_manifest(root)
        self._root = root
        self._interval = interval
        self._devices = {
            index: simulated_device(root, manifest.prefix, index) for index in range(manifest.count)
        }
        self._present: dict[str, DiscoveredDevice] = {}  # by device id
        self._held: dict[str, DiscoveredDevice] = {}  # by device id: gone while flashing
        self._feed = ChangeFeed()
        self._watch: asyncio.Task[None] | None = None
        self._unsubscribe = flashing.on_flash_end(self._flash_ended)

    async def scan(self) -> list[DiscoveredDevice]:
        """The boards whose port is there now."""
        self._ensure_watch()
        self._feed.forget_backlog()
        self._present = self._plugged_now()
        return list(self._present.values())

    def changes(self) -> AsyncIterator[DeviceChange]:
        """ADD when a port appears, REMOVE when one vanishes (not while this worker flashes)."""
        self._ensure_watch()
        return self._feed.subscribe()

    async def close(self) -> None:
        """Stop watching and end every `changes()` iterator."""
        self._unsubscribe()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._feed.close()

    def plugged_bus_ids(self) -> set[str]:
        """Bus ids of the boards plugged in now (for `SimulatedUsbip`)."""
        return {d.bus_id or "" for d in [*self._present.values(), *self._held.values()]}

    def _plugged_now(self) -> dict[str, DiscoveredDevice]:
        names = set()
        for folder in ("dev", "drives"):
            with contextlib.suppress(FileNotFoundError):
                names.update(os.listdir(self._root / folder))
        return {
            device.device_id: device
            for index, device in self._devices.items()
            if port_path(self._root, index).name in names
            or drive_path(self._root, index).name in names
        }

    def _ensure_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._run_watch(), name="attached discovery")

    async def _run_watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._apply(self._plugged_now())

    def _apply(self, now: dict[str, DiscoveredDevice]) -> None:
        for device_id, device in now.items():
            if device_id in self._present:
                continue
            if self._held.pop(device_id, None) is None:
                self._feed.publish(DeviceChange(ChangeKind.ADD, device))
        for device_id, device in self._present.items():
            if device_id in now:
                continue
            if flashing.is_flashing(device_id):
                self._held[device_id] = device
            else:
                self._feed.publish(DeviceChange(ChangeKind.REMOVE, device))
        self._present = now

    def _flash_ended(self, device_id: str) -> None:
        gone = self._held.pop(device_id, None)
        if gone is None:
            return
        if device_id in self._plugged_now():
            self._present[device_id] = gone  # back before the watch saw it: nothing changed
        else:
            self._feed.publish(DeviceChange(ChangeKind.REMOVE, gone))
