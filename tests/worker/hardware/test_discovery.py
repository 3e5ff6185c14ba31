"""udev records map to devices; unplugs are REMOVE at once; a board's own reflash is not."""

from __future__ import annotations

import pytest

from icefarm_worker.hardware import flashing
from icefarm_worker.hardware.base import ChangeKind, DeviceChange
from icefarm_worker.hardware.discovery import (
    GenericMatch,
    UdevDiscovery,
    bus_id_from_devpath,
    device_from_udev,
)
from icefarm_worker.simulator import SimulatedFarm

TTY_DEVPATH = "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.4/1-1.4:1.0/tty/ttyACM0"
BOARD_TTY = {
    "SUBSYSTEM": "tty",
    "DEVPATH": TTY_DEVPATH,
    "DEVNAME": "/dev/ttyACM0",
    "DEVLINKS": "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.4:1.0 "
    "/dev/serial/by-id/usb-tinyVision.ai_pico2-ice_DE6280E4-if00",
    "ID_VENDOR_ID": "2e8a",
    "ID_MODEL": "pico2-ice",
    "ID_SERIAL_SHORT": "DE6280E4",
    "ID_USB_INTERFACE_NUM": "00",
}
BOOT_DEVPATH = "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.4"
# The same board in its UF2 bootloader: a whole USB device, 2e8a:000f, the same serial number.
BOARD_IN_BOOTLOADER = {
    "SUBSYSTEM": "usb",
    "DEVTYPE": "usb_device",
    "DEVPATH": BOOT_DEVPATH,
    "ID_VENDOR_ID": "2e8a",
    "ID_MODEL_ID": "000f",
    "ID_MODEL": "RP2350_Boot",
    "ID_SERIAL_SHORT": "DE6280E4",
}
ANALYZER = {
    "SUBSYSTEM": "usb",
    "DEVTYPE": "usb_device",
    "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb1/1-2",
    "ID_VENDOR_ID": "0925",
    "ID_MODEL_ID": "3881",
    "ID_SERIAL_SHORT": "LA-7",
}
ANALYZER_MATCH = GenericMatch("logic-analyzer", {"ID_VENDOR_ID": "0925", "ID_MODEL_ID": "3881"})


def test_a_board_data_port_maps_to_a_flashable_pico2_ice() -> None:
    device = device_from_udev(BOARD_TTY)
    assert device is not None
    assert (device.device_id, device.kind, device.bus_id, device.flashable) == (
        "DE6280E4",
        "pico2-ice",
        "1-1.4",
        True,
    )
    assert device.serial_port == "/dev/serial/by-id/usb-tinyVision.ai_pico2-ice_DE6280E4-if00"


def test_a_board_sitting_in_its_bootloader_is_the_same_board_without_a_port() -> None:
    device = device_from_udev(BOARD_IN_BOOTLOADER)
    assert device is not None
    assert (device.device_id, device.kind, device.bus_id, device.flashable) == (
        "DE6280E4",
        "pico2-ice",
        "1-1.4",
        True,
    )
    assert device.serial_port is None
    # Its interfaces, another vendor's device with that product id, no serial: not boards.
    assert device_from_udev({**BOARD_IN_BOOTLOADER, "DEVTYPE": "usb_interface"}) is None
    assert device_from_udev({**BOARD_IN_BOOTLOADER, "ID_VENDOR_ID": "0403"}) is None
    assert device_from_udev({**BOARD_IN_BOOTLOADER, "ID_SERIAL_SHORT": ""}) is None


async def test_a_board_whose_flash_did_not_boot_stays_a_board_in_its_bootloader() -> None:
    discovery = UdevDiscovery()
    discovery.handle_event("add", BOARD_TTY)
    with flashing.flashing("DE6280E4"):  # a flash: port gone, bootloader up and gone, port back
        discovery.handle_event("remove", {"SUBSYSTEM": "tty", "DEVPATH": TTY_DEVPATH})
        discovery.handle_event("add", BOARD_IN_BOOTLOADER)
        discovery.handle_event("remove", {"SUBSYSTEM": "usb", "DEVPATH": BOOT_DEVPATH})
        discovery.handle_event("add", BOARD_TTY)
    with flashing.flashing("DE6280E4"):  # a flash that did not boot: it stays in its bootloader
        discovery.handle_event("remove", {"SUBSYSTEM": "tty", "DEVPATH": TTY_DEVPATH})
        discovery.handle_event("add", BOARD_IN_BOOTLOADER)
    changes = await collected(discovery)
    assert [c.kind for c in changes] == [ChangeKind.ADD]  # plugged in all along


