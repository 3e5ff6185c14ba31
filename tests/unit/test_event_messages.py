"""Outbox rows become icefarm.v1.Event messages in one place; odd rows are skipped, not fatal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from icefarm.v1 import types_pb2
from icefarm_control.domain import events
from icefarm_control.domain.events import EventType
from icefarm_control.storage.outbox import EventRow
from icefarm_control.storage.records import DeviceRow, WorkerRow
from icefarm_control.transport.events import devices_available, event

NOW = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
LATER = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)


def row(type_: str, payload: dict[str, Any], sequence: int = 7) -> EventRow:
    return EventRow("client:alice", sequence, type_, payload, NOW)


def test_every_event_type_is_a_field_of_the_event_oneof() -> None:
    kinds = {f.name for f in types_pb2.Event.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert {t.value for t in EventType} == kinds


def test_reservation_ended_keeps_sequence_time_and_fields() -> None:
    payload = events.reservation_ended(
        reservation_id="r1", device_ids=["b", "a"], reason="RELEASED", closed=True
    )
    message = event(row(EventType.RESERVATION_ENDED, {**payload, "client_id": "alice"}))
    assert message is not None
    assert message.sequence == 7
    assert message.time.ToDatetime(UTC) == NOW
    assert message.WhichOneof("kind") == "reservation_ended"
    ended = message.reservation_ended
    assert ended.reservation_id == "r1" and list(ended.device_ids) == ["a", "b"]
    assert ended.reason == types_pb2.END_REASON_RELEASED and ended.reservation_closed
    assert ended.client_id == "alice"  # the operator feed names the holder


def test_reservation_created_becomes_a_reservation() -> None:
    payload = events.reservation_created(
        reservation_id="r1",
        client_id="alice",
        device_ids=["d2", "d1"],
        mode="varmax",
        end_time=LATER,
    )
    message = event(row(EventType.RESERVATION_CREATED, payload))
    assert message is not None
    reservation = message.reservation_created.reservation
    assert reservation.id == "r1" and reservation.client_id == "alice"
    assert reservation.mode == "varmax"
    assert [d.id for d in reservation.devices] == ["d1", "d2"]
    assert reservation.end_time.ToDatetime(UTC) == LATER
    assert reservation.create_time.ToDatetime(UTC) == NOW
    assert reservation.state == types_pb2.RESERVATION_STATE_ACTIVE


def test_lease_events_carry_their_end_time() -> None:
    for type_, builder in (
        (EventType.RESERVATION_EXTENDED, events.reservation_extended),
        (EventType.RESERVATION_ENDING_SOON, events.reservation_ending_soon),
    ):
        message = event(row(type_, builder(reservation_id="r1", end_time=LATER)))
        assert message is not None
        kind = getattr(message, type_)
        assert kind.reservation_id == "r1" and kind.end_time.ToDatetime(UTC) == LATER


def test_device_and_worker_events() -> None:
    ready = event(
        row(
            EventType.DEVICE_READY,
            {"reservation_id": "r1", "device_id": "d1", "worker_endpoint": "h:1"},
        )
    )
    assert ready is not None and ready.device_ready.worker_endpoint == "h:1"
    failed = event(
        row(EventType.DEVICE_FAILED, {"reservation_id": "r1", "device_id": "d1", "error": "x"})
    )
    assert failed is not None and failed.device_failed.error == "x"
    draining = event(
        row(
            EventType.WORKER_DRAINING,
            {"worker": "w", "device_ids": ["d1"], "reservation_ids": ["r1"]},
        )
    )
    assert draining is not None and list(draining.worker_draining.reservation_ids) == ["r1"]


def test_device_changed_and_worker_changed_fill_device_and_worker() -> None:
    device = DeviceRow(
        id="d1",
        worker="w",
        kind="pico2-ice",
        labels={"lab": "a"},
        properties={"mhz": 48},
        state="READY",
        state_time=NOW,
        error="",
        reset_on_release=True,
        reservation_id="r1",
        worker_endpoint="h:1",
        holder="alice",
    )
    message = event(row(EventType.DEVICE_CHANGED, events.device_changed(device)))
    assert message is not None
    changed = message.device_changed.device
    assert changed.id == "d1" and changed.state == types_pb2.DEVICE_STATE_READY
    assert dict(changed.labels) == {"lab": "a"} and dict(changed.properties) == {"mhz": 48.0}
    assert changed.holder == "alice" and changed.reset_on_release
    assert changed.state_time.ToDatetime(UTC) == NOW

    worker = WorkerRow("w", "h:1", "1.0", ("pulsecount",), {}, "DRAINING", NOW, 3)
    message = event(row(EventType.WORKER_CHANGED, events.worker_changed(worker)))
    assert message is not None
    assert message.worker_changed.worker.state == types_pb2.WORKER_STATE_DRAINING
    assert list(message.worker_changed.worker.modes) == ["pulsecount"]
    assert message.worker_changed.worker.device_count == 3


def test_a_flat_device_payload_with_missing_keys_is_tolerated() -> None:
    message = event(row(EventType.DEVICE_CHANGED, {"id": "d1", "state": "BROKEN"}))
    assert message is not None
    assert message.device_changed.device.id == "d1"
    assert message.device_changed.device.state == types_pb2.DEVICE_STATE_BROKEN


def test_unknown_types_and_misfit_payloads_are_skipped() -> None:
    assert event(row("something_new", {"x": 1})) is None
    assert event(row(EventType.RESERVATION_ENDED, {"reason": "NOT_A_REASON"})) is None
    assert event(row(EventType.RESERVATION_ENDED, {"device_ids": "not-a-list"})) is None
    assert event(row(EventType.RESERVATION_EXTENDED, {"end_time": 12})) is None


def test_devices_available_is_ephemeral() -> None:
    message = devices_available("kind=pico2-ice", ["d1", "d2"], NOW)
    assert message.sequence == 0
    assert message.devices_available.count == 2
    assert list(message.devices_available.device_ids) == ["d1", "d2"]
