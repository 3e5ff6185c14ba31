"""The device state machine: the one transition table and where a released device goes."""

from __future__ import annotations

import enum
import itertools

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from icefarm.v1 import types_pb2
from icefarm_control.domain.errors import IllegalTransition, Reason
from icefarm_control.domain.states import (
    DEVICE_STATES,
    HELD_STATES,
    LOST_STATES,
    TRANSITIONS,
    DeviceState,
    EndReason,
    ReservationState,
    WorkerState,
    can_transition,
    check_transition,
    state_after_release,
)

S = DeviceState
LIVE_STATES = [S.DISCOVERED, S.FLASHING, S.TESTING, S.AVAILABLE, S.RESERVED, S.READY]


def test_every_state_has_an_entry_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(DeviceState)


def test_the_table_only_names_real_states() -> None:
    for targets in TRANSITIONS.values():
        assert targets <= set(DeviceState)


@pytest.mark.parametrize("current", LIVE_STATES)
@pytest.mark.parametrize("target", [S.BROKEN, S.OFFLINE, S.REMOVED])
def test_broken_offline_and_removed_are_reachable_from_every_live_state(
    current: DeviceState, target: DeviceState
) -> None:
    assert can_transition(current, target)
    check_transition("board-1", current, target)


@pytest.mark.parametrize("state", list(DeviceState))
def test_staying_put_is_always_allowed(state: DeviceState) -> None:
    assert can_transition(state, state)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.AVAILABLE, S.READY),
        (S.DISCOVERED, S.AVAILABLE),
        (S.DISCOVERED, S.RESERVED),
        (S.FLASHING, S.AVAILABLE),
        (S.TESTING, S.RESERVED),
        (S.REMOVED, S.AVAILABLE),
        (S.REMOVED, S.READY),
    ],
)
def test_skipping_steps_of_the_lifecycle_is_illegal(
    current: DeviceState, target: DeviceState
) -> None:
    assert not can_transition(current, target)
    with pytest.raises(IllegalTransition):
        check_transition("board-1", current, target)


@pytest.mark.parametrize("target", sorted(DEVICE_STATES - {S.BROKEN}))
def test_a_broken_board_takes_whatever_state_its_worker_finds(target: DeviceState) -> None:
    # BROKEN is often the control's inference (a command failed or timed out); the worker's
    # later report of what the hardware does is newer evidence (issue 9, defect 12).
    check_transition("board-1", S.BROKEN, target)


def test_the_normal_lifecycle_is_allowed_step_by_step() -> None:
    path = [S.DISCOVERED, S.FLASHING, S.TESTING, S.AVAILABLE, S.RESERVED, S.READY, S.FLASHING]
    for current, target in itertools.pairwise(path):
        check_transition("board-1", current, target)


def test_illegal_transition_names_the_device_and_both_states() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition("board-7", S.AVAILABLE, S.READY)
    message = str(caught.value)
    assert "board-7" in message
    assert "AVAILABLE" in message and "READY" in message
    assert caught.value.reason == Reason.ILLEGAL_TRANSITION


@pytest.mark.parametrize("held", sorted(HELD_STATES))
def test_a_held_board_that_needs_a_reset_is_reflashed_on_release(held: DeviceState) -> None:
    assert state_after_release(held, reset_on_release=True) == S.FLASHING


@pytest.mark.parametrize("held", sorted(HELD_STATES))
def test_a_held_device_without_reset_is_available_at_once_on_release(held: DeviceState) -> None:
    assert state_after_release(held, reset_on_release=False) == S.AVAILABLE


@pytest.mark.parametrize("lost", sorted(LOST_STATES))
@pytest.mark.parametrize("reset", [True, False])
def test_a_device_lost_while_held_stays_where_it_is_on_release(
    lost: DeviceState, reset: bool
) -> None:
    assert state_after_release(lost, reset_on_release=reset) == lost


def test_held_and_lost_states_are_the_documented_ones() -> None:
    assert {S.RESERVED, S.READY} == HELD_STATES
    assert {S.BROKEN, S.OFFLINE, S.REMOVED} == LOST_STATES


def _proto_names(enum_type: EnumTypeWrapper, prefix: str) -> set[str]:
    names = {value.name for value in enum_type.DESCRIPTOR.values}
    assert all(name.startswith(prefix) for name in names)
    return {name.removeprefix(prefix) for name in names}


@pytest.mark.parametrize(
    ("python_enum", "proto_enum", "prefix"),
    [
        (DeviceState, types_pb2.DeviceState, "DEVICE_STATE_"),
        (WorkerState, types_pb2.WorkerState, "WORKER_STATE_"),
        (EndReason, types_pb2.EndReason, "END_REASON_"),
        (ReservationState, types_pb2.ReservationState, "RESERVATION_STATE_"),
    ],
)
def test_python_enum_names_equal_the_proto_value_names_without_prefix(
    python_enum: type[enum.StrEnum], proto_enum: EnumTypeWrapper, prefix: str
) -> None:
    assert {member.name for member in python_enum} == _proto_names(proto_enum, prefix)
    assert all(member.value == member.name for member in python_enum)
