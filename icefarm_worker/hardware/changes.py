"""Fan-out of device add/remove events to every `Discovery.changes()` iterator.

Changes published before anyone subscribed are kept (up to a bound) for the first subscriber,
so a worker that scans and then subscribes misses nothing that happened in between; a scan
drops what came before it, since the scan itself reports those devices.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from icefarm_worker.hardware.base import DeviceChange

BACKLOG = 1024


class ChangeFeed:
    """Delivers each published `DeviceChange` to all current subscribers, in order."""

    def __init__(self, backlog: int = BACKLOG) -> None:
        self._subscribers: list[asyncio.Queue[DeviceChange | None]] = []
        self._backlog: deque[DeviceChange] = deque(maxlen=backlog)
        self._closed = False

    def publish(self, change: DeviceChange) -> None:
        """Hand `change` to every subscriber (or keep it for the first one)."""
        if self._closed:
            return
        if not self._subscribers:
            self._backlog.append(change)
            return
        for queue in self._subscribers:
            queue.put_nowait(change)

    def forget_backlog(self) -> None:
        """A scan just reported the present devices: earlier changes are in it already."""
        self._backlog.clear()

    def subscribe(self) -> AsyncIterator[DeviceChange]:
        """An iterator of the changes from now on; it ends when the feed is closed."""
        queue: asyncio.Queue[DeviceChange | None] = asyncio.Queue()
        while self._backlog:
            queue.put_nowait(self._backlog.popleft())
        if self._closed:
            queue.put_nowait(None)
        else:
            # Registered now, not at the first __anext__, so nothing slips in between.
            self._subscribers.append(queue)
        return self._iterate(queue)

    def close(self) -> None:
        """End every subscriber's iteration."""
        self._closed = True
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._subscribers.clear()

    async def _iterate(
        self, queue: asyncio.Queue[DeviceChange | None]
    ) -> AsyncIterator[DeviceChange]:
        try:
            while True:
                change = await queue.get()
                if change is None:
                    return
                yield change
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)
