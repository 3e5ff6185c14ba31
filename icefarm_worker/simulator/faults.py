"""Faults a simulated board can be told to have, from the worker config or at run time.

In the worker's TOML config (`[simulator.faults]`, keys are device ids):

    "sim-001" = "no-answer"                                # every evaluation, from the start
    "sim-002" = { fault = "short-read", after = 2 }        # the 3rd evaluation on
    "sim-003" = { fault = "slow", delay = 1.5, once = true }
    "sim-004" = { fault = "flash-failure", after = 1 }     # the 2nd flash on

`after` counts evaluations (flashes for flash-failure) since the fault was set; `once` makes it
fire a single time, after which the board behaves again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

DEFAULT_SLOW_DELAY = 2.0


class Fault(Enum):
    """What goes wrong (see docs/worker.md for what each one looks like to the worker)."""

    # The firmware takes the bitstream and never answers.
    NO_ANSWER = "no-answer"
    # The firmware answers `Watchdog timeout, 103578 bytes received of 104090`.
    SHORT_READ = "short-read"
    # The copy is accepted but the image does not boot: the drive comes back (the board is in
    # its bootloader again) and the CDC port never returns.
    FLASH_FAILURE = "flash-failure"
    # The board vanishes mid-evaluation: its port closes and discovery reports REMOVE.
    UNPLUG = "unplug"
    # The firmware answers correctly, `delay` seconds late.
    SLOW = "slow"


@dataclass(frozen=True)
class FaultSpec:
    """A fault, when it starts (`after` evaluations or flashes), whether it fires `once`."""

    fault: Fault
    after: int = 0
    once: bool = False
    delay: float = DEFAULT_SLOW_DELAY


class FaultState:
    """One board's fault and the counts that decide when it fires."""

    def __init__(self, spec: FaultSpec | None = None) -> None:
        # Told each time a fault fires (the served simulator records it for the soak).
        self.listener: Callable[[Fault], None] | None = None
        self.set(spec)

    def set(self, spec: FaultSpec | None) -> None:
        """Replace the fault (None clears it); counting starts again."""
        self.spec = spec
        self._evaluations = 0
        self._flashes = 0
        self._fired = False

    def on_evaluation(self) -> Fault | None:
        """Count an evaluation; the fault to act out for it, if any."""
        self._evaluations += 1
        if self.spec is None or self.spec.fault is Fault.FLASH_FAILURE:
            return None
        return self._fire(self._evaluations)

    def on_flash(self) -> bool:
        """Count a flash; True when this one must fail."""
        self._flashes += 1
        if self.spec is None or self.spec.fault is not Fault.FLASH_FAILURE:
            return False
        return self._fire(self._flashes) is not None

    @property
    def delay(self) -> float:
        """How late a slow board answers."""
        return self.spec.delay if self.spec else DEFAULT_SLOW_DELAY

    def _fire(self, count: int) -> Fault | None:
        assert self.spec is not None
        if count <= self.spec.after or (self.spec.once and self._fired):
            return None
        self._fired = True
        if self.listener is not None:
            self.listener(self.spec.fault)
        return self.spec.fault


_KEYS = {"fault", "after", "once", "delay"}


def parse_faults(table: Mapping[str, Any]) -> dict[str, FaultSpec]:
    """`[simulator.faults]` from the worker config; ValueError naming the bad key."""
    return {str(device_id): _parse_one(str(device_id), value) for device_id, value in table.items()}


def _parse_one(device_id: str, value: Any) -> FaultSpec:
    where = f"simulator.faults.{device_id}"
    if isinstance(value, str):
        return FaultSpec(_fault(where, value))
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a fault name or a table, got {value!r}")
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected {sorted(_KEYS)})")
    if "fault" not in value:
        raise ValueError(f"{where}: missing key 'fault'")
    after = value.get("after", 0)
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError(f"{where}.after: expected a whole number >= 0, got {after!r}")
    once = value.get("once", False)
    if not isinstance(once, bool):
        raise ValueError(f"{where}.once: expected true or false, got {once!r}")
    delay = value.get("delay", DEFAULT_SLOW_DELAY)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        raise ValueError(f"{where}.delay: expected seconds >= 0, got {delay!r}")
    return FaultSpec(_fault(f"{where}.fault", value["fault"]), after, once, float(delay))


def _fault(where: str, name: Any) -> Fault:
    try:
        return Fault(str(name).replace("_", "-").lower())
    except ValueError:
        known = ", ".join(fault.value for fault in Fault)
        raise ValueError(f"{where}: unknown fault {name!r} (known: {known})") from None
