"""The simulator's circuit time, and a worker attaching to a simulator in another process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from icefarm_worker.hardware.base import ChangeKind
from icefarm_worker.modes import get_mode
from icefarm_worker.simulator import SimulatedFarm, expected_pulse_count
from icefarm_worker.simulator.attached import AttachedDiscovery, read_manifest
from icefarm_worker.simulator.farm import simulated_board
from tests.worker.hardware.conftest import FLASH_TIMEOUT, make_bitstream, wait_until

CIRCUIT = 0.3


async def test_the_answer_comes_no_sooner_than_the_circuit_time(tmp_path: Path) -> None:
    farm = SimulatedFarm(1, tmp_path / "farm", circuit_seconds=CIRCUIT)
    await farm.start()
    try:
        mode = get_mode("pulsecount")({})
        board = farm.board(farm.device("sim-000"))
        await board.flash(farm.firmware_paths()["pulsecount"], timeout=FLASH_TIMEOUT)
        link = await board.open_serial(timeout=2.0)
        await mode.ready(link, timeout=2.0)
        loop = asyncio.get_running_loop()
        for seed in range(2):
            bitstream = make_bitstream(seed)
            started = loop.time()
            measurement = await mode.evaluate(link, bitstream, timeout=CIRCUIT + 3.0)
            assert loop.time() - started >= CIRCUIT
            assert measurement.pulse_count == expected_pulse_count(bitstream)
        await link.close()
    finally:
        await farm.stop()


async def test_a_worker_attaches_to_a_simulator_process(tmp_path: Path) -> None:
    root = tmp_path / "farm"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "icefarm_worker.simulator", "serve", "--count", "2",
        "--root", str(root), "--prefix", "ext", "--circuit-time", "0.2",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    discovery: AttachedDiscovery | None = None
    try:
        await wait_until(lambda: (root / "farm.json").exists(), timeout=20.0)
        assert read_manifest(root).pid == process.pid
        discovery = AttachedDiscovery(root, interval=0.01)
        devices = await discovery.scan()
        assert sorted(d.device_id for d in devices) == ["ext-000", "ext-001"]
        changes = discovery.changes()
        # A flash (the port vanishes and returns) is not reported as an unplug.
        board = simulated_board(root, devices[0])
        await board.flash(root / "firmware" / "pulsecount.uf2", timeout=FLASH_TIMEOUT)
        link = await board.open_serial(timeout=2.0)
        mode = get_mode("pulsecount")({})
        await mode.ready(link, timeout=2.0)
        bitstream = make_bitstream(7)
        started = asyncio.get_running_loop().time()
        measurement = await mode.evaluate(link, bitstream, timeout=3.0)
        assert asyncio.get_running_loop().time() - started >= 0.2
        assert measurement.pulse_count == expected_pulse_count(bitstream)
        await link.close()
        # SIGUSR1: the boards' own busy time so far (what bench/evaluate.py compares against).
        os.kill(process.pid, signal.SIGUSR1)
        report = root / "device_time.json"
        await wait_until(report.exists, timeout=10.0)
        busy = json.loads(report.read_text())
        assert busy["dump"] == 1 and busy["evaluations"] == 1
        assert 0.2 <= busy["busy_seconds"] < 3.0
        # Stopping the simulator makes its ports vanish: REMOVE for both boards.
        os.kill(process.pid, signal.SIGTERM)
        removed = []
        async with asyncio.timeout(10):
            async for change in changes:
                removed.append((change.kind, change.device.device_id))
                if len(removed) == 2:
                    break
        assert sorted(removed) == [(ChangeKind.REMOVE, "ext-000"), (ChangeKind.REMOVE, "ext-001")]
    finally:
        if discovery is not None:
            await discovery.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
