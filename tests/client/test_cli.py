"""`icefarm` as a real subprocess against a real control and worker: output, the --json
schema, exit codes, and bad input (never a traceback)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from icefarm_worker.simulator.firmware import expected_pulse_count
from tests.client.bitstreams import bitstream
from tests.client.conftest import BOARDS, RunningFarm
from tests.client.processes import BIN, cli_env, eventually

ICEFARM = str(BIN / "icefarm")


def icefarm(
    *args: str, control: str = "127.0.0.1:1", client_id: str = "cli-user"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ICEFARM, *args], capture_output=True, text=True, timeout=60,
        env=cli_env(control, client_id), check=False,
    )  # fmt: skip


def ok_json(*args: str, control: str) -> object:
    done = icefarm(*args, "--json", control=control)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int = 1) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_farm_listings_for_people_and_for_scripts(farm: RunningFarm) -> None:
    status = ok_json("status", control=farm.address)
    assert isinstance(status, dict)
    assert status["workers"] == 1 and status["devices"] == 4 and status["available"] == 4
    workers = icefarm("workers", control=farm.address)
    assert workers.returncode == 0 and "lab-a" in workers.stdout and "ONLINE" in workers.stdout
    devices = ok_json("devices", "kind=pico2-ice", control=farm.address)
    assert isinstance(devices, list) and len(devices) == 4
    assert set(devices[0]) >= {"id", "worker", "kind", "state", "labels", "holder", "error"}
    assert {d["state"] for d in devices} == {"AVAILABLE"}


def test_reserve_extend_release_through_the_cli(farm: RunningFarm) -> None:
    reserved = ok_json("reserve", "2", "--mode", "pulsecount", "--duration", "20m",
                       control=farm.address)  # fmt: skip
    assert isinstance(reserved, dict)
    assert set(reserved) >= {"id", "client_id", "devices", "end_time", "state", "token"}
    assert reserved["client_id"] == "cli-user" and len(reserved["devices"]) == 2
    # Held after the CLI process exited.
    listed = ok_json("reservations", control=farm.address)
    assert isinstance(listed, list) and [r["id"] for r in listed] == [reserved["id"]]
    extended = ok_json("extend", reserved["id"], "--duration", "1h", control=farm.address)
    assert isinstance(extended, list) and extended[0]["end_time"] > reserved["end_time"]
    table = icefarm("reservations", control=farm.address)
    assert reserved["id"] in table.stdout and "ACTIVE" in table.stdout
    released = ok_json("release", "--all", control=farm.address)
    assert isinstance(released, dict) and released["ended_reservation_ids"] == [reserved["id"]]
    assert ok_json("reservations", control=farm.address) == []


def test_evaluate_files_prints_results(farm: RunningFarm, tmp_path: Path) -> None:
    files = []
    for i in range(4):
        path = tmp_path / f"design{i}.bin"
        path.write_bytes(bitstream(400 + i))
        files.append(str(path))
    results = ok_json("evaluate", *files, "--count", "2", control=farm.address)
    assert isinstance(results, list) and [r["bitstream_id"] for r in results] == files
    for result in results:
        assert set(result) >= {"bitstream_id", "device_id", "pulse_count", "variance", "error",
                               "attempt", "queue_duration", "run_duration"}  # fmt: skip
        assert result["pulse_count"] == expected_pulse_count(
            Path(result["bitstream_id"]).read_bytes()
        )
    csv_out = icefarm("evaluate", *files[:2], "--csv", control=farm.address)
    assert csv_out.returncode == 0, csv_out.stderr
    assert csv_out.stdout.splitlines()[0] == "bitstream_id,device_id,value,attempt,run_ms,error"
    assert len(csv_out.stdout.splitlines()) == 3


def test_watch_prints_the_live_feed(farm: RunningFarm) -> None:
    watch = subprocess.Popen(
        [ICEFARM, "watch", "--json", "--limit", "1"], stdout=subprocess.PIPE, text=True,
        env=cli_env(farm.address),
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        # Events are produced until the feed has shown one.
        while watch.poll() is None:
            reserved = ok_json("reserve", "1", control=farm.address)
            assert isinstance(reserved, dict)
            ok_json("release", reserved["id"], control=farm.address)
            try:
                watch.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
        event = json.loads(watch.stdout.readline())
        assert set(event) >= {"type", "sequence", "time"} and event["sequence"] > 0
        assert watch.returncode == 0
    finally:
        watch.kill()
        watch.wait()


def test_bad_input_exit_codes_and_one_line_errors(farm: RunningFarm) -> None:
    usage = icefarm("status", "--no-such-flag", control=farm.address)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert usage.stderr.splitlines()[-1] == "icefarm: error: unrecognized arguments: --no-such-flag"
    assert icefarm("no-such-command").returncode == 2
    assert icefarm("reserve", control=farm.address).returncode == 2
    assert icefarm("reserve", "1", "--wait", "soon", control=farm.address).returncode == 2
    bad = icefarm("devices", "kind=>pico2-ice", control=farm.address)
    assert_one_line_error(bad)
    assert "position 4" in bad.stderr
    too_many = icefarm("reserve", "9", control=farm.address)
    assert_one_line_error(too_many)
    # Wanted, matching and free, in so many words.
    assert f"9 device(s) wanted but the farm has only {BOARDS}" in too_many.stderr
    assert "free)" in too_many.stderr
    unknown = icefarm("release", "no-such-reservation", control=farm.address)
    assert unknown.returncode in (0, 1) and "Traceback" not in unknown.stderr


def test_enum_options_list_their_choices_and_durations_read_as_written(farm: RunningFarm) -> None:
    bogus = icefarm("devices", "--state", "bogus", control=farm.address)
    assert bogus.returncode == 2 and "Traceback" not in bogus.stderr
    assert "invalid choice: 'bogus' (choose from 'discovered'," in bogus.stderr
    upper = icefarm("devices", "--state", "AVAILABLE", "--json", control=farm.address)
    assert upper.returncode == 0, upper.stderr
    assert {d["state"] for d in json.loads(upper.stdout)} == {"AVAILABLE"}
    long = icefarm("reserve", "1", "--duration", "30d", control=farm.address)
    assert_one_line_error(long)
    assert "must be at most 7d" in long.stderr


def test_a_waiting_reserve_says_it_is_queued_and_hints_repeat_the_connection(
    farm: RunningFarm,
) -> None:
    held = icefarm("reserve", str(BOARDS), control=farm.address, client_id="hog")
    assert held.returncode == 0, held.stderr
    waiting = icefarm("reserve", "1", "--wait", "2s", control=farm.address, client_id="bob")
    assert waiting.returncode == 1
    first, *rest = waiting.stderr.strip().splitlines()
    assert first == "queued: waiting up to 2s for 1 device(s) (0 free now)"
    assert len(rest) == 1 and "Traceback" not in waiting.stderr  # then the one-line timeout
    # The hint works as printed, also when the connection was given on the command line.
    done = subprocess.run(
        [ICEFARM, "reserve", "1", "--control", farm.address, "--client-id", "carol"],
        capture_output=True, text=True, timeout=60, env={**cli_env("127.0.0.1:1")},
    )  # fmt: skip
    assert done.returncode == 1  # nothing free yet: the hog holds every board
    icefarm("release", "--all", control=farm.address, client_id="hog")
    wait_available_cli(farm.address)
    done = subprocess.run(
        [ICEFARM, "reserve", "1", "--control", farm.address, "--client-id", "carol"],
        capture_output=True, text=True, timeout=60, env={**cli_env("127.0.0.1:1")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    hint = done.stdout.strip().splitlines()[-1].removeprefix("release with: ")
    assert f"--control {farm.address}" in hint and "--client-id carol" in hint
    released = subprocess.run(
        shlex.split(hint), capture_output=True, text=True, timeout=60,
        env={**cli_env("127.0.0.1:1"), "PATH": f"{BIN}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert released.returncode == 0, released.stderr


def wait_available_cli(address: str) -> None:
    """Until a board is free again (released boards are flashed back first)."""

    def one_free() -> bool:
        found = ok_json("devices", "--state", "available", control=address)
        return isinstance(found, list) and len(found) > 0

    eventually(one_free, what="a free board")


def test_help_shows_defaults() -> None:
    done = icefarm("evaluate", "--help")
    assert done.returncode == 0
    assert "(default: 2)" in done.stdout  # --in-flight
    assert "(default: pulsecount)" in done.stdout


def test_a_control_address_without_a_port_gets_the_default_port() -> None:
    from icefarm_client.connection import control_target

    assert control_target("127.0.0.1") == "127.0.0.1:50051"  # not gRPC's 443
    assert control_target("control.lab") == "control.lab:50051"
    assert control_target("[::1]") == "[::1]:50051"
    assert control_target("10.0.0.1:6000,10.0.0.2") == "ipv4:10.0.0.1:6000,10.0.0.2:50051"
    assert control_target("ipv4:127.0.0.1:7,127.0.0.1:8") == "ipv4:127.0.0.1:7,127.0.0.1:8"
    done = icefarm("status", control="127.0.0.2")  # nothing listens there
    assert_one_line_error(done)
    assert "127.0.0.2:50051" in done.stderr


def test_an_unreachable_control_is_one_line_and_exit_1() -> None:
    done = icefarm("status", control="127.0.0.1:1")
    assert_one_line_error(done)
    assert "unavailable" in done.stderr


@pytest.mark.skipif(shutil.which("usbip") is not None, reason="usbip is installed here")
def test_attach_without_the_usbip_tool_says_so(farm: RunningFarm) -> None:
    done = icefarm("attach", "some-reservation", control=farm.address)
    assert_one_line_error(done)
    assert "usbip" in done.stderr


def test_completion_scripts() -> None:
    bash = icefarm("completion", "bash")
    assert bash.returncode == 0 and "complete -o default -F _icefarm icefarm" in bash.stdout
    assert "evaluate)" in bash.stdout and "--json" in bash.stdout
    zsh = icefarm("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef icefarm")


def test_the_demo_runs_end_to_end() -> None:
    done = subprocess.run([ICEFARM, "demo", "--boards", "4", "--count", "2", "--bitstreams", "8"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ 8/8 results match" in done.stdout
    assert "icefarm demo --keep-running" in done.stdout  # the commands to try come with it
    assert "stopped the worker and the control" in done.stdout
    assert "Task was destroyed" not in done.stdout + done.stderr
