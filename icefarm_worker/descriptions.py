"""What the worker says about its devices beyond their state: properties declared in the config
or found by NVML, and the labels and properties changed at run time (`UpdateDevice`).

Every DeviceUpdate the worker sends (Register included) goes through `complete`, so a change
survives reconnects and re-plugs. Changes merge like the control's: a label set to "" or a
property set to NaN is removed. Removed keys are kept as tombstones and sent with every update,
so a removal the control missed while disconnected still reaches it with the next Register.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from icefarm.v1 import control_service_pb2 as cpb


class DeviceDescriptions:
    """Labels and properties per device id, laid over what discovery and the lifecycle say."""

    def __init__(self) -> None:
        self._labels: dict[str, dict[str, str]] = {}
        self._properties: dict[str, dict[str, float]] = {}

    def change(
        self,
        device_id: str,
        labels: Mapping[str, str] | None = None,
        properties: Mapping[str, float] | None = None,
    ) -> None:
        """Merge into the device's labels and properties ("" and NaN remove a key)."""
        self._labels.setdefault(device_id, {}).update(labels or {})
        self._properties.setdefault(device_id, {}).update(properties or {})

    def complete(self, update: cpb.DeviceUpdate) -> cpb.DeviceUpdate:
        """`update` with the device's labels and properties (tombstones included)."""
        completed = cpb.DeviceUpdate()
        completed.CopyFrom(update)
        completed.labels.update(self._labels.get(update.device_id, {}))
        completed.properties.update(self._properties.get(update.device_id, {}))
        return completed

    def labels_update(self, device_id: str) -> cpb.DeviceUpdate:
        """A labels-and-properties-only DeviceUpdate (no state: the control keeps its own)."""
        return self.complete(cpb.DeviceUpdate(device_id=device_id))

    def labels(self, device_id: str, discovered: Mapping[str, str]) -> dict[str, str]:
        """The device's labels now: what discovery found, changed as told."""
        merged = {**discovered, **self._labels.get(device_id, {})}
        return {k: v for k, v in merged.items() if v != ""}

    def properties(self, device_id: str) -> dict[str, float]:
        """The device's properties now."""
        merged = self._properties.get(device_id, {})
        return {k: v for k, v in merged.items() if not math.isnan(v)}
