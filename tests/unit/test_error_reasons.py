"""Error reasons and status codes: the domain, the transport and the proto contract agree."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from google.rpc.error_details_pb2 import RetryInfo
from psycopg import errors
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from icefarm.v1 import types_pb2
from icefarm_control.domain import errors as e
from icefarm_control.domain.tokens import TokenInvalid
from icefarm_control.storage.database import Database
from icefarm_control.transport.errors import domain_status, failure_status, status_code_for

M = TypeVar("M", bound=Message)

TYPES_PROTO = Path(__file__).resolve().parents[2] / "protos" / "icefarm" / "v1" / "types.proto"
PREFIX = "ERROR_REASON_"


def proto_reason_names() -> set[str]:
    return {v.name.removeprefix(PREFIX) for v in types_pb2.ErrorReason.DESCRIPTOR.values} - {
        "UNSPECIFIED"
    }


def documented_codes() -> dict[str, list[grpc.StatusCode]]:
    """Each ErrorReason's status codes, read from the comment above it in types.proto."""
    text = TYPES_PROTO.read_text()
    block = text[text.index("enum ErrorReason") :]
    block = block[: block.index("}")]
    codes: dict[str, list[grpc.StatusCode]] = {}
    comment: list[str] = []
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped.removeprefix("//"))
            continue
        value = re.match(rf"{PREFIX}(\w+)\s*=", stripped)
        if value and value.group(1) != "UNSPECIFIED":
            words = re.findall(r"\b[A-Z_]{4,}\b", " ".join(comment))
            codes[value.group(1)] = [
                grpc.StatusCode[w] for w in words if w in grpc.StatusCode.__members__
            ]
        comment = []
    return codes


# One instance of each error the domain raises, one per reason it raises it with.
ERRORS: list[e.IcefarmDomainError] = [
    e.NotEnoughDevices("only 1 of 2 free"),
    e.NotFound("no reservation r1", reason=e.Reason.RESERVATION_NOT_FOUND),
    e.PermissionDenied("bob holds d1"),
    e.FailedPrecondition("worker lab-a is draining", reason=e.Reason.WORKER_DRAINING),
    e.SelectorError("unexpected '?'", 4),
    e.InvalidArgument("count", "must be at least 1"),
    e.NotFound("no device d9"),
    e.NotFound("no worker lab-z", reason=e.Reason.WORKER_NOT_FOUND),
    e.FailedPrecondition("d1 is BROKEN"),
    e.Unauthenticated("send your client id"),
    e.PermissionDenied("admins only", reason=e.Reason.PERMISSION_DENIED),
    e.AlreadyExists("lab-a is connected"),
    e.IllegalTransition("d1: AVAILABLE → READY is not allowed"),
    TokenInvalid("forged"),
    e.FailedPrecondition("no varmax on lab-a", reason=e.Reason.MODE_UNSUPPORTED),
    e.FailedPrecondition("d1 failed", reason=e.Reason.DEVICE_FAILED),
    e.Unavailable("shutting down"),
    e.ReservationEnded("reservation r1 ended at 12:00 (RELEASED)"),
    e.LimitExceeded("at most 10 Reserve calls per second"),
    e.Internal("a bug"),
    e.IcefarmDomainError("changed meanwhile"),
]


def test_every_domain_reason_is_a_proto_error_reason() -> None:
    assert {r.value for r in e.Reason} <= proto_reason_names()


def test_every_proto_error_reason_is_a_domain_reason() -> None:
    assert proto_reason_names() <= {r.value for r in e.Reason}


def test_reason_values_equal_their_names() -> None:
    assert all(r.value == r.name for r in e.Reason)


def test_every_error_reason_documents_a_status_code() -> None:
    codes = documented_codes()
    assert set(codes) == proto_reason_names()
    assert all(codes.values()), {name for name, found in codes.items() if not found}


def test_the_error_table_covers_every_reason() -> None:
    assert {error.reason for error in ERRORS} == set(e.Reason)


