"""The edge check of request messages (transport/validation.py): what it refuses, and where."""

from __future__ import annotations

import math

import pytest
from google.protobuf.message import Message

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm_control.domain.errors import InvalidArgument, Reason, Unauthenticated
from icefarm_control.transport.identity import client_id_from
from icefarm_control.transport.validation import find_violation

TOO_BIG = 2**63

REFUSED: list[tuple[str, Message, str]] = [
    ("nul in a selector", rpb.ReserveRequest(count=1, selector='kind="a\x00"'), "selector"),
    ("escape in a selector", rpb.ReserveRequest(count=1, selector="kind=a\x1b"), "selector"),
    ("delete in a request id", rpb.ReserveRequest(count=1, request_id="r\x7f"), "request_id"),
    ("nul in a device id", rpb.ReserveRequest(device_ids=["ok", "d\x00"]), "device_ids"),
    ("nul in a mode_args value", rpb.ReserveRequest(mode_args={"k": "v\x00"}), "mode_args"),
    ("nul in a mode_args key", rpb.ReserveRequest(mode_args={"k\x00": "v"}), "mode_args"),
    ("newline in a selector", rpb.ReserveRequest(selector="a\nb"), "selector"),
    ("nul in a release id", rpb.ReleaseRequest(reservation_ids=["r\x00"]), "reservation_ids"),
    ("nul in a page token", rpb.ListReservationsRequest(page_token="\x00"), "page_token"),
    ("nul in a worker name", cpb.DrainWorkerRequest(worker="w\x00"), "worker"),
    (
        "nul in a Register name",
        cpb.WorkerSessionRequest(register=cpb.Register(name="lab\x00")),
        "register.name",
    ),
    (
        "nul in a label of a registered device",
        cpb.WorkerSessionRequest(
            register=cpb.Register(
                name="lab", devices=[cpb.DeviceUpdate(device_id="d", labels={"a": "\x00"})]
            )
        ),
        "register.devices.labels",
    ),
    (
        "nul in a DeviceUpdate label",
        cpb.WorkerSessionRequest(device_update=cpb.DeviceUpdate(labels={"room": "a\x00"})),
        "device_update.labels",
    ),
    (
        "an infinite property",
        cpb.WorkerSessionRequest(device_update=cpb.DeviceUpdate(properties={"t": math.inf})),
        "device_update.properties",
    ),
    (
        "a negative infinite property",
        cpb.WorkerSessionRequest(device_update=cpb.DeviceUpdate(properties={"t": -math.inf})),
        "device_update.properties",
    ),
    (
        "nul in a command error",
        cpb.WorkerSessionRequest(command_result=cpb.CommandResult(error="x\x00")),
        "command_result.error",
    ),
    (
        "nul in a watch selector",
        rpb.SessionRequest(watch=rpb.WatchAvailability(selector='a="\x00"')),
        "watch.selector",
    ),
    (
        "resume_after 2**63 in Hello",
        rpb.SessionRequest(hello=rpb.Hello(resume_after=TOO_BIG)),
        "hello.resume_after",
    ),
    (
        "resume_after 2**63 in WatchEvents",
        cpb.WatchEventsRequest(resume_after=TOO_BIG),
        "resume_after",
    ),
]

ACCEPTED: list[tuple[str, Message]] = [
    ("an ordinary Reserve", rpb.ReserveRequest(count=2, selector='kind=pico2-ice room="a b"')),
    ("unicode text", rpb.ReserveRequest(count=1, selector='room="Zürich 3 · Süd"')),
    (
        "NaN removes a property",
        cpb.WorkerSessionRequest(device_update=cpb.DeviceUpdate(properties={"t": math.nan})),
    ),
    (
        "a multi-line error text",
        cpb.WorkerSessionRequest(
            device_update=cpb.DeviceUpdate(error="flash failed:\n\tat block 3")
        ),
    ),
    (
        "a multi-line command error",
        cpb.WorkerSessionRequest(command_result=cpb.CommandResult(error="no\nboard")),
    ),
    ("the largest resume_after", rpb.SessionRequest(hello=rpb.Hello(resume_after=TOO_BIG - 1))),
    ("a large ping nonce", rpb.SessionRequest(ping=rpb.Ping(nonce=2**64 - 1))),
    ("an empty message", rpb.ReleaseRequest()),
]


@pytest.mark.parametrize(("case", "message", "field"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_hostile_field_is_refused_naming_its_path(
    case: str, message: Message, field: str
) -> None:
    violation = find_violation(message)
    assert isinstance(violation, InvalidArgument), case
    assert violation.field == field
    assert violation.reason == Reason.INVALID_FIELD


@pytest.mark.parametrize(("case", "message"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_an_ordinary_message_passes(case: str, message: Message) -> None:
    assert find_violation(message) is None, case


def test_nan_in_the_properties_of_a_registered_device_passes() -> None:
    # The devices of a Register are DeviceUpdates: NaN means "no such property" there too.
    register = cpb.Register(
        name="lab", devices=[cpb.DeviceUpdate(device_id="d", properties={"t": math.nan})]
    )
    assert find_violation(cpb.WorkerSessionRequest(register=register)) is None


def test_the_description_names_the_character_and_the_item_without_echoing_it() -> None:
    violation = find_violation(rpb.ReserveRequest(device_ids=["ok", "d\x00"]))
    assert violation is not None
    assert "U+0000" in violation.description
    assert "item 1" in violation.description
    assert "\x00" not in violation.message


@pytest.mark.parametrize("client_id", ["alice\n", "al\x00ice", "al ice", "x" * 257])
def test_a_malformed_client_id_is_refused(client_id: str) -> None:
    with pytest.raises(Unauthenticated):
        client_id_from(((("icefarm-client-id", client_id),)), required=True)


def test_a_good_client_id_is_taken() -> None:
    assert client_id_from((("icefarm-client-id", "alice@host"),), required=True) == "alice@host"
