"""reservations remember whether their client had a Session open

Revision ID: 0004
Revises: 0003

Client liveness (the client grace) ends only reservations made while their client had a
Session open: a reservation made by a one-shot `icefarm reserve` is held until its lease ends.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attached", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_column("attached")
