"""The states of devices, workers and reservations, and the device transition table: one
definition for the control, the worker and the client. Names match the icefarm.v1 enums
without their prefix; UNSPECIFIED is the proto's zero value ("not set"), never a state a
device is in."""

from __future__ import annotations

import enum


class DeviceState(enum.StrEnum):
    """The life of a device (ARCHITECTURE §5; docs/api.md "Device states")."""

    UNSPECIFIED = "UNSPECIFIED"
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
    """Whether a worker takes reservations."""

    UNSPECIFIED = "UNSPECIFIED"
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


class ReservationState(enum.StrEnum):
    """Whether a reservation still holds devices."""

    UNSPECIFIED = "UNSPECIFIED"
    ACTIVE = "ACTIVE"
    ENDED = "ENDED"


class EndReason(enum.StrEnum):
    """Why devices stopped being held."""

    UNSPECIFIED = "UNSPECIFIED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"
    WORKER_LOST = "WORKER_LOST"
    CLIENT_LOST = "CLIENT_LOST"
    DEVICE_REMOVED = "DEVICE_REMOVED"
    DEVICE_FAILED = "DEVICE_FAILED"


S = DeviceState
# Every state a device can be in.
DEVICE_STATES = frozenset(S) - {S.UNSPECIFIED}
_ANYWHERE_FROM_LIVE = {S.BROKEN, S.OFFLINE, S.REMOVED}

# Where each state may go. A worker reporting anything else is refused, never applied.
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    S.UNSPECIFIED: frozenset(),
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
    # evidence. Held states still need the holder's reservation (control: device_reports.py).
    S.BROKEN: DEVICE_STATES - {S.BROKEN},
    # OFFLINE → whatever its worker reports on reconnect (reconciliation).
    S.OFFLINE: DEVICE_STATES - {S.OFFLINE},
    # REMOVED → DISCOVERED: plugged in again.
    S.REMOVED: frozenset({S.DISCOVERED, S.OFFLINE}),
}

# States in which a device is used by its holder.
HELD_STATES = frozenset({S.RESERVED, S.READY})
# States whose devices still belong to a reservation but cannot be used by it.
LOST_STATES = frozenset({S.BROKEN, S.OFFLINE, S.REMOVED})


def can_transition(current: DeviceState, target: DeviceState) -> bool:
    """True when the table allows `current → target` (staying put is always allowed)."""
    return current == target or target in TRANSITIONS[current]
