"""`usbip`: the board runs its default firmware and is exported to the client over usbip."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from icefarm_worker.hardware.base import DiscoveredDevice, HardwareError, SerialLink, Usbip
from icefarm_worker.modes.base import EvaluationFailed, Measurement, Mode
from icefarm_worker.modes.protocol import DEFAULT_FIRMWARE_LINE, wait_for


class UsbipMode(Mode):
    """Exports the device; evaluates nothing. The lifecycle calls `export` once the board is
    ready and `withdraw` at release (always, see `Usbip.unbind`)."""

    name = "usbip"
    firmware = "default"
    evaluates = False

    def __init__(self, args: Mapping[str, str]) -> None:
        super().__init__(args)
        for key in self.args:
            raise ValueError(f"mode {self.name} takes no argument {key!r}")

    async def ready(self, link: SerialLink, timeout: float) -> None:
        """Check the default firmware is running before the board leaves our hands."""
        deadline = asyncio.get_running_loop().time() + timeout
        await wait_for(link, lambda line: line == DEFAULT_FIRMWARE_LINE, "greeting", deadline)

    async def evaluate(self, link: SerialLink, bitstream: bytes, timeout: float) -> Measurement:
        """Never evaluates: the client drives an exported board itself."""
        raise EvaluationFailed(
            "usbip mode exports the board; it does not evaluate", board_fault=False
        )

    async def export(self, usbip: Usbip, device: DiscoveredDevice) -> None:
        """Bind the device to usbip-host so a client can attach it."""
        await usbip.bind(_bus_id(device))

    async def withdraw(self, usbip: Usbip, device: DiscoveredDevice) -> None:
        """Unbind the device, whether or not it is still listed as exported."""
        await usbip.unbind(_bus_id(device))


def _bus_id(device: DiscoveredDevice) -> str:
    if device.bus_id is None:
        raise HardwareError("usbip-bind", f"device {device.device_id} has no USB bus id")
    return device.bus_id
