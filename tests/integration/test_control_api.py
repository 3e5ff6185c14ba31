"""ReservationService and the operator RPCs through a real gRPC server on loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2
from icefarm_control.storage import outbox
from icefarm_control.storage.testing import (
    operator_feed,
    register_device,
    register_worker,
    seed_farm,
)
from tests.grpc_errors import bad_fields_of, reason_of
from tests.integration.conftest import RunningControl, as_client


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def reserve(control: RunningControl, client: str, **fields: object) -> rpb.ReserveResponse:
    request = rpb.ReserveRequest(**fields)  # type: ignore[arg-type]
    response: rpb.ReserveResponse = await control.reservations.Reserve(
        request, metadata=as_client(client)
    )
    return response


async def free_count(control: RunningControl) -> int:
    answer = await control.reservations.GetAvailability(rpb.GetAvailabilityRequest())
    return answer.count


async def test_health_reports_serving(control: RunningControl) -> None:
    stub = health_pb2_grpc.HealthStub(control.channel)
    for service in ("", "icefarm.v1.ReservationService", "icefarm.v1.ControlService"):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_two_clients_racing_for_the_last_board(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    results = await asyncio.gather(
        reserve(control, "alice", count=1),
        reserve(control, "bob", count=1),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, rpb.ReserveResponse)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(losses[0]) == "NOT_ENOUGH_DEVICES"
    assert wins[0].token and len(wins[0].reservation.devices) == 1


async def test_reserve_returns_devices_lease_and_token(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=3)
    answer = await reserve(
        control, "alice", count=2, mode="pulsecount", mode_args={"k": "v"}, duration=seconds(120)
    )
    reservation = answer.reservation
    assert reservation.client_id == "alice" and reservation.mode == "pulsecount"
    assert dict(reservation.mode_args) == {"k": "v"}
    assert len(reservation.devices) == 2
    assert all(d.state == types_pb2.DEVICE_STATE_RESERVED for d in reservation.devices)
    assert all(d.worker_endpoint.startswith("127.0.0.1:") for d in reservation.devices)
    lease = reservation.end_time.ToDatetime(UTC) - reservation.create_time.ToDatetime(UTC)
    assert abs(lease.total_seconds() - 120) < 1
    assert reservation.state == types_pb2.RESERVATION_STATE_ACTIVE
    assert await free_count(control) == 1


async def test_waiting_reserve_is_served_when_boards_free_up_in_order(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    held = await reserve(control, "holder", count=1)
    first = asyncio.create_task(reserve(control, "first", count=1, wait_timeout=seconds(30)))
    await _until_queued(control, 1)
    second = asyncio.create_task(reserve(control, "second", count=1, wait_timeout=seconds(30)))
    await _until_queued(control, 2)
    await control.reservations.Release(
        rpb.ReleaseRequest(reservation_ids=[held.reservation.id]), metadata=as_client("holder")
    )
    served = await asyncio.wait_for(first, 10)
    assert served.reservation.client_id == "first"
    assert not second.done()
    await control.reservations.Release(rpb.ReleaseRequest(all=True), metadata=as_client("first"))
    assert (await asyncio.wait_for(second, 10)).reservation.client_id == "second"


async def test_waiter_whose_timeout_passes_gets_deadline_exceeded_and_holds_nothing(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    await reserve(control, "holder", count=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(control, "late", count=1, wait_timeout=seconds(0.3))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(caught.value) == "NOT_ENOUGH_DEVICES"
    await control.reservations.Release(rpb.ReleaseRequest(all=True), metadata=as_client("holder"))
    assert await free_count(control) == 1
    listed = await control.reservations.ListReservations(
        rpb.ListReservationsRequest(include_ended=True), metadata=as_client("late")
    )
    assert list(listed.reservations) == []


async def test_expired_lease_ends_within_two_seconds_without_any_call(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    answer = await reserve(control, "alice", count=1, duration=seconds(1))
    end = answer.reservation.end_time.ToDatetime(UTC)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        listed = await control.reservations.ListReservations(
            rpb.ListReservationsRequest(include_ended=True), metadata=as_client("alice")
        )
        (row,) = listed.reservations
        if row.state == types_pb2.RESERVATION_STATE_ENDED:
            break
        await asyncio.sleep(0.05)
    assert row.state == types_pb2.RESERVATION_STATE_ENDED
    assert row.end_reason == types_pb2.END_REASON_EXPIRED
    assert (row.ended_time.ToDatetime(UTC) - end).total_seconds() < 2
    assert await free_count(control) == 1


async def test_extend_moves_the_end_and_returns_fresh_tokens(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    answer = await reserve(control, "alice", count=1, duration=seconds(60))
    extended = await control.reservations.Extend(
        rpb.ExtendRequest(reservation_ids=[answer.reservation.id], duration=seconds(3600)),
        metadata=as_client("alice"),
    )
    (row,) = extended.reservations
    assert row.end_time.ToDatetime(UTC) > answer.reservation.end_time.ToDatetime(UTC)
    assert extended.tokens[answer.reservation.id]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.reservations.Extend(
            rpb.ExtendRequest(reservation_ids=[answer.reservation.id]), metadata=as_client("bob")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(caught.value) == "NOT_HOLDER"


async def test_release_by_a_non_holder_is_permission_denied(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=1)
    answer = await reserve(control, "alice", count=1)
    for request in (
        rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]),
        rpb.ReleaseRequest(device_ids=[answer.reservation.devices[0].id]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await control.reservations.Release(request, metadata=as_client("mallory"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(caught.value) == "NOT_HOLDER"
    assert await free_count(control) == 0


async def test_release_of_an_unknown_reservation_is_not_found(control: RunningControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.reservations.Release(
            rpb.ReleaseRequest(reservation_ids=["nope"]), metadata=as_client("alice")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "RESERVATION_NOT_FOUND"


async def test_reserve_without_identity_is_unauthenticated(control: RunningControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.reservations.Reserve(rpb.ReserveRequest(count=1))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "icefarm-client-id" in (caught.value.details() or "")


BAD_RESERVES: list[tuple[str, dict[str, object], str]] = [
    ("malformed selector", {"count": 1, "selector": "kind=>pico"}, "selector"),
    ("unclosed in-list", {"count": 1, "selector": "worker in (a,b"}, "selector"),
    ("negative count", {"count": -3}, "count"),
    ("zero count", {"count": 0}, "count"),
    ("absurd count", {"count": 1_000_000}, "count"),
    ("zero duration", {"count": 1, "duration": seconds(0)}, "duration"),
    ("absurd duration", {"count": 1, "duration": seconds(10 * 365 * 86400)}, "duration"),
    ("negative duration", {"count": 1, "duration": duration_pb2.Duration(seconds=-5)}, "duration"),
    (
        "negative wait",
        {"count": 1, "wait_timeout": duration_pb2.Duration(seconds=-1)},
        "wait_timeout",
    ),
    ("absurd wait", {"count": 1, "wait_timeout": seconds(400 * 86400)}, "wait_timeout"),
    ("duplicate device id", {"device_ids": ["board-0-000", "board-0-000"]}, "device_ids"),
    ("oversized device list", {"device_ids": [f"d{i}" for i in range(5000)]}, "device_ids"),
    ("count and ids", {"count": 3, "device_ids": ["board-0-000"]}, "count"),
    ("bad mode", {"count": 1, "mode": "Pulse Count!"}, "mode"),
    (
        "too many mode args",
        {"count": 1, "mode_args": {f"k{i}": "v" for i in range(100)}},
        "mode_args",
    ),
    ("oversized selector", {"count": 1, "selector": "a=" + "b" * 5000}, "selector"),
]


@pytest.mark.parametrize(
    ("fields", "field"), [c[1:] for c in BAD_RESERVES], ids=[c[0] for c in BAD_RESERVES]
)
async def test_bad_reserve_is_invalid_argument_naming_the_field_and_writes_nothing(
    control: RunningControl, fields: dict[str, object], field: str
) -> None:
    await seed_farm(control.database, boards_per_worker=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(control, "alice", **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields_of(caught.value) == [field]
    assert (caught.value.details() or "").startswith(f"{field}:")
    assert await free_count(control) == 2
    listed = await control.reservations.ListReservations(
        rpb.ListReservationsRequest(include_ended=True), metadata=as_client("alice")
    )
    assert list(listed.reservations) == []


async def test_reserving_an_unknown_device_is_not_found_and_writes_nothing(
    control: RunningControl,
) -> None:
    await seed_farm(control.database, boards_per_worker=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(control, "alice", device_ids=["board-0-000", "no-such-board"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "DEVICE_NOT_FOUND"
    assert "no-such-board" in (caught.value.details() or "")
    assert await free_count(control) == 2


async def test_selector_errors_name_the_position(control: RunningControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.reservations.GetAvailability(
            rpb.GetAvailabilityRequest(selector="kind=pico2-ice,gpu>=lots")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_SELECTOR"
    assert "position 20" in (caught.value.details() or "")


async def test_availability_counts_matching_free_devices(control: RunningControl) -> None:
    await register_worker(control.database, "lab-a")
    await register_device(control.database, "a", worker="lab-a", properties={"gpu_memory_mb": 8192})
    await register_device(
        control.database, "b", worker="lab-a", properties={"gpu_memory_mb": 16384}
    )
    answer = await control.reservations.GetAvailability(
        rpb.GetAvailabilityRequest(selector="gpu_memory_mb>=16384")
    )
    assert answer.count == 1 and list(answer.device_ids) == ["b"]


async def test_operator_lists_workers_and_devices_with_paging(control: RunningControl) -> None:
    await seed_farm(control.database, workers=2, boards_per_worker=3)
    workers = await control.control.ListWorkers(cpb.ListWorkersRequest())
    assert [w.name for w in workers.workers] == ["worker-0", "worker-1"]
    assert all(
        w.device_count == 3 and w.state == types_pb2.WORKER_STATE_ONLINE for w in workers.workers
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await control.control.ListDevices(
            cpb.ListDevicesRequest(selector="worker=worker-1", page_size=2, page_token=token)
        )
        seen += [d.id for d in page.devices]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["board-1-000", "board-1-001", "board-1-002"]
    reserved = await reserve(control, "alice", device_ids=["board-0-001"])
    only_reserved = await control.control.ListDevices(
        cpb.ListDevicesRequest(state=types_pb2.DEVICE_STATE_RESERVED)
    )
    (device,) = only_reserved.devices
    assert device.id == "board-0-001" and device.holder == "alice"
    assert device.reservation_id == reserved.reservation.id


async def test_get_device_unknown_is_not_found(control: RunningControl) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.control.GetDevice(cpb.GetDeviceRequest(device_id="ghost"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "DEVICE_NOT_FOUND"


async def test_operator_ends_and_extends_reservations(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=3)
    a = await reserve(control, "alice", count=1, duration=seconds(60))
    await reserve(control, "bob", count=2)
    extended = await control.control.ExtendReservations(
        cpb.ExtendReservationsRequest(client_id="alice", duration=seconds(7200))
    )
    (row,) = extended.reservations
    assert row.id == a.reservation.id
    assert (row.end_time.ToDatetime(UTC) - datetime.now(UTC)).total_seconds() > 7000
    ended = await control.control.EndReservations(cpb.EndReservationsRequest(client_id="bob"))
    assert len(ended.device_ids) == 2
    listed = await control.reservations.ListReservations(
        rpb.ListReservationsRequest(include_ended=True), metadata=as_client("bob")
    )
    (bobs,) = listed.reservations
    assert bobs.end_reason == types_pb2.END_REASON_REVOKED
    assert await free_count(control) == 2


async def test_remove_device_takes_it_from_its_holder(control: RunningControl) -> None:
    await seed_farm(control.database, boards_per_worker=2)
    answer = await reserve(control, "alice", count=2)
    gone = answer.reservation.devices[0].id
    removed = await control.control.RemoveDevice(cpb.RemoveDeviceRequest(device_id=gone))
    assert removed.device.state == types_pb2.DEVICE_STATE_REMOVED
    assert removed.device.reservation_id == ""
    listed = await control.reservations.ListReservations(
        rpb.ListReservationsRequest(), metadata=as_client("alice")
    )
    (row,) = listed.reservations
    lost = {d.id: d.released_reason for d in row.devices}
    assert lost[gone] == types_pb2.END_REASON_DEVICE_REMOVED
    assert row.state == types_pb2.RESERVATION_STATE_ACTIVE
    async with control.database.read() as conn:
        commands = await outbox.pending_commands(conn, "worker-0")
    feed = await operator_feed(control.database)
    assert [(c.type, c.device_id) for c in commands][-1] == ("remove_device", gone)
    assert feed[-1].type == "device_changed"
    assert feed[-1].payload["device"]["state"] == "REMOVED"


async def _until_queued(control: RunningControl, n: int, timeout: float = 10) -> None:
    from icefarm_control.storage import waiter_queries as waiter_q

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with control.database.read() as conn:
            if len(await waiter_q.waiting(conn)) >= n:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} waiters queued within {timeout}s")


async def test_a_named_board_that_cannot_be_reserved_is_failed_precondition_naming_it(
    control: RunningControl,
) -> None:
    """Held by someone else: RESOURCE_EXHAUSTED (it frees up, so waiting makes sense). Removed
    or broken: FAILED_PRECONDITION / DEVICE_NOT_AVAILABLE, saying which and why."""
    ids = await seed_farm(control.database, boards_per_worker=2)
    await reserve(control, "holder", device_ids=[ids[0]])
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await reserve(control, "alice", device_ids=[ids[0]])
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(busy.value) == "NOT_ENOUGH_DEVICES"
    await control.control.RemoveDevice(cpb.RemoveDeviceRequest(device_id=ids[1]))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await reserve(control, "alice", device_ids=[ids[1]])
    assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(gone.value) == "DEVICE_NOT_AVAILABLE"
    assert f"{ids[1]} is removed" in (gone.value.details() or "")
