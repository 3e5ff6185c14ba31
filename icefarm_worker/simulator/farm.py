"""`SimulatedFarm`: N emulated pico2-ice boards under one directory, with the discovery and usbip
back ends the worker would otherwise get from udev and the usbip tools.

    root/dev/ttyICE{i}         the CDC port: a symlink to the pty slave (absent in the bootloader)
    root/drives/RP2350-{i}/    the UF2 drive (only while in the bootloader)
    root/firmware/{name}.uf2   images of the simulated firmwares ("default", "pulsecount", ...)

Boards are driven by the real `SerialBoard` (its drive search pointed at root/drives).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Protocol

from icefarm_worker.hardware.base import (
    ChangeKind,
    DeviceChange,
    DiscoveredDevice,
    HardwareError,
)
from icefarm_worker.hardware.board import SerialBoard
from icefarm_worker.hardware.changes import ChangeFeed
from icefarm_worker.simulator.emulator import BoardEmulator
from icefarm_worker.simulator.faults import Fault, FaultSpec, FaultState
from icefarm_worker.simulator.firmware import FIRMWARES, firmware_image

START_TIMEOUT = 10.0


def port_path(root: Path, index: int) -> Path:
    """Where board `index`'s CDC port appears (a symlink to its pty slave)."""
    return root / "dev" / f"ttyICE{index}"


def drive_path(root: Path, index: int) -> Path:
    """Where board `index`'s UF2 drive appears while it sits in its bootloader (what udev's
    disk of the same USB serial number is on real hardware)."""
    return root / "drives" / f"RP2350-{index}"


def simulated_device(root: Path, prefix: str, index: int) -> DiscoveredDevice:
    """What discovery reports for board `index` of a farm under `root`."""
    return DiscoveredDevice(
        device_id=f"{prefix}-{index:03d}",
        kind="pico2-ice",
        serial_port=str(port_path(root, index)),
        bus_id=f"9-{index + 1}",
        labels={"simulated": "true"},
    )


def simulated_board(root: Path, device: DiscoveredDevice) -> SerialBoard:
    """The real `SerialBoard` for a simulated device, its drive search at `root/drives`."""
    index = _index_of(device)

    def own_drive() -> Path | None:
        return None if index is None else drive_path(root, index)

    return SerialBoard(
        device, drive_search=[root / "drives"], poll_interval=0.01, own_drive=own_drive
    )


def _index_of(device: DiscoveredDevice) -> int | None:
    """Board index from its port's name (`ttyICE{i}`), None for a port not of this farm."""
    match = re.fullmatch(r"ttyICE(\d+)", Path(device.serial_port or "").name)
    return int(match.group(1)) if match else None


class SimulatedDiscovery:
    """The farm's plugged-in boards; plug and unplug arrive as ADD and REMOVE."""

    def __init__(self, farm: SimulatedFarm) -> None:
        self._farm = farm
        self.feed = ChangeFeed()

    async def scan(self) -> list[DiscoveredDevice]:
        """The boards plugged in now."""
        self.feed.forget_backlog()
        return [self._farm.device(device_id) for device_id in self._farm.plugged()]

    def changes(self) -> AsyncIterator[DeviceChange]:
        """ADD on plug, REMOVE on unplug (at once)."""
        return self.feed.subscribe()

    async def close(self) -> None:
        """End every `changes()` iterator."""
        self.feed.close()


class PluggedBusIds(Protocol):
    """Whatever knows which simulated boards are plugged in (the farm, or an attached
    discovery)."""

    def plugged_bus_ids(self) -> set[str]:
        """Bus ids of the boards plugged in now."""
        ...


class SimulatedUsbip:
    """Records bindings instead of running the usbip tools; same contract as `UsbipTools`."""

    def __init__(self, farm: PluggedBusIds, port: int = 3240) -> None:
        self._farm = farm
        self._port = port
        self.started = False
        self.bound: set[str] = set()

    @property
    def port(self) -> int:
        """The TCP port a real usbipd would listen on."""
        return self._port

    async def start(self) -> None:
        """Pretend usbipd is now running."""
        self.started = True

    async def bind(self, bus_id: str) -> None:
        """Export a plugged-in board's bus id."""
        if bus_id not in self._farm.plugged_bus_ids():
            raise HardwareError("usbip-bind", f"no device on bus id {bus_id}")
        self.bound.add(bus_id)

    async def unbind(self, bus_id: str) -> None:
        """Stop exporting; fine when it was not exported."""
        self.bound.discard(bus_id)

    async def exported(self) -> list[str]:
        """Bound bus ids of boards still plugged in."""
        if not self.started:
            raise HardwareError("usbip-list", "usbipd is not running")
        return sorted(self.bound & self._farm.plugged_bus_ids())


