"""The sync client's translation of every gRPC status code and every ErrorInfo reason into the
client's exceptions, with scripted answers on a grpc_testing channel (no server)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from datetime import timedelta

import grpc
import grpc_testing  # type: ignore[import-untyped]
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import icefarm_client as ic
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2 as tpb

SERVICE = rpb.DESCRIPTOR.services_by_name["ReservationService"]
AVAILABILITY = SERVICE.methods_by_name["GetAvailability"]

# What each status code becomes when the server attaches no reason.
BY_CODE: dict[grpc.StatusCode, type[ic.IcefarmError]] = {
    grpc.StatusCode.CANCELLED: ic.IcefarmError,
    grpc.StatusCode.UNKNOWN: ic.IcefarmError,
    grpc.StatusCode.INVALID_ARGUMENT: ic.InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: ic.DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: ic.IcefarmError,
    grpc.StatusCode.ALREADY_EXISTS: ic.IcefarmError,
    grpc.StatusCode.PERMISSION_DENIED: ic.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ic.IcefarmError,
    grpc.StatusCode.FAILED_PRECONDITION: ic.FailedPrecondition,
    grpc.StatusCode.ABORTED: ic.IcefarmError,
    grpc.StatusCode.OUT_OF_RANGE: ic.InvalidArgument,
    grpc.StatusCode.UNIMPLEMENTED: ic.IcefarmError,
    grpc.StatusCode.INTERNAL: ic.InternalError,
    grpc.StatusCode.UNAVAILABLE: ic.ControlUnavailable,
    grpc.StatusCode.DATA_LOSS: ic.IcefarmError,
    grpc.StatusCode.UNAUTHENTICATED: ic.Unauthenticated,
}

# Every ErrorInfo reason, with the status the servers send it with, and what it becomes.
BY_REASON: dict[str, tuple[grpc.StatusCode, type[ic.IcefarmError]]] = {
    "NOT_ENOUGH_DEVICES": (grpc.StatusCode.RESOURCE_EXHAUSTED, ic.NotEnoughDevices),
    "RESERVATION_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, ic.ReservationNotFound),
    "NOT_HOLDER": (grpc.StatusCode.PERMISSION_DENIED, ic.NotHolder),
    "WORKER_DRAINING": (grpc.StatusCode.FAILED_PRECONDITION, ic.FailedPrecondition),
    "INVALID_SELECTOR": (grpc.StatusCode.INVALID_ARGUMENT, ic.InvalidSelector),
    "INVALID_FIELD": (grpc.StatusCode.INVALID_ARGUMENT, ic.InvalidArgument),
    "DEVICE_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, ic.DeviceNotFound),
    "WORKER_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, ic.WorkerNotFound),
    "DEVICE_NOT_AVAILABLE": (grpc.StatusCode.FAILED_PRECONDITION, ic.DeviceNotAvailable),
    "UNAUTHENTICATED": (grpc.StatusCode.UNAUTHENTICATED, ic.Unauthenticated),
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, ic.PermissionDenied),
    "WORKER_ALREADY_CONNECTED": (grpc.StatusCode.ALREADY_EXISTS, ic.IcefarmError),
    "ILLEGAL_TRANSITION": (grpc.StatusCode.FAILED_PRECONDITION, ic.FailedPrecondition),
    "TOKEN_INVALID": (grpc.StatusCode.PERMISSION_DENIED, ic.PermissionDenied),
    "MODE_UNSUPPORTED": (grpc.StatusCode.FAILED_PRECONDITION, ic.FailedPrecondition),
    "DEVICE_FAILED": (grpc.StatusCode.FAILED_PRECONDITION, ic.DeviceFailed),
    "SHUTTING_DOWN": (grpc.StatusCode.UNAVAILABLE, ic.ControlUnavailable),
    "CONFLICT": (grpc.StatusCode.ABORTED, ic.IcefarmError),
    "RESERVATION_ENDED": (grpc.StatusCode.FAILED_PRECONDITION, ic.ReservationEnded),
    "LIMIT_EXCEEDED": (grpc.StatusCode.RESOURCE_EXHAUSTED, ic.LimitExceeded),
    "INTERNAL": (grpc.StatusCode.INTERNAL, ic.InternalError),
}


@pytest.fixture
def scripted() -> Iterator[tuple[ic.Client, grpc_testing.Channel]]:
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    client = ic.Client(channel=channel, client_id="tester", retry=ic.RetryPolicy(attempts=1))
    try:
        yield client, channel
    finally:
        client.close()


def fail_with(
    scripted: tuple[ic.Client, grpc_testing.Channel],
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    field: str = "",
    metadata: dict[str, str] | None = None,
    retry_delay: timedelta | None = None,
) -> ic.IcefarmError:
    """Call GetAvailability, answer it with the status, return what the client raised."""
    client, channel = scripted
    details = []
    if reason:
        packed = any_pb2.Any()
        info = error_details_pb2.ErrorInfo(
            reason=reason, domain="icefarm.dev", metadata=metadata or {}
        )
        packed.Pack(info)
        details.append(packed)
    if retry_delay is not None:
        packed = any_pb2.Any()
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(retry_delay)
        packed.Pack(retry)
        details.append(packed)
    if field:
        packed = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(packed)
    status = rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.availability, "kind=pico2-ice")
        metadata, request, rpc = channel.take_unary_unary(AVAILABILITY)
        assert request == rpb.GetAvailabilityRequest(selector="kind=pico2-ice")
        assert ("icefarm-client-id", "tester") in metadata
        rpc.terminate(None, status.trailing_metadata, status.code, status.details)
        with pytest.raises(ic.IcefarmError) as raised:
            future.result(timeout=10)
    return raised.value


def test_a_successful_answer_becomes_a_dataclass(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    client, channel = scripted
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.availability)
        _, _, rpc = channel.take_unary_unary(AVAILABILITY)
        answer = rpb.GetAvailabilityResponse(count=2, device_ids=["a", "b"])
        rpc.terminate(answer, (), grpc.StatusCode.OK, "")
        assert future.result(timeout=10) == ic.Availability(2, ("a", "b"))


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_without_a_reason_is_translated(
    scripted: tuple[ic.Client, grpc_testing.Channel], code: grpc.StatusCode
) -> None:
    error = fail_with(scripted, code, f"it went {code.name.lower()}")
    assert type(error) is BY_CODE[code]
    assert error.code == code.name
    assert error.reason == ""
    assert code.name.lower() in error.message


def test_the_reason_table_covers_every_error_reason_of_the_api() -> None:
    names = {n.removeprefix("ERROR_REASON_") for n in tpb.ErrorReason.DESCRIPTOR.values_by_name}
    assert set(BY_REASON) == names - {"UNSPECIFIED"}


@pytest.mark.parametrize("reason", sorted(BY_REASON))
def test_every_error_reason_is_translated(
    scripted: tuple[ic.Client, grpc_testing.Channel], reason: str
) -> None:
    code, expected = BY_REASON[reason]
    error = fail_with(scripted, code, f"because {reason}", reason)
    assert type(error) is expected
    assert error.reason == reason
    assert error.code == code.name


def test_a_wait_that_ran_out_is_a_wait_timeout_and_a_deadline(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    error = fail_with(scripted, grpc.StatusCode.DEADLINE_EXCEEDED, "waited", "NOT_ENOUGH_DEVICES")
    assert type(error) is ic.WaitTimeout
    assert isinstance(error, ic.NotEnoughDevices)
    assert isinstance(error, ic.DeadlineExceeded)


def test_an_invalid_field_names_the_field_and_a_selector_its_position(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    field = fail_with(
        scripted, grpc.StatusCode.INVALID_ARGUMENT, "count: must be >= 0", "INVALID_FIELD", "count"
    )
    assert isinstance(field, ic.InvalidArgument)
    assert field.field == "count"
    selector = fail_with(
        scripted,
        grpc.StatusCode.INVALID_ARGUMENT,
        "selector: unknown operator '=>' at position 4",
        "INVALID_SELECTOR",
        "selector",
    )
    assert isinstance(selector, ic.InvalidSelector)
    assert (selector.field, selector.position) == ("selector", 4)


def test_unavailable_is_retried_then_succeeds() -> None:
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    retry = ic.RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
    with (
        ic.Client(channel=channel, client_id="tester", retry=retry) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(client.availability)
        for _ in range(2):
            _, _, rpc = channel.take_unary_unary(AVAILABILITY)
            rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection refused")
        _, _, rpc = channel.take_unary_unary(AVAILABILITY)
        rpc.terminate(rpb.GetAvailabilityResponse(count=1), (), grpc.StatusCode.OK, "")
        assert future.result(timeout=10).count == 1


def test_a_lost_deadlock_is_retried_then_succeeds() -> None:
    """ABORTED with reason CONFLICT: the control committed nothing, so the call goes again."""
    channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
    retry = ic.RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="CONFLICT", domain="icefarm.dev"))
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.ABORTED, message="deadlock; retry", details=[info])
    )
    with (
        ic.Client(channel=channel, client_id="tester", retry=retry) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(client.availability)
        _, _, rpc = channel.take_unary_unary(AVAILABILITY)
        rpc.terminate(None, status.trailing_metadata, status.code, status.details)
        _, _, rpc = channel.take_unary_unary(AVAILABILITY)
        rpc.terminate(rpb.GetAvailabilityResponse(count=1), (), grpc.StatusCode.OK, "")
        assert future.result(timeout=10).count == 1


def test_other_codes_are_not_retried(scripted: tuple[ic.Client, grpc_testing.Channel]) -> None:
    client, _ = scripted
    retry = ic.RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
    client.aio.settings = ic.Settings(client_id="tester", retry=retry)
    error = fail_with(scripted, grpc.StatusCode.INTERNAL, "bug (incident abc)", "INTERNAL")
    assert type(error) is ic.InternalError
    assert error.reason == "INTERNAL"


def test_not_enough_devices_carries_the_counts_the_control_sends(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    counts = {"wanted": "5", "matching": "4", "free": "1"}
    error = fail_with(
        scripted, grpc.StatusCode.RESOURCE_EXHAUSTED, "5 wanted", "NOT_ENOUGH_DEVICES", "", counts
    )
    assert isinstance(error, ic.NotEnoughDevices)
    assert (error.wanted, error.matching, error.free) == (5, 4, 1)
    waited = fail_with(
        scripted, grpc.StatusCode.DEADLINE_EXCEEDED, "waited", "NOT_ENOUGH_DEVICES", "", counts
    )
    assert isinstance(waited, ic.WaitTimeout)
    assert (waited.wanted, waited.matching, waited.free) == (5, 4, 1)


def test_counts_not_sent_are_none(scripted: tuple[ic.Client, grpc_testing.Channel]) -> None:
    error = fail_with(scripted, grpc.StatusCode.RESOURCE_EXHAUSTED, "no", "NOT_ENOUGH_DEVICES")
    assert isinstance(error, ic.NotEnoughDevices)
    assert (error.wanted, error.matching, error.free) == (None, None, None)


def test_a_limit_says_when_to_retry_when_the_control_does(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    error = fail_with(
        scripted,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 64 waiting reserves per client",
        "LIMIT_EXCEEDED",
        retry_delay=timedelta(seconds=2.5),
    )
    assert isinstance(error, ic.LimitExceeded)
    assert error.retry_delay == timedelta(seconds=2.5)
    assert error.code == "RESOURCE_EXHAUSTED"
    plain = fail_with(scripted, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many", "LIMIT_EXCEEDED")
    assert isinstance(plain, ic.LimitExceeded)
    assert plain.retry_delay is None


def test_an_ended_reservation_is_a_failed_precondition_of_its_own(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    error = fail_with(
        scripted,
        grpc.StatusCode.FAILED_PRECONDITION,
        "reservation r1 ended at 10:00 (released)",
        "RESERVATION_ENDED",
    )
    assert isinstance(error, ic.ReservationEnded)
    assert isinstance(error, ic.FailedPrecondition)
    assert "released" in error.message


def test_an_internal_error_names_its_incident(
    scripted: tuple[ic.Client, grpc_testing.Channel],
) -> None:
    error = fail_with(
        scripted,
        grpc.StatusCode.INTERNAL,
        "internal error (incident 0123abcd4567 in the control's log)",
        "INTERNAL",
    )
    assert isinstance(error, ic.InternalError)
    assert error.incident == "0123abcd4567"
    tagged = fail_with(
        scripted, grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", "", {"incident": "f00d"}
    )
    assert isinstance(tagged, ic.InternalError)
    assert tagged.incident == "f00d"
