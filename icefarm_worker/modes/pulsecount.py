"""`pulsecount`: the firmware loads the bitstream and counts the pulses it produces."""

from __future__ import annotations

from icefarm_worker.hardware.base import SerialLink
from icefarm_worker.modes.base import Measurement
from icefarm_worker.modes.bitstream import BitstreamMode
from icefarm_worker.modes.protocol import parse_pulses, wait_for


class PulseCountMode(BitstreamMode):
    """Answers `... pulses: N`; the measurement is N."""

    name = "pulsecount"
    firmware = "pulsecount"

    async def read_answer(self, link: SerialLink, deadline: float) -> Measurement:
        """The pulse count from the firmware's answer."""
        line = await wait_for(
            link, lambda text: parse_pulses(text) is not None, "pulse count", deadline
        )
        count = parse_pulses(line)
        assert count is not None  # wait_for only returns accepted lines
        return Measurement(pulse_count=count)
