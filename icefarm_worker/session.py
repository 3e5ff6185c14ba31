"""The worker's WorkerSession: the one stream it opens to the control (so it works behind NAT).

Connect (trying the control addresses in turn, with jittered exponential back-off, forever),
send Register with every board as it is now, then: one task reads commands, one writes what
is queued (device updates, command results, heartbeats, Draining) in order. When the stream
ends the worker connects again and reconciles by registering again; what happened while it was
away is in the new Register, and commands the control sends again are answered from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_chain, wait_random_exponential
from tenacity.wait import wait_base

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import control_service_pb2_grpc as cpb_grpc

log = structlog.get_logger(__name__)
Stream = grpc.aio.StreamStreamCall[cpb.WorkerSessionRequest, cpb.WorkerSessionResponse]
# How long the control has to answer Register.
REGISTER_TIMEOUT = 10.0
# A control that restarts (or a replica that takes over) serves again within seconds: the first
# attempts pause at most this long (jittered), so the worker is back soon after it serves.
FIRST_ATTEMPTS = 20
FIRST_ATTEMPTS_MAX_PAUSE = 1.5
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def reconnect_pauses(longest: float) -> wait_base:
    """Jittered exponential pauses, at most FIRST_ATTEMPTS_MAX_PAUSE for the first attempts,
    then growing up to `longest` (a control that stays away is not hammered)."""
    first = wait_random_exponential(multiplier=0.2, max=min(longest, FIRST_ATTEMPTS_MAX_PAUSE))
    later = wait_random_exponential(multiplier=0.2, max=longest)
    return wait_chain(*[first] * FIRST_ATTEMPTS, later)


class NotConnected(Exception):
    """The control could not be reached, or did not accept the registration."""


@dataclass
class Identity:
    """What the worker tells the control about itself in Register."""

    name: str
    endpoint: str
    version: str
    modes: Sequence[str]
    labels: dict[str, str] = field(default_factory=dict)


class ControlSession:
    """Keeps a WorkerSession open to the control for as long as the worker runs."""

    def __init__(
        self,
        addresses: Sequence[str],
        identity: Identity,
        *,
        devices: Callable[[], list[cpb.DeviceUpdate]],
        on_command: Callable[[cpb.WorkerCommand], None],
        on_registered: Callable[[cpb.Registered], None],
        reconnect_max: float = 30.0,
    ) -> None:
        self.addresses = list(addresses)
        self.identity = identity
        self.devices = devices
        self.on_command = on_command
        self.on_registered = on_registered
        self.reconnect_max = reconnect_max
        self.connected = asyncio.Event()
        self.registrations = 0
        self._outbox: asyncio.Queue[cpb.WorkerSessionRequest] | None = None
        self._stopping = False
        self._stop = asyncio.Event()
        self._draining: cpb.Draining | None = None
        self._address = itertools.cycle(self.addresses)

    # ------------------------------------------------------------ what goes to the control

    def send(self, request: cpb.WorkerSessionRequest) -> None:
        """Queue a message for the control; dropped while disconnected (the next Register
        carries the state it would have reported)."""
        if self._outbox is not None:
            self._outbox.put_nowait(request)

    def report(self, update: cpb.DeviceUpdate) -> None:
        """Queue a DeviceUpdate."""
        self.send(cpb.WorkerSessionRequest(device_update=update))

    def result(self, result: cpb.CommandResult) -> None:
        """Queue a CommandResult."""
        self.send(cpb.WorkerSessionRequest(command_result=result))

    def draining(self, timeout: float) -> None:
        """Tell the control (now, and after every reconnect) that this worker is draining."""
        message = cpb.Draining()
        message.timeout.FromMilliseconds(int(timeout * 1000))
        self._draining = message
        self.send(cpb.WorkerSessionRequest(draining=message))

    # ------------------------------------------------------------ the connection loop

    async def run(self) -> None:
        """Connect, serve the stream until it ends, connect again; until `stop()`."""
        while not self._stopping:
            # A fresh back-off after every registered session: it restarts from short pauses.
            retrying = AsyncRetrying(
                wait=reconnect_pauses(self.reconnect_max),
                retry=retry_if_exception_type(NotConnected),
                sleep=self._pause,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._session(next(self._address))
            # A stream the control ends at once must not turn into a busy loop.
            await self._pause(random.uniform(0.05, 0.3))

    async def _pause(self, seconds: float) -> None:
        """Sleep between attempts; `stop()` cuts it short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def stop(self) -> None:
        """Half-close the stream (the control records the end at once) and stop connecting."""
        self._stopping = True
        self._stop.set()

    async def _session(self, address: str) -> None:
        if self._stopping:
            return
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = cpb_grpc.ControlServiceStub(channel).WorkerSession()
            registered = await self._register(call, address)
            self.registrations += 1
            log.info("registered", control=address, worker=registered.worker_name)
            self.on_registered(registered)
            self.connected.set()
            try:
                await self._serve(call, registered)
            finally:
                self.connected.clear()
                self._outbox = None
        log.info("control stream ended; reconnecting", control=address)

    async def _register(self, call: Stream, address: str) -> cpb.Registered:
        # Reports from now on queue behind Register; the snapshot in Register is newer
        # than anything lost while disconnected.
        self._outbox = asyncio.Queue()
        identity = self.identity
        register = cpb.Register(
            name=identity.name,
            endpoint=identity.endpoint,
            version=identity.version,
            modes=list(identity.modes),
            labels=identity.labels,
            devices=self.devices(),
            draining=self._draining,
        )
        try:
            await call.write(cpb.WorkerSessionRequest(register=register))
            first = await asyncio.wait_for(call.read(), REGISTER_TIMEOUT)
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
            self._outbox = None
            call.cancel()
            message = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            log.info("control not reachable", control=address, error=message)
            raise NotConnected(message) from exc
        if not isinstance(first, cpb.WorkerSessionResponse) or not first.HasField("registered"):
            self._outbox = None
            call.cancel()
            raise NotConnected("the control did not answer Register")
        return first.registered

    async def _serve(self, call: Stream, registered: cpb.Registered) -> None:
        interval = registered.timers.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        tasks = [
            asyncio.create_task(self._read(call)),
            asyncio.create_task(self._write(call)),
            asyncio.create_task(self._beat(interval)),
            asyncio.create_task(self._stop.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                await self._flush_and_close(call)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _flush_and_close(self, call: Stream) -> None:
        outbox = self._outbox
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            while outbox is not None and not outbox.empty():
                await asyncio.wait_for(call.write(outbox.get_nowait()), 2)
            await call.done_writing()
            await asyncio.wait_for(call.code(), 5)

    async def _read(self, call: Stream) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while True:
                response = await call.read()
                if not isinstance(response, cpb.WorkerSessionResponse):
                    return  # EOF: the control ended the stream
                if response.HasField("command"):
                    self.on_command(response.command)

    async def _write(self, call: Stream) -> None:
        outbox = self._outbox
        assert outbox is not None
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbox.get())

    async def _beat(self, interval: float) -> None:
        for nonce in itertools.count(1):
            await asyncio.sleep(interval)
            self.send(cpb.WorkerSessionRequest(heartbeat=cpb.Heartbeat(nonce=nonce)))
