"""`Client`: the blocking API for scripts and notebooks, over an `AsyncClient` whose event loop
runs in a background thread (so it works inside a running loop too, as in Jupyter)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
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


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="icefarm", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[T]) -> T:
        """Run `coroutine` on the loop and wait for it. Ctrl-C cancels it (letting it clean
        up, bounded) and is raised again."""
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
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


class Farm:
    """The devices of one reservation, for a `with` block (see `Client.reserve`)."""

    def __init__(self, runner: _LoopThread, farm: AsyncFarm) -> None:
        self._runner = runner
        self._farm = farm

    def __enter__(self) -> Farm:
        self._runner.run(self._farm.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.run(self._farm.__aexit__(*exc))

    @property
    def reservation(self) -> Reservation:
        """The reservation (with the newest worker token)."""
        return self._farm.reservation

    @property
    def id(self) -> str:
        """The reservation id."""
        return self._farm.id

    @property
    def devices(self) -> tuple[ReservedDevice, ...]:
        """The held devices that are READY and have not failed."""
        return self._farm.devices

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

    def extend(self, duration: timedelta | None = None) -> Reservation:
        """Move the lease end to `duration` from now."""
        return self._runner.run(self._farm.extend(duration))

    def release(self) -> Released:
        """Release the devices now."""
        return self._runner.run(self._farm.release())

    def evaluate(self, bitstreams: Bitstreams, *, in_flight: int = 2) -> Iterator[Result]:
        """Evaluate bitstreams on every held board; each Result as it arrives."""
        return self._runner.iterate(self._farm.evaluate(bitstreams, in_flight=in_flight))


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
        """Close the Session, the channels and the background thread."""
        if self._runner.loop.is_running():
            self._runner.run(self.aio.close())
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

    def reserve(self, count: int = 0, **options: Any) -> Farm:
        """`with client.reserve(4, mode="pulsecount", wait=timedelta(minutes=5)) as farm:`
        (options as for `AsyncClient.reserve`: mode, mode_args, selector, device_ids,
        duration, wait, ready_timeout, auto_extend)."""
        return Farm(self._runner, self.aio.reserve(count, **options))

    def create_reservation(self, count: int = 0, **options: Any) -> Reservation:
        """Reserve and return at once; held until its lease ends or it is released
        (options as for `AsyncClient.create_reservation`)."""
        return self._run(self.aio.create_reservation(count, **options))

    def extend(self, *reservation_ids: str, duration: timedelta | None = None) -> list[Reservation]:
        """Extend these reservations."""
        return self._run(self.aio.extend(*reservation_ids, duration=duration))

    def extend_all(self, duration: timedelta | None = None) -> list[Reservation]:
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
        self, count: int, selector: str = "", timeout: timedelta | None = None
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

    def drain_worker(self, worker: str, timeout: timedelta | None = None) -> Worker:
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
