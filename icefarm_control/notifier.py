"""Wake-ups: who must re-read the outbox now. A wake-up carries no data, only topic names;
every reader re-reads the database, so a lost or duplicated wake-up loses nothing.

The committing code wakes this process's readers directly. On PostgreSQL the topics are also
sent to the other replicas: after the commit, batched (`PostgresAnnouncer`: one
`NOTIFY icefarm, '<topics>'` carries everything committed since the previous one), and every
replica's listener wakes its own readers, skipping what its own announcer sent. Announcing
after the commit, not inside the transaction, keeps NOTIFY's database-wide commit lock out of
the reserve/release path; a wake-up lost to a crash in between costs a reader's slow re-read.
The listener reconnects forever and wakes everyone after each reconnect, and every reader also
re-reads on a slow timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

import psycopg
import structlog
from sqlalchemy.engine import make_url
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

log = structlog.get_logger(__name__)
T = TypeVar("T")
CHANNEL = "icefarm"
EVERYONE = "*"
# Woken once when this control starts shutting down (streams end so clients go elsewhere).
STOPPING = "control:stopping"
# NOTIFY payloads must stay below 8000 bytes; past this we wake everyone instead.
MAX_PAYLOAD = 7000


def notify_payload(topics: Iterable[str]) -> str:
    payload = " ".join(sorted(set(topics)))
    return payload if len(payload) <= MAX_PAYLOAD else EVERYONE


class Flag:
    """asyncio.Event's set/clear/is_set/wait in a few dozen bytes: one is held by every open
    stream (thousands per replica), and asyncio.Event carries a deque of its own."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class Mailbox(Generic[T]):
    """What asyncio.Queue does for one stream's outgoing messages (put, get, task_done, join),
    without its three deques and its Event: a replica holds thousands of these."""

    __slots__ = ("_done", "_items", "_ready", "_unfinished")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._unfinished = 0
        self._ready = Flag()
        self._done = Flag()
        self._done.set()

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._unfinished += 1
        self._done.clear()
        self._ready.set()

    async def get(self) -> T:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.pop(0)

    def task_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished <= 0:
            self._unfinished = 0
            self._done.set()

    async def join(self) -> None:
        """Until every item put so far has been taken and marked done."""
        await self._done.wait()


class Subscription:
    """An event set whenever one of its topics is woken."""

    __slots__ = ("event", "notifier", "topics")

    def __init__(self, notifier: Notifier, topics: tuple[str, ...]) -> None:
        self.notifier = notifier
        self.topics = topics
        self.event = Flag()

    async def wait(self, timeout: float | None = None) -> bool:
        """True when woken (and re-armed), False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


class Notifier:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self.stopping = False

    def announce_stopping(self) -> None:
        self.stopping = True
        self.wake([STOPPING])

    @contextlib.contextmanager
    def subscribe(self, *topics: str) -> Iterator[Subscription]:
        subscription = Subscription(self, topics)
        for topic in topics:
            self._subscribers[topic].add(subscription)
        try:
            yield subscription
        finally:
            for topic in topics:
                self._subscribers[topic].discard(subscription)
                if not self._subscribers[topic]:
                    del self._subscribers[topic]

    def wake(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if topic == EVERYONE:
                self.wake_all()
                return
            for subscription in self._subscribers.get(topic, ()):
                subscription.event.set()

    def wake_all(self) -> None:
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.event.set()


def _conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _retrying(what: str) -> AsyncRetrying:
    """Reconnect forever, with jittered back-off, on connection errors only."""
    return AsyncRetrying(
        retry=retry_if_exception_type((psycopg.OperationalError, OSError)),
        wait=wait_exponential_jitter(multiplier=0.05, max=5, jitter=0.05),
        before_sleep=lambda state: log.warning(
            f"notify {what} lost its connection; reconnecting",
            attempt=state.attempt_number,
            error=str(state.outcome.exception()) if state.outcome else "",
        ),
    )


class PostgresAnnouncer:
    """Sends this replica's wake-ups to the others: NOTIFY after commit, batched, on a
    dedicated autocommit connection (outside the pool). A batch that fails is sent again
    after the reconnect."""

    def __init__(self, database_url: str) -> None:
        self.conninfo = _conninfo(database_url)
        self.backend_pid: int | None = None
        self._pending: set[str] = set()
        self._ready = asyncio.Event()
        # Set while nothing is waiting to be sent.
        self._idle = asyncio.Event()
        self._idle.set()

    def announce(self, topics: Iterable[str]) -> None:
        self._pending.update(topics)
        self._idle.clear()
        self._ready.set()

    async def run(self) -> None:
        async for attempt in _retrying("announcer"):
            with attempt:
                await self._send_forever()

    async def _send_forever(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            # A NOTIFY is only a wake-up: no need to wait for its commit record on disk.
            await conn.execute("SET synchronous_commit = off")
            self.backend_pid = conn.info.backend_pid
            while True:
                await self._ready.wait()
                self._ready.clear()
                topics, self._pending = self._pending, set()
                payload = notify_payload(topics)
                try:
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                except BaseException:
                    self._pending |= topics
                    self._ready.set()
                    raise
                if not self._pending:
                    self._idle.set()

    async def flush(self, timeout: float) -> None:
        """Give what is pending a moment to go out (at shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


class PostgresListener:
    """LISTEN on a dedicated autocommit connection (outside the pool), forever."""

    def __init__(
        self, database_url: str, notifier: Notifier, announcer: PostgresAnnouncer | None = None
    ) -> None:
        self.conninfo = _conninfo(database_url)
        self.notifier = notifier
        # Our own announcements: this process already woke its readers when it committed.
        self.announcer = announcer
        self.connected = asyncio.Event()
        self.backend_pid: int | None = None
        self.reconnects = 0

    async def run(self) -> None:
        async for attempt in _retrying("listener"):
            with attempt:
                await self._listen()

    async def _listen(self) -> None:
        self.connected.clear()
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self.backend_pid = conn.info.backend_pid
            self.reconnects += 1
            self.connected.set()
            # Anything committed while we were not listening is in the outbox: re-read it.
            # (While connected no NOTIFY is lost; each reader also re-reads on its own slow,
            # jittered timer, so nothing here needs to wake everyone periodically.)
            self.notifier.wake_all()
            async for notification in conn.notifies():
                if self.announcer is None or notification.pid != self.announcer.backend_pid:
                    self.notifier.wake(notification.payload.split())


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
