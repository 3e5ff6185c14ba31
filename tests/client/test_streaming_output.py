"""`icefarm evaluate --jsonl/--csv` writes each result the moment it arrives: a run stopped with
Ctrl-C keeps every line written so far (it used to leave an empty file), releases its
reservation and exits 130 with one line, and leaves no asyncio task pending behind it."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import icefarm_client as ic
from tests.client.bitstreams import bitstream
from tests.client.conftest import wait_available
from tests.client.processes import BIN, Processes, cli_env, eventually

Clients = Callable[..., ic.Client]
ICEFARM = str(BIN / "icefarm")
FILES = 60
BOARDS = 4
# Each simulated board takes this long per bitstream: 60 files on 4 boards take ~4 s, long
# enough to be stopped half-way.
CIRCUIT_TIME = "0.25s"
RESULT_KEYS = {"bitstream_id", "device_id", "pulse_count", "variance", "error", "attempt",
               "queue_duration", "run_duration", "worker"}  # fmt: skip


@pytest.fixture
def slow_farm(procs: Processes, clients: Clients) -> str:
    control = procs.control()
    procs.worker(control.address, BOARDS, "lab-s", "--simulate-circuit-time", CIRCUIT_TIME)
    wait_available(clients(control.address, "fixture"), BOARDS)
    return control.address


def bitstream_files(root: Path, count: int) -> list[str]:
    files = []
    for i in range(count):
        path = root / f"design{i:02d}.bin"
        path.write_bytes(bitstream(700 + i))
        files.append(str(path))
    return files


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def interrupt_when(
    command: list[str], out: Path, err: Path, address: str, client_id: str, ready: int
) -> subprocess.Popen[bytes]:
    """Start `command` with stdout to `out`; SIGINT once `out` has `ready` lines."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env=cli_env(address, client_id)
        )
    try:
        eventually(lambda: len(lines_of(out)) >= ready, 60, f"{ready} lines in {out.name}")
    except AssertionError:
        process.kill()
        process.wait()
        raise AssertionError(err.read_text()) from None
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    return process


def assert_released(address: str, clients: Clients, client_id: str) -> None:
    owner = clients(address, client_id)
    assert owner.reservations() == []  # released before the command exited
    (ended,) = owner.reservations(include_ended=True)
    assert ended.end_reason is ic.EndReason.RELEASED


def test_an_interrupted_evaluate_keeps_every_jsonl_line_written_and_releases(
    slow_farm: str, clients: Clients, tmp_path: Path
) -> None:
    files = bitstream_files(tmp_path, FILES)
    # A 1-in-8 race (a task left pending at exit) is likely to show in three runs.
    for run in range(3):
        out, err = tmp_path / f"results{run}.jsonl", tmp_path / f"stderr{run}.txt"
        client_id = f"interrupted-{run}"
        command = [ICEFARM, "evaluate", *files, "--jsonl", "--count", str(BOARDS)]
        process = interrupt_when(command, out, err, slow_farm, client_id, ready=4 + 3 * run)
        stderr = err.read_text()
        assert process.returncode == 130, stderr
        assert stderr.strip().splitlines() == ["icefarm: interrupted"], stderr
        assert "Task was destroyed" not in stderr
        written = out.read_text()
        assert written.endswith("\n")  # no half-written line
        records = [json.loads(line) for line in written.splitlines()]
        assert 0 < len(records) < FILES
        for record in records:
            assert set(record) == RESULT_KEYS
            assert record["error"] == "" and record["pulse_count"] is not None
        assert len({r["bitstream_id"] for r in records}) == len(records)
        assert_released(slow_farm, clients, client_id)
        wait_available(clients(slow_farm, f"watcher-{run}"), BOARDS)


def test_an_interrupted_csv_evaluate_keeps_its_header_and_rows(
    slow_farm: str, clients: Clients, tmp_path: Path
) -> None:
    files = bitstream_files(tmp_path, FILES)
    out, err = tmp_path / "results.csv", tmp_path / "stderr.txt"
    command = [ICEFARM, "evaluate", *files, "--csv", "--count", str(BOARDS)]
    process = interrupt_when(command, out, err, slow_farm, "csv-user", ready=5)
    assert process.returncode == 130, err.read_text()
    assert "Task was destroyed" not in err.read_text()
    header, *rows = list(csv.reader(out.read_text().splitlines()))
    assert header == ["bitstream_id", "device_id", "value", "attempt", "run_ms", "error"]
    assert 4 <= len(rows) < FILES
    assert all(len(row) == len(header) and row[2] and not row[5] for row in rows)
    assert_released(slow_farm, clients, "csv-user")


def test_streamed_lines_come_before_the_run_ends(
    slow_farm: str, clients: Clients, tmp_path: Path
) -> None:
    files = bitstream_files(tmp_path, 24)
    out, err = tmp_path / "results.jsonl", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [ICEFARM, "evaluate", *files, "--jsonl", "--count", str(BOARDS)],
            stdout=stdout, stderr=stderr, env=cli_env(slow_farm, "streaming"),
        )  # fmt: skip
    try:
        # Lines are in the file while the command still runs.
        eventually(lambda: lines_of(out), 60, "a first line")
        assert process.poll() is None
        assert process.wait(timeout=60) == 0, err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in lines_of(out)]
    assert sorted(r["bitstream_id"] for r in records) == sorted(files)
    assert "Task was destroyed" not in err.read_text()


def test_only_one_output_format_at_a_time(slow_farm: str, tmp_path: Path) -> None:
    path = tmp_path / "one.bin"
    path.write_bytes(bitstream(1))
    done = subprocess.run(
        [ICEFARM, "evaluate", str(path), "--csv", "--jsonl"], capture_output=True, text=True,
        timeout=60, env=cli_env(slow_farm), check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "icefarm: error: evaluate: choose one of --json, --csv, --jsonl"
