"""What the soak watches while it runs: the database's invariants (tests/invariants.py) checked
every second, the boards' states (so recovery and "AVAILABLE again" are measured from what the
control recorded), and every process's resident memory."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from icefarm_control.storage.database import Database
from icefarm_control.storage.models import devices, reservations
from tests import invariants
from tests.soak.farm import Farm, Proc, rss_kib

CHECK_INTERVAL = 1.0
RSS_INTERVAL = 5.0


@dataclass
class Break:
    """An invariant seen broken, when, and the rows that broke it."""

    t: float
    invariant: str
    detail: str
    # The boards it is about, when it is about boards: their state changes are the story.
    devices: tuple[str, ...] = ()


@dataclass
class Monitor:
    farm: Farm
    database: Database
    breaks: list[Break] = field(default_factory=list)
    checks: int = 0
    skipped: int = 0
    states: dict[str, str] = field(default_factory=dict)
    changes: list[tuple[float, str, str]] = field(default_factory=list)
    rss: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    notes: list[tuple[float, str]] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Something the soak did (a fault, a restart), for the story around a break."""
        self.notes.append((time.time(), text))

    async def run(self, stop: asyncio.Event) -> None:
        rss_due = 0.0
        while not stop.is_set():
            await self.check_once()
            if time.monotonic() >= rss_due:
                self.sample_rss()
                rss_due = time.monotonic() + RSS_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL)

    async def check_once(self) -> bool:
        """One round: every invariant and every board's state. False when the database could
        not be read (it is being restarted): the round is skipped, not passed."""
        now = time.time()
        try:
            async with self.database.read() as conn:
                found = await invariants.check(conn)
                rows = (await conn.execute(select(devices.c.id, devices.c.state))).all()
        except (DBAPIError, OperationalError, OSError):
            self.skipped += 1
            return False
        self.checks += 1
        for violation in found:
            self.breaks.append(Break(now, violation.invariant, str(violation)))
        for exit_ in self.farm.unexpected_exits():
            if all(exit_ != b.detail for b in self.breaks):
                self.breaks.append(Break(now, "a process exited that the soak did not end", exit_))
        for device_id, state in rows:
            if self.states.get(device_id) != state:
                self.states[device_id] = state
                self.changes.append((now, device_id, state))
        return True

    def sample_rss(self) -> None:
        now = time.time()
        roles: list[Proc] = [
            *self.farm.controls.values(),
            *self.farm.workers.values(),
            *self.farm.simulators.values(),
        ]
        for proc in roles:
            kib = rss_kib(proc.pid)
            if kib is not None:
                self.rss.setdefault(proc.role, []).append((now, proc.pid, kib))

    def state_at(self, device_id: str) -> str:
        return self.states.get(device_id, "")

    def first_change(
        self, device_id: str, after: float, accept: Callable[[str], bool]
    ) -> float | None:
        """When `device_id` was first seen in a state `accept`s, after `after`."""
        for t, device, state in self.changes:
            if device == device_id and t >= after and accept(state):
                return t
        return None

    async def holders(self) -> dict[str, str]:
        """device id → client id of its active holder, now."""
        async with self.database.read() as conn:
            rows = (
                await conn.execute(
                    select(devices.c.id, reservations.c.client_id).join(
                        reservations, reservations.c.id == devices.c.reservation_id
                    )
                )
            ).all()
        return {str(device): str(client) for device, client in rows}

    async def reservations(self) -> list[dict[str, Any]]:
        async with self.database.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        reservations.c.id,
                        reservations.c.client_id,
                        reservations.c.state,
                        reservations.c.end_reason,
                        reservations.c.create_time,
                        reservations.c.ended_time,
                    )
                )
            ).all()
        return [dict(row._mapping) for row in rows]
