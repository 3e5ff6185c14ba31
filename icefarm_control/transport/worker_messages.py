"""WorkerSession messages ↔ domain values: reports in, commands out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import structlog

from icefarm.v1 import control_service_pb2 as pb
from icefarm_control.domain.device_reports import DeviceReport
from icefarm_control.domain.events import CommandType
from icefarm_control.domain.workers import Registration
from icefarm_control.storage.outbox import CommandRow
from icefarm_control.transport.convert import duration, optional_duration, parse_device_state

log = structlog.get_logger(__name__)


def device_report(update: pb.DeviceUpdate, field: str = "device_update") -> DeviceReport:
    """The report in `update`; `field` is where it sits in the message (for errors)."""
    return DeviceReport(
        device_id=update.device_id,
        kind=update.kind,
        state=parse_device_state(update.state, f"{field}.state"),
        labels=dict(update.labels),
        properties=dict(update.properties),
        error=update.error,
        reset_on_release=update.reset_on_release,
        reservation_id=update.reservation_id,
    )


def registration(register: pb.Register) -> Registration:
    return Registration(
        name=register.name,
        endpoint=register.endpoint,
        version=register.version,
        modes=tuple(register.modes),
        labels=dict(register.labels),
        devices=tuple(device_report(d, "register.devices") for d in register.devices),
        # Absent: not draining; present without a timeout: the control's default.
        draining=optional_duration(
            "register.draining.timeout", register.draining.timeout, register.HasField("draining")
        ),
    )


def _seconds(value: Any) -> timedelta:
    return timedelta(seconds=float(value or 0))


def command(row: CommandRow) -> pb.WorkerCommand | None:
    """The message for one outbox command, or None (logged) when its type is unknown."""
    p = row.payload
    message = pb.WorkerCommand(correlation_id=row.correlation_id)
    device_id = str(p.get("device_id", ""))
    if row.type == CommandType.PREPARE_DEVICE:
        message.prepare_device.CopyFrom(
            pb.PrepareDeviceCommand(
                device_id=device_id,
                reservation_id=str(p.get("reservation_id", "")),
                client_id=str(p.get("client_id", "")),
                mode=str(p.get("mode", "")),
                mode_args={str(k): str(v) for k, v in dict(p.get("mode_args") or {}).items()},
                lease_duration=duration(_seconds(p.get("lease_seconds"))),
            )
        )
    elif row.type == CommandType.RELEASE_DEVICE:
        message.release_device.CopyFrom(
            pb.ReleaseDeviceCommand(
                device_id=device_id, reservation_id=str(p.get("reservation_id", ""))
            )
        )
    elif row.type == CommandType.REBOOT_DEVICE:
        message.reboot_device.CopyFrom(pb.RebootDeviceCommand(device_id=device_id))
    elif row.type == CommandType.REMOVE_DEVICE:
        message.remove_device.CopyFrom(pb.RemoveDeviceCommand(device_id=device_id))
    elif row.type == CommandType.DRAIN:
        message.drain.CopyFrom(pb.DrainCommand(timeout=duration(_seconds(p.get("timeout")))))
    elif row.type == CommandType.DRAIN_COMPLETE:
        message.drain_complete.SetInParent()
    else:
        log.warning("skipping a command of unknown type", type=row.type, worker=row.worker)
        return None
    return message
