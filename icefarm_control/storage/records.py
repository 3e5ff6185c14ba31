"""Plain rows the storage layer hands back: frozen, typed, free of SQLAlchemy."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from icefarm_control.domain.states import DeviceState


@dataclass(frozen=True)
class WorkerRow:
    name: str
    endpoint: str
    version: str
    modes: tuple[str, ...]
    labels: dict[str, str]
    state: str
    last_seen_time: datetime
    device_count: int = 0


@dataclass(frozen=True)
class DeviceRow:
    id: str
    worker: str
    kind: str
    labels: dict[str, str]
    properties: dict[str, float]
    state: str
    state_time: datetime
    error: str
    reset_on_release: bool
    reservation_id: str | None
    worker_endpoint: str = ""
    worker_state: str = ""
    holder: str = ""


@dataclass(frozen=True)
class ReservedDeviceRow:
    id: str
    worker: str
    worker_endpoint: str
    state: str
    kind: str
    released_reason: str | None
    reset_on_release: bool = False

    @staticmethod
    def newly_reserved(
        *, id: str, worker: str, endpoint: str, kind: str, reset_on_release: bool
    ) -> ReservedDeviceRow:
        """A device just taken by a reservation."""
        return ReservedDeviceRow(
            id=id,
            worker=worker,
            worker_endpoint=endpoint,
            state=DeviceState.RESERVED.value,
            kind=kind,
            released_reason=None,
            reset_on_release=reset_on_release,
        )


@dataclass(frozen=True)
class ReservationRow:
    id: str
    client_id: str
    mode: str
    mode_args: dict[str, str]
    selector: str
    create_time: datetime
    end_time: datetime
    state: str
    end_reason: str | None
    ended_time: datetime | None
    request_id: str | None
    devices: tuple[ReservedDeviceRow, ...] = field(default=())

    @property
    def held_device_ids(self) -> list[str]:
        return [d.id for d in self.devices if d.released_reason is None]


@dataclass(frozen=True)
class WaiterRow:
    id: int
    client_id: str
    count: int
    device_ids: tuple[str, ...]
    selector: str
    mode: str
    mode_args: dict[str, str]
    lease_seconds: float
    request_id: str | None
    create_time: datetime
    deadline: datetime
    state: str
    reservation_id: str | None
    # The replica whose Reserve call waits on it.
    replica_id: str = ""

    @staticmethod
    def from_mapping(row: Any) -> WaiterRow:
        return WaiterRow(
            id=row.id,
            client_id=row.client_id,
            count=row.count,
            device_ids=tuple(row.device_ids),
            selector=row.selector,
            mode=row.mode,
            mode_args=dict(row.mode_args),
            lease_seconds=row.lease_seconds,
            request_id=row.request_id,
            create_time=row.create_time,
            deadline=row.deadline,
            state=row.state,
            reservation_id=row.reservation_id,
            replica_id=row.replica_id,
        )
