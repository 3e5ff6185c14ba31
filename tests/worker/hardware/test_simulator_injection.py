"""A served simulator takes faults, unplugs and plugs at run time (SIGUSR2 + root/inject.json),
which is how the chaos soak (bench/soak.py) hurts the boards of a running farm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from icefarm_worker.modes import get_mode
from icefarm_worker.modes.base import EvaluationFailed
from icefarm_worker.simulator.farm import port_path, simulated_board, simulated_device
from tests.worker.hardware.conftest import FLASH_TIMEOUT, make_bitstream, wait_until


async def _inject(root: Path, pid: int, seq: int, commands: list[dict[str, object]]) -> None:
    (root / "inject.json").write_text(json.dumps({"seq": seq, "commands": commands}))
    os.kill(pid, signal.SIGUSR2)
    done = root / "inject.done"
    await wait_until(lambda: done.exists() and done.read_text() == str(seq), timeout=10.0)


async def test_a_served_simulator_applies_faults_unplugs_and_plugs_sent_at_run_time(
    tmp_path: Path,
) -> None:
    root = tmp_path / "farm"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "icefarm_worker.simulator", "serve", "--count", "2",
        "--root", str(root), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_until(lambda: (root / "farm.json").exists(), timeout=20.0)
        board = simulated_board(root, simulated_device(root, "sim", 0))
        await board.flash(root / "firmware" / "pulsecount.uf2", timeout=FLASH_TIMEOUT)
        link = await board.open_serial(timeout=2.0)
        mode = get_mode("pulsecount")({})
        await mode.ready(link, timeout=2.0)
        # A bad command is skipped; the good one after it still applies.
        await _inject(root, process.pid, 1, [
            {"device": "sim-009", "fault": "short-read"},
            {"device": "sim-000", "fault": "short-read", "once": True},
        ])  # fmt: skip
        before = time.time()
        with pytest.raises(EvaluationFailed):
            await mode.evaluate(link, make_bitstream(1), timeout=3.0)
        # The firing is recorded once, when it happened (not when it was injected).
        (fired,) = [json.loads(line) for line in (root / "fired.jsonl").read_text().splitlines()]
        assert (fired["device"], fired["fault"]) == ("sim-000", "short-read")
        assert before <= fired["t"] <= time.time()
        await mode.ready(link, timeout=3.0)
        assert (await mode.evaluate(link, make_bitstream(2), timeout=3.0)).pulse_count is not None
        await link.close()
        await _inject(root, process.pid, 2, [{"device": "sim-001", "action": "unplug"}])
        await wait_until(lambda: not port_path(root, 1).exists(), timeout=5.0)
        await _inject(root, process.pid, 3, [{"device": "sim-001", "action": "plug"}])
        await wait_until(port_path(root, 1).exists, timeout=5.0)
        assert process.returncode is None
    finally:
        process.terminate()
        await process.wait()
