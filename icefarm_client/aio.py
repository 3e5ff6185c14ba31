"""`AsyncClient`: the whole API on asyncio. `Client` (sync.py) runs one of these in a thread."""

from __future__ import annotations

import asyncio
import inspect
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import grpc
import structlog

from icefarm.settings import format_duration
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm_client import convert
from icefarm_client.connection import RetryPolicy, Settings
from icefarm_client.convert import DurationLike
from icefarm_client.errors import WaitTimeout
from icefarm_client.farm import AsyncFarm
from icefarm_client.models import Availability, Event, EventType, Released, Reservation
from icefarm_client.operator import OperatorCalls
from icefarm_client.session import SessionFeed

log = structlog.get_logger(__name__)
EventCallback = Callable[[Event], Awaitable[None] | None]
# What the control accepts as a Session instance.
_INSTANCE = re.compile(r"[\x21-\x7e]{1,64}")


def new_session_instance() -> str:
    """A random name for one Client object's Session (8 hex characters)."""
    return secrets.token_hex(4)


class AsyncClient(OperatorCalls):
    """The iCEFARM client on asyncio.

    Connection settings come from the arguments, else `ICEFARM_CONTROL`, `ICEFARM_TOKEN`,
    `ICEFARM_CLIENT_ID` and `ICEFARM_TLS*`, else plaintext to 127.0.0.1:50051 as user@host.
    Use it as `async with AsyncClient() as client:` (or call `close()`).

    Reservations belong to the client id; the Session (liveness and events) belongs to this
    object, named by `session_instance` (random unless given), so several Clients of one user
    run side by side without replacing each other's Session. Two Clients given the same name
    do replace each other's (the older one's Session ends for good)."""

    def __init__(
        self,
        control: str | None = None,
        *,
        client_id: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        settings: Settings | None = None,
        channel: grpc.aio.Channel | grpc.Channel | None = None,
        session_instance: str | None = None,
    ) -> None:
        if session_instance is not None and not _INSTANCE.fullmatch(session_instance):
            raise ValueError("session_instance must be 1-64 printable ASCII characters")
        settings = settings or Settings.resolve(
            control,
            client_id=client_id,
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            retry=retry,
            timeout=timeout,
        )
        super().__init__(settings, channel)
        self._callbacks: dict[EventType | None, list[EventCallback]] = {}
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._pending: set[asyncio.Task[None]] = set()
        # Kept for the life of this object, across reconnects, so its resume point holds.
        self.session_instance = session_instance or new_session_instance()
        self.session = SessionFeed(
            settings, self._channel, self._deliver, instance=self.session_instance
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the Session and every channel (reservations are not released: a farm left
        open can be taken back with `resume` by a client of the same client id)."""
        await self.session.stop()
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        # Awaited, so no task of this client is left pending when its loop stops.
        await asyncio.gather(*pending, return_exceptions=True)
        await self._close_channels()

    # ------------------------------------------------------------ reservations

    async def create_reservation(
        self,
        count: int = 0,
        *,
        mode: str = "",
        mode_args: dict[str, str] | None = None,
        selector: str = "",
        device_ids: Sequence[str] = (),
        duration: DurationLike | None = None,
        wait: DurationLike | None = None,
        wait_for_new_devices: bool = False,
    ) -> Reservation:
        """Reserve `count` devices matching `selector` (or exactly `device_ids`), all or
        nothing, and return at once (devices may still be preparing). `wait` queues fairly
        until enough are free (WaitTimeout when it runs out); without it NotEnoughDevices is
        raised at once, and also when the farm has fewer matching devices than `count` unless
        `wait_for_new_devices`. The reservation is held until its lease ends (`duration`,
        default the control's) or it is released. Durations are a timedelta, seconds, or text
        like "90s", "5m", "1h30m"."""
        lease = convert.optional_timedelta(duration, "duration")
        queue_for = convert.optional_timedelta(wait, "wait")
        request = rpb.ReserveRequest(
            count=count,
            device_ids=list(device_ids),
            selector=selector,
            mode=mode,
            mode_args=mode_args or {},
            request_id=uuid.uuid4().hex,
            wait_for_new_devices=wait_for_new_devices,
        )
        if lease is not None:
            request.duration.CopyFrom(convert.duration(lease))
        timeout = self.settings.timeout
        if queue_for is not None and queue_for > timedelta(0):
            request.wait_timeout.CopyFrom(convert.duration(queue_for, "wait"))
            timeout += queue_for.total_seconds()
        answer = await self._call("reservations", "Reserve", request, timeout=timeout)
        return convert.reservation(answer.reservation, answer.token)

    def reserve(
        self,
        count: int = 0,
        *,
        mode: str = "",
        mode_args: dict[str, str] | None = None,
        selector: str = "",
        device_ids: Sequence[str] = (),
        duration: DurationLike | None = None,
        wait: DurationLike | None = None,
        wait_for_new_devices: bool = False,
        ready_timeout: DurationLike = timedelta(minutes=2),
        auto_extend: bool = True,
    ) -> AsyncFarm:
        """`async with client.reserve(4, mode="pulsecount") as farm:` (or `farm = await
        client.reserve(...)` and later `await farm.close()`) — reserve, wait until every
        device is READY (DeadlineExceeded after `ready_timeout`), keep the Session open,
        extend the lease when it is ending soon (unless `auto_extend` is False), and release
        on closing, even on an exception. Nothing is reserved until the farm is opened."""
        lease = convert.optional_timedelta(duration, "duration")
        request = {
            "count": count,
            "mode": mode,
            "mode_args": mode_args or {},
            "selector": selector,
            "device_ids": tuple(device_ids),
            "duration": lease,
            "wait": convert.optional_timedelta(wait, "wait"),
            "wait_for_new_devices": wait_for_new_devices,
        }
        return AsyncFarm(
            self,
            request=request,
            duration=lease,
            ready_timeout=convert.to_timedelta(ready_timeout, "ready_timeout"),
            auto_extend=auto_extend,
        )

    def resume(
        self,
        reservation_id: str,
        *,
        duration: DurationLike | None = None,
        ready_timeout: DurationLike = timedelta(minutes=2),
        auto_extend: bool = True,
    ) -> AsyncFarm:
        """Take back a reservation of this client id that is still active (made by an
        earlier Client, e.g. before a notebook kernel restarted): `farm = await
        client.resume(id)` or `async with client.resume(id) as farm:`. Opening it extends the
        lease to at least `duration` from now (default: the control's default lease; never
        shorter than it was) for a fresh worker token, waits until its devices are READY and
        auto-extends like `reserve`; closing it releases. ReservationNotFound for an unknown
        id, ReservationEnded for one that has ended, PermissionDenied for another client's."""
        return AsyncFarm(
            self,
            resume=reservation_id,
            duration=convert.optional_timedelta(duration, "duration"),
            ready_timeout=convert.to_timedelta(ready_timeout, "ready_timeout"),
            auto_extend=auto_extend,
        )

    async def extend(
        self, *reservation_ids: str, duration: DurationLike | None = None
    ) -> list[Reservation]:
        """Move the lease end of these reservations to `duration` from now (default: the
        control's default lease; never earlier); returns them with fresh worker tokens."""
        request = rpb.ExtendRequest(reservation_ids=list(reservation_ids))
        return await self._extend(request, duration)

    async def extend_all(self, duration: DurationLike | None = None) -> list[Reservation]:
        """Extend every active reservation of this client."""
        return await self._extend(rpb.ExtendRequest(all=True), duration)

    async def _extend(
        self, request: rpb.ExtendRequest, duration: DurationLike | None
    ) -> list[Reservation]:
        if duration is not None:
            request.duration.CopyFrom(convert.duration(duration, "duration"))
        answer = await self._call("reservations", "Extend", request)
        return [convert.reservation(r, answer.tokens.get(r.id, "")) for r in answer.reservations]

    async def release(self, *reservation_ids: str, device_ids: Iterable[str] = ()) -> Released:
        """Stop holding these reservations (or just these devices)."""
        request = rpb.ReleaseRequest(
            reservation_ids=list(reservation_ids), device_ids=list(device_ids)
        )
        answer = await self._call("reservations", "Release", request)
        return Released(tuple(answer.device_ids), tuple(answer.ended_reservation_ids))

    async def release_all(self) -> Released:
        """Stop holding everything this client holds."""
        answer = await self._call("reservations", "Release", rpb.ReleaseRequest(all=True))
        return Released(tuple(answer.device_ids), tuple(answer.ended_reservation_ids))

    async def reservations(self, include_ended: bool = False) -> list[Reservation]:
        """This client's reservations, newest first."""
        found: list[Reservation] = []
        token = ""
        while True:
            request = rpb.ListReservationsRequest(
                include_ended=include_ended, page_size=500, page_token=token
            )
            answer = await self._call("reservations", "ListReservations", request)
            found += [convert.reservation(r) for r in answer.reservations]
            token = answer.next_page_token
            if not token:
                return found

    async def availability(self, selector: str = "") -> Availability:
        """How many free devices match `selector` now, and which."""
        request = rpb.GetAvailabilityRequest(selector=selector)
        answer = await self._call("reservations", "GetAvailability", request)
        return Availability(answer.count, tuple(answer.device_ids))

    async def wait_available(
        self, count: int, selector: str = "", timeout: DurationLike | None = None
    ) -> Availability:
        """Wait until at least `count` devices matching `selector` are free (a hint: they may
        be taken before you reserve; `create_reservation(wait=...)` keeps your place in
        line). WaitTimeout when `timeout` passes first; InvalidSelector for a bad selector."""
        limit = convert.optional_timedelta(timeout, "timeout")
        await self.availability(selector)  # a bad selector fails here, with its position
        queue = self._subscribe()
        self.session.watch(selector, count)
        self.start_session()
        try:
            return await asyncio.wait_for(
                self._first_available(queue, selector, count),
                limit.total_seconds() if limit is not None else None,
            )
        except TimeoutError:
            within = format_duration(limit) if limit is not None else "the wait"
            raise WaitTimeout(
                f"fewer than {count} devices matching {selector!r} were free within {within}",
                code="DEADLINE_EXCEEDED",
            ) from None
        finally:
            self.session.unwatch(selector)
            self._subscribers.remove(queue)

    async def _first_available(
        self, queue: asyncio.Queue[Event], selector: str, count: int
    ) -> Availability:
        await self.session.connected.wait()
        # The watch may have been registered before the stream was up; send it (again).
        self.session.watch(selector, count)
        while True:
            event = await queue.get()
            if (
                event.type is EventType.DEVICES_AVAILABLE
                and event.selector == selector
                and event.count >= count
            ):
                return Availability(event.count, event.device_ids)

    # ------------------------------------------------------------ events

    def start_session(self) -> None:
        """Open the Session (liveness and events) if it is not open; it stays open until
        `close()`. Reserving through `reserve()` or listening for events does this."""
        self.session.start()

    def on(self, event_type: EventType | None, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` for every event of `event_type` (None: every event); the
        callback may be a coroutine function. Returns a function that removes it."""
        self._callbacks.setdefault(event_type, []).append(callback)
        self.start_session()

        def remove() -> None:
            callbacks = self._callbacks.get(event_type, [])
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    async def events(self, *types: EventType) -> AsyncIterator[Event]:
        """Every event of this client from now on (only `types`, when given)."""
        queue = self._subscribe()
        self.start_session()
        try:
            while True:
                event = await queue.get()
                if not types or event.type in types:
                    yield event
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    def _subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def _deliver(self, event: Event) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)
        for callback in self._callbacks.get(event.type, []) + self._callbacks.get(None, []):
            try:
                outcome: Any = callback(event)
            except Exception:
                log.exception("event callback failed", event=event.type.value)
                continue
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._pending.add(task)
                task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event callback failed", error=repr(task.exception()))
