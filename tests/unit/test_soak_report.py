"""The soak report's story around a broken invariant: for a board that never came back, the
board's own state changes (the CI failure of a board stuck REMOVED printed nothing)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from tests.soak.farm import Farm, Sizes
from tests.soak.monitor import Break
from tests.soak.report import _first_break


def test_a_stuck_board_is_told_by_its_state_changes_and_the_faults_around_them() -> None:
    monitor = SimpleNamespace(
        changes=[
            (100.0, "w1-003", "AVAILABLE"),
            (101.0, "w0-000", "RESERVED"),
            (110.0, "w1-003", "REMOVED"),
        ],
        notes=[(108.0, "fault worker-kill begins"), (300.0, "faults over; clients asked to stop")],
    )
    stuck = Break(
        400.0,
        "board not AVAILABLE",
        "1 board(s) not AVAILABLE: w1-003=REMOVED",
        devices=("w1-003",),
    )
    outcome = SimpleNamespace(
        breaks={"every healthy plugged-in board AVAILABLE": [stuck]},
        monitor=monitor,
        seen=SimpleNamespace(lives=[]),
    )
    first = _first_break(outcome)  # type: ignore[arg-type]
    assert first is not None
    assert first["t"] == 110.0
    assert first["around"] == [
        "-10.0s board w1-003: AVAILABLE",
        "-2.0s soak: fault worker-kill begins",
        "+0.0s board w1-003: REMOVED",
    ]


def test_a_process_that_exits_unasked_is_reported_and_one_the_soak_killed_is_not(
    tmp_path: Path,
) -> None:
    farm = Farm(tmp_path, "sqlite", Sizes(), 1, use_netns=False)
    (tmp_path / "logs").mkdir()
    crashed = farm._spawn("control-1", [sys.executable, "-c", "raise SystemExit(2)"], "c1.log")
    farm.controls[1] = crashed
    killed = farm._spawn("worker-0", [sys.executable, "-c", "import time; time.sleep(60)"], "w0")
    farm.workers[0] = killed
    crashed.popen.wait(timeout=30)
    farm.kill(killed)
    (exit_,) = farm.unexpected_exits()
    assert exit_.startswith("control-1 (pid") and "exited with 2" in exit_
