"""One Evaluate stream: bitstreams queued per board, each result out as soon as it exists.

Each held board of the reservation has a runner task. A bitstream aimed at a board waits in
that board's queue; the others wait in a shared queue any free runner takes from. A board that
fails mid-queue (a board fault or a hardware error) is rebooted once (its mode re-flashed) and
the bitstream is tried again; a board that fails again right after its reboot, or whose reboot
fails, is BROKEN (reported to the control, which tells the holder) and its queue moves to the
other boards. A bitstream that still cannot run comes back as a failed result: the stream
itself never dies of a board.

A stream holds at most `limit` bitstreams in the worker at once, counted from when one is read
off the stream until its result has been handed to gRPC: queued, running and unsent results
alike. The reader waits for room (`room()`) before it reads again, so a client that sends
faster than the boards run, or never reads its results, is held back by gRPC flow control
instead of growing the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from google.protobuf import duration_pb2

from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.lifecycle import BoardFailed, BoardLifecycle, NotHeld
from icefarm_worker.modes.base import EvaluationFailed, Measurement

log = structlog.get_logger(__name__)
# A bitstream is tried at most this often (on one board, after its reboot, then elsewhere).
MAX_ATTEMPTS = 3
# The largest bitstream accepted (an iCE40UP5K image is 104090 bytes; room for bigger parts).


@dataclass
class Job:
    """One bitstream waiting for (another) try."""

    bitstream: wpb.Bitstream
    queued: float
    attempt: int = 1
    last_error: str = ""


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return d


class EvaluationRun:
    """The queues and runners of one Evaluate stream."""

    def __init__(self, boards: list[BoardLifecycle], reservation_id: str, limit: int) -> None:
        self.reservation_id = reservation_id
        self.limit = max(1, limit)
        # Read off the stream and not yet handed to gRPC as a result; the most there ever was.
        self.in_flight = 0
        self.peak_in_flight = 0
        self._room = asyncio.Event()
        self.boards = {b.device_id: b for b in boards}
        self.live: set[str] = set(self.boards)
        self.own: dict[str, deque[Job]] = {d: deque() for d in self.boards}
        self.shared: deque[Job] = deque()
        self.pending = 0
        self.input_done = False
        self._results: asyncio.Queue[wpb.EvaluateResult | None] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._runners: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ the stream's side

    def start(self) -> None:
        """Start one runner per board."""
        self._runners = [asyncio.create_task(self._run(b)) for b in self.boards.values()]

    def submit(self, bitstream: wpb.Bitstream) -> None:
        """Queue a bitstream (on its board, or for any board)."""
        self.pending += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._route(Job(bitstream, time.monotonic()))

    async def room(self) -> None:
        """Until the stream may hold another bitstream."""
        while self.in_flight >= self.limit:
            self._room.clear()
            await self._room.wait()

    def finish_input(self) -> None:
        """The client sent its last bitstream: end once every result is out."""
        self.input_done = True
        self._check_done()
        self._notify()

    def end(self) -> None:
        """Stop producing results (the stream is being aborted)."""
        self._results.put_nowait(None)

    async def results(self) -> AsyncIterator[wpb.EvaluateResult]:
        """Each result as it exists, until the last one (or `end()`)."""
        while (result := await self._results.get()) is not None:
            yield result
            # Resumed once gRPC has taken the result: its bitstream leaves the count.
            self.in_flight -= 1
            self._room.set()

    async def stop(self) -> None:
        """Cancel the runners (the stream is over)."""
        for task in self._runners:
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)

    # ------------------------------------------------------------ queues

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _route(self, job: Job) -> None:
        target = job.bitstream.device_id
        if target in self.live:
            self.own[target].append(job)
        elif self.live:
            self.shared.append(job)
        else:
            reason = job.last_error or "no held board left"
            self._emit(job, "", error=f"no board left to run it on ({reason})")
            return
        self._notify()

    async def _next(self, device_id: str) -> Job | None:
        while device_id in self.live:
            if self.own[device_id]:
                return self.own[device_id].popleft()
            if self.shared:
                return self.shared.popleft()
            if self.input_done and self.pending == 0:
                return None
            await self._wake.wait()
        return None

    def _retire(self, board: BoardLifecycle) -> None:
        """The board is out of this stream: its queue goes to the others (or fails)."""
        self.live.discard(board.device_id)
        left = list(self.own[board.device_id])
        self.own[board.device_id].clear()
        if not self.live:
            left += list(self.shared)
            self.shared.clear()
        for job in left:
            job.last_error = job.last_error or f"device {board.device_id} failed"
            self._route(job)
        self._notify()

    def _retry(self, job: Job, error: str, board: BoardLifecycle | None) -> None:
        """Try the bitstream again: first on `board` (just rebooted), else anywhere."""
        job.attempt += 1
        job.last_error = error
        if job.attempt > MAX_ATTEMPTS:
            self._emit(job, "", error=f"failed {MAX_ATTEMPTS} times; last: {error}")
        elif board is not None:
            self.own[board.device_id].appendleft(job)
            self._notify()
        else:
            self._route(job)

    def _emit(
        self,
        job: Job,
        device_id: str,
        *,
        measurement: Measurement | None = None,
        error: str = "",
        started: float | None = None,
    ) -> None:
        now = time.monotonic()
        result = wpb.EvaluateResult(
            bitstream_id=job.bitstream.id,
            device_id=device_id,
            error=error,
            attempt=job.attempt,
            queue_duration=_duration((started or now) - job.queued),
            run_duration=_duration(now - started if started else 0.0),
        )
        if measurement is not None and measurement.pulse_count is not None:
            result.pulse_count = measurement.pulse_count
        elif measurement is not None and measurement.variance is not None:
            result.variance = measurement.variance
        self.pending -= 1
        self._results.put_nowait(result)
        self._check_done()

    def _check_done(self) -> None:
        if self.input_done and self.pending == 0:
            self._results.put_nowait(None)
            self._notify()

    # ------------------------------------------------------------ one board's runner

    async def _run(self, board: BoardLifecycle) -> None:
        rid = self.reservation_id
        # Set after a reboot until a bitstream succeeds: a second fault then breaks the board.
        suspect = False
        while (job := await self._next(board.device_id)) is not None:
            started = time.monotonic()
            try:
                measurement = await board.evaluate(rid, job.bitstream.data)
            except NotHeld:
                self._retry(job, f"device {board.device_id} was released", None)
                self._retire(board)
                return
            except EvaluationFailed as exc:
                if not exc.board_fault:
                    self._emit(job, board.device_id, error=str(exc), started=started)
                    continue
                fault = str(exc)
            except HardwareError as exc:
                fault = str(exc)
            else:
                suspect = False
                self._emit(job, board.device_id, measurement=measurement, started=started)
                continue
            log.warning("board fault", device=board.device_id, error=fault, suspect=suspect)
            if not await self._recover(board, suspect, fault):
                self._retry(job, fault, None)
                self._retire(board)
                return
            suspect = True
            self._retry(job, fault, board)

    async def _recover(self, board: BoardLifecycle, suspect: bool, fault: str) -> bool:
        """Reboot a board after a fault; False (board BROKEN or gone) when it is done for."""
        if suspect:
            board.fail(f"failed again after a reboot: {fault}")
            return False
        try:
            await board.reboot_mode(self.reservation_id)
        except (NotHeld, BoardFailed, HardwareError) as exc:
            log.warning("board reboot failed", device=board.device_id, error=str(exc))
            return False
        return True
