"""The serial protocol of the evaluation firmwares (pulsecount, varmax): one definition of each
line format, shared by the modes and by the simulator's firmware emulators.

    firmware: Waiting for bitstream transfer              (after boot and after each answer)
    host:     104090 bytes of bitstream (the firmware reads it in 512-byte chunks)
    firmware: Bitstream loaded, pulses: 12345             (pulsecount)
              ADC samples: 2048,2051,2040,...             (varmax: 500 integers, 100 µs apart)
              Watchdog timeout, 1024 bytes received of 104090   (the transfer stalled)
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Sequence

from icefarm.limits import PICO2_ICE_BITSTREAM_BYTES
from icefarm_worker.hardware.base import SerialLink, SerialTimeout
from icefarm_worker.modes.base import EvaluationFailed

BITSTREAM_SIZE = PICO2_ICE_BITSTREAM_BYTES
CHUNK_SIZE = 512
SAMPLE_COUNT = 500
WAITING_LINE = "Waiting for bitstream transfer"
DEFAULT_FIRMWARE_LINE = "default firmware"
PULSES_PREFIX = "Bitstream loaded, pulses: "
SAMPLES_PREFIX = "ADC samples: "
_PULSES = re.compile(r"pulses:\s*(\d+)\s*$")
_WATCHDOG = re.compile(r"Watchdog timeout, (\d+) bytes received of (\d+)")


def pulses_line(count: int) -> str:
    """The pulsecount firmware's answer."""
    return f"{PULSES_PREFIX}{count}"


def samples_line(samples: Sequence[int]) -> str:
    """The varmax firmware's answer."""
    return SAMPLES_PREFIX + ",".join(str(sample) for sample in samples)


def watchdog_line(received: int, expected: int = BITSTREAM_SIZE) -> str:
    """What either firmware says when the transfer stalls."""
    return f"Watchdog timeout, {received} bytes received of {expected}"


def parse_pulses(line: str) -> int | None:
    """N from a `... pulses: N` line, None for any other line."""
    match = _PULSES.search(line)
    return int(match.group(1)) if match else None


def parse_samples(line: str) -> list[int] | None:
    """The samples of an `ADC samples: ...` line, None for any other line; EvaluationFailed
    when the line is one but garbled."""
    if not line.startswith(SAMPLES_PREFIX):
        return None
    try:
        samples = [int(field) for field in line[len(SAMPLES_PREFIX) :].split(",")]
    except ValueError:
        raise EvaluationFailed(f"garbled sample line: {line[:80]!r}") from None
    if len(samples) != SAMPLE_COUNT:
        raise EvaluationFailed(f"expected {SAMPLE_COUNT} samples, got {len(samples)}")
    return samples


def mean_abs_difference(samples: Sequence[int]) -> float:
    """The varmax value: the mean absolute difference of consecutive samples."""
    if len(samples) < 2:
        raise ValueError("need at least two samples")
    total = sum(abs(b - a) for a, b in itertools.pairwise(samples))
    return total / (len(samples) - 1)


def check_bitstream(bitstream: bytes) -> None:
    """A bitstream of the wrong size is the caller's fault, found before touching the board."""
    if len(bitstream) != BITSTREAM_SIZE:
        raise EvaluationFailed(
            f"bitstream is {len(bitstream)} bytes, expected {BITSTREAM_SIZE}", board_fault=False
        )


async def wait_for(
    link: SerialLink, accept: Callable[[str], bool], what: str, deadline: float
) -> str:
    """Read lines until one is accepted (others are stale chatter) or the loop time reaches
    `deadline`. A watchdog line fails the evaluation; so does silence."""
    loop = asyncio.get_running_loop()
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise EvaluationFailed(f"no {what} from the board in time")
        try:
            line = await link.read_line(timeout=remaining)
        except SerialTimeout:
            raise EvaluationFailed(f"no {what} from the board in time") from None
        if accept(line):
            return line
        if _WATCHDOG.search(line):
            raise EvaluationFailed(f"short transfer: {line}")


async def send_bitstream(link: SerialLink, bitstream: bytes) -> None:
    """Send the bitstream in one write: the port's flow control paces it into the chunks the
    firmware reads, and one write per 512 bytes would cost the worker twice the CPU (a system
    call and an event-loop turn each; see docs/benchmarks.md, `bench/evaluate.py`)."""
    await link.write(bitstream)
