"""The real modes against simulated firmware: results belong to their bitstream; faults fail."""

from __future__ import annotations

import pytest

from icefarm_worker.hardware.base import ChangeKind, HardwareError, SerialLink, SerialTimeout
from icefarm_worker.modes import MODES, EvaluationFailed, UnknownMode, get_mode
from icefarm_worker.modes.base import Mode
from icefarm_worker.modes.usbip import UsbipMode
from icefarm_worker.simulator import (
    Fault,
    FaultSpec,
    SimulatedFarm,
    expected_pulse_count,
    expected_variance,
)
from tests.worker.hardware.conftest import FLASH_TIMEOUT, make_bitstream


async def ready_board(farm: SimulatedFarm, device_id: str, mode: Mode) -> SerialLink:
    board = farm.board(farm.device(device_id))
    await board.flash(farm.firmware_paths()[mode.firmware], timeout=FLASH_TIMEOUT)
    link = await board.open_serial(timeout=2.0)
    await mode.ready(link, timeout=2.0)
    return link


async def test_pulsecount_reports_the_count_of_each_bitstream(farm: SimulatedFarm) -> None:
    mode = get_mode("pulsecount")({})
    link = await ready_board(farm, "sim-000", mode)
    for seed in range(3):
        bitstream = make_bitstream(seed)
        measurement = await mode.evaluate(link, bitstream, timeout=3.0)
        assert measurement.pulse_count == expected_pulse_count(bitstream)
    await link.close()


async def test_varmax_reports_the_variance_of_each_bitstream(farm: SimulatedFarm) -> None:
    mode = get_mode("varmax")({})
    link = await ready_board(farm, "sim-001", mode)
    for seed in (10, 11):
        bitstream = make_bitstream(seed)
        measurement = await mode.evaluate(link, bitstream, timeout=3.0)
        assert measurement.variance == pytest.approx(expected_variance(bitstream))
    assert expected_variance(make_bitstream(10)) != expected_variance(make_bitstream(11))
    await link.close()


async def test_a_wrong_size_bitstream_is_not_the_boards_fault(farm: SimulatedFarm) -> None:
    mode = get_mode("pulsecount")({})
    link = await ready_board(farm, "sim-000", mode)
    with pytest.raises(EvaluationFailed) as failure:
        await mode.evaluate(link, b"\0" * 1000, timeout=1.0)
    assert failure.value.board_fault is False
    # The board was not touched: the next real bitstream still evaluates.
    bitstream = make_bitstream(1)
    assert (await mode.evaluate(link, bitstream, 3.0)).pulse_count == expected_pulse_count(
        bitstream
    )
    await link.close()


@pytest.mark.parametrize("fault", [Fault.NO_ANSWER, Fault.SHORT_READ])
async def test_a_board_fault_after_n_evaluations_fails_that_evaluation(
    farm: SimulatedFarm, fault: Fault
) -> None:
    mode = get_mode("pulsecount")({})
    link = await ready_board(farm, "sim-002", mode)
    farm.inject("sim-002", FaultSpec(fault, after=1))
    first = make_bitstream(1)
    assert (await mode.evaluate(link, first, 3.0)).pulse_count == expected_pulse_count(first)
    with pytest.raises(EvaluationFailed) as failure:
        await mode.evaluate(link, make_bitstream(2), timeout=0.5)
    assert failure.value.board_fault is True
    if fault is Fault.SHORT_READ:
        assert "Watchdog timeout, 103578 bytes received of 104090" in str(failure.value)
    await link.close()


async def test_a_slow_board_answers_within_a_generous_timeout(farm: SimulatedFarm) -> None:
    mode = get_mode("varmax")({})
    link = await ready_board(farm, "sim-000", mode)
    farm.inject("sim-000", FaultSpec(Fault.SLOW, delay=0.3))
    bitstream = make_bitstream(5)
    measurement = await mode.evaluate(link, bitstream, timeout=3.0)
    assert measurement.variance == pytest.approx(expected_variance(bitstream))
    with pytest.raises(EvaluationFailed) as failure:
        await mode.evaluate(link, bitstream, timeout=0.1)
    assert failure.value.board_fault is True
    await link.close()


async def test_a_board_unplugged_mid_evaluation_fails_and_is_removed(farm: SimulatedFarm) -> None:
    mode = get_mode("pulsecount")({})
    assert len(await farm.discovery.scan()) == 3
    changes = farm.discovery.changes()
    link = await ready_board(farm, "sim-001", mode)
    farm.inject("sim-001", Fault.UNPLUG)
    with pytest.raises(HardwareError) as failure:
        await mode.evaluate(link, make_bitstream(3), timeout=2.0)
    assert failure.value.step == "serial"
    assert not isinstance(failure.value, SerialTimeout)
    change = await anext(changes)
    assert (change.kind, change.device.device_id) == (ChangeKind.REMOVE, "sim-001")
    assert "sim-001" not in farm.plugged()
    await link.close()


async def test_usbip_mode_is_ready_on_default_firmware_and_exports_the_bus(
    farm: SimulatedFarm,
) -> None:
    assert get_mode("usbip") is UsbipMode
    mode = UsbipMode({})
    assert mode.evaluates is False
    link = await ready_board(farm, "sim-000", mode)
    await link.close()
    device = farm.device("sim-000")
    await mode.export(farm.usbip, device)
    await farm.usbip.start()
    assert await farm.usbip.exported() == [device.bus_id]
    await mode.withdraw(farm.usbip, device)
    assert await farm.usbip.exported() == []


def test_modes_are_registered_by_name_and_unknown_names_are_refused() -> None:
    assert sorted(MODES) == ["pulsecount", "usbip", "varmax"]
    with pytest.raises(UnknownMode, match="known: pulsecount, usbip, varmax"):
        get_mode("blink")
    with pytest.raises(ValueError, match="'speed'"):
        get_mode("pulsecount")({"speed": "fast"})
