"""The usbip contract, run against the real tools (a fake `usbip` on PATH) and the simulator."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from icefarm_worker.hardware.base import HardwareError, Usbip
from icefarm_worker.hardware.usbip import UsbipTools, parse_exported
from icefarm_worker.simulator import SimulatedFarm

LIST_OUTPUT = """Exportable USB devices
======================
 - localhost
      1-1.4: Raspberry Pi : unknown product (2e8a:000a)
           : /sys/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.4
           : Miscellaneous Device / ? / Interface Association (ef/02/01)
           :  0 - Communications / Abstract (modem) / None (02/02/00)
      3-2: Saleae : Logic (0925:3881)
           : /sys/devices/pci0000:00/0000:00:14.0/usb3/3-2
"""

# Behaves like usbip for the buses in $FAKE_USBIP_BUSES, keeping bindings in a file and logging
# every command line, with the real tool's messages.
FAKE_USBIP = """#!{python}
import os, sys
state = os.environ["FAKE_USBIP_STATE"]
with open(state + ".log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
buses = os.environ["FAKE_USBIP_BUSES"].split()
bound = set(open(state).read().split()) if os.path.exists(state) else set()
args = sys.argv[1:]
if args[:1] == ["-D"]:
    open(state + ".daemon", "w").close(); sys.exit(0)
if args[:1] == ["list"]:
    if not os.path.exists(state + ".daemon"):
        print("usbip: error: could not connect to localhost:3240"); sys.exit(1)
    if not bound:
        print("usbip: info: no exportable devices found on localhost"); sys.exit(0)
    print(" - localhost")
    for bus in sorted(bound):
        print("      %s: Raspberry Pi : unknown product (2e8a:000a)" % bus)
    sys.exit(0)
bus = args[2]
if bus not in buses:
    print("usbip: error: device with the specified bus ID does not exist"); sys.exit(1)
if args[0] == "bind":
    if bus in bound:
        print("usbip: error: device on busid %s is already bound to usbip-host" % bus); sys.exit(1)
    bound.add(bus)
elif bus in bound:
    bound.discard(bus)
else:
    print("usbip: error: device is not bound to usbip-host driver"); sys.exit(1)
open(state, "w").write(" ".join(bound))
"""


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("usbip", "usbipd"):
        tool = bin_dir / name
        tool.write_text(FAKE_USBIP.format(python=sys.executable))
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_USBIP_STATE", str(tmp_path / "bound"))
    return tmp_path / "bound"


@pytest.fixture(params=["real", "simulated"])
async def usbip_and_bus(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Usbip, str]]:
    if request.param == "real":
        request.getfixturevalue("fake_tools")
        monkeypatch.setenv("FAKE_USBIP_BUSES", "1-1.4")
        yield UsbipTools(), "1-1.4"
        return
    farm = SimulatedFarm(1, tmp_path / "farm")
    await farm.start()
    yield farm.usbip, farm.device("sim-000").bus_id or ""
    await farm.stop()


async def test_bind_exports_and_unbind_withdraws(usbip_and_bus: tuple[Usbip, str]) -> None:
    usbip, bus = usbip_and_bus
    await usbip.start()
    assert await usbip.exported() == []
    await usbip.bind(bus)
    await usbip.bind(bus)  # binding twice is fine
    assert await usbip.exported() == [bus]
    await usbip.unbind(bus)
    assert await usbip.exported() == []
    assert usbip.port == 3240


async def test_unbind_is_safe_when_nothing_is_bound(usbip_and_bus: tuple[Usbip, str]) -> None:
    usbip, bus = usbip_and_bus
    await usbip.start()
    await usbip.unbind(bus)
    assert await usbip.exported() == []


async def test_binding_an_unknown_bus_fails(usbip_and_bus: tuple[Usbip, str]) -> None:
    usbip, _ = usbip_and_bus
    with pytest.raises(HardwareError) as failure:
        await usbip.bind("7-7")
    assert failure.value.step == "usbip-bind"


async def test_listing_without_usbipd_fails(usbip_and_bus: tuple[Usbip, str]) -> None:
    usbip, _ = usbip_and_bus
    with pytest.raises(HardwareError) as failure:
        await usbip.exported()
    assert failure.value.step == "usbip-list"


async def test_the_real_tools_get_these_command_lines(
    fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_USBIP_BUSES", "1-1.4")
    tools = UsbipTools()
    await tools.start()
    await tools.bind("1-1.4")
    await tools.unbind("1-1.4")
    assert read_log(fake_tools) == ["list -r localhost", "-D", "bind -b 1-1.4", "unbind -b 1-1.4"]


def read_log(state: Path) -> list[str]:
    return Path(str(state) + ".log").read_text().splitlines()


async def test_a_missing_tool_is_a_hardware_error(tmp_path: Path) -> None:
    tools = UsbipTools(usbip=str(tmp_path / "no-such-usbip"))
    with pytest.raises(HardwareError, match="not found"):
        await tools.unbind("1-1.4")


def test_list_output_parses_to_bus_ids() -> None:
    assert parse_exported(LIST_OUTPUT) == ["1-1.4", "3-2"]
    assert parse_exported("usbip: info: no exportable devices found on localhost") == []
