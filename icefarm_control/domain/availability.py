"""Watching availability: tell a client once each time enough devices matching its selector
become free (a shortage turning into enough), without one query per client.

One monitor per replica re-counts free devices once per distinct watched selector whenever
devices may have changed: the `devices` topic (devices freed) and the `operator` topic (every
reservation created or ended, device and worker changes), plus a slow timer. A count is a
snapshot: a board taken and freed again between two counts is not seen as a transition, so
DevicesAvailable is a hint to Reserve (with a wait), never a promise.

All selectors are counted in one read transaction. A selector whose count fails (a database
that refuses it spoils the whole transaction on PostgreSQL) is from then on counted alone,
until it counts again: one bad watch never silences the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from icefarm_control.domain.selectors import Selector, parse_selector
from icefarm_control.domain.settings import UPKEEP_SECONDS
from icefarm_control.notifier import Notifier, Subscription
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage.database import Database

log = structlog.get_logger(__name__)

RECOUNT_INTERVAL = UPKEEP_SECONDS


@dataclass(eq=False)
class Watch:
    """One client's interest in `count` free devices matching `selector`."""

    selector: str
    count: int
    # Called with the free device ids on each shortage → enough transition; returns False
    # when it could not pass them on (then the next count tries again).
    on_available: Callable[[Sequence[str]], bool]
    enough: bool = field(default=False)

    def update(self, free: Sequence[str]) -> None:
        enough = len(free) >= self.count
        if enough and not self.enough:
            enough = self.on_available(free)
        self.enough = enough


class AvailabilityMonitor:
    def __init__(
        self, database: Database, notifier: Notifier, recount_interval: float = RECOUNT_INTERVAL
    ) -> None:
        self.db = database
        self.notifier = notifier
        self.recount_interval = recount_interval
        self._watches: dict[str, set[Watch]] = defaultdict(set)
        self._parsed: dict[str, Selector] = {}
        # Selectors whose count failed: counted alone; `_reported`: their failure is logged.
        self._failing: set[str] = set()
        self._reported: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    def watch(
        self, selector: str, count: int, on_available: Callable[[Sequence[str]], bool]
    ) -> Watch:
        """Start watching (SelectorError when the selector does not parse); the first count
        runs at once, so a client is told straight away when enough are already free."""
        parsed = parse_selector(selector)
        watch = Watch(selector, count, on_available)
        self._parsed[selector] = parsed
        self._watches[selector].add(watch)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="availability-monitor")
        elif self._subscription is not None:
            self._subscription.event.set()  # a new watch counts as a wake-up
        return watch

    def unwatch(self, watch: Watch) -> None:
        watchers = self._watches.get(watch.selector)
        if watchers is None:
            return
        watchers.discard(watch)
        if not watchers:
            del self._watches[watch.selector]
            self._parsed.pop(watch.selector, None)
            self._failing.discard(watch.selector)
            self._reported.discard(watch.selector)

    @property
    def watch_count(self) -> int:
        return sum(len(w) for w in self._watches.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        with self.notifier.subscribe(outbox.DEVICES, outbox.OPERATOR) as subscription:
            self._subscription = subscription
            try:
                while self._watches:
                    try:
                        await self._recount()
                    except Exception:
                        log.exception("counting free devices for watchers failed")
                    await subscription.wait(self.recount_interval)
            finally:
                self._subscription = None

    async def _recount(self) -> None:
        selectors = [s for s in self._watches if s in self._parsed]
        together = [s for s in selectors if s not in self._failing]
        free: dict[str, list[str]] = {}
        try:
            free.update(await self._count(together))
        except Exception:
            log.warning("counting free devices failed; counting each selector alone")
            self._failing.update(together)
        for selector in [s for s in selectors if s in self._failing]:
            try:
                free.update(await self._count([selector]))
            except Exception:
                if selector not in self._reported:
                    self._reported.add(selector)
                    log.exception("counting free devices failed", selector=repr(selector)[:200])
                continue
            self._failing.discard(selector)
            self._reported.discard(selector)
        for selector, ids in free.items():
            for watch in list(self._watches.get(selector, ())):
                self._tell(watch, ids)

    async def _count(self, selectors: Sequence[str]) -> dict[str, list[str]]:
        """The free devices matching each selector, in one read transaction."""
        free: dict[str, list[str]] = {}
        if not selectors:
            return free
        async with self.db.read() as conn:
            for selector in selectors:
                parsed = self._parsed.get(selector)
                if parsed is None:
                    continue
                free[selector] = await q.count_free_devices(
                    conn, None if parsed.is_empty else parsed
                )
        return free

    @staticmethod
    def _tell(watch: Watch, free: Sequence[str]) -> None:
        try:
            watch.update(free)
        except Exception:
            log.exception("telling a watcher about free devices failed", selector=watch.selector)
