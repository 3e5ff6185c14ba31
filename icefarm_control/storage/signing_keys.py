"""The keys that sign reservation tokens, kept in the database so that every replica of one
database signs with the same key.

Start-up reads the unretired keys in one query. Only a database without any creates one, and
that creation is serialised between replicas starting at the same moment: on PostgreSQL by a
table lock taken before the second look, on SQLite by the write transaction's BEGIN IMMEDIATE
(which holds the file's write lock across processes). Whoever comes second finds the first's
key and uses it, so there is never more than one current key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from icefarm_control.storage.database import Database
from icefarm_control.storage.models import signing_keys


@dataclass(frozen=True)
class SigningKeyRow:
    key_id: str
    private_key: str  # PEM (icefarm.tokens.private_key_to_text)
    create_time: datetime


async def _unretired(conn: AsyncConnection) -> list[SigningKeyRow]:
    sk = signing_keys.c
    rows = await conn.execute(
        select(sk.key_id, sk.private_key, sk.create_time)
        .where(sk.retire_time.is_(None))
        .order_by(sk.create_time.desc(), sk.key_id.desc())
    )
    return [SigningKeyRow(r.key_id, r.private_key, r.create_time) for r in rows]


async def load_or_create(
    database: Database, new_key: Callable[[], SigningKeyRow]
) -> tuple[list[SigningKeyRow], bool]:
    """The unretired signing keys, newest (the one that signs) first, and whether this call
    created the key: when the database has none, `new_key()` is stored, unless another replica
    stored one first (then that one is returned)."""
    async with database.read() as conn:
        keys = await _unretired(conn)
    if keys:
        return keys, False
    async with database.write() as conn:
        if database.is_postgresql:
            # Self-conflicting, so two replicas creating at once queue here; readers are not
            # blocked (other replicas loading keys).
            await conn.execute(text("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE"))
        keys = await _unretired(conn)
        if keys:
            return keys, False
        row = new_key()
        await conn.execute(
            insert(signing_keys).values(
                key_id=row.key_id, private_key=row.private_key, create_time=row.create_time
            )
        )
        return [row], True
