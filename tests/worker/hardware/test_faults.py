"""The simulator's fault table from the worker config."""

from __future__ import annotations

from typing import Any

import pytest

from icefarm_worker.simulator import Fault, FaultSpec, parse_faults
from icefarm_worker.simulator.faults import FaultState


def test_faults_parse_from_names_and_tables() -> None:
    table = {
        "sim-001": "no-answer",
        "sim-002": {"fault": "short_read", "after": 2},
        "sim-003": {"fault": "slow", "delay": 1.5, "once": True},
    }
    assert parse_faults(table) == {
        "sim-001": FaultSpec(Fault.NO_ANSWER),
        "sim-002": FaultSpec(Fault.SHORT_READ, after=2),
        "sim-003": FaultSpec(Fault.SLOW, once=True, delay=1.5),
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("melt", r"simulator.faults.sim-001: unknown fault 'melt'"),
        ({"fault": "slow", "speed": 2}, r"simulator.faults.sim-001: unknown key 'speed'"),
        ({"after": 1}, r"simulator.faults.sim-001: missing key 'fault'"),
        ({"fault": "slow", "after": -1}, r"simulator.faults.sim-001.after"),
        ({"fault": "slow", "once": "yes"}, r"simulator.faults.sim-001.once"),
        ({"fault": "slow", "delay": "soon"}, r"simulator.faults.sim-001.delay"),
        (3, r"simulator.faults.sim-001: expected a fault name or a table"),
    ],
)
def test_bad_fault_config_names_the_key(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_faults({"sim-001": value})


def test_after_and_once_decide_which_evaluations_fail() -> None:
    state = FaultState(FaultSpec(Fault.SHORT_READ, after=1, once=True))
    assert [state.on_evaluation() for _ in range(4)] == [None, Fault.SHORT_READ, None, None]
    state.set(FaultSpec(Fault.FLASH_FAILURE, after=1))
    assert state.on_evaluation() is None
    assert [state.on_flash() for _ in range(3)] == [False, True, True]
