"""Two control replicas started at once on a new PostgreSQL database both migrate it: one
waits for the other instead of failing on the other's half-made schema (the soak found a
replica that never started: `duplicate key value violates unique constraint
"pg_type_typname_nsp_index"`)."""

from __future__ import annotations

import asyncio

import pytest

from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import HEAD_REVISION, current_revision, upgrade
from tests.conftest import create_pg_database, drop_pg_database


@pytest.mark.postgres
async def test_replicas_migrating_a_new_database_at_once_all_succeed() -> None:
    url = create_pg_database()
    replicas = [Database(url) for _ in range(4)]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(upgrade(db) for db in replicas))
        assert await current_revision(replicas[0]) == HEAD_REVISION
    finally:
        for db in replicas:
            await db.dispose()
        drop_pg_database(url)
