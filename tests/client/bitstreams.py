"""Deterministic bitstreams for the tests (the simulator's results depend only on the bytes)."""

from __future__ import annotations

import hashlib

from icefarm.limits import PICO2_ICE_BITSTREAM_BYTES

BITSTREAM_SIZE = PICO2_ICE_BITSTREAM_BYTES


def bitstream(seed: int) -> bytes:
    """A 104090-byte pseudo-random bitstream, different for each seed."""
    block = hashlib.sha256(f"client-test-{seed}".encode()).digest()
    return (block * (BITSTREAM_SIZE // len(block) + 1))[:BITSTREAM_SIZE]
