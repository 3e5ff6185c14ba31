"""Devices that are not USB boards: declared in the worker's config (`[[devices]]`) or found by
NVML at start. They are there for as long as the worker runs, cannot be flashed, and become
AVAILABLE at once (the lifecycle skips flashing for them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from icefarm_worker.hardware.base import DeviceChange, DiscoveredDevice, Discovery


class WithDevices:
    """A discovery (real, simulated or none) plus devices that come with every scan and
    never change."""

    def __init__(self, inner: Discovery, devices: Sequence[DiscoveredDevice]) -> None:
        self.inner = inner
        self.devices = list(devices)

    async def scan(self) -> list[DiscoveredDevice]:
        """The inner discovery's devices, then these."""
        return [*await self.inner.scan(), *self.devices]

    def changes(self) -> AsyncIterator[DeviceChange]:
        """The inner discovery's plug and unplug events (these devices have none)."""
        return self.inner.changes()

    async def close(self) -> None:
        """Close the inner discovery."""
        await self.inner.close()


class NoBoards:
    """The discovery of a worker that drives no USB boards (`boards = "none"`)."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    async def scan(self) -> list[DiscoveredDevice]:
        """Nothing is plugged in."""
        return []

    async def changes(self) -> AsyncIterator[DeviceChange]:
        """No events; ends when closed."""
        await self._closed.wait()
        nothing: tuple[DeviceChange, ...] = ()
        for change in nothing:  # an async generator that yields nothing
            yield change

    async def close(self) -> None:
        """End `changes()`."""
        self._closed.set()
