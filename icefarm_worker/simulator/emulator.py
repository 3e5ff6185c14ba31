"""One simulated pico2-ice: a pty standing for its CDC port, a directory for its UF2 drive.

The emulator holds the pty master in the worker's event loop (`add_reader`/`add_writer`) and
keeps a slave fd open itself, so the master never sees EIO when the worker closes the port. It
polls the pty's termios speed (the master reports the slave's settings on Linux); 1200 baud is
the touch: the port vanishes, the drive appears, a complete `.uf2` in it is the next firmware.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import termios
import tty
from collections.abc import Callable
from pathlib import Path

from icefarm_worker.simulator import uf2
from icefarm_worker.simulator.faults import FaultState
from icefarm_worker.simulator.firmware import EMULATORS, firmware_name, run_silent

POLL = 0.01
# What a host that never reads can leave queued before new lines are dropped (as a CDC does).
MAX_PENDING = 4096
INDEX_HTM = (
    '<html><head><meta http-equiv="refresh" content="0;URL=https://pico-ice.tinyvision.ai/"/>'
    "</head></html>\n"
)
INFO_UF2 = "UF2 Bootloader v1.0\nModel: Raspberry Pi RP2350\nBoard-ID: RP2350\n"


class _PortIO:
    """The firmware's end of the pty (implements `FirmwareIO`)."""

    def __init__(
        self,
        master: int,
        faults: FaultState,
        watchdog: float,
        unplug: Callable[[], None],
        circuit_seconds: float = 0.0,
    ):
        self.faults = faults
        self.watchdog = watchdog
        self.circuit_seconds = circuit_seconds
        self._unplug = unplug
        self._master = master
        self._loop = asyncio.get_running_loop()
        self._inbox = bytearray()
        self._arrived = asyncio.Event()
        self._outbox = bytearray()
        self._loop.add_reader(master, self._on_readable)

    async def read(self, timeout: float, limit: int) -> bytes | None:
        if not self._inbox:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        data = bytes(self._inbox[:limit])
        del self._inbox[:limit]
        return data

    def send_line(self, line: str) -> None:
        if len(self._outbox) > MAX_PENDING:
            return
        if not self._outbox:
            self._loop.add_writer(self._master, self._on_writable)
        self._outbox += line.encode() + b"\r\n"

    def unplug(self) -> None:
        self._loop.call_soon(self._unplug)

    def close(self) -> None:
        self._loop.remove_reader(self._master)
        self._loop.remove_writer(self._master)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._loop.remove_reader(self._master)
            return
        self._inbox += data
        self._arrived.set()

    def _on_writable(self) -> None:
        try:
            written = os.write(self._master, self._outbox)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._outbox)
        del self._outbox[:written]
        if not self._outbox:
            self._loop.remove_writer(self._master)


class BoardEmulator:
    """Power it on and it runs its flashed firmware on `port_path`, until touched or unplugged."""

    def __init__(
        self,
        index: int,
        root: Path,
        faults: FaultState,
        *,
        watchdog: float,
        boot_delay: float,
        on_unplug: Callable[[], None],
        circuit_seconds: float = 0.0,
    ) -> None:
        self.port_path = root / "dev" / f"ttyICE{index}"  # farm.port_path, without the cycle
        self.drive_path = root / "drives" / f"RP2350-{index}"  # farm.drive_path
        self.faults = faults
        # What is in flash; None = no bootable image, so the board sits in its bootloader.
        self.firmware: str | None = "default"
        self.flashes = 0
        self._watchdog = watchdog
        self._boot_delay = boot_delay
        # Seconds an evaluating firmware spends per bitstream before it answers.
        self.circuit_seconds = circuit_seconds
        self._on_unplug = on_unplug
        self._task: asyncio.Task[None] | None = None

    @property
    def powered(self) -> bool:
        """True between `power_on` and `power_off`."""
        return self._task is not None and not self._task.done()

    def power_on(self) -> None:
        """Boot: run the firmware in flash, or the bootloader when there is none."""
        if not self.powered:
            self._task = asyncio.create_task(self._run(), name=f"emulator {self.port_path.name}")

    async def power_off(self) -> None:
        """Cut power: the port and the drive vanish."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            if self.firmware is not None:
                await self._run_firmware(self.firmware)
            await self._bootloader()

    async def _run_firmware(self, name: str) -> None:
        """Until the 1200-baud touch."""
        master, slave = os.openpty()
        io: _PortIO | None = None
        firmware: asyncio.Task[None] | None = None
        try:
            tty.setraw(slave)
            attributes = termios.tcgetattr(slave)
            attributes[4] = attributes[5] = termios.B115200
            termios.tcsetattr(slave, termios.TCSANOW, attributes)
            os.set_blocking(master, False)
            io = _PortIO(master, self.faults, self._watchdog, self._on_unplug, self.circuit_seconds)
            firmware = asyncio.create_task(EMULATORS.get(name, run_silent)(io))
            _replace_symlink(self.port_path, os.ttyname(slave))
            while termios.tcgetattr(master)[4] != termios.B1200:
                if firmware.done() and firmware.exception() is not None:
                    firmware.result()  # an emulator bug: let it surface, not hang the board
                await asyncio.sleep(POLL)
        finally:
            self.port_path.unlink(missing_ok=True)
            if firmware is not None:
                firmware.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await firmware
            if io is not None:
                io.close()
            os.close(master)
            os.close(slave)

    async def _bootloader(self) -> None:
        """Until a complete UF2 image has been copied in."""
        await asyncio.sleep(self._boot_delay)  # USB re-enumeration as a mass-storage device
        try:
            self.drive_path.mkdir(parents=True, exist_ok=True)
            (self.drive_path / "INDEX.HTM").write_text(INDEX_HTM)
            (self.drive_path / "INFO_UF2.TXT").write_text(INFO_UF2)
            payload = await self._wait_for_image()
        finally:
            shutil.rmtree(self.drive_path, ignore_errors=True)
        self.flashes += 1
        self.firmware = None if self.faults.on_flash() else (firmware_name(payload) or "unknown")

    async def _wait_for_image(self) -> bytes:
        while True:
            for path in list(self.drive_path.iterdir()):
                if path.suffix.lower() != ".uf2":
                    continue
                try:
                    payload = uf2.decode(path.read_bytes())
                except uf2.Uf2Error:
                    path.unlink(missing_ok=True)  # a bootloader ignores what is not UF2
                    continue
                if payload is not None:
                    return payload
            await asyncio.sleep(POLL)


def _replace_symlink(link: Path, target: str) -> None:
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.replace(link)  # atomic: the port appears whole, never half-made