class SimulatedFarm:
    """`count` simulated boards with ids `{prefix}-000`, `{prefix}-001`, ... under `root`.

    `circuit_seconds` is how long the evaluating firmwares (pulsecount, varmax) take per
    bitstream once they have received it, as a real board measures for a while."""

    def __init__(
        self,
        count: int,
        root: Path,
        faults: Mapping[str, Fault | FaultSpec] | None = None,
        prefix: str = "sim",
        *,
        watchdog: float = 1.0,
        boot_delay: float = 0.05,
        circuit_seconds: float = 0.0,
    ) -> None:
        self.root = root
        self.prefix = prefix
        self.circuit_seconds = circuit_seconds
        self._ids = [f"{prefix}-{index:03d}" for index in range(count)]
        self._faults = {device_id: FaultState() for device_id in self._ids}
        self._emulators = {
            device_id: BoardEmulator(
                index,
                root,
                self._faults[device_id],
                watchdog=watchdog,
                boot_delay=boot_delay,
                on_unplug=functools.partial(self._unplug_now, device_id),
                circuit_seconds=circuit_seconds,
            )
            for index, device_id in enumerate(self._ids)
        }
        self._devices = {
            device_id: simulated_device(root, prefix, index)
            for index, device_id in enumerate(self._ids)
        }
        for device_id, fault in (faults or {}).items():
            self.inject(device_id, fault)
        self._plugged: set[str] = set()
        self.discovery = SimulatedDiscovery(self)
        self.usbip = SimulatedUsbip(self)

    async def start(self) -> None:
        """Create the directories and firmware images, power every board on and wait for its
        port."""
        for sub in ("dev", "drives", "firmware"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.firmware_paths()
        for device_id in self._ids:
            await self.plug(device_id)

    async def stop(self) -> None:
        """Power every board off and end the discovery feed."""
        for emulator in self._emulators.values():
            await emulator.power_off()
        self._plugged.clear()
        await self.discovery.close()

    def firmware_paths(self) -> dict[str, Path]:
        """Write (if needed) and return the UF2 images of the simulated firmwares, by name."""
        directory = self.root / "firmware"
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in FIRMWARES:
            path = paths[name] = directory / f"{name}.uf2"
            image = firmware_image(name)
            if not path.exists() or path.read_bytes() != image:
                path.write_bytes(image)
        return paths

    def device_ids(self) -> list[str]:
        """Every board's id, plugged or not."""
        return list(self._ids)

    def plugged(self) -> list[str]:
        """Ids of the boards plugged in now."""
        return [device_id for device_id in self._ids if device_id in self._plugged]

    def plugged_bus_ids(self) -> set[str]:
        """Bus ids of the boards plugged in now."""
        return {self._devices[device_id].bus_id or "" for device_id in self._plugged}

    def device(self, device_id: str) -> DiscoveredDevice:
        """What discovery reports for `device_id`."""
        return self._devices[self._known(device_id)]

    def emulator(self, device_id: str) -> BoardEmulator:
        """The emulator behind `device_id` (tests read its state)."""
        return self._emulators[self._known(device_id)]

    def board(self, device: DiscoveredDevice) -> SerialBoard:
        """The real `SerialBoard` for a simulated device."""
        return simulated_board(self.root, device)

    async def plug(self, device_id: str) -> None:
        """Plug the board in: it boots, its port appears, discovery reports ADD."""
        emulator = self.emulator(device_id)
        if device_id in self._plugged:
            return
        emulator.power_on()
        if emulator.firmware is not None:
            await _wait_for_path(emulator.port_path)
        self._plugged.add(device_id)
        self.discovery.feed.publish(DeviceChange(ChangeKind.ADD, self._devices[device_id]))

    async def unplug(self, device_id: str) -> None:
        """Pull the board out: discovery reports REMOVE at once, then port and drive vanish."""
        self._unplug_now(self._known(device_id))
        await self._emulators[device_id].power_off()

    def inject(self, device_id: str, fault: Fault | FaultSpec | None) -> None:
        """Give the board a fault from now on (None clears it); counting starts again."""
        spec = FaultSpec(fault) if isinstance(fault, Fault) else fault
        self._faults[self._known(device_id)].set(spec)

    def on_fault_fired(self, listener: Callable[[str, Fault], None]) -> None:
        """Call `listener(device_id, fault)` whenever a board's fault fires."""
        for device_id, state in self._faults.items():
            state.listener = functools.partial(listener, device_id)

    def _unplug_now(self, device_id: str) -> None:
        if device_id not in self._plugged:
            return
        self._plugged.discard(device_id)
        self.discovery.feed.publish(DeviceChange(ChangeKind.REMOVE, self._devices[device_id]))
        emulator = self._emulators[device_id]
        # Called from inside the emulator for the UNPLUG fault: cancel, do not await ourselves.
        asyncio.get_running_loop().call_soon(_cancel_power, emulator)

    def _known(self, device_id: str) -> str:
        if device_id not in self._emulators:
            raise KeyError(f"no simulated board {device_id!r}")
        return device_id


_pending_power_offs: set[asyncio.Task[None]] = set()


def _cancel_power(emulator: BoardEmulator) -> None:
    task = asyncio.ensure_future(emulator.power_off())
    _pending_power_offs.add(task)
    task.add_done_callback(_pending_power_offs.discard)


async def _wait_for_path(path: Path, timeout: float = START_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not path.exists():  # noqa: ASYNC240 (a cheap stat per poll, bounded by the deadline)
        if loop.time() >= deadline:
            raise HardwareError("serial", f"simulated port {path} did not appear")
        await asyncio.sleep(0.005)
