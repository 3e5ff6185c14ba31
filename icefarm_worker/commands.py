"""What the worker does with each command the control sends down its WorkerSession.

Every command is answered with a CommandResult carrying its correlation id. The control sends
a command again after a reconnect when it saw no answer; a command already carried out is
answered from memory, one still running is answered when it ends: nothing is done twice.
The hold changes as soon as a command arrives (before its hardware steps queue for the board).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from icefarm.states import DeviceState as State
from icefarm.v1 import control_service_pb2 as cpb
from icefarm_worker.fleet import Fleet
from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.lifecycle import BoardFailed

log = structlog.get_logger(__name__)
# Answers remembered for re-sent commands (far more than the control can have unanswered).
REMEMBERED = 10_000


class Drains(Protocol):
    """What a drain does to the worker (the app implements it)."""

    @property
    def draining(self) -> bool: ...

    def begin_drain(self, timeout: float | None) -> None: ...

    def drain_complete(self) -> None: ...


class CommandHandler:
    """Carries out commands and sends their results (through `send_result`)."""

    def __init__(
        self, fleet: Fleet, send_result: Callable[[cpb.CommandResult], None], drains: Drains
    ) -> None:
        self.fleet = fleet
        self.send_result = send_result
        self.drains = drains
        self.done: OrderedDict[str, cpb.CommandResult] = OrderedDict()
        self.running: dict[str, asyncio.Task[None]] = {}

    def handle(self, command: cpb.WorkerCommand) -> None:
        """Start one command (or answer a repeat). Returns at once."""
        cid = command.correlation_id
        if cid in self.done:
            log.info("command repeated; answering from memory", correlation_id=cid)
            self.send_result(self.done[cid])
            return
        if cid in self.running:
            return  # answered when it ends
        kind = command.WhichOneof("kind") or ""
        log.info("command", kind=kind, correlation_id=cid)
        work = self._start(kind, command)
        task = asyncio.create_task(self._finish(cid, work))
        self.running[cid] = task

    async def _finish(self, cid: str, work: asyncio.Future[str]) -> None:
        try:
            error = await work
        except (BoardFailed, HardwareError) as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("command failed unexpectedly", correlation_id=cid)
            error = f"worker error: {exc}"
        result = cpb.CommandResult(correlation_id=cid, ok=not error, error=error)
        self.running.pop(cid, None)
        self.done[cid] = result
        while len(self.done) > REMEMBERED:
            self.done.popitem(last=False)
        self.send_result(result)

    def _start(self, kind: str, command: cpb.WorkerCommand) -> asyncio.Future[str]:
        """Take the synchronous part of the command now; the rest runs as a task whose result
        is the error text ("" = ok)."""
        if kind == "prepare_device":
            return self._prepare(command.prepare_device)
        if kind == "release_device":
            return self._release(command.release_device)
        if kind == "drain":
            timeout = command.drain.timeout.ToTimedelta().total_seconds()
            self.drains.begin_drain(timeout if timeout > 0 else None)
            return _now("")
        if kind == "drain_complete":
            self.drains.drain_complete()
            return _now("")
        device_id = getattr(getattr(command, kind, None), "device_id", "")
        board = self.fleet.boards.get(device_id)
        if board is None:
            return _now(f"no device {device_id!r} on this worker")
        if kind == "reboot_device":
            return asyncio.ensure_future(_ok(board.reboot()))
        if kind == "remove_device":
            return asyncio.ensure_future(_ok(board.remove()))
        return _now(f"unknown command {kind!r}")

    def _prepare(self, prepare: cpb.PrepareDeviceCommand) -> asyncio.Future[str]:
        board = self.fleet.boards.get(prepare.device_id)
        if board is None or board.state == State.REMOVED:
            return _now(f"no device {prepare.device_id!r} on this worker")
        # Even while draining: the control stopped placing reservations here when the drain
        # began, so a prepare that still arrives belongs to one made before it, and is served.
        board.hold(prepare.reservation_id)
        work = board.prepare(prepare.reservation_id, prepare.mode, dict(prepare.mode_args))
        return asyncio.ensure_future(_ok(work))

    def _release(self, release: cpb.ReleaseDeviceCommand) -> asyncio.Future[str]:
        board = self.fleet.boards.get(release.device_id)
        if board is None or board.state == State.REMOVED:
            return _now("")  # gone already: nothing holds it
        if not board.let_go(release.reservation_id):
            log.info("stale release ignored", device=release.device_id)
            return _now("")
        return asyncio.ensure_future(_ok(board.release()))


async def _ok(work: Awaitable[None]) -> str:
    await work
    return ""


def _now(error: str) -> asyncio.Future[str]:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    future.set_result(error)
    return future
