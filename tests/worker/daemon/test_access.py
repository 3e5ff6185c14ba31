"""The worker is the final arbiter of who touches its boards: a genuine, unexpired token that
names the board, from the reservation that holds it now. Anything else is refused and the
board is left alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from icefarm.tokens import TokenClaims
from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm_worker.app import WorkerApp
from icefarm_worker.simulator import SimulatedFarm, expected_pulse_count
from tests.grpc_errors import bad_fields_of, reason_of
from tests.integration.worker_farm import eventually, release, state_is
from tests.worker.daemon.harness import (
    ControlUnderTest,
    all_in_state,
    bitstream,
    evaluate,
    reserve_ready,
    simulated_worker,
    token_metadata,
    worker_stub,
)


@pytest.fixture
async def worker(
    control: ControlUnderTest, sim_root: Path
) -> AsyncIterator[tuple[WorkerApp, SimulatedFarm]]:
    async with simulated_worker(control.address, sim_root, 2) as running:
        await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
        yield running


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def one(data: bytes, device_id: str = "", bitstream_id: str = "x") -> list[wpb.Bitstream]:
    return [wpb.Bitstream(id=bitstream_id, data=data, device_id=device_id)]


async def test_a_token_of_another_reservation_is_refused_and_the_board_untouched(
    control: ControlUnderTest, worker: tuple[WorkerApp, SimulatedFarm]
) -> None:
    app, _ = worker
    alice = await reserve_ready(control, "alice", 1)
    bob = await reserve_ready(control, "bob", 1)
    board = alice.reservation.devices[0].id
    channel, stub = worker_stub(app)
    async with channel:
        request = wpb.GetDeviceInfoRequest(device_id=board)
        error = await refused(stub.GetDeviceInfo(request, metadata=token_metadata(bob.token)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "NOT_HOLDER"
        error = await refused(evaluate(stub, bob.token, one(bitstream(1), board)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED

        results = await evaluate(stub, alice.token, one(bitstream(2)))
        assert results[0].attempt == 1
        assert results[0].pulse_count == expected_pulse_count(bitstream(2))
    assert await state_is(control, board, tpb.DEVICE_STATE_READY)


async def test_expired_forged_and_missing_tokens_are_refused(
    control: ControlUnderTest, worker: tuple[WorkerApp, SimulatedFarm]
) -> None:
    app, _ = worker
    answer = await reserve_ready(control, "alice", 1)
    board = answer.reservation.devices[0].id
    expired = control.app.engine.signer.sign(
        TokenClaims(
            reservation_id=answer.reservation.id,
            client_id="alice",
            device_ids=(board,),
            expires=datetime.now(UTC) - timedelta(seconds=1),
        )
    )
    body, _, signature = answer.token.partition(".")
    forged = f"{body}.{signature[::-1]}"
    channel, stub = worker_stub(app)
    async with channel:
        for token in (expired, forged, "not-a-token"):
            error = await refused(evaluate(stub, token, one(bitstream(1))))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(error) == "TOKEN_INVALID"
        error = await refused(stub.GetDeviceInfo(wpb.GetDeviceInfoRequest(device_id=board)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "TOKEN_INVALID"
    assert await state_is(control, board, tpb.DEVICE_STATE_READY)


async def test_a_board_released_a_moment_ago_is_refused(
    control: ControlUnderTest, worker: tuple[WorkerApp, SimulatedFarm]
) -> None:
    app, _ = worker
    answer = await reserve_ready(control, "alice", 1)
    board = answer.reservation.devices[0].id
    await release(control, "alice", answer.reservation.id)

    async def let_go() -> bool:
        return not app.fleet.boards[board].holds(answer.reservation.id)

    await eventually(let_go, what="the worker hears of the release")
    channel, stub = worker_stub(app)
    async with channel:
        error = await refused(evaluate(stub, answer.token, one(bitstream(1))))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(error) == "NOT_HOLDER"
        request = wpb.WorkerServiceRebootDeviceRequest(device_id=board)
        error = await refused(stub.RebootDevice(request, metadata=token_metadata(answer.token)))
        assert reason_of(error) == "NOT_HOLDER"
    await eventually(lambda: state_is(control, board, tpb.DEVICE_STATE_AVAILABLE))


async def test_bad_input_is_invalid_argument_naming_the_field(
    control: ControlUnderTest, worker: tuple[WorkerApp, SimulatedFarm]
) -> None:
    app, _ = worker
    answer = await reserve_ready(control, "alice", 1)
    board = answer.reservation.devices[0].id
    meta = token_metadata(answer.token)
    channel, stub = worker_stub(app)
    async with channel:
        cases = [
            (evaluate(stub, answer.token, one(bitstream(1), bitstream_id="")), "bitstream.id"),
            (evaluate(stub, answer.token, one(b"")), "bitstream.data"),
            (
                evaluate(stub, answer.token, one(bitstream(1), "no-such-board")),
                "bitstream.device_id",
            ),
            (stub.GetDeviceInfo(wpb.GetDeviceInfoRequest(), metadata=meta), "device_id"),
            (
                stub.GetDeviceInfo(wpb.GetDeviceInfoRequest(device_id="nope"), metadata=meta),
                "device_id",
            ),
            (stub.SetMode(wpb.SetModeRequest(device_id=board, mode="x"), metadata=meta), "mode"),
        ]
        for call, field in cases:
            error = await refused(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert bad_fields_of(error) == [field]
        info = await stub.GetDeviceInfo(wpb.GetDeviceInfoRequest(device_id=board), metadata=meta)
        assert info.device.mode == "pulsecount"
        assert info.device.reservation_id == answer.reservation.id
        assert info.device.state == tpb.DEVICE_STATE_READY


async def test_set_mode_switches_a_held_board(
    control: ControlUnderTest, worker: tuple[WorkerApp, SimulatedFarm]
) -> None:
    app, _ = worker
    answer = await reserve_ready(control, "alice", 1)
    board = answer.reservation.devices[0].id
    channel, stub = worker_stub(app)
    async with channel:
        switched = await stub.SetMode(
            wpb.SetModeRequest(device_id=board, mode="varmax"),
            metadata=token_metadata(answer.token),
        )
        assert switched.device.mode == "varmax"
        assert switched.device.firmware == "varmax"
        results = await evaluate(stub, answer.token, one(bitstream(3)))
        assert results[0].WhichOneof("value") == "variance"
    await eventually(lambda: state_is(control, board, tpb.DEVICE_STATE_READY))
