"""ReservationService.Session: a client's liveness and its event feed.

The shape is labgrid's: a handshake (Hello within the handshake timeout), then a receive task
over the request iterator (Ping → Pong, WatchAvailability, UnwatchAvailability) and a feed task
(the client's outbox after the resume point, re-read on every wake-up of `client:<id>`), both
putting what goes out on one queue that the handler drains. No lock is held across a network
wait; the database decides who owns a Session (the generation of its client and instance).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from icefarm.v1 import reservation_service_pb2 as pb
from icefarm_control.domain.availability import AvailabilityMonitor, Watch
from icefarm_control.domain.clients import (
    FEED_BATCH,
    ClientSessions,
    FeedGate,
    SessionStart,
    needs_reading,
)
from icefarm_control.domain.errors import IcefarmDomainError, InvalidArgument, Reason, Unavailable
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import (
    FEED_REREAD_SECONDS,
    MAX_WATCHES_PER_SESSION,
    UPKEEP_SECONDS,
)
from icefarm_control.notifier import Flag, Mailbox, Notifier
from icefarm_control.storage import outbox
from icefarm_control.storage.client_queries import SessionKey
from icefarm_control.transport import convert
from icefarm_control.transport import events as event_messages
from icefarm_control.transport.errors import abort, domain_status, to_status
from icefarm_control.transport.identity import caller_identity
from icefarm_control.transport.streams import failure_status, to_completion

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]

MAX_WATCHES = MAX_WATCHES_PER_SESSION
# How often the replica's upkeep looks for feeds that fell behind (a lost wake-up).
RESYNC_SECONDS = UPKEEP_SECONDS
# A feed's own last resort, should the upkeep not run.
FEED_RESYNC_SECONDS = FEED_REREAD_SECONDS
# Hello.instance: which Client object of the client this is (the charset of client ids).
_INSTANCE = re.compile(r"[\x21-\x7e]{0,64}")

SUPERSEDED = to_status(
    grpc.StatusCode.ABORTED,
    "superseded: a newer Session of this client and instance took over (do not reconnect this one)",
    Reason.CONFLICT.value,
)
SHUTTING_DOWN = to_status(
    grpc.StatusCode.UNAVAILABLE,
    "the control is shutting down; reconnect (to another replica) with resume_after",
    Reason.SHUTTING_DOWN.value,
)


@dataclass(frozen=True)
class _End:
    """Put on the outgoing queue to end the stream: OK (None) or this status."""

    status: grpc.Status | None


class ClientSessionHandler:
    """Serves every Session of one replica and keeps them honest: refreshes their liveness,
    wakes feeds that fell behind, ends them when the replica shuts down."""

    def __init__(
        self,
        sessions: ClientSessions,
        notifier: Notifier,
        *,
        handshake_timeout: float,
        max_count: int,
    ) -> None:
        self.sessions = sessions
        self.notifier = notifier
        self.monitor = AvailabilityMonitor(sessions.db, notifier)
        self.gate = FeedGate(sessions)
        self.handshake_timeout = handshake_timeout
        self.max_count = max_count
        self._live: dict[SessionKey, ClientStream] = {}
        self._refreshed = float("-inf")
        self._closing = False

    @classmethod
    def for_engine(
        cls, engine: ReservationEngine, sessions: ClientSessions | None = None
    ) -> ClientSessionHandler:
        return cls(
            sessions or ClientSessions(engine),
            engine.notifier,
            handshake_timeout=engine.timers.handshake_timeout.total_seconds(),
            max_count=engine.limits.max_count,
        )

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def upkeep_interval(self) -> float:
        return min(RESYNC_SECONDS, self.sessions.refresh_interval)

    async def serve(
        self, requests: AsyncIterator[pb.SessionRequest], context: Context
    ) -> AsyncIterator[pb.SessionResponse]:
        try:
            if self._closing:
                raise Unavailable("the control is shutting down; reconnect to another replica")
            caller = caller_identity(context, required=True)
            hello = await self._handshake(requests)
            key = SessionKey(caller.client_id, hello.instance)
            start = await to_completion(self.sessions.open(key, hello.resume_after))
        except Exception as error:
            await abort(context, failure_status(error, "Session"))
        stream = ClientStream(self, start)
        previous = self._live.get(start.key)
        if previous is not None:
            previous.end(SUPERSEDED)
        self._live[start.key] = stream
        if self._closing:
            stream.end(SHUTTING_DOWN)
        try:
            yield pb.SessionResponse(
                welcome=pb.Welcome(
                    client_id=start.key.client_id,
                    last_sequence=start.last_sequence,
                    timers=convert.timers(self.sessions.timers),
                )
            )
            async for response in stream.run(requests):
                yield response
        finally:
            if self._live.get(start.key) is stream:
                del self._live[start.key]
            # Runs to its end even when gRPC cancels this handler (again) meanwhile.
            await to_completion(stream.finish())
        if stream.status is not None:
            await abort(context, stream.status)

    async def _handshake(self, requests: AsyncIterator[pb.SessionRequest]) -> pb.Hello:
        try:
            first = await asyncio.wait_for(anext(aiter(requests)), self.handshake_timeout)
        except TimeoutError:
            raise InvalidArgument(
                "hello", f"send Hello as the first message within {self.handshake_timeout:g} s"
            ) from None
        except StopAsyncIteration:
            raise InvalidArgument("hello", "the stream ended before Hello") from None
        kind = first.WhichOneof("kind")
        if kind != "hello":
            raise InvalidArgument(
                "hello", f"the first message must be Hello, not {kind or 'empty'}"
            )
        if not _INSTANCE.fullmatch(first.hello.instance):
            raise InvalidArgument(
                "hello.instance", "must be at most 64 printable ASCII characters (no spaces)"
            )
        return first.hello

    async def upkeep(self) -> None:
        """Mark this replica's sessions as seen, and wake each feed that fell behind its
        outbox or lost its session to a newer one (a lost wake-up costs at most this long)."""
        live = dict(self._live)
        if not live:
            return
        now = time.monotonic()
        if now - self._refreshed >= self.sessions.refresh_interval:
            await self.sessions.refresh(list(live))
            self._refreshed = now
        positions = await self.sessions.positions(list(live))
        behind = {
            outbox.client_audience(key.client_id)
            for key, stream in live.items()
            if needs_reading(positions.get(key), stream)
        }
        if behind:
            self.notifier.wake(sorted(behind))

    async def shut_down(self, timeout: float) -> None:
        """End every Session with UNAVAILABLE (clients reconnect elsewhere) and wait, up to
        `timeout`, for them to record their disconnect."""
        self._closing = True
        streams = list(self._live.values())
        for stream in streams:
            stream.end(SHUTTING_DOWN)
        if streams:
            waiting = [asyncio.ensure_future(s.finished.wait()) for s in streams]
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            for task in pending:
                task.cancel()
        await self.monitor.close()


class ClientStream:
    """One open Session."""

    def __init__(self, handler: ClientSessionHandler, start: SessionStart) -> None:
        self.handler = handler
        self.sessions = handler.sessions
        self.key = start.key
        self.client_id = start.key.client_id
        self.generation = start.generation
        # Read from the outbox up to here / yielded to gRPC (or skipped) up to here.
        self.cursor = start.resume_after
        self.sent = start.resume_after
        self.status: grpc.Status | None = None
        self.finished = Flag()
        self._out: Mailbox[pb.SessionResponse | _End] = Mailbox()
        self._ended = False
        self._tasks: list[asyncio.Task[None]] = []
        self._watches: dict[str, Watch] = {}
        # False while the last read filled a whole batch (read on without waiting).
        self.cursor_caught_up = True

    def end(self, status: grpc.Status | None) -> None:
        """End the stream after what is already queued (first call wins)."""
        if not self._ended:
            self._ended = True
            self._out.put_nowait(_End(status))

    async def run(
        self, requests: AsyncIterator[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionResponse]:
        self._tasks = [
            asyncio.create_task(self._receive(requests), name=f"session-receive:{self.client_id}"),
            asyncio.create_task(self._feed(), name=f"session-feed:{self.client_id}"),
        ]
        while True:
            item = await self._out.get()
            if isinstance(item, _End):
                self._out.task_done()
                self.status = item.status
                return
            yield item
            if item.event.sequence > self.sent:
                self.sent = item.event.sequence
            self._out.task_done()

    async def finish(self) -> None:
        """Stop both tasks, drop the watches, and record the disconnect (the grace starts)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for watch in self._watches.values():
            self.handler.monitor.unwatch(watch)
        self._watches.clear()
        try:
            await self.sessions.close(self.key, self.generation, self.sent)
        except Exception:
            log.exception(
                "could not record the end of a client session",
                client=self.client_id,
                instance=self.key.instance,
            )
        finally:
            self.finished.set()

    # ------------------------------------------------------------ what the client sends

    async def _receive(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        try:
            async for request in requests:
                self._handle(request)
        except asyncio.CancelledError:
            raise
        except IcefarmDomainError as error:
            self.end(domain_status(error))
            return
        except Exception as error:
            if not self._ended:
                self.end(failure_status(error, "Session"))
            return
        self.end(None)  # the client finished sending: the Session is over

    def _handle(self, request: pb.SessionRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind == "ping":
            self._out.put_nowait(pb.SessionResponse(pong=pb.Pong(nonce=request.ping.nonce)))
        elif kind == "watch":
            self._watch(request.watch.selector, request.watch.count)
        elif kind == "unwatch":
            watch = self._watches.pop(request.unwatch.selector, None)
            if watch is not None:
                self.handler.monitor.unwatch(watch)
        elif kind == "hello":
            raise InvalidArgument("hello", "send Hello once, as the first message")
        else:
            raise InvalidArgument("kind", "an empty SessionRequest")

    def _watch(self, selector: str, count: int) -> None:
        count = count or 1
        if not 1 <= count <= self.handler.max_count:
            raise InvalidArgument("watch.count", f"must be 1 to {self.handler.max_count}")
        if selector not in self._watches and len(self._watches) >= MAX_WATCHES:
            raise InvalidArgument("watch", f"at most {MAX_WATCHES} selectors per Session")
        previous = self._watches.pop(selector, None)
        if previous is not None:
            self.handler.monitor.unwatch(previous)
        self._watches[selector] = self.handler.monitor.watch(
            selector, count, lambda free: self._tell_available(selector, free)
        )

    def _tell_available(self, selector: str, free: Sequence[str]) -> bool:
        if self._ended:
            return False
        event = event_messages.devices_available(selector, free, self.sessions.clock.now())
        self._out.put_nowait(pb.SessionResponse(event=event))
        return True

    # ------------------------------------------------------------ the event feed

    async def _feed(self) -> None:
        try:
            audience = outbox.client_audience(self.client_id)
            with self.handler.notifier.subscribe(audience) as subscription:
                worth_reading = True
                while not self._ended:
                    if worth_reading and not await self._deliver_batch():
                        return
                    if self.cursor_caught_up:
                        await subscription.wait(FEED_RESYNC_SECONDS)
                        worth_reading = await self.handler.gate.worth_reading(self)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.end(failure_status(error, "Session"))

    async def _deliver_batch(self) -> bool:
        """Send the next events after the cursor and record how far the feed got; False when
        the stream must end (a newer Session owns the feed)."""
        batch = await to_completion(self.sessions.read_feed(self.key, self.generation, self.cursor))
        if batch.superseded:
            self.end(SUPERSEDED)
            return False
        self.cursor_caught_up = len(batch.events) < FEED_BATCH
        if not batch.events:
            return True
        for row in batch.events:
            self.cursor = row.sequence
            message = event_messages.event(row)
            if message is not None:
                self._out.put_nowait(pb.SessionResponse(event=message))
        await self._out.join()  # every queued message went to gRPC (backpressure)
        self.sent = max(self.sent, self.cursor)
        recorded = self.sessions.record_delivery(self.key, self.generation, self.cursor)
        if not await to_completion(recorded):
            self.end(SUPERSEDED)
            return False
        return True
