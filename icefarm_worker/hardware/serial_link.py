"""A `SerialLink` over a pyserial port, driven by the event loop (no thread per request).

pyserial opens and configures the port (raw mode, baud rate, DTR); the bytes then move with
non-blocking `os.read`/`os.write` on its file descriptor, woken by `loop.add_reader` and
`loop.add_writer`. The same code talks to a real CDC ACM port and to a simulator's pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
from typing import Any

import serial

from icefarm_worker.hardware.base import HardwareError, SerialTimeout

# A line longer than this is garbage (a wrong baud rate, a firmware gone mad), not a reply.
MAX_LINE = 64 * 1024
DEFAULT_BAUDRATE = 115200


class PySerialLink:
    """An open serial port. Reads happen only while `read_line` waits, so a link nobody reads
    leaves the bytes in the kernel's buffer rather than growing ours."""

    def __init__(self, port: Any, path: str) -> None:
        self._port = port
        self._path = path
        self._fd: int = port.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self._closed = False

    @property
    def path(self) -> str:
        """The port this link was opened on."""
        return self._path

    async def write(self, data: bytes) -> None:
        """Write all of `data`, waiting for the port to drain when its buffer is full."""
        view = memoryview(data)
        while view:
            self._check_open()
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise HardwareError("serial", f"{self._path}: write failed: {exc}") from exc
            view = view[written:]

    async def read_line(self, timeout: float) -> str:
        """One line without its line ending; `SerialTimeout` when none arrives in `timeout`
        seconds, `HardwareError("serial", ...)` when the port goes away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            line = self._take_line()
            if line is not None:
                return line
            self._fill()
            line = self._take_line()
            if line is not None:
                return line
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SerialTimeout(f"{self._path}: no line within {timeout:g}s")
            try:
                async with asyncio.timeout(remaining):
                    await self._wait(writable=False)
            except TimeoutError:
                continue

    async def close(self) -> None:
        """Close the port; safe to call twice and after the port vanished."""
        if self._closed:
            return
        self._closed = True
        # The device may already be gone; closing is all that is left to do.
        with contextlib.suppress(OSError, serial.SerialException):
            self._port.close()

    def _take_line(self) -> str | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                raise HardwareError("serial", f"{self._path}: line longer than {MAX_LINE} bytes")
            return None
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return raw.rstrip(b"\r").decode("utf-8", errors="replace")

    def _fill(self) -> None:
        """Move whatever the kernel holds into our buffer; EOF or EIO means the port vanished."""
        self._check_open()
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise HardwareError("serial", f"{self._path}: port went away") from exc
                raise HardwareError("serial", f"{self._path}: read failed: {exc}") from exc
            if not chunk:
                raise HardwareError("serial", f"{self._path}: port went away")
            self._buffer += chunk

    async def _wait(self, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            loop.add_writer(self._fd, wake)
        else:
            loop.add_reader(self._fd, wake)
        try:
            await ready
        finally:
            if writable:
                loop.remove_writer(self._fd)
            else:
                loop.remove_reader(self._fd)

    def _check_open(self) -> None:
        if self._closed:
            raise HardwareError("serial", f"{self._path}: link is closed")


def open_link(path: str, baudrate: int = DEFAULT_BAUDRATE) -> PySerialLink:
    """Open `path` now (the caller has checked it exists); HardwareError when it cannot."""
    try:
        port = serial.Serial(path, baudrate)
        # pyserial leaves VMIN=0, where an empty read means "no data yet"; with VMIN=1 and a
        # non-blocking fd, no data is EAGAIN and an empty read means the port hung up.
        attributes = termios.tcgetattr(port.fileno())
        attributes[6][termios.VMIN] = 1
        attributes[6][termios.VTIME] = 0
        termios.tcsetattr(port.fileno(), termios.TCSANOW, attributes)
    except (OSError, termios.error, serial.SerialException) as exc:
        raise HardwareError("serial", f"cannot open {path}: {exc}") from exc
    return PySerialLink(port, path)


def touch_1200(path: str) -> bool:
    """Open `path` at 1200 baud and close it, which asks the RP2350 to reboot into its UF2
    bootloader. Returns False when the port was not there (the board may already be in it)."""
    try:
        port = serial.Serial(path, 1200)
    except termios.error:
        # The port hung up after 1200 baud was set, while pyserial still flushed it: the
        # board is already rebooting into its bootloader (the touch worked).
        return True
    except (OSError, serial.SerialException) as exc:
        if os.path.exists(path):
            raise HardwareError("touch", f"cannot open {path} at 1200 baud: {exc}") from exc
        return False
    # The board reboots as we close; the port vanishing under us is the point.
    with contextlib.suppress(OSError, serial.SerialException):
        port.close()
    return True
