"""`Client`: the blocking API for scripts and notebooks, over an `AsyncClient` whose event loop
runs in a background thread (so it works inside a running loop too, as in Jupyter)."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import threading
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from icefarm_client.aio import AsyncClient
from icefarm_client.connection import RetryPolicy
from icefarm_client.convert import DurationLike
from icefarm_client.evaluate import Bitstreams
from icefarm_client.farm import AsyncFarm
from icefarm_client.models import (
    Availability,
    BoardInfo,
    Device,
    DeviceState,
    Event,
    EventType,
    ExportInfo,
    Released,
    Reservation,
    ReservedDevice,
    Result,
    Worker,
)

T = TypeVar("T")
# How long an interrupted call may take to wind down (e.g. release what it reserved).
INTERRUPT_GRACE = 15.0
# How long closing a Client waits for the tasks still on its loop to finish being cancelled.
STOP_GRACE = 10.0


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="icefarm", daemon=True)
        self.thread.start()
        _running.add(self)

    def run(self, coroutine: Awaitable[T]) -> T:
        """Run `coroutine` on the loop and wait for it. Ctrl-C cancels it (letting it clean
        up, bounded) and is raised again."""
        if not self.loop.is_running():
            if inspect.iscoroutine(coroutine):
                coroutine.close()  # never awaited, on purpose
            raise RuntimeError("this Client is closed")
        tasks: list[asyncio.Task[Any]] = []

        async def tracked() -> T:
            task = asyncio.current_task()
            assert task is not None
            tasks.append(task)
            return await coroutine

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            for task in tasks:
                self.loop.call_soon_threadsafe(task.cancel)
            # The cancellation itself, or what cleaning up raised, is not the news here.
            with contextlib.suppress(BaseException):
                future.result(timeout=INTERRUPT_GRACE)
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async one (closed when the caller stops early)."""
        try:
            while True:
                try:
                    yield self.run(iterator.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            close: Any = getattr(iterator, "aclose", None)
            if close is not None and self.loop.is_running():
                with contextlib.suppress(RuntimeError, concurrent.futures.CancelledError):
                    self.run(close())

    def stop(self) -> None:
        """Cancel and await whatever still runs on the loop (as `asyncio.run` does: no task is
        left to be destroyed pending), then stop the loop and its thread."""
        _running.discard(self)
        if self.loop.is_running():
            finishing = asyncio.run_coroutine_threadsafe(_finish_tasks(), self.loop)
            with contextlib.suppress(BaseException):
                finishing.result(timeout=STOP_GRACE)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


async def _finish_tasks() -> None:
    loop = asyncio.get_running_loop()
    # Cancelling one task can start another (an async generator's finaliser closes it in a
    # new task): repeat until none is left.
    for _ in range(10):
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not left:
            break
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    await loop.shutdown_asyncgens()


# Loops of Clients not closed yet: stopped at interpreter exit (reservations stay held).
_running: weakref.WeakSet[_LoopThread] = weakref.WeakSet()


@atexit.register
def _stop_running_loops() -> None:
    for runner in list(_running):
        runner.stop()


class Farm:
    """The devices of one reservation (see `Client.reserve` and `Client.resume`).

    Use it in a `with` block, or across notebook cells: `farm.open()` (or the first
    `evaluate`, `extend`, `id`, `reservation` or `devices`) reserves and waits until the
    devices are READY; `farm.close()` releases them (idempotent; also what leaving the `with`
    block does)."""

    def __init__(self, runner: _LoopThread, farm: AsyncFarm) -> None:
        self._runner = runner
        self._farm = farm

    def __enter__(self) -> Farm:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        held = self._farm._reservation
        if held is None:
            return "<Farm (not open)>"
        closed = "" if self.opened else ", closed"
        return f"<Farm {held.id}: {len(self._farm.devices)} device(s){closed}>"

    def open(self) -> Farm:
        """Reserve (or take the reservation back) and wait until the devices are READY;
        returns the farm. Opening an open farm does nothing."""
        self._runner.run(self._farm.open())
        return self

    def close(self) -> None:
        """Stop unfinished evaluations and release the devices. Closing again, or closing a
        farm never opened, does nothing."""
        farm = self._farm
        if farm._closed:
            return
        if not self._runner.loop.is_running():
            if farm._reservation is None or farm.ended is not None:
                farm._closed = True  # nothing is held
                return
            raise RuntimeError(
                f"the Client of reservation {farm.id} is closed; a Client of the same client "
                f"id can take it back with resume({farm.id!r}) and close it"
            )
        self._runner.run(farm.close())

    @property
    def opened(self) -> bool:
        """True while the farm is open (reserved and settled, not closed)."""
        return self._farm.opened

    def _open_farm(self) -> AsyncFarm:
        if not self._farm._opened:
            self.open()
        return self._farm

    @property
    def reservation(self) -> Reservation:
        """The reservation (with the newest worker token); opens the farm if needed."""
        return self._open_farm().reservation

    @property
    def id(self) -> str:
        """The reservation id; opens the farm if needed."""
        return self._open_farm().id

    @property
    def devices(self) -> tuple[ReservedDevice, ...]:
        """The held devices that are READY and have not failed; opens the farm if needed."""
        return self._open_farm().devices

    @property
    def events(self) -> list[Event]:
        """Every event about this reservation so far."""
        return list(self._farm.events)

    @property
    def failed(self) -> dict[str, str]:
        """Held devices that failed or were taken away, with why."""
        return dict(self._farm.failed)

    @property
    def ended(self) -> Event | None:
        """The ReservationEnded event once the reservation has ended, else None."""
        return self._farm.ended

    @property
    def extensions(self) -> int:
        """How many times the lease was extended (automatically or by `extend`)."""
        return self._farm.extensions

    def extend(self, duration: DurationLike | None = None) -> Reservation:
        """Move the lease end to `duration` from now (a timedelta, seconds or "30m")."""
        farm = self._open_farm()
        return self._runner.run(farm.extend(duration))

    def release(self) -> Released:
        """Release the devices now (and raise if that fails; `close()` only logs it)."""
        return self._runner.run(self._farm.release())

    def evaluate(self, bitstreams: Bitstreams, *, in_flight: int = 2) -> Iterator[Result]:
        """Evaluate bitstreams on every held board; each Result as it arrives (opens the
        farm if needed)."""
        farm = self._open_farm()
        return self._runner.iterate(farm.evaluate(bitstreams, in_flight=in_flight))


class Client:
    """The blocking iCEFARM client. Arguments as for `AsyncClient`; use `with Client() as
    client:` or call `close()`. Event callbacks run on the client's background thread."""

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
        channel: grpc.Channel | None = None,
        session_instance: str | None = None,
    ) -> None:
        self._runner = _LoopThread()

        async def build() -> AsyncClient:
            return AsyncClient(
                control,
                client_id=client_id,
                token=token,
                tls=tls,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
                retry=retry,
                timeout=timeout,
                channel=channel,
                session_instance=session_instance,
            )

        try:
            self.aio = self._runner.run(build())
        except BaseException:
            self._runner.stop()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Session, the channels and the background thread. Reservations are not
        released: a farm left open is held until its lease ends or, after the control's
        client grace, until no Session of this client id has been seen for that long — a
        Client of the same client id can `resume` it meanwhile. Closing twice does nothing."""
        if self._runner.loop.is_running():
            try:
                self._runner.run(self.aio.close())
            finally:
                self._runner.stop()

    @property
    def client_id(self) -> str:
        """The identity this client acts as (the owner of its reservations)."""
        return self.aio.client_id

    @property
    def session_instance(self) -> str:
        """The name of this Client's own Session (one per Client object)."""
        return self.aio.session_instance

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    # ------------------------------------------------------------ reservations

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
    ) -> Farm:
        """`count` devices matching `selector` (or exactly `device_ids`) in `mode` as a
        `Farm`: `with client.reserve(4, mode="pulsecount", wait="5m") as farm:`, or in a
        notebook `farm = client.reserve(4, mode="pulsecount").open()` … `farm.close()`.

        Nothing is reserved until the farm is opened; opening reserves (queueing up to `wait`
        for free devices, WaitTimeout after it; NotEnoughDevices at once without it), waits
        until every device is READY (DeadlineExceeded after `ready_timeout`), keeps the
        Session open and extends the lease (`duration`, default the control's) whenever it is
        ending soon unless `auto_extend` is False. Closing releases, also on an exception.
        Durations are a timedelta, seconds, or text like "90s", "5m", "1h30m"."""
        farm = self.aio.reserve(
            count,
            mode=mode,
            mode_args=mode_args,
            selector=selector,
            device_ids=device_ids,
            duration=duration,
            wait=wait,
            wait_for_new_devices=wait_for_new_devices,
            ready_timeout=ready_timeout,
            auto_extend=auto_extend,
        )
        return Farm(self._runner, farm)

    def resume(
        self,
        reservation_id: str,
        *,
        duration: DurationLike | None = None,
        ready_timeout: DurationLike = timedelta(minutes=2),
        auto_extend: bool = True,
    ) -> Farm:
        """Take back an active reservation of this client id — one an earlier Client left
        open, e.g. before a notebook kernel restarted — as an open `Farm`: its lease is
        extended to at least `duration` from now (default: the control's default lease), its
        devices are READY, it auto-extends, and `close()` releases it. ReservationNotFound
        for an unknown id, ReservationEnded for one that has ended (reserve again),
        PermissionDenied for another client id's."""
        farm = self.aio.resume(
            reservation_id, duration=duration, ready_timeout=ready_timeout, auto_extend=auto_extend
        )
        return Farm(self._runner, farm).open()

    def create_reservation(
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
        `wait_for_new_devices`. Held until its lease ends (`duration`, default the
        control's) or it is released; nothing extends it."""
        return self._run(
            self.aio.create_reservation(
                count,
                mode=mode,
                mode_args=mode_args,
                selector=selector,
                device_ids=device_ids,
                duration=duration,
                wait=wait,
                wait_for_new_devices=wait_for_new_devices,
            )
        )

    def extend(
        self, *reservation_ids: str, duration: DurationLike | None = None
    ) -> list[Reservation]:
        """Extend these reservations to `duration` from now (never earlier)."""
        return self._run(self.aio.extend(*reservation_ids, duration=duration))

    def extend_all(self, duration: DurationLike | None = None) -> list[Reservation]:
        """Extend every active reservation of this client."""
        return self._run(self.aio.extend_all(duration))

    def release(self, *reservation_ids: str, device_ids: Iterable[str] = ()) -> Released:
        """Release these reservations (or devices)."""
        return self._run(self.aio.release(*reservation_ids, device_ids=device_ids))

    def release_all(self) -> Released:
        """Release everything this client holds."""
        return self._run(self.aio.release_all())

    def reservations(self, include_ended: bool = False) -> list[Reservation]:
        """This client's reservations, newest first."""
        return self._run(self.aio.reservations(include_ended))

    def availability(self, selector: str = "") -> Availability:
        """How many free devices match `selector`."""
        return self._run(self.aio.availability(selector))

    def wait_available(
        self, count: int, selector: str = "", timeout: DurationLike | None = None
    ) -> Availability:
        """Wait until `count` devices matching `selector` are free (WaitTimeout)."""
        return self._run(self.aio.wait_available(count, selector, timeout))

    # ------------------------------------------------------------ events

    def on(
        self, event_type: EventType | None, callback: Callable[[Event], None]
    ) -> Callable[[], None]:
        """Call `callback(event)` (on the background thread) for each event of the type;
        returns a function that removes it."""

        async def register() -> Callable[[], None]:
            return self.aio.on(event_type, callback)

        return self._run(register())

    def events(self, *types: EventType) -> Iterator[Event]:
        """Every event of this client from now on (blocking iterator)."""
        return self._runner.iterate(self.aio.events(*types))

    # ------------------------------------------------------------ operators and workers

    def workers(self) -> list[Worker]:
        """Every worker."""
        return self._run(self.aio.workers())

    def devices(self, selector: str = "", state: DeviceState | None = None) -> list[Device]:
        """Every device matching `selector` (and `state`)."""
        return self._run(self.aio.devices(selector, state))

    def device(self, device_id: str) -> Device:
        """One device."""
        return self._run(self.aio.device(device_id))

    def end_reservations(self, **filters: Sequence[str] | str) -> Released:
        """End anyone's reservations (reservation_ids=, device_ids=, client_id=)."""
        return self._run(self.aio.end_reservations(**filters))  # type: ignore[arg-type]

    def extend_reservations(self, **filters: Any) -> list[Reservation]:
        """Extend anyone's reservations (reservation_ids=, device_ids=, client_id=, duration=)."""
        return self._run(self.aio.extend_reservations(**filters))

    def remove_device(self, device_id: str) -> Device:
        """Take a device out of the farm."""
        return self._run(self.aio.remove_device(device_id))

    def reboot_device(self, device_id: str) -> Device:
        """Ask a device's worker to reboot it."""
        return self._run(self.aio.reboot_device(device_id))

    def drain_worker(self, worker: str, timeout: DurationLike | None = None) -> Worker:
        """Drain a worker."""
        return self._run(self.aio.drain_worker(worker, timeout))

    def watch_events(self, resume_after: int = 0) -> Iterator[Event]:
        """The operator feed (blocking iterator)."""
        return self._runner.iterate(self.aio.watch_events(resume_after))

    def board_info(self, reservation: Reservation, device_id: str) -> BoardInfo:
        """What a held board is doing, asked of its worker."""
        return self._run(self.aio.board_info(reservation, device_id))

    def export(self, reservation: Reservation, device_id: str) -> ExportInfo:
        """usbip mode: export a held board; where to attach it."""
        return self._run(self.aio.export(reservation, device_id))
