"""What the client returns: frozen dataclasses and string enums, never generated messages."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# The states are shared with the control and the worker (one definition, icefarm/states.py).
from icefarm.states import DeviceState as DeviceState
from icefarm.states import EndReason as EndReason
from icefarm.states import ReservationState as ReservationState
from icefarm.states import WorkerState as WorkerState


class EventType(enum.StrEnum):
    """The kinds of event a client hears on its Session (and operators on WatchEvents)."""

    DEVICE_READY = "DEVICE_READY"
    DEVICE_FAILED = "DEVICE_FAILED"
    RESERVATION_ENDING_SOON = "RESERVATION_ENDING_SOON"
    RESERVATION_ENDED = "RESERVATION_ENDED"
    DEVICES_AVAILABLE = "DEVICES_AVAILABLE"
    WORKER_DRAINING = "WORKER_DRAINING"
    RESERVATION_CREATED = "RESERVATION_CREATED"
    RESERVATION_EXTENDED = "RESERVATION_EXTENDED"
    DEVICE_CHANGED = "DEVICE_CHANGED"
    WORKER_CHANGED = "WORKER_CHANGED"


@dataclass(frozen=True)
class Device:
    """One device of the farm as the control sees it."""

    id: str
    worker: str
    kind: str
    state: DeviceState
    labels: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, float] = field(default_factory=dict)
    state_time: datetime | None = None
    error: str = ""
    worker_endpoint: str = ""
    reservation_id: str = ""
    holder: str = ""


@dataclass(frozen=True)
class Worker:
    """One worker daemon."""

    name: str
    endpoint: str
    version: str
    modes: tuple[str, ...]
    labels: Mapping[str, str]
    state: WorkerState
    last_seen_time: datetime | None
    device_count: int


@dataclass(frozen=True)
class ReservedDevice:
    """A device as held by a reservation."""

    id: str
    worker: str
    worker_endpoint: str
    state: DeviceState
    kind: str
    released_reason: EndReason = EndReason.UNSPECIFIED


@dataclass(frozen=True)
class Reservation:
    """A reservation. `token` (for the workers) is set on what Reserve and Extend return."""

    id: str
    client_id: str
    mode: str
    mode_args: Mapping[str, str]
    devices: tuple[ReservedDevice, ...]
    create_time: datetime | None
    end_time: datetime | None
    state: ReservationState
    end_reason: EndReason = EndReason.UNSPECIFIED
    ended_time: datetime | None = None
    selector: str = ""
    token: str = ""

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The ids of the devices it holds (or held)."""
        return tuple(d.id for d in self.devices)


@dataclass(frozen=True)
class Availability:
    """How many free devices match a selector, and which."""

    count: int
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class Released:
    """What a release let go of."""

    device_ids: tuple[str, ...]
    ended_reservation_ids: tuple[str, ...]


@dataclass(frozen=True)
class ExportInfo:
    """Where to attach a board exported over USB/IP (`usbip attach -r host -b bus_id`)."""

    device_id: str
    bus_id: str
    host: str
    port: int


@dataclass(frozen=True)
class BoardInfo:
    """What a held board is doing, as its worker reports it."""

    device_id: str
    kind: str
    state: DeviceState
    mode: str
    reservation_id: str
    firmware: str
    error: str


@dataclass(frozen=True)
class Event:
    """One event. Which fields are set depends on `type`; the rest keep their defaults."""

    type: EventType
    sequence: int = 0
    time: datetime | None = None
    reservation_id: str = ""
    device_id: str = ""
    device_ids: tuple[str, ...] = ()
    reservation_ids: tuple[str, ...] = ()
    worker: str = ""
    worker_endpoint: str = ""
    error: str = ""
    reason: EndReason = EndReason.UNSPECIFIED
    reservation_closed: bool = False
    end_time: datetime | None = None
    selector: str = ""
    count: int = 0
    client_id: str = ""
    device: Device | None = None
    worker_info: Worker | None = None
    reservation: Reservation | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of one bitstream: a value (pulse_count or variance) or an error."""

    bitstream_id: str
    device_id: str
    pulse_count: int | None = None
    variance: float | None = None
    error: str = ""
    attempt: int = 1
    queue_duration: timedelta = timedelta(0)
    run_duration: timedelta = timedelta(0)
    worker: str = ""

    @property
    def ok(self) -> bool:
        """True when the bitstream was evaluated."""
        return not self.error

    @property
    def value(self) -> float | None:
        """The measurement, whichever mode produced it."""
        return self.pulse_count if self.pulse_count is not None else self.variance
