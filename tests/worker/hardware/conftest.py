"""Fixtures for the hardware tests: a running simulated farm and bitstreams."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from icefarm_worker.modes.protocol import BITSTREAM_SIZE
from icefarm_worker.simulator import SimulatedFarm

FLASH_TIMEOUT = 5.0


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[SimulatedFarm]:
    """Three simulated boards with a short firmware watchdog."""
    simulated = SimulatedFarm(3, tmp_path / "farm", watchdog=0.3)
    await simulated.start()
    yield simulated
    await simulated.stop()


def make_bitstream(seed: int) -> bytes:
    """A distinct, reproducible 104090-byte bitstream per seed."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (BITSTREAM_SIZE // len(block) + 1))[:BITSTREAM_SIZE]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
