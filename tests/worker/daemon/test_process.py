"""`icefarm-worker` as a real process against a real control process: it comes up with
simulated boards, serves a reservation, and `icefarm-worker drain` makes it exit 0. Bad
settings are one line on stderr and exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from icefarm.v1 import types_pb2 as tpb
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_worker.simulator import expected_pulse_count
from tests.integration.conftest import BIN, ControlProcess, start_control_process
from tests.integration.worker_farm import FAST_FLAGS, connected, release
from tests.worker.daemon.harness import all_in_state, bitstream, evaluate, reserve_ready

WORKER = str(BIN / "icefarm-worker")


@pytest.fixture
def control_process(database_url: str) -> Iterator[ControlProcess]:
    process = start_control_process(database_url, *FAST_FLAGS)
    yield process
    process.process.kill()
    process.process.wait(timeout=10)
    assert process.process.stdout is not None
    process.process.stdout.close()


async def wait_for_log(stream: asyncio.StreamReader, event: str) -> dict[str, object]:
    while True:
        line = await asyncio.wait_for(stream.readline(), 30)
        assert line, f"the worker exited before logging {event!r}"
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            return dict(record)


async def test_a_worker_process_serves_a_reservation_and_drains_to_exit_0(
    control_process: ControlProcess, tmp_path: Path
) -> None:
    pid_file = tmp_path / "worker.pid"
    worker = await asyncio.create_subprocess_exec(
        WORKER,
        "run",
        "--simulate",
        "2",
        "--control",
        control_process.address,
        "--name",
        "rack-1",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--pid-file",
        str(pid_file),
        stderr=asyncio.subprocess.PIPE,
    )
    assert worker.stderr is not None
    try:
        serving = await wait_for_log(worker.stderr, "worker serving")
        logs = asyncio.create_task(worker.stderr.read())  # keep the pipe drained
        async with connected(control_process.address) as control:
            boards = await all_in_state(control, 2, tpb.DEVICE_STATE_AVAILABLE)
            assert boards[0].worker_endpoint == serving["endpoint"]
            answer = await reserve_ready(control, "alice", 2)
            async with connected(str(serving["endpoint"])) as worker_channel:
                stub = wpb_grpc.WorkerServiceStub(worker_channel.channel)
                items = [wpb.Bitstream(id=str(i), data=bitstream(i)) for i in range(6)]
                results = await evaluate(stub, answer.token, items)
            assert [r.pulse_count for r in sorted(results, key=lambda r: int(r.bitstream_id))] == [
                expected_pulse_count(bitstream(i)) for i in range(6)
            ]
            await release(control, "alice", answer.reservation.id)
        drain = await asyncio.create_subprocess_exec(
            WORKER, "drain", "--pid-file", str(pid_file), "--wait", "30s"
        )
        assert await asyncio.wait_for(drain.wait(), 40) == 0
        assert await asyncio.wait_for(worker.wait(), 10) == 0
        assert "drain complete" in (await logs).decode()
        assert not pid_file.exists()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--control", "nowhere"], "--control: 'nowhere' is not HOST:PORT"),
        (["--simulate", "-1"], "--simulate: must be a whole number"),
        (["--firmware", "default=/no/such.uf2"], "firmware default: /no/such.uf2 is not a file"),
        (["--evaluate-timeout", "soon"], "--evaluate-timeout: 'soon' is not a duration"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run([WORKER, "run", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"icefarm-worker: {done.stderr.strip()[16:]}"]
    assert message in done.stderr


def test_an_unknown_setting_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        'simulate = 2\ncolour = "blue"\n[simulator.faults]\n"sim-000" = "no-answer"\n'
    )
    done = subprocess.run(
        [WORKER, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "unknown setting 'colour'" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_shows_defaults_as_written() -> None:
    done = subprocess.run([WORKER, "run", "--help"], capture_output=True, text=True, timeout=30)
    text = " ".join(done.stdout.split())
    assert "(default: 10s) [ICEFARM_WORKER_EVALUATE_TIMEOUT]" in text
    assert "(default: 127.0.0.1:50051) [ICEFARM_WORKER_CONTROL]" in text


def test_help_documents_every_setting() -> None:
    from icefarm_worker.config import SETTINGS

    done = subprocess.run([WORKER, "run", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in done.stdout
        assert setting.env in done.stdout


def test_a_fault_for_a_board_the_worker_does_not_have_is_one_line_naming_its_boards(
    tmp_path: Path,
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('simulate = 2\nname = "lab-z"\n[simulator.faults]\n"sim-000" = "no-answer"\n')
    done = subprocess.run(
        [WORKER, "run", "--config", str(config), "--control", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "icefarm-worker: simulator.faults: no simulated board 'sim-000' "
        "(this worker's boards are lab-z-sim-000 … lab-z-sim-001)"
    ]


def test_an_unknown_worker_variable_is_warned_about_naming_the_closest_setting() -> None:
    done = subprocess.run(
        [WORKER, "run", "--simulate", "1", "--simulate-circuit-time", "bogus"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "ICEFARM_WORKER_SIMULAT": "3", "ICEFARM_CONTROL": "x:1"},
    )  # fmt: skip
    assert done.returncode == 2  # the bad setting still stops it, after the warning
    warning, error = done.stderr.strip().splitlines()
    assert warning == (
        "icefarm-worker: warning: unknown environment variable ICEFARM_WORKER_SIMULAT "
        "(did you mean ICEFARM_WORKER_SIMULATE?): ignored"
    )
    assert "simulate-circuit-time" in error
