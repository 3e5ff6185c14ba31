"""What the outbox carries: event and command types, and their payloads.

Payload keys are the field names of the matching icefarm.v1 messages (the transport turns a
payload into its message field by field); enum values are the domain names ("RELEASED"),
times are ISO 8601 strings. The PostgreSQL fast paths build the same payloads in SQL; a test
keeps the two in step.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icefarm_control.storage.records import DeviceRow, WorkerRow


class EventType(enum.StrEnum):
    """The names of the `icefarm.v1.Event.kind` oneof fields."""

    DEVICE_READY = "device_ready"
    DEVICE_FAILED = "device_failed"
    RESERVATION_ENDING_SOON = "reservation_ending_soon"
    RESERVATION_ENDED = "reservation_ended"
    DEVICES_AVAILABLE = "devices_available"
    WORKER_DRAINING = "worker_draining"
    RESERVATION_CREATED = "reservation_created"
    RESERVATION_EXTENDED = "reservation_extended"
    DEVICE_CHANGED = "device_changed"
    WORKER_CHANGED = "worker_changed"


class CommandType(enum.StrEnum):
    """The names of the `icefarm.v1.WorkerCommand.kind` oneof fields."""

    PREPARE_DEVICE = "prepare_device"
    RELEASE_DEVICE = "release_device"
    REBOOT_DEVICE = "reboot_device"
    REMOVE_DEVICE = "remove_device"
    DRAIN = "drain"
    DRAIN_COMPLETE = "drain_complete"


def iso(value: datetime) -> str:
    return value.isoformat()


def reservation_created(
    *,
    reservation_id: str,
    client_id: str,
    device_ids: Sequence[str],
    mode: str,
    end_time: datetime,
) -> dict[str, Any]:
    return {
        "reservation_id": reservation_id,
        "client_id": client_id,
        "device_ids": sorted(device_ids),
        "mode": mode,
        "end_time": iso(end_time),
    }


def reservation_ended(
    *, reservation_id: str, device_ids: Sequence[str], reason: str, closed: bool
) -> dict[str, Any]:
    return {
        "reservation_id": reservation_id,
        "device_ids": sorted(device_ids),
        "reason": reason,
        "reservation_closed": closed,
    }


def reservation_extended(*, reservation_id: str, end_time: datetime) -> dict[str, Any]:
    return {"reservation_id": reservation_id, "end_time": iso(end_time)}


def prepare_device(
    *,
    device_id: str,
    reservation_id: str,
    client_id: str,
    mode: str,
    mode_args: dict[str, str],
    lease_seconds: float,
) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "reservation_id": reservation_id,
        "client_id": client_id,
        "mode": mode,
        "mode_args": mode_args,
        "lease_seconds": lease_seconds,
    }


def release_device(*, device_id: str, reservation_id: str) -> dict[str, Any]:
    return {"device_id": device_id, "reservation_id": reservation_id}


def reservation_ending_soon(*, reservation_id: str, end_time: datetime) -> dict[str, Any]:
    return {"reservation_id": reservation_id, "end_time": iso(end_time)}


def device_ready(*, reservation_id: str, device_id: str, worker_endpoint: str) -> dict[str, Any]:
    return {
        "reservation_id": reservation_id,
        "device_id": device_id,
        "worker_endpoint": worker_endpoint,
    }


def device_failed(*, reservation_id: str, device_id: str, error: str) -> dict[str, Any]:
    return {"reservation_id": reservation_id, "device_id": device_id, "error": error}


def worker_draining(
    *, worker: str, device_ids: Sequence[str], reservation_ids: Sequence[str]
) -> dict[str, Any]:
    return {
        "worker": worker,
        "device_ids": sorted(device_ids),
        "reservation_ids": sorted(set(reservation_ids)),
    }


def device_changed(device: DeviceRow) -> dict[str, Any]:
    """The operator feed's view of a device (icefarm.v1.DeviceChanged)."""
    return {
        "device": {
            "id": device.id,
            "worker": device.worker,
            "kind": device.kind,
            "state": device.state,
            "labels": dict(device.labels),
            "properties": dict(device.properties),
            "state_time": iso(device.state_time),
            "error": device.error,
            "worker_endpoint": device.worker_endpoint,
            "reservation_id": device.reservation_id or "",
            "holder": device.holder,
            "reset_on_release": device.reset_on_release,
        }
    }


def worker_changed(worker: WorkerRow) -> dict[str, Any]:
    """The operator feed's view of a worker (icefarm.v1.WorkerChanged)."""
    return {
        "worker": {
            "name": worker.name,
            "endpoint": worker.endpoint,
            "version": worker.version,
            "modes": list(worker.modes),
            "labels": dict(worker.labels),
            "state": worker.state,
            "last_seen_time": iso(worker.last_seen_time),
            "device_count": worker.device_count,
        }
    }


def reboot_device(*, device_id: str) -> dict[str, Any]:
    return {"device_id": device_id}


def remove_device(*, device_id: str) -> dict[str, Any]:
    return {"device_id": device_id}


def drain(*, timeout: timedelta) -> dict[str, Any]:
    """Durations travel as seconds (a number), as everywhere in the outbox."""
    return {"timeout": timeout.total_seconds()}


def drain_complete() -> dict[str, Any]:
    return {}
