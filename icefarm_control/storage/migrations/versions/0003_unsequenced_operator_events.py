"""operator events may wait for their sequence number

Revision ID: 0003
Revises: 0002

The PostgreSQL fast paths write operator events without a number; the operator-feed sequencer
numbers them just after (storage/outbox.py), so concurrent reserves and releases do not queue
on the operator feed's one counter row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column("sequence", existing_type=sa.BigInteger(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM events WHERE sequence IS NULL")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.alter_column("sequence", existing_type=sa.BigInteger(), nullable=False)
