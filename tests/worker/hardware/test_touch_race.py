"""The 1200-baud touch when the board reboots while the port is still being opened (found by the
chaos soak, bench/soak.py): the pty hung up between pyserial setting 1200 baud and flushing the
input, `termios.error` (not an OSError) escaped `touch_1200`, the release's reset was not
retried, and the board stayed in its bootloader for good. The touch worked; it must say so."""

from __future__ import annotations

import os
import sys
import termios
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.hardware.serial_link import touch_1200

TOUCHES = 300  # the hang-up lands inside the open in roughly one touch of twelve


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    # The board's thread must get the GIL between pyserial's steps to hang up inside the open.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _board_that_reboots_on_touch(master: int, stop: threading.Event) -> None:
    """Close the pty master the moment the port is set to 1200 baud, as the RP2350 does."""
    while not stop.is_set():
        try:
            if termios.tcgetattr(master)[5] == termios.B1200:
                os.close(master)
                return
        except termios.error:
            return
    os.close(master)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_a_board_that_reboots_during_the_touch_is_touched_never_an_unexpected_error() -> None:
    outcomes: Counter[str] = Counter()
    for _ in range(TOUCHES):
        master, slave = os.openpty()
        path = os.ttyname(slave)
        os.close(slave)
        stop = threading.Event()
        board = threading.Thread(target=_board_that_reboots_on_touch, args=(master, stop))
        board.start()
        try:
            outcomes[str(touch_1200(path))] += 1
        except HardwareError:
            outcomes["HardwareError"] += 1
        except Exception as exc:  # what the bug let out: the touch's caller does not expect it
            outcomes[type(exc).__name__] += 1
        finally:
            stop.set()
            board.join(timeout=5)
    assert set(outcomes) <= {"True", "False", "HardwareError"}, outcomes
