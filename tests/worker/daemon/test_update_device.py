"""UpdateDevice: only callers on loopback may change a device's labels and properties; an
unknown device or a key no selector could name is INVALID_ARGUMENT naming the field; the
`set-device` command turns bad flags into one line and exit 2, an absent worker into exit 1."""

from __future__ import annotations

import math
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_worker.app import WorkerApp
from icefarm_worker.backends import open_hardware
from icefarm_worker.cli import build_parser
from icefarm_worker.config import resolve
from icefarm_worker.service import is_loopback
from tests.grpc_errors import bad_fields_of
from tests.integration.conftest import BIN
from tests.integration.worker_farm import device, eventually
from tests.worker.daemon.harness import ControlUnderTest, all_in_state, worker_config
from tests.worker.daemon.test_devices_beyond_boards import GPU_BOX

WORKER = str(BIN / "icefarm-worker")


def this_hosts_address() -> str:
    """An address of this host that is not loopback (the one its default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # no packet is sent for a UDP connect
        except OSError:
            pytest.skip("this host has no address besides loopback")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("this host has no address besides loopback")
    return address


@pytest.fixture
async def worker(control: ControlUnderTest, tmp_path: Path) -> AsyncIterator[WorkerApp]:
    """A real worker listening on every interface, with `gpu-box-1` declared."""
    config_file = tmp_path / "worker.toml"
    config_file.write_text(GPU_BOX)
    args = build_parser().parse_args(
        ["run", "--config", str(config_file), "--boards", "none", "--gpus", "off"]
    )
    declared = resolve(args, environ={}).devices
    config = worker_config(
        control.address, listen="0.0.0.0:0", boards="none", gpus="off", devices=declared
    )
    app = WorkerApp(config, await open_hardware(config))
    await app.start()
    try:
        await all_in_state(control, 1, tpb.DEVICE_STATE_AVAILABLE)
        yield app
    finally:
        await app.stop(grace=0.5)


async def update(address: str, request: wpb.UpdateDeviceRequest) -> wpb.UpdateDeviceResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        answer: wpb.UpdateDeviceResponse = await wpb_grpc.WorkerServiceStub(channel).UpdateDevice(
            request, timeout=10
        )
        return answer


async def refused(address: str, request: wpb.UpdateDeviceRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await update(address, request)
    return raised.value


async def test_an_update_from_another_host_is_permission_denied_and_changes_nothing(
    control: ControlUnderTest, worker: WorkerApp
) -> None:
    outside = f"{this_hosts_address()}:{worker.port}"
    request = wpb.UpdateDeviceRequest(device_id="gpu-box-1", labels={"status": "stolen"})
    error = await refused(outside, request)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "loopback" in (error.details() or "")

    answer = await update(f"127.0.0.1:{worker.port}", request)
    assert answer.labels["status"] == "stolen"  # the same call from loopback is accepted

    async def seen() -> bool:
        return (await device(control, "gpu-box-1")).labels.get("status") == "stolen"

    await eventually(seen, timeout=5, what="the loopback update reaching the control")


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:56298", True),
        ("ipv4:127.9.9.9:1", True),
        ("ipv6:%5B::1%5D:37210", True),  # as gRPC writes it
        ("ipv6:[::1]:37210", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:80", True),
        ("unix:/run/icefarm.sock", True),
        ("ipv4:192.0.2.2:56298", False),
        ("ipv6:%5Bfd00::2%5D:37210", False),
        ("ipv6:%5B::ffff:192.0.2.2%5D:80", False),
        ("", False),
    ],
)
def test_only_loopback_peers_count_as_this_host(peer: str, local: bool) -> None:
    assert is_loopback(peer) is local


@pytest.mark.parametrize(
    ("request_fields", "field", "words"),
    [
        ({"device_id": "no-such-box"}, "device_id", "no device 'no-such-box'"),
        ({"device_id": ""}, "device_id", "is required"),
        ({"device_id": "gpu-box-1", "labels": {"bad key": "x"}}, "labels", "'bad key'"),
        ({"device_id": "gpu-box-1", "labels": {"kind": "x"}}, "labels", "device field"),
        ({"device_id": "gpu-box-1", "labels": {"ok": "a\x07b"}}, "labels", "control character"),
        ({"device_id": "gpu-box-1", "properties": {"load": math.inf}}, "properties", "finite"),
    ],
)
async def test_a_bad_update_is_invalid_argument_naming_the_field(
    worker: WorkerApp, request_fields: dict[str, object], field: str, words: str
) -> None:
    request = wpb.UpdateDeviceRequest(**request_fields)  # type: ignore[arg-type]
    error = await refused(f"127.0.0.1:{worker.port}", request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields_of(error) == [field]
    assert words in (error.details() or "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--label", "status"], "--label 'status': must be KEY=VALUE"),
        (["--label", "bad key=1"], "is not a selector key"),
        (["--property", "load=high"], "'high' is not a number"),
        (["--property", "load=inf"], "must be a finite number"),
    ],
)
def test_set_device_with_bad_flags_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [WORKER, "set-device", "gpu-box-1", *args, "--worker", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr


def test_set_device_without_a_worker_is_one_line_and_exit_1() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    done = subprocess.run(
        [WORKER, "set-device", "gpu-box-1", "--label", "a=b", "--worker", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"icefarm-worker: set-device: no worker answering at 127.0.0.1:{port} (--worker HOST:PORT)"
    )
