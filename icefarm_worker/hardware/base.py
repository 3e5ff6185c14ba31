"""The small interfaces between the worker's board lifecycle and the hardware.

Each interface has a real implementation (pyudev, pyserial, the `usbip` tools) and a simulated
one (pseudo-terminals and a directory standing for the UF2 drive, see `icefarm_worker.simulator`);
both pass the same contract tests. The lifecycle (`icefarm_worker.lifecycle`) only ever talks to
these interfaces, so the code that runs against the simulator is the code that runs on a rack.

Every method that waits takes a timeout and raises `HardwareError` naming the step that failed;
the lifecycle turns that into `BROKEN` with the message as the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal, Protocol


class HardwareError(Exception):
    """A hardware step failed or timed out. `step` names it ("touch", "uf2-drive", "copy",
    "serial", "usbip-bind", ...) and the message says what happened, for the board's holder."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class SerialTimeout(HardwareError):
    """`SerialLink.read_line` saw no complete line in time; the port is still open. Modes turn this
    into `EvaluationFailed`, while a vanished port stays a plain `HardwareError`."""

    def __init__(self, message: str) -> None:
        super().__init__("serial", message)


@dataclass(frozen=True)
class DiscoveredDevice:
    """One USB device the worker found (by udev, or made by the simulator)."""

    # Stable id: the USB serial number (udev ID_SERIAL_SHORT) for boards.
    device_id: str
    # "pico2-ice" for boards; the configured kind for generic USB devices.
    kind: str
    # The CDC data port (interface 00) as a path that disappears while the board is in its
    # bootloader and comes back after flashing; None for devices without one.
    serial_port: str | None = None
    # USB bus id ("1-1.4") for usbip; None when unknown.
    bus_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Only boards can be flashed; generic devices skip flashing and testing.
    flashable: bool = True


class ChangeKind(Enum):
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class DeviceChange:
    kind: ChangeKind
    device: DiscoveredDevice


class Discovery(Protocol):
    """Finds devices: an initial scan, then add/remove events as they happen."""

    async def scan(self) -> list[DiscoveredDevice]: ...

    def changes(self) -> AsyncIterator[DeviceChange]:
        """Add/remove events from now on (an unplug arrives as REMOVE at once)."""
        ...

    async def close(self) -> None: ...


class SerialLink(Protocol):
    """An open CDC serial port (pyserial on a real board, the slave pty in the simulator)."""

    async def write(self, data: bytes) -> None: ...

    async def read_line(self, timeout: float) -> str:
        """One line without its line ending; HardwareError("serial", ...) on timeout/EOF."""
        ...

    async def close(self) -> None: ...


class Board(Protocol):
    """One flashable board's hardware operations."""

    @property
    def device(self) -> DiscoveredDevice: ...

    async def flash(self, firmware: Path, timeout: float) -> None:
        """1200-baud touch → wait for the UF2 drive (INDEX.HTM + INFO_UF2.TXT) → copy the .uf2
        → wait for the CDC port to come back. Each step bounded by what remains of `timeout`;
        HardwareError naming the step otherwise."""
        ...

    async def open_serial(self, timeout: float) -> SerialLink:
        """Open the CDC data port (waiting up to `timeout` for it to exist)."""
        ...


class Usbip(Protocol):
    """The usbip tools on this host."""

    async def start(self) -> None:
        """Make sure usbipd runs (started once by the worker)."""
        ...

    async def bind(self, bus_id: str) -> None: ...

    async def unbind(self, bus_id: str) -> None:
        """Always safe to call, also when the bus is not listed as exported (a client that
        vanished mid-attach leaves a stale binding otherwise)."""
        ...

    async def exported(self) -> list[str]:
        """Bus ids currently exported (`usbip list -r localhost`)."""
        ...

    @property
    def port(self) -> int:
        """The TCP port usbipd listens on (3240 by default)."""
        ...


Step = Literal["touch", "uf2-drive", "copy", "serial", "test", "mode"]
