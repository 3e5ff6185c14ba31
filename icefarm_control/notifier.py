"""Wake-ups: who must re-read the outbox now. A wake-up carries no data, only topic names;
every reader re-reads the database, so a lost or duplicated wake-up loses nothing.

On SQLite the committing code wakes this process directly. On PostgreSQL each transaction also
sends `NOTIFY icefarm, '<topics>'`, and every replica's listener wakes its own readers; the
listener reconnects forever and wakes everyone after each reconnect, and every reader also
re-reads on a slow timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

import psycopg
import structlog
from sqlalchemy.engine import make_url
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

log = structlog.get_logger(__name__)
CHANNEL = "icefarm"
EVERYONE = "*"
# Woken once when this control starts shutting down (streams end so clients go elsewhere).
STOPPING = "control:stopping"
# NOTIFY payloads must stay below 8000 bytes; past this we wake everyone instead.
MAX_PAYLOAD = 7000


def notify_payload(topics: Iterable[str]) -> str:
    payload = " ".join(sorted(set(topics)))
    return payload if len(payload) <= MAX_PAYLOAD else EVERYONE


class Subscription:
    """An event set whenever one of its topics is woken."""

    def __init__(self, notifier: Notifier, topics: tuple[str, ...]) -> None:
        self.notifier = notifier
        self.topics = topics
        self.event = asyncio.Event()

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


class PostgresListener:
    """LISTEN on a dedicated autocommit connection (outside the pool), forever."""

    def __init__(self, database_url: str, notifier: Notifier) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.notifier = notifier
        self.connected = asyncio.Event()
        self.backend_pid: int | None = None
        self.reconnects = 0

    async def run(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((psycopg.OperationalError, OSError)),
            wait=wait_exponential_jitter(multiplier=0.05, max=5, jitter=0.05),
            before_sleep=lambda state: log.warning(
                "notify listener lost its connection; reconnecting",
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else "",
            ),
        )
        async for attempt in retrying:
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
                self.notifier.wake(notification.payload.split())


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
