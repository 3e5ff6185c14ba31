"""The operator feed: every change, in order, for dashboards and `icefarm watch`."""

from __future__ import annotations

from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.outbox import EventRow
from icefarm_control.storage.sequencer import number_pending_operator_events

OPERATOR_BATCH = 500


class OperatorFeed:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def last_sequence(self) -> int:
        """The number of the newest operator event, counting every event committed so far
        (on PostgreSQL the ones still waiting for the sequencer are numbered first)."""
        await number_pending_operator_events(self.db)
        async with self.db.read() as conn:
            return await outbox.last_sequence(conn, outbox.OPERATOR)

    async def events_after(self, after: int, limit: int = OPERATOR_BATCH) -> list[EventRow]:
        async with self.db.read() as conn:
            return await outbox.events_after(conn, outbox.OPERATOR, after, limit)
