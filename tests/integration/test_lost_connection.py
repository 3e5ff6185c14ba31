"""A write transaction whose connection the server closes fails with the database's own error
(a lost database, which the transport answers UNAVAILABLE and callers retry), never with an
error of the cleanup after it (SQLAlchemy's MissingGreenlet, which became INTERNAL)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from icefarm_control.storage import outbox
from icefarm_control.storage.database import Database
from icefarm_control.transport.errors import is_database_unreachable
from tests.conftest import _admin_conninfo

pytestmark = pytest.mark.postgres


async def test_a_connection_closed_by_the_server_mid_transaction_is_a_lost_database(
    pg_database: Database,
) -> None:
    with pytest.raises(Exception) as caught:
        async with pg_database.write() as conn:
            outbox.touch(conn, outbox.DEVICES)
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await conn.execute(text("SELECT 1"))
    assert type(caught.value).__name__ != "MissingGreenlet", caught.value
    assert is_database_unreachable(caught.value), repr(caught.value)
    # The pool recovers: the next transaction works.
    async with pg_database.write() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
