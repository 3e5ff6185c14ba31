"""Fixtures for the worker daemon tests: a real control (SQLite, in this process), a simulated
farm, and the real worker wired to both over gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.worker.daemon.harness import ControlUnderTest, running_control


@pytest.fixture
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLite only: these tests are about the worker, not the storage back ends."""
    yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'control.db'}"


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[ControlUnderTest]:
    """A control with a short heartbeat and a command timeout long enough to flash boards."""
    async with running_control(database_url) as running:
        yield running


@pytest.fixture
def sim_root(tmp_path: Path) -> Path:
    # pty symlinks and UF2 drives live here; keep the path short.
    return tmp_path
