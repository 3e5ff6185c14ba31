"""The iCEFARM client: reserve boards, evaluate bitstreams, hear what happens to them.

    from icefarm_client import Client
    with Client() as client, client.reserve(4, mode="pulsecount") as farm:
        for result in farm.evaluate(paths):
            print(result.bitstream_id, result.pulse_count)

`Client` blocks (scripts, notebooks); `AsyncClient` is the same API on asyncio. Every failure
is an `IcefarmError` subclass (see `icefarm_client.errors`).
"""

from icefarm import __version__
from icefarm_client.aio import AsyncClient
from icefarm_client.connection import RetryPolicy, Settings
from icefarm_client.errors import (
    ControlUnavailable,
    DeadlineExceeded,
    DeviceFailed,
    DeviceNotAvailable,
    DeviceNotFound,
    FailedPrecondition,
    IcefarmError,
    InternalError,
    InvalidArgument,
    InvalidSelector,
    LimitExceeded,
    NotEnoughDevices,
    NotHolder,
    PermissionDenied,
    ReservationEnded,
    ReservationNotFound,
    Unauthenticated,
    WaitTimeout,
    WorkerNotFound,
    WorkerUnavailable,
)
from icefarm_client.farm import AsyncFarm
from icefarm_client.models import (
    Availability,
    BoardInfo,
    Device,
    DeviceState,
    EndReason,
    Event,
    EventType,
    ExportInfo,
    Released,
    Reservation,
    ReservationState,
    ReservedDevice,
    Result,
    Worker,
    WorkerState,
)
from icefarm_client.sync import Client, Farm

__all__ = [
    "AsyncClient",
    "AsyncFarm",
    "Availability",
    "BoardInfo",
    "Client",
    "ControlUnavailable",
    "DeadlineExceeded",
    "Device",
    "DeviceFailed",
    "DeviceNotAvailable",
    "DeviceNotFound",
    "DeviceState",
    "EndReason",
    "Event",
    "EventType",
    "ExportInfo",
    "FailedPrecondition",
    "Farm",
    "IcefarmError",
    "InternalError",
    "InvalidArgument",
    "InvalidSelector",
    "LimitExceeded",
    "NotEnoughDevices",
    "NotHolder",
    "PermissionDenied",
    "Released",
    "Reservation",
    "ReservationEnded",
    "ReservationNotFound",
    "ReservationState",
    "ReservedDevice",
    "Result",
    "RetryPolicy",
    "Settings",
    "Unauthenticated",
    "WaitTimeout",
    "Worker",
    "WorkerNotFound",
    "WorkerState",
    "WorkerUnavailable",
    "__version__",
]
