"""The modes the farm's workers offer, so Reserve can refuse one that no worker has.

Without this a mistyped mode reaches the workers as PrepareDevice, fails there, and leaves each
reserved board BROKEN. The set is cached for a moment (Reserve is the hot path) and re-read
once before a mode is refused, so a worker that just registered a new mode is seen.
"""

from __future__ import annotations

import asyncio

from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.domain.settings import MODE_CACHE_SECONDS
from icefarm_control.storage import worker_queries as wq
from icefarm_control.storage.database import Database

CACHE_SECONDS = MODE_CACHE_SECONDS


class ModeCatalog:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._offered: frozenset[str] = frozenset()
        self._read_at: float | None = None

    async def check(self, mode: str) -> None:
        """InvalidArgument naming the mode when workers advertise modes and none offers it.
        (A farm whose workers advertise no modes at all is not checked.)"""
        if not mode:
            return
        now = asyncio.get_running_loop().time()
        if self._read_at is None or now - self._read_at > CACHE_SECONDS:
            await self._read(now)
        if mode in self._offered or not self._offered:
            return
        await self._read(now)  # perhaps a worker offering it just registered
        if mode in self._offered or not self._offered:
            return
        offered = ", ".join(sorted(self._offered))
        raise InvalidArgument("mode", f"no worker offers mode {mode!r} (offered: {offered})")

    async def _read(self, now: float) -> None:
        async with self.db.read() as conn:
            self._offered = frozenset(await wq.offered_modes(conn))
        self._read_at = now
