"""Fixtures for the client tests: a real control process on SQLite and a real worker process
with simulated boards (started fresh for each test, stopped by the pids started), and clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import icefarm_client as ic
from tests.client.processes import Process, Processes, eventually

BOARDS = 4


@dataclass
class RunningFarm:
    """A control and one worker with simulated boards, all AVAILABLE."""

    procs: Processes
    control: Process
    worker: Process

    @property
    def address(self) -> str:
        return self.control.address


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


def wait_available(client: ic.Client, count: int, selector: str = "") -> None:
    """Poll until `count` devices matching `selector` are AVAILABLE."""
    eventually(
        lambda: len(client.devices(selector, ic.DeviceState.AVAILABLE)) >= count,
        what=f"{count} boards available",
    )


@pytest.fixture
def clients() -> Iterator[Callable[..., ic.Client]]:
    """make(address, client_id, **options) → a Client closed at the end of the test."""
    made: list[ic.Client] = []

    def make(address: str, client_id: str, **options: object) -> ic.Client:
        client = ic.Client(address, client_id=client_id, **options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def farm(procs: Processes, clients: Callable[..., ic.Client]) -> RunningFarm:
    control = procs.control()
    worker = procs.worker(control.address, BOARDS)
    wait_available(clients(control.address, "fixture"), BOARDS)
    return RunningFarm(procs, control, worker)
