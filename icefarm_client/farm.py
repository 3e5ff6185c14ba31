"""`AsyncFarm`: a reservation held from opening to closing (a `with` block, or `open()` and
`close()` across notebook cells), ready to evaluate on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from icefarm_client import convert
from icefarm_client.convert import DurationLike
from icefarm_client.errors import (
    DeadlineExceeded,
    DeviceFailed,
    PermissionDenied,
    ReservationEnded,
    ReservationNotFound,
)
from icefarm_client.evaluate import Bitstreams, Evaluation
from icefarm_client.models import (
    DeviceState,
    EndReason,
    Event,
    EventType,
    Released,
    Reservation,
    ReservedDevice,
    Result,
)

if TYPE_CHECKING:
    from icefarm_client.aio import AsyncClient

# How long reserve() waits for the Session before reserving anyway.
SESSION_WAIT = 10.0
log = structlog.get_logger(__name__)
READY_POLL = 1.0


class Evaluating:
    """The results of one `evaluate()` as they arrive, which closing the farm ends (its worker
    streams stopped). Once closed or finished it yields nothing more: an async generator
    closed from another task than the one iterating it can report itself "already running"
    to the next `__anext__` (Python 3.11), so the generator is not asked again."""

    def __init__(self, results: AsyncIterator[Result]) -> None:
        self._results = results
        self._done = False

    def __aiter__(self) -> Evaluating:
        return self

    async def __anext__(self) -> Result:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._results.__anext__()
        except BaseException:
            self._done = True  # finished, failed or cancelled: the generator has ended
            raise

    async def aclose(self) -> None:
        """Stop the evaluation (idempotent)."""
        if self._done:
            return
        self._done = True
        aclose: Any = getattr(self._results, "aclose", None)
        if aclose is not None:
            await aclose()


class AsyncFarm:
    """The devices of one reservation.

    Opening it (`async with`, `await farm` or `await farm.open()`) reserves — or, made by
    `AsyncClient.resume`, takes an existing reservation of this client id back — and waits
    until the devices are READY. Closing it (`await farm.close()`, or leaving the block) stops
    any evaluation still running and releases the devices; it is idempotent. Meanwhile the
    lease is extended whenever the control says it is ending soon, and `events` records what
    happened to the reservation."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        request: dict[str, Any] | None = None,
        resume: str = "",
        duration: timedelta | None,
        ready_timeout: timedelta,
        auto_extend: bool,
    ) -> None:
        self.client = client
        self._request = request
        self._resume = resume
        self.duration = duration
        self.ready_timeout = ready_timeout
        self.auto_extend = auto_extend
        self._reservation: Reservation | None = None
        self.ready: set[str] = set()
        self.failed: dict[str, str] = {}
        self.events: list[Event] = []
        self.ended: Event | None = None
        self.extensions = 0
        self._remove: Callable[[], None] | None = None
        # loop.time() of the last extension and the lease it granted (seconds), which pace
        # the automatic extends; the pending one, if any.
        self._extended_at: float | None = None
        self._lease_seconds = 0.0
        self._extending: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._opened = False
        self._closed = False
        # Unfinished evaluate() iterators: closing the farm closes them before releasing, so
        # none is left suspended with its worker streams open.
        self._evaluations: weakref.WeakSet[Evaluating] = weakref.WeakSet()

    # ------------------------------------------------------------ opening and closing

    @property
    def opened(self) -> bool:
        """True once the reservation is held and its devices have settled (until closed)."""
        return self._opened and not self._closed

    async def open(self) -> AsyncFarm:
        """Reserve (or take the reservation back) and wait until the devices are READY;
        returns the farm. Opening an open farm does nothing."""
        async with self._opening:
            if self._closed:
                raise RuntimeError("this farm is closed: reserve again")
            if not self._opened:
                await self._open()
                self._opened = True
        return self

    def __await__(self) -> Generator[Any, None, AsyncFarm]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncFarm:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    async def close(self) -> None:
        """Stop unfinished evaluations and release the devices (a failed release is logged,
        not raised). Closing again, or closing a farm never opened, does nothing."""
        if self._closed:
            return
        self._closed = True
        for evaluation in list(self._evaluations):
            with contextlib.suppress(RuntimeError):  # one running in another task right now
                await evaluation.aclose()
        await self._release_quietly()

    async def _open(self) -> None:
        self.client.start_session()
        queue = self.client._subscribe()
        try:
            # Reserve with the Session open: the control then ends this reservation if this
            # process dies (after the client grace) instead of holding it to the lease end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.client.session.connected.wait(), SESSION_WAIT)
            if self._resume:
                self._reservation = await self._take_back(self._resume)
            else:
                self._reservation = await self.client.create_reservation(**(self._request or {}))
            self._remove = self.client.on(None, self._on_event)
            await self._wait_ready(queue)
        except BaseException:
            if self._resume:
                self._detach()  # a failed resume leaves the reservation as it was
            elif self._reservation is not None:
                await asyncio.shield(self._release_quietly())
            raise
        finally:
            self.client._subscribers.remove(queue)

    async def _take_back(self, reservation_id: str) -> Reservation:
        # Extend hands out a fresh worker token and never shortens the lease; moving the lease
        # end also re-arms the "ending soon" warning, which an earlier Session may have had.
        try:
            (current,) = await self.client.extend(reservation_id, duration=self.duration)
        except ReservationNotFound as exc:
            raise ReservationNotFound(
                f"no reservation {reservation_id} to resume", code=exc.code, reason=exc.reason
            ) from None
        except ReservationEnded as exc:
            raise ReservationEnded(
                f"{exc.message}: it cannot be resumed, reserve again",
                code=exc.code,
                reason=exc.reason,
            ) from None
        except PermissionDenied as exc:
            raise type(exc)(
                f"{exc.message}: resume it with the client id that made it "
                f"(this client is {self.client.client_id!r})",
                code=exc.code,
                reason=exc.reason,
            ) from None
        return current

    def _detach(self) -> None:
        self._stop_extending()
        if self._remove is not None:
            self._remove()
            self._remove = None

    async def _release_quietly(self) -> None:
        self._detach()
        if self._reservation is None or self.ended is not None:
            return
        try:
            await self.client.release(self._reservation.id)
        except Exception as exc:  # leaving must not hide the block's own exception
            log.warning("release failed", reservation=self._reservation.id, error=str(exc))
            return
        self.ended = Event(
            EventType.RESERVATION_ENDED,
            reservation_id=self._reservation.id,
            reason=EndReason.RELEASED,
            reservation_closed=True,
        )

    # ------------------------------------------------------------ what it holds

    @property
    def reservation(self) -> Reservation:
        """The reservation (with the newest worker token)."""
        if self._reservation is None:
            raise RuntimeError(
                "the farm is not open yet: `await farm.open()`, `await farm` or `async with`"
            )
        return self._reservation

    @property
    def id(self) -> str:
        """The reservation id."""
        return self.reservation.id

    @property
    def devices(self) -> tuple[ReservedDevice, ...]:
        """The held devices that are READY and have not failed."""
        return tuple(
            d for d in self.reservation.devices if d.id in self.ready and d.id not in self.failed
        )

    async def extend(self, duration: DurationLike | None = None) -> Reservation:
        """Move the lease end to `duration` from now (default: the reserve's duration)."""
        wanted = convert.optional_timedelta(duration, "duration")
        (extended,) = await self.client.extend(self.id, duration=wanted or self.duration)
        self._take_extension(extended)
        return self.reservation

    async def release(self) -> Released:
        """Release the devices now (closing the farm then does nothing more)."""
        if self._reservation is None:
            return Released((), ())
        released = await self.client.release(self.id)
        self._detach()
        self.ended = Event(
            EventType.RESERVATION_ENDED,
            reservation_id=self.id,
            reason=EndReason.RELEASED,
            reservation_closed=True,
        )
        return released

    def evaluate(self, bitstreams: Bitstreams, *, in_flight: int = 2) -> AsyncIterator[Result]:
        """Evaluate bitstreams (paths, bytes, or (id, bytes) pairs) on every held board,
        yielding each Result as it arrives. At most `in_flight` bitstreams wait per board."""
        if self.ended is not None:
            raise ReservationEnded(
                f"reservation {self.id} has ended ({self.ended.reason.value}): reserve again"
            )
        if self._closed:
            raise RuntimeError("this farm is closed: reserve again")
        boards: Counter[tuple[str, str]] = Counter(
            (d.worker_endpoint, d.worker) for d in self.devices
        )
        run = Evaluation(self.client, self.reservation.token, dict(boards), bitstreams, in_flight)
        evaluation = Evaluating(run.results())
        self._evaluations.add(evaluation)
        return evaluation

    # ------------------------------------------------------------ readiness and events

    async def _wait_ready(self, queue: asyncio.Queue[Event]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout.total_seconds()
        self._note_states(self.reservation)
        while not self._settled():
            left = deadline - loop.time()
            if left <= 0:
                raise DeadlineExceeded(
                    f"reservation {self.id}: devices not ready within {self.ready_timeout}"
                )
            try:
                event = await asyncio.wait_for(queue.get(), min(READY_POLL, left))
            except TimeoutError:
                # Events are the fast path; a look at the reservation catches anything missed.
                current = [r for r in await self.client.reservations() if r.id == self.id]
                if not current:
                    raise DeviceFailed(
                        f"reservation {self.id} ended before its devices were ready"
                    ) from None
                self._note_states(current[0])
                continue
            if event.type is EventType.DEVICE_READY and event.reservation_id == self.id:
                self.ready.add(event.device_id)
        if not self.devices:
            errors = "; ".join(f"{k}: {v}" for k, v in sorted(self.failed.items()))
            reason = self.ended.reason.value if self.ended else errors
            raise DeviceFailed(f"reservation {self.id}: no device became ready ({reason})")

    def _note_states(self, reservation: Reservation) -> None:
        for device in reservation.devices:
            if device.state is DeviceState.READY:
                self.ready.add(device.id)
            elif device.state is DeviceState.BROKEN or (
                device.released_reason is not EndReason.UNSPECIFIED
            ):
                self.failed.setdefault(device.id, device.state.value)

    def _settled(self) -> bool:
        if self.ended is not None:
            return True
        return all(d.id in self.ready or d.id in self.failed for d in self.reservation.devices)

    def _on_event(self, event: Event) -> None:
        mine = event.reservation_id == self.id or self.id in event.reservation_ids
        if not mine or self._reservation is None:
            return
        self.events.append(event)
        if event.type is EventType.DEVICE_READY:
            self.ready.add(event.device_id)
        elif event.type is EventType.DEVICE_FAILED:
            self.failed[event.device_id] = event.error or "failed"
        elif event.type is EventType.RESERVATION_ENDED:
            for device_id in event.device_ids:
                self.failed.setdefault(device_id, f"released: {event.reason.value}")
            if event.reservation_closed:
                self.ended = event
        elif event.type is EventType.RESERVATION_ENDING_SOON and self.auto_extend:
            if self._extending is not None and not self._extending.done():
                return
            task = self._extending = asyncio.ensure_future(self._auto_extend())
            self.client._pending.add(task)
            task.add_done_callback(self.client._callback_done)

    def _stop_extending(self) -> None:
        if self._extending is not None:
            self._extending.cancel()
            self._extending = None

    async def _auto_extend(self) -> None:
        # A lease shorter than the control's warning window is "ending soon" again right after
        # each extension: extend at the first warning, then no sooner than half a lease after
        # the previous extension (else it is extended about once a second).
        if self._extended_at is not None:
            loop = asyncio.get_running_loop()
            pause = self._extended_at + self._lease_seconds / 2 - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
        if self.ended is not None or self._remove is None:
            return
        try:
            await self.extend()
            log.info("lease extended", reservation=self.id)
        except Exception as exc:
            log.warning("automatic extend failed", reservation=self.id, error=str(exc))

    def _take_extension(self, extended: Reservation) -> None:
        self.extensions += 1
        self._extended_at = asyncio.get_running_loop().time()
        if extended.end_time is not None:
            left = extended.end_time - datetime.now(UTC)
            self._lease_seconds = max(0.0, left.total_seconds())
        token = extended.token or self.reservation.token
        self._reservation = dataclasses.replace(
            self.reservation, end_time=extended.end_time, token=token
        )
