"""Evaluating bitstreams across every held board, straight from the workers.

One WorkerService.Evaluate stream per worker holding boards of the reservation. Each stream
gets at most `in_flight` bitstreams per board at a time, so every board stays busy without
queueing the whole experiment on one worker. Results are yielded as they arrive. A worker that
loses all its boards (or its connection) gives its unfinished bitstreams back to the others; a
bitstream that cannot be evaluated (wrong size, failed three times) comes back as a failed
`Result`; only when no board is left at all is `DeviceFailed` raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from icefarm.limits import MAX_BITSTREAM_BYTES
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_client import convert
from icefarm_client.errors import DeviceFailed, translate
from icefarm_client.models import Result

if TYPE_CHECKING:
    from icefarm_client.calls import CallBase

log = structlog.get_logger(__name__)
Bitstreams = Iterable[str | PathLike[str] | bytes | tuple[str, bytes]]
# What a worker answers for a bitstream it has no board left for (icefarm_worker/evaluation.py).
NO_BOARD_LEFT = "no board left"
MAX_LANES_PER_BITSTREAM = 3


@dataclass
class Item:
    """One bitstream on its way."""

    id: str
    data: bytes
    lanes_tried: int = 0
    last_error: str = ""
    # Tries on the lanes that gave it back (a worker's own count restarts on the next one).
    earlier_attempts: int = 0


@dataclass
class Lane:
    """One worker's Evaluate stream."""

    endpoint: str
    worker: str
    boards: int
    capacity: int
    queue: asyncio.Queue[wpb.EvaluateRequest | None] = field(default_factory=asyncio.Queue)
    in_flight: dict[str, Item] = field(default_factory=dict)
    open: bool = True
    task: asyncio.Task[None] | None = None
    error: str = ""


def items_of(bitstreams: Bitstreams) -> Iterator[Item]:
    """Items from paths (id: the path), bytes (id: the index) or (id, bytes) pairs."""
    seen: set[str] = set()
    for index, entry in enumerate(bitstreams):
        if isinstance(entry, tuple):
            item = Item(str(entry[0]), bytes(entry[1]))
        elif isinstance(entry, bytes | bytearray | memoryview):
            item = Item(str(index), bytes(entry))
        else:
            item = Item(str(entry), Path(entry).read_bytes())
        if item.id in seen:
            raise ValueError(f"bitstream id {item.id!r} appears twice")
        seen.add(item.id)
        yield item