@pytest.mark.parametrize(
    "error", ERRORS, ids=lambda error: f"{type(error).__name__}-{error.reason}"
)
def test_each_domain_error_maps_to_the_status_code_its_reason_documents(
    error: e.IcefarmDomainError,
) -> None:
    assert status_code_for(error) == documented_codes()[error.reason.value][0]


def test_not_enough_devices_without_waiting_is_resource_exhausted() -> None:
    error = e.NotEnoughDevices("only 1 of 2 free", waited=False)
    assert status_code_for(error) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_not_enough_devices_after_waiting_is_deadline_exceeded() -> None:
    error = e.NotEnoughDevices("only 1 of 2 free", waited=True)
    assert status_code_for(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc.StatusCode.DEADLINE_EXCEEDED in documented_codes()["NOT_ENOUGH_DEVICES"]


def test_an_unclassified_domain_error_is_aborted_so_the_caller_retries() -> None:
    assert status_code_for(e.IcefarmDomainError("raced")) == grpc.StatusCode.ABORTED


# ------------------------------------------------------------ details and failures


def _details(status: grpc.Status) -> list[Any]:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return list(status_pb2.Status.FromString(value).details)
    raise AssertionError("no status details")


def _unpack(status: grpc.Status, kind: type[M]) -> M | None:
    for detail in _details(status):
        message = kind()
        if detail.Unpack(message):
            return message
    return None


def test_not_enough_devices_carries_its_counts_in_error_info_metadata() -> None:
    error = e.NotEnoughDevices("3 wanted", counts={"wanted": 3, "matching": 2, "free": 1})
    info = _unpack(domain_status(error), error_details_pb2.ErrorInfo)
    assert info is not None
    assert dict(info.metadata) == {"wanted": "3", "matching": "2", "free": "1"}


def test_limit_exceeded_says_when_to_retry_in_retry_info() -> None:
    retry = _unpack(domain_status(e.LimitExceeded("slow down", retry_after=1.5)), RetryInfo)
    assert retry is not None
    assert retry.retry_delay.ToTimedelta().total_seconds() == 1.5


def test_limit_exceeded_without_a_time_has_no_retry_info() -> None:
    assert _unpack(domain_status(e.LimitExceeded("slow down")), RetryInfo) is None


def _raised(error: Exception) -> grpc.Status:
    """The status for `error`, computed inside the `except` that caught it (as in the code)."""
    try:
        raise error
    except Exception as caught:
        return failure_status(caught, "Test")


def test_an_unexpected_error_is_internal_with_an_incident_id_and_nothing_of_it() -> None:
    status = _raised(RuntimeError("SELECT secret FROM sqlalchemy_psycopg"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert re.search(r"incident [0-9a-f]{12}", status.details)
    for word in ("SELECT", "secret", "RuntimeError", "sqlalchemy", "psycopg", "Traceback"):
        assert word not in status.details
        assert word.encode() not in b"".join(d.SerializeToString() for d in _details(status))


@pytest.mark.parametrize("sqlstate_error", [errors.DeadlockDetected, errors.SerializationFailure])
def test_a_deadlock_or_serialization_failure_is_aborted_conflict_to_retry(
    sqlstate_error: type[psycopg.Error],
) -> None:
    wrapped = OperationalError("UPDATE devices SET x = 1", {}, sqlstate_error("deadlock"))
    status = _raised(wrapped)
    assert status.code == grpc.StatusCode.ABORTED
    info = _unpack(status, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "CONFLICT"
    assert "UPDATE" not in status.details


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_database_that_is_not_there_is_unavailable() -> None:
    database = Database(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/none")
    try:
        async with database.read() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as error:
        status = failure_status(error, "Test")
    else:
        raise AssertionError("connected to a closed port")
    finally:
        await database.dispose()
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in status.details and "psycopg" not in status.details


def test_a_lost_connection_is_unavailable() -> None:
    assert _raised(ConnectionResetError("peer reset")).code == grpc.StatusCode.UNAVAILABLE
