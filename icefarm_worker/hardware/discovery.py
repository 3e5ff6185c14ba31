"""Device discovery with pyudev: an initial scan, then netlink events on the event loop.

`device_from_udev` maps one udev record (its property dict) to a `DiscoveredDevice`; it is pure
so the mapping is tested without hardware. `UdevDiscovery` feeds it from `Context.list_devices`
and from a netlink `Monitor` whose socket is watched with `loop.add_reader`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyudev

from icefarm_worker.hardware import flashing
from icefarm_worker.hardware.base import ChangeKind, DeviceChange, DiscoveredDevice, HardwareError
from icefarm_worker.hardware.changes import ChangeFeed

BOARD_KIND = "pico2-ice"
BOARD_VENDORS = frozenset({"2e8a", "1209"})
BOARD_MODELS = ("RP2350", "pico-ice", "Pico")
DATA_INTERFACE = "00"
# The RP2350's (and RP2040's) UF2 bootloader as a USB device: a board sitting in it has no CDC
# port, but the same USB serial number.
BOOTLOADER_IDS = frozenset({("2e8a", "000f"), ("2e8a", "0003")})
BY_ID_PREFIX = "/dev/serial/by-id/"
# "1-1.4:1.0" is interface 0 of configuration 1 on the USB device "1-1.4".
_INTERFACE_COMPONENT = re.compile(r"^(\d+-[\d.]+):\d+\.\d+$")
_USB_DEVICE_COMPONENT = re.compile(r"^\d+-[\d.]+$")


@dataclass(frozen=True)
class GenericMatch:
    """A configured non-board USB device: every udev property in `properties` must match.
    Unless `properties` names a SUBSYSTEM, only whole USB devices (DEVTYPE usb_device) match."""

    kind: str
    properties: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)


def device_from_udev(
    properties: Mapping[str, str], generic: Sequence[GenericMatch] = ()
) -> DiscoveredDevice | None:
    """The device a udev record stands for, or None when it is not one of ours."""
    if properties.get("SUBSYSTEM") == "tty" and _is_board(properties):
        return _board(properties)
    if _is_board_in_bootloader(properties):
        return _board_in_bootloader(properties)
    for match in generic:
        if _matches(properties, match):
            return _generic(properties, match)
    return None


def _is_board(properties: Mapping[str, str]) -> bool:
    vendor = properties.get("ID_VENDOR_ID", "").lower()
    # Case-insensitive, so the pico2-ice's own "pico2-ice" model string matches "Pico".
    model = properties.get("ID_MODEL", "").lower()
    return vendor in BOARD_VENDORS and any(name.lower() in model for name in BOARD_MODELS)


def _is_board_in_bootloader(properties: Mapping[str, str]) -> bool:
    ids = (properties.get("ID_VENDOR_ID", "").lower(), properties.get("ID_MODEL_ID", "").lower())
    whole = properties.get("SUBSYSTEM") == "usb" and properties.get("DEVTYPE") == "usb_device"
    return whole and ids in BOOTLOADER_IDS


def _board_in_bootloader(properties: Mapping[str, str]) -> DiscoveredDevice | None:
    """A board found in its UF2 bootloader (a flash cut short, an empty flash): its port is
    found by serial number once its firmware runs (`SerialBoard`)."""
    serial = properties.get("ID_SERIAL_SHORT")
    if not serial:
        return None
    return DiscoveredDevice(
        device_id=serial,
        kind=BOARD_KIND,
        serial_port=None,
        bus_id=bus_id_from_devpath(properties.get("DEVPATH", "")),
        flashable=True,
    )


def _board(properties: Mapping[str, str]) -> DiscoveredDevice | None:
    serial = properties.get("ID_SERIAL_SHORT")
    if properties.get("ID_USB_INTERFACE_NUM") != DATA_INTERFACE or not serial:
        return None
    return DiscoveredDevice(
        device_id=serial,
        kind=BOARD_KIND,
        serial_port=_stable_port(properties),
        bus_id=bus_id_from_devpath(properties.get("DEVPATH", "")),
        flashable=True,
    )


def _stable_port(properties: Mapping[str, str]) -> str | None:
    # The by-id link names the serial number, so it survives the board re-enumerating as
    # ttyACM1 after a flash; DEVNAME does not.
    for link in properties.get("DEVLINKS", "").split():
        if link.startswith(BY_ID_PREFIX):
            return link
    return properties.get("DEVNAME") or None


def _matches(properties: Mapping[str, str], match: GenericMatch) -> bool:
    if "SUBSYSTEM" not in match.properties and (
        properties.get("SUBSYSTEM") != "usb" or properties.get("DEVTYPE") != "usb_device"
    ):
        return False
    return all(properties.get(key) == value for key, value in match.properties.items())


def _generic(properties: Mapping[str, str], match: GenericMatch) -> DiscoveredDevice:
    bus_id = bus_id_from_devpath(properties.get("DEVPATH", ""))
    device_id = (
        properties.get("ID_SERIAL_SHORT")
        or properties.get("ID_SERIAL")
        or f"{match.kind}-{bus_id or properties.get('DEVPATH', '?')}"
    )
    return DiscoveredDevice(
        device_id=device_id,
        kind=match.kind,
        serial_port=None,
        bus_id=bus_id,
        labels=dict(match.labels),
        flashable=False,
    )


def bus_id_from_devpath(devpath: str) -> str | None:
    """The USB bus id ("1-1.4") of the device a sysfs DEVPATH belongs to."""
    components = [part for part in devpath.split("/") if part]
    for part in components:
        interface = _INTERFACE_COMPONENT.match(part)
        if interface:
            return interface.group(1)
    usb_devices = [part for part in components if _USB_DEVICE_COMPONENT.match(part)]
    return usb_devices[-1] if usb_devices else None


class UdevDiscovery:
    """pico2-ice boards and configured USB devices on this host, as udev sees them."""

    def __init__(self, generic: Sequence[GenericMatch] = (), context: Any = None) -> None:
        self._generic = list(generic)
        self._context: Any = context
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feed = ChangeFeed()
        self._known: dict[str, DiscoveredDevice] = {}  # by DEVPATH
        self._held: dict[str, DiscoveredDevice] = {}  # by device id: gone while flashing
        self._unsubscribe = flashing.on_flash_end(self._flash_ended)

    async def scan(self) -> list[DiscoveredDevice]:
        """Every matching device present now (the monitor starts first, so none is missed)."""
        self._ensure_monitor()
        self._feed.forget_backlog()
        found: dict[str, DiscoveredDevice] = {}
        for subsystem in ("tty", "usb"):
            for udev_device in self._context.list_devices(subsystem=subsystem):
                properties = {str(k): str(v) for k, v in udev_device.properties.items()}
                device = device_from_udev(properties, self._generic)
                if device is not None:
                    self._known[properties.get("DEVPATH", device.device_id)] = device
                    found[device.device_id] = device
        return list(found.values())

    def changes(self) -> AsyncIterator[DeviceChange]:
        """Add/remove events from now on; an unplug arrives as REMOVE at once."""
        self._ensure_monitor()
        return self._feed.subscribe()

    async def close(self) -> None:
        """Stop watching udev and end every `changes()` iterator."""
        self._unsubscribe()
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        self._monitor = None
        self._feed.close()

    def handle_event(self, action: str, properties: Mapping[str, str]) -> None:
        """Apply one udev event (called by the monitor; tests call it with recorded records)."""
        devpath = properties.get("DEVPATH", "")
        if action == "add":
            device = device_from_udev(properties, self._generic)
            if device is None or devpath in self._known:
                return
            self._known[devpath] = device
            if self._held.pop(device.device_id, None) is not None:
                return  # The board came back from its bootloader: nothing changed for anyone.
            self._feed.publish(DeviceChange(ChangeKind.ADD, device))
        elif action == "remove":
            gone = self._known.pop(devpath, None)
            if gone is None:
                return
            if gone.flashable and flashing.is_flashing(gone.device_id):
                self._held[gone.device_id] = gone
                return
            self._feed.publish(DeviceChange(ChangeKind.REMOVE, gone))

    def _flash_ended(self, device_id: str) -> None:
        gone = self._held.pop(device_id, None)
        if gone is not None:
            self._feed.publish(DeviceChange(ChangeKind.REMOVE, gone))

    def _ensure_monitor(self) -> None:
        if self._monitor is not None:
            return
        try:
            if self._context is None:
                self._context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(self._context)
            monitor.filter_by("tty")
            monitor.filter_by("usb")
            monitor.start()
        except (OSError, ImportError) as exc:
            raise HardwareError("discovery", f"cannot watch udev: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(monitor.fileno(), self._drain_monitor)
        self._monitor = monitor

    def _drain_monitor(self) -> None:
        while self._monitor is not None:
            udev_device = self._monitor.poll(timeout=0)
            if udev_device is None:
                return
            properties = {str(k): str(v) for k, v in udev_device.properties.items()}
            self.handle_event(str(udev_device.action), properties)
