"""The schema: one SQLAlchemy Core table per fact of ARCHITECTURE §5, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    exists,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)


def has_open_session(client_id: Any) -> Any:
    """SQL: the client has a Session open now (on any replica)."""
    return exists().where(
        client_sessions.c.client_id == client_id, client_sessions.c.disconnect_time.is_(None)
    )


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware in UTC (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonDocument: Any = JSON().with_variant(JSONB(), "postgresql")
BigId: Any = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only

workers = Table(
    "workers",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("endpoint", String(256), nullable=False, default=""),
    Column("version", String(64), nullable=False, default=""),
    Column("modes", JsonDocument, nullable=False, default=list),
    Column("labels", JsonDocument, nullable=False, default=dict),
    Column("state", String(16), nullable=False),
    Column("last_seen_time", UtcDateTime, nullable=False),
    Column("connect_time", UtcDateTime, nullable=True),
    # Which control replica holds its stream, and the session generation (issue: streams).
    Column("session_replica", String(64), nullable=True),
    Column("session_generation", Integer, nullable=False, default=0),
    Column("drain_deadline", UtcDateTime, nullable=True),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("worker_name", String(128), ForeignKey("workers.name"), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("labels", JsonDocument, nullable=False, default=dict),
    Column("properties", JsonDocument, nullable=False, default=dict),
    Column("state", String(16), nullable=False),
    Column("state_time", UtcDateTime, nullable=False),
    Column("error", Text, nullable=False, default=""),
    Column("reset_on_release", Boolean, nullable=False, default=False),
    # The reservation holding it now (denormalised from reservation_devices for fast reads).
    Column("reservation_id", String(64), nullable=True),
    Index("ix_devices_state_worker", "state", "worker_name"),
    Index("ix_devices_worker_name", "worker_name"),
    Index("ix_devices_reservation_id", "reservation_id"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(256), nullable=False),
    Column("mode", String(64), nullable=False, default=""),
    Column("mode_args", JsonDocument, nullable=False, default=dict),
    Column("selector", Text, nullable=False, default=""),
    Column("create_time", UtcDateTime, nullable=False),
    Column("end_time", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("end_reason", String(32), nullable=True),
    Column("ended_time", UtcDateTime, nullable=True),
    Column("request_id", String(128), nullable=True),
    Column("ending_soon_sent", Boolean, nullable=False, default=False),
    # Made while its client had a Session open: the client grace applies (domain/clients.py).
    Column("attached", Boolean, nullable=False, default=True, server_default=true()),
    Index("ix_reservations_state_end_time", "state", "end_time"),
    Index("ix_reservations_client_state", "client_id", "state"),
    UniqueConstraint("client_id", "request_id"),
)

reservation_devices = Table(
    "reservation_devices",
    metadata,
    Column("reservation_id", String(64), ForeignKey("reservations.id"), primary_key=True),
    Column("device_id", String(128), ForeignKey("devices.id"), primary_key=True),
    Column("released_time", UtcDateTime, nullable=True),
    Column("released_reason", String(32), nullable=True),
    Index("ix_reservation_devices_device_id", "device_id"),
)

waiters = Table(
    "waiters",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("client_id", String(256), nullable=False),
    Column("count", Integer, nullable=False),
    Column("device_ids", JsonDocument, nullable=False, default=list),
    Column("selector", Text, nullable=False, default=""),
    Column("mode", String(64), nullable=False, default=""),
    Column("mode_args", JsonDocument, nullable=False, default=dict),
    Column("lease_seconds", Float, nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("create_time", UtcDateTime, nullable=False),
    Column("deadline", UtcDateTime, nullable=False),
    # WAITING until served (reservation_id set) or gone (CANCELLED).
    Column("state", String(16), nullable=False),
    Column("reservation_id", String(64), nullable=True),
    Column("replica_id", String(64), nullable=False),
    Index("ix_waiters_state_id", "state", "id"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # "operator" or "client:<client id>".
    Column("audience", String(300), nullable=False),
    # NULL until the operator-feed sequencer numbers it (PostgreSQL fast paths only).
    Column("sequence", BigInteger, nullable=True),
    Column("type", String(48), nullable=False),
    Column("payload", JsonDocument, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    UniqueConstraint("audience", "sequence"),
    Index("ix_events_create_time", "create_time"),
)

event_sequences = Table(
    "event_sequences",
    metadata,
    Column("audience", String(300), primary_key=True),
    Column("last_sequence", BigInteger, nullable=False),
)

worker_commands = Table(
    "worker_commands",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("correlation_id", String(64), nullable=False, unique=True),
    Column("worker_name", String(128), nullable=False),
    Column("device_id", String(128), nullable=True),
    Column("type", String(32), nullable=False),
    Column("payload", JsonDocument, nullable=False),
    # PENDING → SENT → DONE | FAILED | TIMED_OUT
    Column("state", String(16), nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("sent_time", UtcDateTime, nullable=True),
    Column("done_time", UtcDateTime, nullable=True),
    # When a SENT command without a result counts as timed out.
    Column("deadline", UtcDateTime, nullable=True),
    Column("error", Text, nullable=False, default=""),
    Index("ix_worker_commands_worker_state", "worker_name", "state", "id"),
)

client_sessions = Table(
    "client_sessions",
    metadata,
    Column("client_id", String(256), primary_key=True),
    # One row per Session identity of the client (one per Client object; "" = the only one).
    Column("instance", String(64), primary_key=True, default="", server_default=""),
    # The replica holding the client's Session stream now; NULL while it has none.
    Column("replica_id", String(64), nullable=True),
    Column("session_generation", Integer, nullable=False, default=0),
    Column("connect_time", UtcDateTime, nullable=True),
    Column("disconnect_time", UtcDateTime, nullable=True),
    Column("last_seen_time", UtcDateTime, nullable=False),
    # The highest event sequence sent on a Session (resume point for Hello without one).
    Column("delivered_sequence", BigInteger, nullable=False, default=0),
)

# Control replicas alive now: each refreshes its row every second, so a stream held by a replica
# that died (its row went stale) never blocks its worker from registering again.
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("start_time", UtcDateTime, nullable=False),
    Column("last_seen_time", UtcDateTime, nullable=False),
)

# The keys that sign reservation tokens, shared by every replica of the database (newest first
# signs; older ones still verify until their tokens have expired).
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("private_key", Text, nullable=False),
    Column("create_time", UtcDateTime, nullable=False),
    Column("retire_time", UtcDateTime, nullable=True),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("secret_hash", String(128), nullable=False, unique=True),
    Column("create_time", UtcDateTime, nullable=False),
    Column("revoke_time", UtcDateTime, nullable=True),
)