async def test_a_board_plugged_in_sitting_in_its_bootloader_is_added_and_removed() -> None:
    discovery = UdevDiscovery()
    discovery.handle_event("add", BOARD_IN_BOOTLOADER)
    discovery.handle_event("remove", {"SUBSYSTEM": "usb", "DEVPATH": BOOT_DEVPATH})
    changes = await collected(discovery)
    assert [(c.kind, c.device.device_id) for c in changes] == [
        (ChangeKind.ADD, "DE6280E4"),
        (ChangeKind.REMOVE, "DE6280E4"),
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"ID_USB_INTERFACE_NUM": "02"},
        {"ID_VENDOR_ID": "0403"},
        {"ID_MODEL": "FT232R"},
        {"ID_SERIAL_SHORT": ""},
    ],
)
def test_other_ports_and_devices_are_not_boards(change: dict[str, str]) -> None:
    assert device_from_udev({**BOARD_TTY, **change}) is None


@pytest.mark.parametrize("model", ["RP2350", "pico-ice", "Pico"])
def test_any_board_model_name_matches(model: str) -> None:
    device = device_from_udev({**BOARD_TTY, "ID_MODEL": model, "ID_VENDOR_ID": "1209"})
    assert device is not None and device.kind == "pico2-ice"


def test_a_generic_device_needs_every_configured_property() -> None:
    device = device_from_udev(ANALYZER, [ANALYZER_MATCH])
    assert device is not None
    assert (device.device_id, device.kind, device.bus_id, device.flashable) == (
        "LA-7",
        "logic-analyzer",
        "1-2",
        False,
    )
    assert device_from_udev({**ANALYZER, "ID_MODEL_ID": "3882"}, [ANALYZER_MATCH]) is None
    # Its interfaces carry the same vendor properties but are not the device.
    interface = {
        **ANALYZER,
        "DEVTYPE": "usb_interface",
        "DEVPATH": ANALYZER["DEVPATH"] + "/1-2:1.0",
    }
    assert device_from_udev(interface, [ANALYZER_MATCH]) is None


def test_bus_ids_come_from_the_usb_device_in_the_devpath() -> None:
    assert bus_id_from_devpath(TTY_DEVPATH) == "1-1.4"
    assert bus_id_from_devpath("/devices/pci0000:00/0000:00:14.0/usb3/3-2") == "3-2"
    assert bus_id_from_devpath("/devices/virtual/tty/tty0") is None


async def collected(discovery: UdevDiscovery) -> list[DeviceChange]:
    changes = discovery.changes()
    await discovery.close()
    return [change async for change in changes]


async def test_udev_events_become_adds_and_an_unplug_a_remove_at_once() -> None:
    discovery = UdevDiscovery()
    discovery.handle_event("add", BOARD_TTY)
    discovery.handle_event("remove", {"SUBSYSTEM": "tty", "DEVPATH": TTY_DEVPATH})
    changes = await collected(discovery)
    assert [(c.kind, c.device.device_id) for c in changes] == [
        (ChangeKind.ADD, "DE6280E4"),
        (ChangeKind.REMOVE, "DE6280E4"),
    ]


async def test_a_reflash_hides_the_port_bounce_but_not_a_board_that_stays_gone() -> None:
    discovery = UdevDiscovery()
    discovery.handle_event("add", BOARD_TTY)
    with flashing.flashing("DE6280E4"):
        discovery.handle_event("remove", {"SUBSYSTEM": "tty", "DEVPATH": TTY_DEVPATH})
        discovery.handle_event("add", BOARD_TTY)
    with flashing.flashing("DE6280E4"):
        discovery.handle_event("remove", {"SUBSYSTEM": "tty", "DEVPATH": TTY_DEVPATH})
    changes = await collected(discovery)
    assert [c.kind for c in changes] == [ChangeKind.ADD, ChangeKind.REMOVE]


async def test_udev_scan_runs_on_this_machine() -> None:
    discovery = UdevDiscovery()
    try:
        try:
            devices = await discovery.scan()
        except Exception as exc:  # pragma: no cover - depends on the host
            pytest.skip(f"udev is not usable here: {exc}")
        assert all(device.kind == "pico2-ice" for device in devices)
    finally:
        await discovery.close()


async def test_simulated_unplug_and_plug_are_remove_and_add(farm: SimulatedFarm) -> None:
    assert [d.device_id for d in await farm.discovery.scan()] == ["sim-000", "sim-001", "sim-002"]
    changes = farm.discovery.changes()
    await farm.unplug("sim-002")
    assert not farm.emulator("sim-002").port_path.exists()
    assert [d.device_id for d in await farm.discovery.scan()] == ["sim-000", "sim-001"]
    await farm.plug("sim-002")
    first, second = await anext(changes), await anext(changes)
    assert (first.kind, first.device.device_id) == (ChangeKind.REMOVE, "sim-002")
    assert (second.kind, second.device.device_id) == (ChangeKind.ADD, "sim-002")
    assert farm.emulator("sim-002").port_path.exists()
