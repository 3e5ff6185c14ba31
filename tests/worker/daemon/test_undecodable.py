"""Bytes that are not the request message are INVALID_ARGUMENT naming `request` on the worker's
WorkerService and on the control's services (never UNKNOWN), and the servers go on serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from tests.grpc_errors import bad_fields_of
from tests.worker.daemon.conftest import ControlUnderTest
from tests.worker.daemon.harness import (
    all_in_state,
    reserve_ready,
    simulated_worker,
    token_metadata,
)

# A field 1 of wire type 2 (length-delimited) that claims more bytes than follow.
GARBAGE = b"\x0a\x7f\x01"


def identity(data: bytes) -> bytes:
    return data


Metadata = tuple[tuple[str, str], ...]
ALICE: Metadata = (("icefarm-client-id", "alice"),)


async def call_raw_unary(
    address: str, method: str, metadata: Metadata = ()
) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            method, request_serializer=identity, response_deserializer=identity
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(GARBAGE, timeout=10, metadata=metadata)
    return caught.value


async def call_raw_stream(
    address: str, method: str, metadata: Metadata = ()
) -> grpc.aio.AioRpcError:
    """A stream whose first message is garbage (streams check who calls first)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method, request_serializer=identity, response_deserializer=identity
        )
        stream = call(iter([GARBAGE]), timeout=10, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
    return caught.value


def assert_refused(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_fields_of(error) == ["request"]
    assert "DecodeError" not in (error.details() or "")


async def test_the_control_refuses_undecodable_requests(control: ControlUnderTest) -> None:
    assert_refused(
        await call_raw_unary(control.address, "/icefarm.v1.ReservationService/Reserve", ALICE)
    )
    assert_refused(await call_raw_unary(control.address, "/icefarm.v1.ControlService/GetDevice"))
    assert_refused(
        await call_raw_stream(control.address, "/icefarm.v1.ControlService/WorkerSession")
    )
    assert_refused(
        await call_raw_stream(control.address, "/icefarm.v1.ReservationService/Session", ALICE)
    )
    listed = await control.control.ListDevices(cpb.ListDevicesRequest())
    assert list(listed.devices) == []


async def test_the_worker_refuses_undecodable_requests(
    control: ControlUnderTest, sim_root: Path
) -> None:
    async with simulated_worker(control.address, sim_root, 1) as (worker, _farm):
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        held = token_metadata((await reserve_ready(control, "alice", 1)).token)
        address = f"127.0.0.1:{worker.port}"
        for method in ("SetMode", "GetDeviceInfo", "RebootDevice", "Export"):
            assert_refused(await call_raw_unary(address, f"/icefarm.v1.WorkerService/{method}"))
        assert_refused(await call_raw_stream(address, "/icefarm.v1.WorkerService/Evaluate", held))
        async with grpc.aio.insecure_channel(address) as channel:
            info = channel.unary_unary(
                "/icefarm.v1.WorkerService/GetDeviceInfo",
                request_serializer=wpb.GetDeviceInfoRequest.SerializeToString,
                response_deserializer=wpb.GetDeviceInfoResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await info(wpb.GetDeviceInfoRequest(device_id="sim-000"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # no token: served
