"""What a worker's report about a device means (domain/device_reports.py), without a database."""

from __future__ import annotations

import math

import pytest

from icefarm_control.domain.device_reports import (
    UNCHANGED,
    DeviceReport,
    Judgement,
    KnownDevice,
    judge_reconnect,
    judge_update,
    merge_labels,
    merge_properties,
)
from icefarm_control.domain.errors import IllegalTransition
from icefarm_control.domain.states import DeviceState, EndReason

S = DeviceState


def known(state: DeviceState, holder: str | None = None, reset: bool = True) -> KnownDevice:
    return KnownDevice(state, holder, reset)


def report(state: DeviceState | None, reservation: str = "", reset: bool = True) -> DeviceReport:
    return DeviceReport("b1", kind="pico2-ice", state=state, reservation_id=reservation,
                        reset_on_release=reset)  # fmt: skip


def test_labels_merge_and_an_empty_value_removes_the_key() -> None:
    assert merge_labels({"a": "1", "b": "2"}, {"b": "", "c": "3"}) == {"a": "1", "c": "3"}


def test_properties_merge_and_nan_removes_the_key() -> None:
    assert merge_properties({"t": 1.0, "v": 3.3}, {"v": math.nan, "w": 2.0}) == {
        "t": 1.0,
        "w": 2.0,
    }


@pytest.mark.parametrize(
    ("device", "update", "expected"),
    [
        (None, report(None), Judgement(S.DISCOVERED)),
        (None, report(S.AVAILABLE), Judgement(S.AVAILABLE)),
        (known(S.AVAILABLE), report(None), UNCHANGED),
        (known(S.AVAILABLE), report(S.FLASHING), Judgement(S.FLASHING)),
        (known(S.RESERVED, "r1"), report(S.READY, "r1"), Judgement(S.READY)),
        (known(S.READY, "r1"), report(S.BROKEN, "r1"), Judgement(S.BROKEN)),
        # Failures are facts about the board whoever holds it.
        (known(S.READY, "r2"), report(S.BROKEN, "r1"), Judgement(S.BROKEN)),
        (known(S.READY, "r1"), report(S.REMOVED), Judgement(S.REMOVED, EndReason.DEVICE_REMOVED)),
        # Stale: about a reservation that no longer holds it, or an old release finishing.
        (known(S.RESERVED, "r2"), report(S.READY, "r1"), UNCHANGED),
        (known(S.RESERVED, "r2"), report(S.AVAILABLE), UNCHANGED),
        (known(S.AVAILABLE), report(S.RESERVED, "r1"), UNCHANGED),
        (known(S.READY, "r1"), report(S.AVAILABLE, "r1"), UNCHANGED),
        # The worker is right about the hardware: a board the control broke (a command timed
        # out) that its worker reset and tested is free again, and one it prepared is READY.
        (known(S.BROKEN), report(S.AVAILABLE), Judgement(S.AVAILABLE)),
        (known(S.BROKEN), report(S.TESTING), Judgement(S.TESTING)),
        (known(S.BROKEN, "r1"), report(S.READY, "r1"), Judgement(S.READY)),
        (known(S.BROKEN, "r1"), report(S.RESERVED, "r1"), Judgement(S.RESERVED)),
        # The control is right about the hold: a held broken board reported free stays broken
        # (the holder releases it, and the worker's reset reports it again).
        (known(S.BROKEN, "r1"), report(S.AVAILABLE), UNCHANGED),
        (known(S.BROKEN, "r2"), report(S.READY, "r1"), UNCHANGED),
    ],
)
def test_live_updates(
    device: KnownDevice | None, update: DeviceReport, expected: Judgement
) -> None:
    assert judge_update(device, update) == expected


@pytest.mark.parametrize(
    ("device", "update"),
    [
        (known(S.AVAILABLE), report(S.READY)),
        (known(S.AVAILABLE), report(S.RESERVED)),  # a held state needs its reservation
        (known(S.BROKEN), report(S.READY)),  # a held state needs its reservation
        (None, report(S.READY)),
        (None, report(S.OFFLINE)),
    ],
)
def test_live_updates_the_table_forbids_are_refused(
    device: KnownDevice | None, update: DeviceReport
) -> None:
    with pytest.raises(IllegalTransition):
        judge_update(device, update)


@pytest.mark.parametrize(
    ("device", "update", "pending", "expected"),
    [
        # Whatever it was (OFFLINE while away), a free board takes the reported state.
        (known(S.OFFLINE), report(S.AVAILABLE), False, Judgement(S.AVAILABLE)),
        (known(S.BROKEN), report(S.TESTING), False, Judgement(S.TESTING)),
        # Both sides agree on the hold: kept.
        (known(S.OFFLINE, "r1"), report(S.READY, "r1"), False, Judgement(S.READY)),
        # The worker never heard of the hold, but the prepare is on its way: kept.
        (known(S.OFFLINE, "r1"), report(S.AVAILABLE), True, Judgement(S.RESERVED)),
        # The worker forgot the hold: it ends.
        (
            known(S.OFFLINE, "r1"),
            report(S.AVAILABLE),
            False,
            Judgement(S.AVAILABLE, EndReason.WORKER_LOST),
        ),
        # The worker runs another, ended reservation: the hold ends and it is told to release.
        (
            known(S.OFFLINE, "r1"),
            report(S.READY, "r0"),
            False,
            Judgement(S.FLASHING, EndReason.WORKER_LOST, "r0"),
        ),
        # Free in the database, held on the worker: released (to FLASHING for a reset).
        (known(S.OFFLINE), report(S.READY, "r0"), False, Judgement(S.FLASHING, None, "r0")),
        (
            known(S.OFFLINE),
            report(S.READY, "r0", reset=False),
            False,
            Judgement(S.AVAILABLE, None, "r0"),
        ),
        (None, report(S.AVAILABLE), False, Judgement(S.AVAILABLE)),
        (
            known(S.READY, "r1"),
            report(S.REMOVED),
            False,
            Judgement(S.REMOVED, EndReason.DEVICE_REMOVED),
        ),
    ],
)
def test_reconnect(
    device: KnownDevice | None, update: DeviceReport, pending: bool, expected: Judgement
) -> None:
    assert judge_reconnect(device, update, prepare_pending=pending) == expected


def test_a_live_worker_cannot_report_a_board_offline_on_reconnect() -> None:
    with pytest.raises(IllegalTransition):
        judge_reconnect(known(S.AVAILABLE), report(S.OFFLINE), prepare_pending=False)
