"""Fair allocation: arrival order, all or nothing, explicit ids, no overtaking on wanted devices."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from icefarm_control.domain.allocation import Demand, plan_allocation
from icefarm_control.domain.selectors import parse_selector


@dataclass(frozen=True)
class Device:
    id: str
    worker: str = "lab-a"
    kind: str = "pico2-ice"
    labels: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, float] = field(default_factory=dict)


def boards(*ids: str, kind: str = "pico2-ice") -> list[Device]:
    return [Device(id=i, kind=kind) for i in ids]


def test_demands_are_served_in_arrival_order() -> None:
    plan = plan_allocation([Demand("first", 1), Demand("second", 1)], boards("b1"))
    assert plan == {"first": ["b1"]}


def test_every_demand_is_served_when_there_is_enough() -> None:
    plan = plan_allocation([Demand("first", 2), Demand("second", 1)], boards("b1", "b2", "b3"))
    assert plan == {"first": ["b1", "b2"], "second": ["b3"]}


def test_a_demand_that_cannot_be_met_whole_takes_nothing() -> None:
    plan = plan_allocation([Demand("big", 3)], boards("b1", "b2"))
    assert plan == {}


def test_a_demand_for_explicit_ids_gets_exactly_those() -> None:
    plan = plan_allocation(
        [Demand("named", 0, device_ids=("b3", "b1"))], boards("b1", "b2", "b3", "b4")
    )
    assert sorted(plan["named"]) == ["b1", "b3"]


def test_a_demand_for_explicit_ids_takes_nothing_when_one_is_not_free() -> None:
    plan = plan_allocation(
        [Demand("named", 0, device_ids=("b1", "gone")), Demand("any", 1)],
        boards("b1", "b2"),
    )
    assert "named" not in plan
    # b1 is held back for the blocked demand; the later one gets the other board.
    assert plan == {"any": ["b2"]}


def test_a_blocked_large_demand_holds_back_the_devices_it_wants() -> None:
    plan = plan_allocation([Demand("big", 3), Demand("small", 1)], boards("b1", "b2"))
    assert plan == {}


def test_a_later_demand_for_other_devices_overtakes_a_blocked_one() -> None:
    free = [*boards("p1", "p2"), *boards("g1", kind="gpu")]
    plan = plan_allocation(
        [
            Demand("big", 3, selector=parse_selector("kind=pico2-ice")),
            Demand("gpu", 1, selector=parse_selector("kind=gpu")),
            Demand("pico", 1, selector=parse_selector("kind=pico2-ice")),
        ],
        free,
    )
    assert plan == {"gpu": ["g1"]}


def test_a_later_unrestricted_demand_gets_only_devices_the_blocked_one_does_not_want() -> None:
    free = [*boards("p1", "p2"), *boards("g1", kind="gpu")]
    plan = plan_allocation(
        [Demand("big", 3, selector=parse_selector("kind=pico2-ice")), Demand("any", 1)], free
    )
    assert plan == {"any": ["g1"]}


def test_devices_are_taken_in_the_preference_order_of_free() -> None:
    plan = plan_allocation([Demand("one", 2), Demand("two", 1)], boards("b3", "b1", "b2"))
    assert plan == {"one": ["b3", "b1"], "two": ["b2"]}


def test_a_selector_only_takes_matching_devices() -> None:
    free = [*boards("p1"), *boards("g1", "g2", kind="gpu")]
    plan = plan_allocation([Demand("gpus", 2, selector=parse_selector("kind=gpu"))], free)
    assert plan == {"gpus": ["g1", "g2"]}


def test_no_device_is_granted_twice() -> None:
    demands = [Demand(n, 2) for n in range(5)]
    plan = plan_allocation(demands, boards(*(f"b{i}" for i in range(7))))
    granted = [device for ids in plan.values() for device in ids]
    assert len(granted) == len(set(granted)) == 6
    assert set(plan) == {0, 1, 2}
