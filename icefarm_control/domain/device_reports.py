"""What a worker's report about one of its devices means: the rules, free of storage.

A worker tells the control what each board is doing (`DeviceUpdate`), live and again in full
when it registers. `judge_update` and `judge_reconnect` decide, from the device as the database
has it and the report, which state to store and what to do about the hold. Who is right:

- The worker, about what the hardware does. A report from the board's worker is applied when
  the table allows it; from BROKEN (often only the control's inference from a failed or timed
  out command) and OFFLINE the table allows any state, so the two sides converge on the
  worker's newer evidence (a board the control broke that the worker reset and tested is
  AVAILABLE again; one it prepared for the current holder is READY, and the holder is told).
- The control, about holds. A held state needs the reservation that holds the board; a free
  state for a held board, or a report naming another reservation, is stale (an old release
  finishing) and changes nothing: the hold ends only by the control, and its release makes
  the worker reset the board and report again. Failures (BROKEN, OFFLINE, REMOVED) always
  apply: they are facts about the board whoever holds it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from icefarm_control.domain.errors import IllegalTransition
from icefarm_control.domain.states import (
    HELD_STATES,
    LOST_STATES,
    DeviceState,
    EndReason,
    check_transition,
    state_after_release,
)


@dataclass(frozen=True)
class DeviceReport:
    """One DeviceUpdate. `state` None = the worker did not say (a labels-only update);
    `reservation_id` is the reservation the worker believes holds the board ("" = none)."""

    device_id: str
    kind: str = ""
    state: DeviceState | None = None
    labels: dict[str, str] = field(default_factory=dict)
    properties: dict[str, float] = field(default_factory=dict)
    error: str = ""
    reset_on_release: bool = False
    reservation_id: str = ""


@dataclass(frozen=True)
class KnownDevice:
    """The device as the database has it."""

    state: DeviceState
    reservation_id: str | None
    reset_on_release: bool


class Hold(enum.Enum):
    """What becomes of the reservation the database says holds the device."""

    KEEP = "keep"
    END = "end"


@dataclass(frozen=True)
class Judgement:
    # The state to store; None = leave the state alone (the report was stale).
    state: DeviceState | None
    # Set when the hold recorded in the database must end, with the reason.
    end_hold: EndReason | None = None
    # Set when the worker still runs a reservation the control has let go: tell it to release.
    release_reservation: str | None = None


UNCHANGED = Judgement(state=None)


def merge_labels(current: dict[str, str], update: dict[str, str]) -> dict[str, str]:
    """Labels merge; a key set to "" is removed (ARCHITECTURE §6)."""
    merged = {**current, **update}
    return {k: v for k, v in merged.items() if v != ""}


def merge_properties(current: dict[str, float], update: dict[str, float]) -> dict[str, float]:
    """Properties merge; a key set to NaN is removed (a number has no empty value)."""
    merged = {**current, **update}
    return {k: v for k, v in merged.items() if not math.isnan(v)}


def carry_worker_labels(
    labels: dict[str, str],
    own: dict[str, str],
    worker: dict[str, str],
    previous: dict[str, str] | None = None,
) -> dict[str, str]:
    """A device carries its worker's labels, so selectors match them (`room=b12`); the
    device's own label wins on a conflict. `own`: the labels the report itself names.
    `previous`: the worker's labels before this Register; one it dropped or changed is taken
    off a device that still carries the old value and does not name the key itself."""
    carried = dict(labels)
    for key, value in (previous or {}).items():
        if worker.get(key) != value and carried.get(key) == value and key not in own:
            del carried[key]
    for key, value in worker.items():
        carried.setdefault(key, value)
    return carried


def judge_update(known: KnownDevice | None, report: DeviceReport) -> Judgement:
    """A live DeviceUpdate. Raises IllegalTransition for a move the table forbids.

    Reports race with commands (a board finishing an old release while the control already gave
    it to the next reservation), so a report about a hold the database no longer records is
    stale and ignored, unless it says the board failed or vanished: those are facts about the
    board whoever holds it.
    """
    if known is None:
        first = report.state or DeviceState.DISCOVERED
        if first in HELD_STATES or first == DeviceState.OFFLINE:
            raise IllegalTransition(f"device {report.device_id}: a new device cannot be {first}")
        return Judgement(state=first)
    target = report.state
    if target is None:
        return UNCHANGED
    holder = known.reservation_id
    if target in LOST_STATES:
        check_transition(report.device_id, known.state, target)
        removed = target == DeviceState.REMOVED and holder is not None
        return Judgement(state=target, end_hold=EndReason.DEVICE_REMOVED if removed else None)
    if report.reservation_id and report.reservation_id != holder:
        return UNCHANGED
    if holder is not None and target not in HELD_STATES:
        # Only the control lets a held board go; the worker is still busy with an old release.
        return UNCHANGED
    if holder is not None and not report.reservation_id:
        return UNCHANGED
    check_transition(report.device_id, known.state, target)
    if target in HELD_STATES and holder is None:
        raise IllegalTransition(
            f"device {report.device_id}: {target} needs the reservation that holds it"
        )
    return Judgement(state=target)


def judge_reconnect(
    known: KnownDevice | None, report: DeviceReport, *, prepare_pending: bool
) -> Judgement:
    """A device reported in Register. The worker was gone, so its devices come back as from
    OFFLINE (where the table allows any state); holds are kept only where both sides agree.
    `prepare_pending`: a prepare_device for the recorded hold has not been answered yet."""
    reported = report.state or DeviceState.DISCOVERED
    reset = report.reset_on_release
    holder = known.reservation_id if known is not None else None
    worker_holds = reported in HELD_STATES
    if holder is not None:
        if reported in LOST_STATES:
            removed = reported == DeviceState.REMOVED
            return Judgement(reported, EndReason.DEVICE_REMOVED if removed else None)
        if worker_holds and report.reservation_id == holder:
            return Judgement(reported)
        if prepare_pending:
            # The worker has not heard of the reservation yet; the command is on its way.
            return Judgement(DeviceState.RESERVED)
        stale = report.reservation_id if worker_holds else None
        if worker_holds:
            reported = state_after_release(reported, reset_on_release=reset)
        return Judgement(reported, EndReason.WORKER_LOST, stale)
    if worker_holds:
        # The reservation it names ended while the worker was away.
        released = state_after_release(reported, reset_on_release=reset)
        return Judgement(released, None, report.reservation_id)
    if reported == DeviceState.OFFLINE:
        raise IllegalTransition(f"device {report.device_id}: a live worker reported it OFFLINE")
    return Judgement(reported)
