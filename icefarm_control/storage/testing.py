"""The test-only way to put workers and devices into a database.

Until workers register over WorkerSession this is how tests, benchmarks and the demo seed a
farm. It is deliberately not reachable through any RPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from icefarm_control.domain.states import DeviceState, WorkerState
from icefarm_control.storage import outbox
from icefarm_control.storage import queries as q
from icefarm_control.storage.database import Database


async def register_worker(
    database: Database,
    name: str,
    *,
    endpoint: str = "127.0.0.1:0",
    modes: Sequence[str] = ("pulsecount", "varmax", "usbip"),
    labels: dict[str, str] | None = None,
    state: WorkerState = WorkerState.ONLINE,
) -> None:
    async with database.write() as conn:
        await q.upsert_worker(
            conn,
            name=name,
            endpoint=endpoint,
            version="test",
            modes=modes,
            labels=labels or {},
            state=state,
            now=datetime.now(UTC),
        )


async def register_device(
    database: Database,
    device_id: str,
    *,
    worker: str,
    kind: str = "pico2-ice",
    state: DeviceState = DeviceState.AVAILABLE,
    labels: dict[str, str] | None = None,
    properties: dict[str, float] | None = None,
    reset_on_release: bool = False,
) -> None:
    async with database.write() as conn:
        await q.upsert_device(
            conn,
            device_id=device_id,
            worker=worker,
            kind=kind,
            state=state,
            labels=labels or {},
            properties=properties or {},
            reset_on_release=reset_on_release,
            now=datetime.now(UTC),
        )


async def seed_farm(
    database: Database, *, workers: int = 1, boards_per_worker: int = 8, prefix: str = "board"
) -> list[str]:
    """`workers` online workers with `boards_per_worker` AVAILABLE boards each; the board ids."""
    ids: list[str] = []
    for w in range(workers):
        name = f"worker-{w}"
        await register_worker(database, name, endpoint=f"127.0.0.1:{50100 + w}")
        for b in range(boards_per_worker):
            device_id = f"{prefix}-{w}-{b:03d}"
            await register_device(database, device_id, worker=name)
            ids.append(device_id)
    return ids


async def operator_feed(database: Database, after: int = 0) -> list[outbox.EventRow]:
    """The operator feed after `after`, once every operator event written so far has its
    number (what the app's sequencer does within moments on PostgreSQL)."""
    if database.is_postgresql:
        from icefarm_control.storage.sequencer import number_operator_events

        async with database.write() as conn:
            await number_operator_events(conn)
    async with database.read() as conn:
        return await outbox.events_after(conn, outbox.OPERATOR, after)
