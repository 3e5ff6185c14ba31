"""The simulated firmwares: their UF2 images, what they compute, and their emulators.

The measurements are deterministic functions of the bitstream bytes, so a test can check that
each result belongs to its bitstream:

- pulse count = `int.from_bytes(sha256(bitstream)[:4], "big") % 100_000`
- samples: `random.Random(sha256(bitstream).digest())`; amplitude `1 + digest[4]`; each of the
  500 samples is `2048 + rng.randint(-amplitude, amplitude)` (a 12-bit ADC around mid-scale);
  the variance figure is their mean absolute consecutive difference (`mean_abs_difference`).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from icefarm_worker.modes.protocol import (
    BITSTREAM_SIZE,
    CHUNK_SIZE,
    DEFAULT_FIRMWARE_LINE,
    SAMPLE_COUNT,
    WAITING_LINE,
    mean_abs_difference,
    pulses_line,
    samples_line,
    watchdog_line,
)
from icefarm_worker.simulator import uf2
from icefarm_worker.simulator.faults import Fault, FaultState

MARKER = b"ICEFARM-SIM-FIRMWARE:"
FIRMWARES = ("default", "pulsecount", "varmax")
DEFAULT_PERIOD = 0.1
# While idle the evaluating firmwares repeat their announcement, so a port opened late hears it.
ANNOUNCE_PERIOD = 0.2


def expected_pulse_count(bitstream: bytes) -> int:
    """The pulse count the simulated pulsecount firmware reports for `bitstream`."""
    return int.from_bytes(hashlib.sha256(bitstream).digest()[:4], "big") % 100_000


def expected_samples(bitstream: bytes) -> list[int]:
    """The 500 ADC samples the simulated varmax firmware reports for `bitstream`."""
    digest = hashlib.sha256(bitstream).digest()
    rng = random.Random(digest)
    amplitude = 1 + digest[4]
    return [2048 + rng.randint(-amplitude, amplitude) for _ in range(SAMPLE_COUNT)]


def expected_variance(bitstream: bytes) -> float:
    """The varmax value for `bitstream`: mean absolute difference of its samples."""
    return mean_abs_difference(expected_samples(bitstream))


def firmware_image(name: str) -> bytes:
    """A UF2 image the emulator boots as firmware `name` (the marker plus some filler)."""
    payload = MARKER + name.encode() + b"\n" + bytes(range(256)) * 8
    return uf2.encode(payload)


def firmware_name(payload: bytes) -> str | None:
    """Which simulated firmware a flashed payload is; None for an image we cannot emulate."""
    if not payload.startswith(MARKER):
        return None
    name = payload[len(MARKER) :].split(b"\n", 1)[0].decode(errors="replace")
    return name if name in FIRMWARES else None


class FirmwareIO(Protocol):
    """The firmware's side of the CDC port, plus the board's faults."""

    faults: FaultState
    watchdog: float
    # How long the circuit runs on the board before the answer (the measurement window).
    circuit_seconds: float

    async def read(self, timeout: float, limit: int) -> bytes | None:
        """Up to `limit` bytes, None after `timeout` seconds of silence."""
        ...

    def send_line(self, line: str) -> None:
        """Queue one line for the host (dropped when the host reads nothing for long)."""
        ...

    def unplug(self) -> None:
        """Make the whole board vanish."""
        ...


Firmware = Callable[[FirmwareIO], Coroutine[Any, Any, None]]


async def run_default(io: FirmwareIO) -> None:
    """Prints `default firmware` every 100 ms and ignores its input."""
    while True:
        io.send_line(DEFAULT_FIRMWARE_LINE)
        await asyncio.sleep(DEFAULT_PERIOD)


async def run_silent(io: FirmwareIO) -> None:
    """A valid image we cannot emulate: it runs, and says nothing."""
    await asyncio.Event().wait()


@dataclass
class DeviceTime:
    """How long this process's emulated boards were busy with bitstreams: from the first bytes
    of each one received to its answer sent (the transfer and the circuit — the device's own
    time, against which the worker's overhead is measured by bench/evaluate.py)."""

    evaluations: int = 0
    busy_seconds: float = 0.0

    def record(self, seconds: float) -> None:
        self.evaluations += 1
        self.busy_seconds += seconds


DEVICE_TIME = DeviceTime()


async def _evaluate_forever(io: FirmwareIO, answer: Callable[[bytes], str]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        io.send_line(WAITING_LINE)
        first = await io.read(ANNOUNCE_PERIOD, BITSTREAM_SIZE)
        if first is None:
            continue
        began = loop.time()
        fault = io.faults.on_evaluation()
        if fault is Fault.UNPLUG:
            io.unplug()
            return
        received = bytearray(first)
        while len(received) < BITSTREAM_SIZE:
            chunk = await io.read(io.watchdog, BITSTREAM_SIZE - len(received))
            if chunk is None:
                break
            received += chunk
        if len(received) < BITSTREAM_SIZE:
            io.send_line(watchdog_line(len(received)))
        elif fault is Fault.SHORT_READ:
            io.send_line(watchdog_line(BITSTREAM_SIZE - CHUNK_SIZE))
        elif fault is Fault.NO_ANSWER:
            await asyncio.Event().wait()  # hung until the next reflash
        else:
            if io.circuit_seconds > 0:
                await asyncio.sleep(io.circuit_seconds)
            if fault is Fault.SLOW:
                await asyncio.sleep(io.faults.delay)
            io.send_line(answer(bytes(received)))
            DEVICE_TIME.record(loop.time() - began)


async def run_pulsecount(io: FirmwareIO) -> None:
    """Takes bitstreams, answers `Bitstream loaded, pulses: N`."""
    await _evaluate_forever(io, lambda bits: pulses_line(expected_pulse_count(bits)))


async def run_varmax(io: FirmwareIO) -> None:
    """Takes bitstreams, answers `ADC samples: s1,...,s500`."""
    await _evaluate_forever(io, lambda bits: samples_line(expected_samples(bits)))


EMULATORS: dict[str, Firmware] = {
    "default": run_default,
    "pulsecount": run_pulsecount,
    "varmax": run_varmax,
}
