"""The boards of this worker: found by discovery, each with its own lifecycle.

A board found (at start or plugged in later) is brought up in its own task; an unplugged board
is REMOVED at once. The lifecycles stay when unplugged, so a board plugged in again keeps its
place (and the control sees REMOVED → DISCOVERED).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import structlog

from icefarm.states import DeviceState as State
from icefarm.v1 import control_service_pb2 as cpb
from icefarm_worker.hardware.base import (
    Board,
    ChangeKind,
    DeviceChange,
    DiscoveredDevice,
    Discovery,
    Usbip,
)
from icefarm_worker.lifecycle import BoardFailed, BoardLifecycle, Reporter, Timeouts
from icefarm_worker.modes.base import Mode

log = structlog.get_logger(__name__)
BoardFactory = Callable[[DiscoveredDevice], Board]


class Fleet:
    """Every board this worker has seen, by device id."""

    def __init__(
        self,
        discovery: Discovery,
        make_board: BoardFactory,
        *,
        usbip: Usbip | None,
        firmware: Mapping[str, Path],
        modes: Mapping[str, type[Mode]],
        timeouts: Timeouts,
        report: Reporter,
    ) -> None:
        self.discovery = discovery
        self.make_board = make_board
        self.usbip = usbip
        self.firmware = firmware
        self.modes = modes
        self.timeouts = timeouts
        self.report = report
        self.boards: dict[str, BoardLifecycle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Scan, bring every board up (in the background), and follow plug/unplug events."""
        changes = self.discovery.changes()
        for device in await self.discovery.scan():
            self.added(device)
        self._watcher = asyncio.create_task(self._watch(changes))

    async def _watch(self, changes: AsyncIterator[DeviceChange]) -> None:
        async for change in changes:
            try:
                if change.kind == ChangeKind.ADD:
                    self.added(change.device)
                else:
                    await self.removed(change.device.device_id)
            except Exception:
                log.exception("device change not handled", device=change.device.device_id)

    def added(self, device: DiscoveredDevice) -> BoardLifecycle:
        """A board appeared: (re)start its lifecycle from DISCOVERED."""
        board = self.make_board(device) if device.flashable else None
        lifecycle = self.boards.get(device.device_id)
        if lifecycle is None:
            lifecycle = BoardLifecycle(
                device,
                board,
                firmware=self.firmware,
                modes=self.modes,
                usbip=self.usbip,
                timeouts=self.timeouts,
                report=self.report,
            )
            self.boards[device.device_id] = lifecycle
        elif lifecycle.state != State.REMOVED:
            return lifecycle  # already known and present (a duplicate ADD)
        lifecycle.plugged(device, board)
        log.info("board found", device=device.device_id, kind=device.kind)
        self.spawn(self._bring_up(lifecycle))
        return lifecycle

    async def removed(self, device_id: str) -> None:
        """A board was unplugged: REMOVED at once."""
        lifecycle = self.boards.get(device_id)
        if lifecycle is not None:
            log.info("board unplugged", device=device_id)
            await lifecycle.unplugged()

    async def _bring_up(self, lifecycle: BoardLifecycle) -> None:
        with contextlib.suppress(BoardFailed):
            await lifecycle.reset()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background, kept until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def updates(self) -> list[cpb.DeviceUpdate]:
        """Every board as it is now (the devices of a Register)."""
        return [board.update() for board in self.boards.values()]

    def held_by(self, reservation_id: str) -> list[BoardLifecycle]:
        """The boards `reservation_id` holds now."""
        return [b for b in self.boards.values() if b.holds(reservation_id)]

    def any_held(self) -> bool:
        """True while any reservation holds a board here."""
        return any(b.reservation_id for b in self.boards.values())

    async def stop(self) -> None:
        """Stop following discovery and close every board's serial link."""
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *self._tasks, *([self._watcher] if self._watcher else []), return_exceptions=True
        )
        for board in self.boards.values():
            await board.close()
        with contextlib.suppress(Exception):
            await self.discovery.close()
