"""replicas, signing keys in the database, one client Session row per Client object

Revision ID: 0005
Revises: 0004

- `replicas`: each control replica refreshes its row every second; a worker stream held by a
  replica whose row went stale is dead and never blocks the worker from registering again.
- `signing_keys`: the reservation-token signing keys, shared by every replica of the database
  (so replicas sign alike by construction), each with a key id that tokens name.
- `client_sessions.instance`: a client may have several Sessions at once (two experiments of
  one user); each Client object names its own.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("start_time", _utc(), nullable=False),
        sa.Column("last_seen_time", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    op.create_table(
        "signing_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("create_time", _utc(), nullable=False),
        sa.Column("retire_time", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_signing_keys")),
    )
    with op.batch_alter_table("client_sessions", schema=None, recreate="always") as batch_op:
        batch_op.add_column(sa.Column("instance", sa.String(64), nullable=False, server_default=""))
        batch_op.drop_constraint(op.f("pk_client_sessions"), type_="primary")
        batch_op.create_primary_key(op.f("pk_client_sessions"), ["client_id", "instance"])


def downgrade() -> None:
    with op.batch_alter_table("client_sessions", schema=None, recreate="always") as batch_op:
        batch_op.drop_constraint(op.f("pk_client_sessions"), type_="primary")
        batch_op.drop_column("instance")
        batch_op.create_primary_key(op.f("pk_client_sessions"), ["client_id"])
    op.drop_table("signing_keys")
    op.drop_table("replicas")
