"""Numbering the operator feed's events after the fact (PostgreSQL).

Every reserve and release appends an operator event. Numbering it inside the fast-path
statement would make every such statement update the one `operator` counter row and hold its
lock until commit: all reserves and releases of all clients would queue on that row. Instead
the fast paths insert operator events with no sequence, and this sequencer numbers them just
after, in batches, in the order of their ids. Sequencers (one per replica) take turns on the
counter row, so numbers are gapless and a reader that has seen number N never later finds an
event numbered below N. Operator readers only read numbered events.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy import func, literal, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.domain.settings import SEQUENCER_GATHER_SECONDS
from icefarm_control.notifier import Notifier
from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.storage.models import event_sequences, events

log = structlog.get_logger(__name__)
UNSEQUENCED = outbox.UNSEQUENCED
BATCH = 1000
# The pause between two numbering rounds (the operator feed's added latency, at most).
GATHER_SECONDS = SEQUENCER_GATHER_SECONDS


async def number_operator_events(conn: AsyncConnection, limit: int = BATCH) -> int:
    """Number up to `limit` unnumbered operator events, oldest id first; how many."""
    lock_counter = (
        postgresql.insert(event_sequences)
        .values(audience=outbox.OPERATOR, last_sequence=0)
        .on_conflict_do_update(
            index_elements=[event_sequences.c.audience],
            set_={"last_sequence": event_sequences.c.last_sequence},
        )
        .returning(event_sequences.c.last_sequence)
    )
    last: int = (await conn.execute(lock_counter)).scalar_one()
    waiting = (
        select(
            events.c.id,
            (literal(last) + func.row_number().over(order_by=events.c.id)).label("number"),
        )
        .where(events.c.audience == outbox.OPERATOR, events.c.sequence.is_(None))
        .order_by(events.c.id)
        .limit(limit)
        .subquery()
    )
    numbered = (
        await conn.execute(
            update(events)
            .where(events.c.id == waiting.c.id)
            .values(sequence=waiting.c.number)
            .returning(events.c.sequence)
        )
    ).all()
    if not numbered:
        return 0
    await conn.execute(
        update(event_sequences)
        .where(event_sequences.c.audience == outbox.OPERATOR)
        .values(last_sequence=last + len(numbered))
    )
    outbox.touch(conn, outbox.OPERATOR)
    return len(numbered)


async def run_sequencer(
    database: Database, notifier: Notifier, stopping: asyncio.Event, poll_seconds: float = 1.0
) -> None:
    """Number operator events whenever some are waiting (woken by any replica's fast paths),
    and every `poll_seconds` anyway in case a wake-up was lost, until `stopping` is set (and
    the topic woken) — then once more, so nothing committed before the stop stays unnumbered."""
    with notifier.subscribe(UNSEQUENCED) as wake:
        while True:
            last_round = stopping.is_set()
            numbered = 0
            try:
                async with database.write() as conn:
                    numbered = await number_operator_events(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("numbering operator events failed; retrying")
            if last_round:
                return
            if numbered < BATCH:
                # Gather a batch: one numbering transaction per pause, not one per commit.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), GATHER_SECONDS)
                await wake.wait(poll_seconds)


async def number_pending_operator_events(database: Database) -> None:
    """Number the operator events still waiting for the sequencer, now. Only PostgreSQL's fast
    paths leave any (SQLite numbers them as they are written), so elsewhere this does nothing."""
    if not database.is_postgresql:
        return
    async with database.write() as conn:
        await number_operator_events(conn)
