"""The real `SerialBoard` flashing simulated boards through their UF2 drives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.hardware.board import (
    SerialBoard,
    boot_drive_by_serial,
    port_by_serial,
    uf2_drives,
)
from icefarm_worker.modes.protocol import DEFAULT_FIRMWARE_LINE, WAITING_LINE
from icefarm_worker.simulator import Fault, FaultSpec, SimulatedFarm
from tests.worker.hardware.conftest import FLASH_TIMEOUT


async def first_line(board: SerialBoard) -> str:
    link = await board.open_serial(timeout=2.0)
    try:
        return await link.read_line(timeout=2.0)
    finally:
        await link.close()


@pytest.mark.parametrize(
    ("firmware", "greeting"),
    [("default", DEFAULT_FIRMWARE_LINE), ("pulsecount", WAITING_LINE), ("varmax", WAITING_LINE)],
)
async def test_flashing_each_firmware_runs_it(
    farm: SimulatedFarm, firmware: str, greeting: str
) -> None:
    board = farm.board(farm.device("sim-000"))
    await board.flash(farm.firmware_paths()[firmware], timeout=FLASH_TIMEOUT)
    assert farm.emulator("sim-000").firmware == firmware
    assert await first_line(board) == greeting


async def test_flashing_back_to_default_prints_default_firmware(farm: SimulatedFarm) -> None:
    board = farm.board(farm.device("sim-001"))
    paths = farm.firmware_paths()
    await board.flash(paths["pulsecount"], timeout=FLASH_TIMEOUT)
    await board.flash(paths["default"], timeout=FLASH_TIMEOUT)
    assert await first_line(board) == DEFAULT_FIRMWARE_LINE
    assert farm.emulator("sim-001").flashes == 2


async def test_boards_flashing_at_once_each_get_their_own_image(farm: SimulatedFarm) -> None:
    paths = farm.firmware_paths()
    wanted = {"sim-000": "pulsecount", "sim-001": "varmax", "sim-002": "default"}
    boards = {device_id: farm.board(farm.device(device_id)) for device_id in wanted}
    await asyncio.gather(
        *(boards[d].flash(paths[name], timeout=FLASH_TIMEOUT) for d, name in wanted.items())
    )
    assert {d: farm.emulator(d).firmware for d in wanted} == wanted
    assert all(farm.emulator(d).flashes == 1 for d in wanted)


async def test_flash_failure_is_a_serial_step_error_and_a_retry_recovers(
    farm: SimulatedFarm,
) -> None:
    farm.inject("sim-000", FaultSpec(Fault.FLASH_FAILURE, once=True))
    board = farm.board(farm.device("sim-000"))
    paths = farm.firmware_paths()
    with pytest.raises(HardwareError) as failure:
        await board.flash(paths["pulsecount"], timeout=60.0)
    # Seen, not waited out: the drive came back instead of the port.
    assert failure.value.step == "serial"
    assert "did not boot: the board is back in its bootloader" in str(failure.value)
    # The board sits in its bootloader with no port; the next flash uses the drive it shows.
    await board.flash(paths["pulsecount"], timeout=FLASH_TIMEOUT)
    assert await first_line(board) == WAITING_LINE


async def test_a_file_that_is_not_uf2_leaves_the_board_in_its_bootloader(
    farm: SimulatedFarm, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.uf2"
    garbage.write_bytes(b"this is not a UF2 image at all" * 40)
    board = farm.board(farm.device("sim-002"))
    with pytest.raises(HardwareError) as failure:
        await board.flash(garbage, timeout=0.5)
    assert failure.value.step == "serial"
    assert uf2_drives([farm.root / "drives"]) == {farm.emulator("sim-002").drive_path}


async def test_an_unplugged_board_fails_the_touch_step_with_no_drive(farm: SimulatedFarm) -> None:
    await farm.unplug("sim-001")
    board = farm.board(farm.device("sim-001"))
    with pytest.raises(HardwareError) as failure:
        await board.flash(farm.firmware_paths()["default"], timeout=0.3)
    assert failure.value.step == "uf2-drive"


async def test_a_missing_firmware_file_is_a_copy_step_error(
    farm: SimulatedFarm, tmp_path: Path
) -> None:
    board = farm.board(farm.device("sim-000"))
    with pytest.raises(HardwareError) as failure:
        await board.flash(tmp_path / "absent.uf2", timeout=1.0)
    assert failure.value.step == "copy"
    assert farm.emulator("sim-000").flashes == 0


async def test_open_serial_times_out_when_the_port_never_appears(farm: SimulatedFarm) -> None:
    await farm.unplug("sim-000")
    with pytest.raises(HardwareError) as failure:
        await farm.board(farm.device("sim-000")).open_serial(timeout=0.1)
    assert failure.value.step == "serial"


async def test_two_boards_found_in_their_bootloaders_are_each_flashed_through_their_own_drive(
    farm: SimulatedFarm,
) -> None:
    # Both were left in their bootloaders (ports absent, drives up): which drive is whose
    # must not be guessed, or one board gets the other's image and never comes back.
    for device_id in ("sim-002", "sim-001"):
        farm.inject(device_id, FaultSpec(Fault.FLASH_FAILURE, once=True))
        with pytest.raises(HardwareError):
            await farm.board(farm.device(device_id)).flash(
                farm.firmware_paths()["default"], timeout=0.5
            )
    paths = farm.firmware_paths()
    await asyncio.gather(
        farm.board(farm.device("sim-002")).flash(paths["pulsecount"], timeout=FLASH_TIMEOUT),
        farm.board(farm.device("sim-001")).flash(paths["varmax"], timeout=FLASH_TIMEOUT),
    )
    assert (farm.emulator("sim-001").firmware, farm.emulator("sim-002").firmware) == (
        "varmax",
        "pulsecount",
    )


def test_a_board_found_in_its_bootloader_has_its_port_and_drive_found_by_serial_number(
    tmp_path: Path,
) -> None:
    by_id, disks, sdb1 = tmp_path / "serial-by-id", tmp_path / "disk-by-id", tmp_path / "sdb1"
    by_id.mkdir()
    disks.mkdir()
    sdb1.touch()
    (by_id / "usb-tinyVision.ai_pico2-ice_DE6280E4-if00").touch()
    (by_id / "usb-tinyVision.ai_pico2-ice_DE6280E4-if02").touch()
    (by_id / "usb-tinyVision.ai_pico2-ice_AB12-if00").touch()
    assert port_by_serial("DE6280E4", by_id) == str(
        by_id / "usb-tinyVision.ai_pico2-ice_DE6280E4-if00"
    )
    assert port_by_serial("FFFF", by_id) is None
    (disks / "usb-RPI_RP2350_DE6280E4-0:0-part1").symlink_to(sdb1)
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"/dev/sda1 / ext4 rw 0 0\n{sdb1} /media/lab/RP2350\\0401 vfat rw,nosuid 0 0\n"
    )
    assert boot_drive_by_serial("DE6280E4", disks, mounts) == Path("/media/lab/RP2350 1")
    assert boot_drive_by_serial("AB12", disks, mounts) is None  # not in its bootloader
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")
    assert boot_drive_by_serial("DE6280E4", disks, mounts) is None  # not mounted (yet)


async def test_an_unplugged_board_fails_its_flash_soon_not_at_the_flash_timeout(
    farm: SimulatedFarm,
) -> None:
    await farm.unplug("sim-001")
    board = farm.board(farm.device("sim-001"))
    async with asyncio.timeout(20):  # far below the flash timeout it is given
        with pytest.raises(HardwareError) as failure:
            await board.flash(farm.firmware_paths()["default"], timeout=60.0)
    assert failure.value.step == "uf2-drive"
    assert "not there: no port and no UF2 drive" in str(failure.value)
