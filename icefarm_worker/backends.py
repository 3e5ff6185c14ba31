"""Which hardware the worker drives: the boards on this host's USB, a simulated farm, or no
boards; plus the devices that are not boards (declared in the config, GPUs found by NVML),
which are added to whichever discovery runs.

All come out as the same `Hardware` (the interfaces of hardware/base.py), so the rest of the
worker cannot tell them apart.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from icefarm_worker.config import ConfigError, WorkerConfig
from icefarm_worker.descriptions import DeviceDescriptions
from icefarm_worker.fleet import BoardFactory
from icefarm_worker.hardware.base import Board, DiscoveredDevice, Discovery, Usbip
from icefarm_worker.hardware.declared import NoBoards, WithDevices
from icefarm_worker.hardware.nvml import find_gpus
from icefarm_worker.modes import MODES
from icefarm_worker.modes.base import Mode

log = structlog.get_logger(__name__)


async def _nothing() -> None:
    return None


@dataclass
class Hardware:
    """Discovery, the board factory, usbip, the firmware files and the modes; `descriptions`
    holds the devices' properties and run-time labels (every DeviceUpdate goes through it)."""

    discovery: Discovery
    make_board: BoardFactory
    usbip: Usbip | None
    firmware: dict[str, Path]
    modes: Mapping[str, type[Mode]] = field(default_factory=lambda: dict(MODES))
    close: Callable[[], Awaitable[None]] = _nothing
    descriptions: DeviceDescriptions = field(default_factory=DeviceDescriptions)


async def open_hardware(config: WorkerConfig) -> Hardware:
    """The boards (`_boards`), with the declared devices and the GPUs added."""
    hardware = await _boards(config)
    return with_devices(hardware, config)


def with_devices(hardware: Hardware, config: WorkerConfig) -> Hardware:
    """`hardware` whose discovery also finds the `[[devices]]` of the config and, unless
    `gpus = "off"`, the GPUs NVML reports; their properties go to `hardware.descriptions`."""
    devices: list[DiscoveredDevice] = []
    for declared in config.devices:
        devices.append(
            DiscoveredDevice(
                declared.device_id, declared.kind, labels=declared.labels, flashable=False
            )
        )
        hardware.descriptions.change(declared.device_id, properties=declared.properties)
    for gpu in find_gpus() if config.gpus == "auto" else []:
        devices.append(gpu.device)
        hardware.descriptions.change(gpu.device.device_id, properties=gpu.properties)
    if devices:
        hardware.discovery = WithDevices(hardware.discovery, devices)
        log.info("devices besides boards", ids=[d.device_id for d in devices])
    return hardware


async def _boards(config: WorkerConfig) -> Hardware:
    """The simulated farm when `config.simulate` > 0, the boards of a simulator process when
    `config.simulate_root` is set, none with `boards = "none"`, else this host's USB boards."""
    if config.simulate:
        return await _simulated(config)
    if config.simulate_root:
        return _attached(config)
    if config.boards == "none":
        return Hardware(NoBoards(), _no_board, None, dict(config.firmware), modes={})
    from icefarm_worker.hardware.board import SerialBoard
    from icefarm_worker.hardware.discovery import UdevDiscovery
    from icefarm_worker.hardware.usbip import UsbipTools

    usbip = UsbipTools()
    try:
        await usbip.start()
    except Exception as exc:  # usbip is optional: boards still evaluate without it
        log.warning("usbip not available; usbip mode disabled", error=str(exc))
        usbip_or_none: Usbip | None = None
    else:
        usbip_or_none = usbip
    modes = dict(MODES)
    if usbip_or_none is None:
        modes.pop("usbip", None)
    return Hardware(UdevDiscovery(), SerialBoard, usbip_or_none, dict(config.firmware), modes)


def _no_board(device: DiscoveredDevice) -> Board:
    raise ConfigError(f"device {device.device_id}: this worker drives no boards (boards = none)")


async def _simulated(config: WorkerConfig) -> Hardware:
    from icefarm_worker.simulator import SimulatedFarm, parse_faults

    try:
        faults = parse_faults(config.simulator_faults)
    except ValueError as exc:
        raise ConfigError(f"simulator.faults: {exc}") from exc
    root = tempfile.TemporaryDirectory(prefix="icefarm-sim-")
    # Named after the worker, so two simulating workers on one control never share an id.
    prefix = f"{config.name}-sim"
    try:
        farm = SimulatedFarm(
            config.simulate,
            Path(root.name),
            faults,
            prefix=prefix,
            circuit_seconds=config.simulate_circuit_time,
        )
    except KeyError as exc:
        root.cleanup()
        last = f"{prefix}-{config.simulate - 1:03d}"
        raise ConfigError(
            f"simulator.faults: {exc.args[0]} (this worker's boards are {prefix}-000 … {last})"
        ) from None
    await farm.start()

    async def close() -> None:
        """Power the simulated boards off and remove their directory."""
        await farm.stop()
        root.cleanup()

    firmware = {**farm.firmware_paths(), **config.firmware}
    log.info("simulating boards", count=config.simulate, root=root.name)
    return Hardware(farm.discovery, farm.board, farm.usbip, firmware, close=close)


def _attached(config: WorkerConfig) -> Hardware:
    from icefarm_worker.simulator.attached import AttachedDiscovery
    from icefarm_worker.simulator.farm import SimulatedUsbip, simulated_board
    from icefarm_worker.simulator.firmware import FIRMWARES

    root = Path(config.simulate_root)
    try:
        discovery = AttachedDiscovery(root)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"simulate_root: no simulator serving in {root} ({exc})") from exc
    firmware = {name: root / "firmware" / f"{name}.uf2" for name in FIRMWARES}
    firmware.update(config.firmware)

    def make_board(device: DiscoveredDevice) -> Board:
        return simulated_board(root, device)

    log.info("attached to simulated boards", root=str(root))
    return Hardware(discovery, make_board, SimulatedUsbip(discovery), firmware)