class Evaluation:
    """One `evaluate()` call's scheduler."""

    def __init__(
        self,
        client: CallBase,
        token: str,
        boards_by_worker: dict[tuple[str, str], int],
        bitstreams: Bitstreams,
        in_flight: int,
    ) -> None:
        self.client = client
        self.token = token
        self.source = items_of(bitstreams)
        self.source_done = False
        self.reruns: deque[Item] = deque()
        self.outstanding = 0
        self.unresolved = 0
        self.failed = False
        self.out: asyncio.Queue[Result | BaseException] = asyncio.Queue()
        self.lanes = [
            Lane(endpoint, worker, boards, max(1, in_flight) * boards)
            for (endpoint, worker), boards in boards_by_worker.items()
            if boards > 0
        ]

    async def results(self) -> AsyncIterator[Result]:
        """Each result as it arrives; DeviceFailed when no board is left for the rest."""
        if not self.lanes:
            raise DeviceFailed("no held board is ready to evaluate on")
        for lane in self.lanes:
            lane.task = asyncio.create_task(self._stream(lane))
        try:
            self._refill()
            while not (self.source_done and self.outstanding == 0):
                outcome = await self.out.get()
                if isinstance(outcome, BaseException):
                    raise outcome
                self.outstanding -= 1
                yield outcome
        finally:
            await self._stop()

    async def _stop(self) -> None:
        for lane in self.lanes:
            self._close(lane)
            if lane.task is not None:
                lane.task.cancel()
        for lane in self.lanes:
            if lane.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task

    def _next_item(self) -> Item | None:
        if self.reruns:
            return self.reruns.popleft()
        if self.source_done:
            return None
        try:
            item = next(self.source)
        except StopIteration:
            self.source_done = True
            return None
        except (OSError, ValueError) as exc:
            self.source_done = True
            self.out.put_nowait(exc)
            return None
        self.outstanding += 1
        self.unresolved += 1
        return item

    def _refill(self) -> None:
        """Top every open lane up to its capacity; close lanes when nothing is left."""
        live = [lane for lane in self.lanes if lane.open]
        if not live:
            if not self.failed and (self.reruns or self.unresolved or not self.source_done):
                self.failed = True
                reason = "; ".join(sorted({lane.error for lane in self.lanes if lane.error}))
                self.out.put_nowait(
                    DeviceFailed(f"no board left to evaluate on ({reason or 'all failed'})")
                )
            return
        for lane in live:
            while len(lane.in_flight) < lane.capacity:
                item = self._next_item()
                if item is None:
                    break
                if len(item.data) > MAX_BITSTREAM_BYTES:
                    # A worker would end the whole stream over it: fail this one alone.
                    error = f"{len(item.data)} bytes; a worker takes at most {MAX_BITSTREAM_BYTES}"
                    self._emit(Result(item.id, "", error=error, attempt=0))
                    continue
                item.lanes_tried += 1
                lane.in_flight[item.id] = item
                lane.queue.put_nowait(
                    wpb.EvaluateRequest(bitstream=wpb.Bitstream(id=item.id, data=item.data))
                )
        # Idle lanes close only once every bitstream has its result: until then a board of
        # another lane may fail and give its bitstreams back to them.
        if self.source_done and not self.reruns and self.unresolved == 0:
            for lane in live:
                self._close(lane)

    def _close(self, lane: Lane) -> None:
        if lane.open:
            lane.open = False
            lane.queue.put_nowait(None)

    def _give_back(self, item: Item, error: str) -> None:
        """A bitstream a lane could not run: another lane tries it, or it fails."""
        item.last_error = error
        if item.lanes_tried >= MAX_LANES_PER_BITSTREAM:
            self._emit(Result(item.id, "", error=error, attempt=item.earlier_attempts))
            return
        self.reruns.append(item)

    def _emit(self, result: Result) -> None:
        self.unresolved -= 1
        self.out.put_nowait(result)

    async def _requests(self, lane: Lane) -> AsyncIterator[wpb.EvaluateRequest]:
        while (request := await lane.queue.get()) is not None:
            yield request

    async def _stream(self, lane: Lane) -> None:
        stub = self.client.worker_stub(lane.endpoint)
        metadata = self.client.settings.metadata(self.token)
        call: Any = stub.Evaluate(self._requests(lane), metadata=metadata)
        try:
            async for response in call:
                self._on_result(lane, convert.result(response.result, lane.worker))
            if lane.in_flight:
                lane.error = f"{lane.worker}: the stream ended early"
        except grpc.RpcError as error:
            lane.error = f"{lane.worker}: {translate(error, 'worker').message}"
            log.warning("evaluate stream failed", worker=lane.worker, error=lane.error)
        finally:
            call.cancel()
        self._close(lane)
        for item in list(lane.in_flight.values()):
            item.earlier_attempts += 1  # it was on its way to (or on) a board of the lane
            self._give_back(item, lane.error)
        lane.in_flight.clear()
        self._refill()

    def _on_result(self, lane: Lane, result: Result) -> None:
        item = lane.in_flight.pop(result.bitstream_id, None)
        if item is None:
            return
        if result.error.startswith(NO_BOARD_LEFT):
            lane.error = f"{lane.worker}: {result.error}"
            self._close(lane)
            item.earlier_attempts += max(result.attempt, 1)
            self._give_back(item, result.error)
        else:
            # `attempt` counts every try of the bitstream, on this worker and before it.
            self._emit(dataclasses.replace(result, attempt=result.attempt + item.earlier_attempts))
        self._refill()
