"""Error reasons and status codes: the domain, the transport and the proto contract agree."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from icefarm.v1 import types_pb2
from icefarm_control.domain import errors as e
from icefarm_control.domain.tokens import TokenInvalid
from icefarm_control.transport.errors import status_code_for

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
