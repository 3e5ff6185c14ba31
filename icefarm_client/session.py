"""The client's Session stream: liveness for the control and the feed of the client's events.

One stream per Client object, named by its own `instance` (so two experiments of one user, each
with its own Client, never replace each other's Session; their reservations still belong to
the one client id). It is reopened whenever it breaks (the control restarted, a replica went
away) under the same instance with `resume_after` = the last sequence seen, so no event is lost
or seen twice; the watched selectors are sent again on every new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc
from icefarm_client import convert
from icefarm_client.connection import Settings
from icefarm_client.errors import IcefarmError, translate
from icefarm_client.models import Event

log = structlog.get_logger(__name__)
PING_INTERVAL = 10.0
RECONNECT_MAX = 2.0
# Codes after which reconnecting cannot help.
_FATAL = (
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)


class SessionFeed:
    """Keeps the Session open and hands each event to `deliver`, in order, once."""

    def __init__(
        self,
        settings: Settings,
        channel: grpc.aio.Channel,
        deliver: Callable[[Event], None],
        instance: str = "",
    ) -> None:
        self.settings = settings
        self.instance = instance
        self._stub = rpb_grpc.ReservationServiceStub(channel)
        self._deliver = deliver
        self.last_sequence = 0
        self.connections = 0
        self.connected = asyncio.Event()
        self.failure: IcefarmError | None = None
        self._watches: dict[str, int] = {}
        self._outgoing: asyncio.Queue[rpb.SessionRequest | None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True while the feed is (re)connecting or connected."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Open the stream (idempotent)."""
        if not self.running:
            self.failure = None
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Close the stream and stop reconnecting."""
        if self._task is None:
            return
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.connected.clear()

    def watch(self, selector: str, count: int) -> None:
        """Ask for DevicesAvailable whenever `count` devices matching `selector` are free."""
        self._watches[selector] = count
        self._send(rpb.SessionRequest(watch=rpb.WatchAvailability(selector=selector, count=count)))

    def unwatch(self, selector: str) -> None:
        """Stop watching `selector`."""
        if self._watches.pop(selector, None) is not None:
            self._send(rpb.SessionRequest(unwatch=rpb.UnwatchAvailability(selector=selector)))

    def _send(self, request: rpb.SessionRequest) -> None:
        if self._outgoing is not None and self.connected.is_set():
            self._outgoing.put_nowait(request)

    async def _run(self) -> None:
        pause = 0.1
        while True:
            try:
                await self._once()
                pause = 0.1
            except grpc.RpcError as error:
                code = getattr(error, "code", lambda: None)()
                self.connected.clear()
                if code in _FATAL:
                    self.failure = translate(error)
                    log.warning("session ended", code=str(code), error=self.failure.message)
                    return
                log.info("session lost; reconnecting", code=str(code))
            self.connected.clear()
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, RECONNECT_MAX)

    async def _requests(
        self, queue: asyncio.Queue[rpb.SessionRequest | None]
    ) -> AsyncIterator[rpb.SessionRequest]:
        while (request := await queue.get()) is not None:
            yield request

    async def _ping(self, queue: asyncio.Queue[rpb.SessionRequest | None]) -> None:
        nonce = 0
        while True:
            await asyncio.sleep(PING_INTERVAL)
            nonce += 1
            queue.put_nowait(rpb.SessionRequest(ping=rpb.Ping(nonce=nonce)))

    async def _once(self) -> None:
        queue: asyncio.Queue[rpb.SessionRequest | None] = asyncio.Queue()
        queue.put_nowait(
            rpb.SessionRequest(
                hello=rpb.Hello(resume_after=self.last_sequence, instance=self.instance)
            )
        )
        for selector, count in self._watches.items():
            queue.put_nowait(
                rpb.SessionRequest(watch=rpb.WatchAvailability(selector=selector, count=count))
            )
        self._outgoing = queue
        call: Any = self._stub.Session(self._requests(queue), metadata=self.settings.metadata())
        pinger = asyncio.create_task(self._ping(queue))
        try:
            async for response in call:
                kind = response.WhichOneof("kind")
                if kind == "welcome":
                    self.connections += 1
                    self.connected.set()
                elif kind == "event":
                    self._accept(response.event)
        finally:
            pinger.cancel()
            self._outgoing = None
            queue.put_nowait(None)
            call.cancel()

    def _accept(self, message: Any) -> None:
        sequence = int(message.sequence)
        if sequence:
            if sequence <= self.last_sequence:
                return
            self.last_sequence = sequence
        try:
            event = convert.event(message)
        except ValueError:
            log.warning("unknown event skipped", sequence=sequence)
            return
        self._deliver(event)
