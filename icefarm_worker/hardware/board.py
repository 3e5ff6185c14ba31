"""`SerialBoard`: flash a pico2-ice through its UF2 bootloader and open its CDC port.

Flashing is four steps, each bounded by what remains of the caller's timeout:

1. touch — open the CDC port at 1200 baud and close it; the board reboots into its bootloader.
2. uf2-drive — wait for a new directory holding `INDEX.HTM` and `INFO_UF2.TXT`.
3. copy — write the `.uf2` into it (a plain write: UF2 bootloaders take nothing cleverer).
4. serial — wait for the CDC port to come back, and check it opens; a drive that vanishes and
   comes back instead is an image that did not boot, failed at once.

A UF2 drive's files do not say which board it belongs to, so steps 1 and 2 run under one lock
per event loop: while a board waits for its drive, no other board of this worker enters its
bootloader, and the only new drive is ours. A claimed drive is never handed to a second board.
Where the board's own drive can be found (`own_drive`: udev's disk of the same USB serial
number, or the simulator's drive directory), only that one is taken — which is what lets a
board found already sitting in its bootloader (its port absent, e.g. its worker died mid-flash)
be flashed while another board of the worker sits in its bootloader too.

A board found in its bootloader has no port path yet (`serial_port` None): its CDC port is then
found by serial number among `/dev/serial/by-id/usb-*_<serial>-if00`.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from icefarm_worker.hardware import flashing
from icefarm_worker.hardware.base import DiscoveredDevice, HardwareError, SerialLink
from icefarm_worker.hardware.serial_link import open_link, touch_1200

DRIVE_MARKERS = ("INDEX.HTM", "INFO_UF2.TXT")
# Filesystems a UF2 bootloader drive can be mounted as; other mounts are never probed (a hung
# network mount must not stall a flash).
DRIVE_FSTYPES = frozenset({"vfat", "msdos", "fuseblk", "exfat"})
POLL_INTERVAL = 0.02
# A board with neither its port nor a UF2 drive for this long is not there (unplugged): a
# re-enumerating board shows one of them well within it.
ABSENT_GRACE = 2.0
BY_ID = Path("/dev/serial/by-id")
DISK_BY_ID = Path("/dev/disk/by-id")


class _DriveClaims:
    """Per event loop: the lock around bootloader entry and the drives being written."""

    def __init__(self) -> None:
        self.entry = asyncio.Lock()
        self.claimed: set[Path] = set()


_CLAIMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _DriveClaims] = (
    weakref.WeakKeyDictionary()
)


def _claims() -> _DriveClaims:
    # asyncio.Lock binds to the first loop that waits on it, so one per loop (tests run many).
    loop = asyncio.get_running_loop()
    claims = _CLAIMS.get(loop)
    if claims is None:
        claims = _CLAIMS[loop] = _DriveClaims()
    return claims


def mounted_dirs(mounts: Path = Path("/proc/mounts")) -> list[Path]:
    """Mount points of filesystems a UF2 drive can be (FAT and friends)."""
    try:
        text = mounts.read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in DRIVE_FSTYPES:
            # /proc/mounts escapes spaces and tabs as octal (\040).
            found.append(Path(fields[1].encode().decode("unicode_escape")))
    return found


def uf2_drives(drive_search: Sequence[Path]) -> set[Path]:
    """Every directory that looks like a UF2 bootloader drive right now: among the mounted
    FAT filesystems and the `drive_search` directories (and their immediate subdirectories)."""
    candidates: list[Path] = [*mounted_dirs()]
    for base in drive_search:
        candidates.append(base)
        try:
            candidates.extend(child for child in base.iterdir() if child.is_dir())
        except OSError:
            continue
    return {path for path in candidates if _is_uf2_drive(path)}


def port_by_serial(serial: str, by_id: Path = BY_ID) -> str | None:
    """The CDC data port (interface 00) of the USB device with serial number `serial`."""
    found = sorted(by_id.glob(f"usb-*_{serial}-if00"))
    return str(found[0]) if found else None


def boot_drive_by_serial(
    serial: str, disk_by_id: Path = DISK_BY_ID, mounts: Path = Path("/proc/mounts")
) -> Path | None:
    """Where the UF2 drive of the RP2350 bootloader with USB serial number `serial` is mounted
    (its disk is `usb-RPI_RP2350_<serial>-0:0`, or a partition of it); None when it is not."""
    disks = {os.path.realpath(link) for link in disk_by_id.glob(f"usb-*_{serial}-0:0*")}
    if not disks:
        return None
    try:
        text = mounts.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and os.path.realpath(fields[0]) in disks:
            return Path(fields[1].encode().decode("unicode_escape"))
    return None


def _is_uf2_drive(path: Path) -> bool:
    try:
        return all((path / name).is_file() for name in DRIVE_MARKERS)
    except OSError:
        return False


class SerialBoard:
    """A pico2-ice on a CDC ACM port, flashed through its UF2 bootloader."""

    def __init__(
        self,
        device: DiscoveredDevice,
        drive_search: Sequence[Path] = (),
        *,
        baudrate: int = 115200,
        poll_interval: float = POLL_INTERVAL,
        own_drive: Callable[[], Path | None] | None = None,
    ) -> None:
        self._device = device
        self._fixed_port = device.serial_port
        self._own_drive = own_drive or (lambda: boot_drive_by_serial(device.device_id))
        self._drive_search = list(drive_search)
        self._baudrate = baudrate
        self._poll = poll_interval

    @property
    def device(self) -> DiscoveredDevice:
        """The device this board drives."""
        return self._device

    async def flash(self, firmware: Path, timeout: float) -> None:
        """Touch → UF2 drive → copy → serial; HardwareError naming the step that failed."""
        try:
            image = await asyncio.to_thread(firmware.read_bytes)
        except OSError as exc:
            raise HardwareError("copy", f"cannot read firmware {firmware}: {exc}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        claims = _claims()
        with flashing.flashing(self._device.device_id):
            drive = await self._enter_bootloader(claims, deadline)
            try:
                await self._copy(drive, firmware.name, image)
                await self._wait_for_boot(drive, deadline, firmware.name)
            finally:
                # Held until the port is back, so the drive is gone before anyone may take it.
                claims.claimed.discard(drive)
            link = await self.open_serial(max(deadline - loop.time(), 0.0))
            await link.close()

    async def open_serial(self, timeout: float) -> SerialLink:
        """Open the CDC data port, waiting up to `timeout` for it to exist."""
        loop = asyncio.get_running_loop()
        port = await self._wait_for_port(loop.time() + timeout, "to open it")
        return open_link(port, self._baudrate)

    def _port(self) -> str | None:
        """The CDC port's path: the one discovery gave, or (a board found in its bootloader)
        the by-id link of its serial number once there is one."""
        if self._fixed_port is not None:
            return self._fixed_port
        return port_by_serial(self._device.device_id)

    async def _enter_bootloader(self, claims: _DriveClaims, deadline: float) -> Path:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                await claims.entry.acquire()
        except TimeoutError:
            raise HardwareError(
                "touch", "timed out waiting for other boards to enter their bootloaders"
            ) from None
        try:
            before = uf2_drives(self._drive_search)
            port = self._port()
            touched = port is not None and touch_1200(port)
            # A board whose port is absent may already sit in its bootloader (a flash that did
            # not boot): then a drive that was there before counts too.
            excluded = before if touched else set()
            started = loop.time()
            while True:
                fresh = uf2_drives(self._drive_search) - excluded - claims.claimed
                own = self._own_drive()
                if own is not None:
                    fresh &= {own}
                if fresh:
                    drive = min(fresh)
                    claims.claimed.add(drive)
                    return drive
                if not touched:
                    port = self._port()
                    if port is not None and os.path.exists(port):  # noqa: ASYNC240
                        # It was re-enumerating: its port is back, so touch it now.
                        excluded = uf2_drives(self._drive_search)
                        touched = touch_1200(port)
                        continue
                    if loop.time() - started >= ABSENT_GRACE:
                        # Neither port nor drive: unplugged (its worker hears so soon), not a
                        # board to wait the whole flash timeout for.
                        raise HardwareError(
                            "uf2-drive", "the board is not there: no port and no UF2 drive"
                        )
                if loop.time() >= deadline:
                    what = "after the 1200-baud touch" if touched else "(the port was absent)"
                    raise HardwareError("uf2-drive", f"no UF2 drive appeared {what}")
                await asyncio.sleep(self._poll)
        finally:
            claims.entry.release()

    async def _copy(self, drive: Path, name: str, image: bytes) -> None:
        target = drive / (name if name.lower().endswith(".uf2") else f"{name}.uf2")
        try:
            await asyncio.to_thread(_write_and_sync, target, image)
        except OSError as exc:
            raise HardwareError("copy", f"writing {target} failed: {exc}") from exc

    async def _wait_for_boot(self, drive: Path, deadline: float, name: str) -> None:
        """After the copy: the port comes back (the image boots), or the drive vanishes and
        comes back (it did not: the bootloader runs again), which fails at once rather than at
        the deadline."""
        loop = asyncio.get_running_loop()
        left = False
        while True:
            port = self._port()
            if port is not None and os.path.exists(port):  # noqa: ASYNC240
                return
            here = _is_uf2_drive(self._own_drive() or drive)
            if left and here:
                raise HardwareError(
                    "serial", f"{name} did not boot: the board is back in its bootloader"
                )
            left = left or not here
            if loop.time() >= deadline:
                raise HardwareError(
                    "serial",
                    f"port {port or self._device.device_id} did not appear after copying {name}",
                )
            await asyncio.sleep(self._poll)

    async def _wait_for_port(self, deadline: float, why: str) -> str:
        loop = asyncio.get_running_loop()
        # A stat per poll is cheap; a port that never appears is what the deadline is for.
        while True:
            port = self._port()
            if port is not None and os.path.exists(port):  # noqa: ASYNC240
                return port
            if loop.time() >= deadline:
                name = port or f"of serial number {self._device.device_id}"
                raise HardwareError("serial", f"port {name} did not appear {why}")
            await asyncio.sleep(self._poll)


def _write_and_sync(target: Path, image: bytes) -> None:
    # The bootloader reboots once it has every block; fsync makes sure it gets them now rather
    # than whenever the page cache is flushed.
    with open(target, "wb") as out:
        out.write(image)
        out.flush()
        os.fsync(out.fileno())
