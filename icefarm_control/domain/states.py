"""The device state machine as the control applies it: the states and the one transition
table are shared (icefarm/states.py); here an illegal transition becomes a domain error."""

from __future__ import annotations

from icefarm.states import (
    DEVICE_STATES,
    HELD_STATES,
    LOST_STATES,
    TRANSITIONS,
    DeviceState,
    EndReason,
    ReservationState,
    WorkerState,
    can_transition,
)
from icefarm_control.domain.errors import IllegalTransition

__all__ = [
    "DEVICE_STATES",
    "HELD_STATES",
    "LOST_STATES",
    "TRANSITIONS",
    "DeviceState",
    "EndReason",
    "ReservationState",
    "WorkerState",
    "can_transition",
    "check_transition",
    "state_after_release",
]


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
    target = DeviceState.FLASHING if reset_on_release else DeviceState.AVAILABLE
    check_transition("?", current, target)
    return target
