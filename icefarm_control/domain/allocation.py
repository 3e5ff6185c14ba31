"""Fair allocation: who gets which free devices, in arrival order, all or nothing."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from icefarm_control.domain.selectors import DeviceFacts, Selector


@dataclass(frozen=True)
class Demand:
    """One request for devices: `count` matching `selector`, or exactly `device_ids`."""

    key: Hashable
    count: int
    device_ids: tuple[str, ...] = ()
    selector: Selector | None = None

    def wants(self, device: DeviceFacts) -> bool:
        if self.device_ids:
            return device.id in self.device_ids
        return self.selector is None or self.selector.matches(device)


def plan_allocation(
    demands: Sequence[Demand], free: Sequence[DeviceFacts]
) -> dict[Hashable, list[str]]:
    """Serve `demands` in order from `free` (already in preference order).

    A demand that cannot be met whole takes nothing, and the free devices it could use are
    held back from the demands behind it: a later request may overtake it only on devices it
    does not want, so a large request is never starved by a stream of small ones.
    """
    unavailable: set[str] = set()
    granted: dict[Hashable, list[str]] = {}
    for demand in demands:
        candidates = [d.id for d in free if d.id not in unavailable and demand.wants(d)]
        needed = len(demand.device_ids) or demand.count
        if len(candidates) >= needed:
            granted[demand.key] = candidates[:needed]
            unavailable.update(candidates[:needed])
        else:
            unavailable.update(candidates)
    return granted
