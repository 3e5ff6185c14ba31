"""The device state machine: the one transition table, and the states a device may be held in."""

from __future__ import annotations

import enum

from icefarm_control.domain.errors import IllegalTransition


class DeviceState(enum.StrEnum):
    """Names match icefarm.v1.DeviceState without the DEVICE_STATE_ prefix."""

    DISCOVERED = "DISCOVERED"
    FLASHING = "FLASHING"
    TESTING = "TESTING"
    AVAILABLE = "AVAILABLE"
    RESERVED = "RESERVED"
    READY = "READY"
    BROKEN = "BROKEN"
    OFFLINE = "OFFLINE"
    REMOVED = "REMOVED"


class WorkerState(enum.StrEnum):
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


class ReservationState(enum.StrEnum):
    ACTIVE = "ACTIVE"
    ENDED = "ENDED"


class EndReason(enum.StrEnum):
    """Why devices stopped being held (icefarm.v1.EndReason without the prefix)."""

    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"
    WORKER_LOST = "WORKER_LOST"
    CLIENT_LOST = "CLIENT_LOST"
    DEVICE_REMOVED = "DEVICE_REMOVED"
    DEVICE_FAILED = "DEVICE_FAILED"


S = DeviceState
_ANYWHERE_FROM_LIVE = {S.BROKEN, S.OFFLINE, S.REMOVED}

# Where each state may go. A worker reporting anything else is refused, never applied.
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    S.DISCOVERED: frozenset({S.FLASHING, S.TESTING, *_ANYWHERE_FROM_LIVE}),
    S.FLASHING: frozenset({S.TESTING, S.FLASHING, *_ANYWHERE_FROM_LIVE}),
    # TESTING → FLASHING: the default firmware did not answer, flash it again.
    S.TESTING: frozenset({S.AVAILABLE, S.FLASHING, *_ANYWHERE_FROM_LIVE}),
    # AVAILABLE → FLASHING/TESTING: an operator reboot or a periodic re-test.
    S.AVAILABLE: frozenset({S.RESERVED, S.FLASHING, S.TESTING, *_ANYWHERE_FROM_LIVE}),
    # RESERVED → FLASHING/AVAILABLE: released while preparing (with or without a reset).
    S.RESERVED: frozenset({S.READY, S.FLASHING, S.AVAILABLE, *_ANYWHERE_FROM_LIVE}),
    # READY → RESERVED: a reboot or a mode switch prepares the board again.
    S.READY: frozenset({S.RESERVED, S.FLASHING, S.AVAILABLE, *_ANYWHERE_FROM_LIVE}),
    # BROKEN → whatever its worker finds. BROKEN is often the control's inference (a command
    # failed or timed out); the worker's later report of what the hardware does is newer
    # evidence. Held states still need the holder's reservation (domain/device_reports.py).
    S.BROKEN: frozenset(set(S) - {S.BROKEN}),
    # OFFLINE → whatever its worker reports on reconnect (reconciliation).
    S.OFFLINE: frozenset(set(S) - {S.OFFLINE}),
    # REMOVED → DISCOVERED: plugged in again.
    S.REMOVED: frozenset({S.DISCOVERED, S.OFFLINE}),
}

HELD_STATES = frozenset({S.RESERVED, S.READY})
# States whose devices still belong to a reservation but cannot be used by it.
LOST_STATES = frozenset({S.BROKEN, S.OFFLINE, S.REMOVED})


def can_transition(current: DeviceState, target: DeviceState) -> bool:
    """True when the table allows `current → target` (staying put is always allowed)."""
    return current == target or target in TRANSITIONS[current]


def check_transition(device_id: str, current: DeviceState, target: DeviceState) -> None:
    """Raise IllegalTransition unless the table allows `current → target`."""
    if not can_transition(current, target):
        raise IllegalTransition(f"device {device_id}: {current} → {target} is not allowed")


def state_after_release(current: DeviceState, *, reset_on_release: bool) -> DeviceState:
    """Where a device goes when its reservation lets it go.

    A board that needs a reset goes to FLASHING (its worker re-flashes the default firmware,
    tests it and reports AVAILABLE); other devices are free at once. A device that broke, went
    offline or was removed while held stays where it is.
    """
    if current not in HELD_STATES:
        return current
    target = S.FLASHING if reset_on_release else S.AVAILABLE
    check_transition("?", current, target)
    return target
