"""Alembic environment: runs on the connection handed over by icefarm_control.storage.migrate."""

from __future__ import annotations

from alembic import context

from icefarm_control.storage.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `icefarm-control db upgrade`")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
