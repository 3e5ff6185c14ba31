"""What a reserved board does: one `Mode` class per file, registered by name.

A mode names the firmware it needs (a key into the worker config's `[firmware]` table), and
either evaluates bitstreams over the board's serial link (`pulsecount`, `varmax`) or exports the
board (`usbip`). Adding a mode touches one file in this package and its tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from icefarm_worker.hardware.base import SerialLink


@dataclass(frozen=True)
class Measurement:
    """What one evaluation produced: exactly one of the two is set."""

    pulse_count: int | None = None
    variance: float | None = None


class EvaluationFailed(Exception):
    """This bitstream could not be evaluated on this board (short transfer, watchdog timeout,
    garbage answer). `board_fault` says whether the board itself is suspect (reboot it once)."""

    def __init__(self, message: str, *, board_fault: bool = True) -> None:
        super().__init__(message)
        self.board_fault = board_fault


class Mode(ABC):
    name: ClassVar[str]
    # Key into the worker config's firmware table ("pulsecount", "varmax", "default").
    firmware: ClassVar[str]
    # True when the mode evaluates bitstreams (Evaluate); False for export-only modes.
    evaluates: ClassVar[bool] = True

    def __init__(self, args: Mapping[str, str]) -> None:
        """`args` are the reservation's mode_args; raise ValueError naming a bad one."""
        self.args = dict(args)

    # Optional hook: a mode with nothing to check keeps this no-op.
    async def ready(self, link: SerialLink, timeout: float) -> None:  # noqa: B027
        """Check the freshly flashed firmware answers as this mode expects."""

    @abstractmethod
    async def evaluate(self, link: SerialLink, bitstream: bytes, timeout: float) -> Measurement:
        """Run one bitstream; EvaluationFailed when it cannot be evaluated."""
