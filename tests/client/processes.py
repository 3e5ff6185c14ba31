"""Real control and worker processes for the client tests (SQLite in a temporary directory,
simulated boards), each logging to a file, stopped by the pid we started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icefarm_control.launch import start_control_process

BIN = Path(sys.executable).parent
# Second-scale worker liveness, so a killed worker is noticed quickly.
CONTROL_FLAGS = ("--offline-timeout", "2s", "--worker-grace", "2s", "--heartbeat-interval", "0.3s")


@dataclass
class Process:
    """A child process and where it logs."""

    popen: subprocess.Popen[bytes]
    address: str
    log: Path

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=15)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM; the exit code (SIGKILL after `timeout`)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=15)


@dataclass
class Processes:
    """Everything a test started; all stopped at the end."""

    root: Path
    started: list[Process] = field(default_factory=list)

    def control(self, database: Path | None = None, port: int = 0, *extra: str) -> Process:
        """`icefarm-control serve` on SQLite (a new file unless `database` is given)."""
        database = database or self.root / "control.db"
        log = self.root / f"control-{len(self.started)}.log"
        popen, address = start_control_process(
            f"sqlite:///{database}", log, *CONTROL_FLAGS, "--listen", f"127.0.0.1:{port}", *extra
        )
        process = Process(popen, address, log)
        self.started.append(process)
        return process

    def worker(self, control: str, boards: int, name: str = "lab-a", *extra: str) -> Process:
        """`icefarm-worker run --simulate N`; returns once it serves WorkerService."""
        log = self.root / f"worker-{name}-{len(self.started)}.log"
        command = [
            str(BIN / "icefarm-worker"), "run", "--simulate", str(boards), "--control", control,
            "--name", name, "--listen", "127.0.0.1:0", "--log-format", "json",
            "--reconnect-max", "0.5s", "--evaluate-timeout", "2s", *extra,
        ]  # fmt: skip
        with log.open("wb") as out:
            popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        process = Process(popen, "", log)
        self.started.append(process)
        record = wait_for_log(process, "worker serving")
        process.address = str(record["endpoint"])
        return process

    def stop_all(self) -> None:
        """Kill whatever is still running, newest first."""
        for process in reversed(self.started):
            process.kill()


def wait_for_log(process: Process, event: str, timeout: float = 30) -> dict[str, Any]:
    """The first JSON log record of `event`; AssertionError if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in process.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                return dict(record)
        if process.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in {process.log}:\n{process.log.read_text()[-3000:]}")


def eventually(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


def cli_env(control: str, client_id: str = "cli-user") -> dict[str, str]:
    """The environment for an `icefarm` subprocess."""
    return {**os.environ, "ICEFARM_CONTROL": control, "ICEFARM_CLIENT_ID": client_id}
