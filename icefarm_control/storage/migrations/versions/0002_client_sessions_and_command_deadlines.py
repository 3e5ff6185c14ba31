"""client sessions and command deadlines

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "client_sessions",
        sa.Column("client_id", sa.String(length=256), nullable=False),
        sa.Column("replica_id", sa.String(length=64), nullable=True),
        sa.Column("session_generation", sa.Integer(), nullable=False),
        sa.Column("connect_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnect_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_client_sessions")),
    )
    with op.batch_alter_table("worker_commands", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("worker_commands", schema=None) as batch_op:
        batch_op.drop_column("deadline")

    op.drop_table("client_sessions")
