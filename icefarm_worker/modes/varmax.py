"""`varmax`: the firmware loads the bitstream and samples its output with the ADC."""

from __future__ import annotations

from icefarm_worker.hardware.base import SerialLink
from icefarm_worker.modes.base import Measurement
from icefarm_worker.modes.bitstream import BitstreamMode
from icefarm_worker.modes.protocol import (
    SAMPLES_PREFIX,
    mean_abs_difference,
    parse_samples,
    wait_for,
)


class VarMaxMode(BitstreamMode):
    """Answers `ADC samples: s1,...,s500` (100 µs apart); the measurement is the mean absolute
    difference of consecutive samples."""

    name = "varmax"
    firmware = "varmax"

    async def read_answer(self, link: SerialLink, deadline: float) -> Measurement:
        """The variance figure from the firmware's samples."""
        line = await wait_for(
            link, lambda text: text.startswith(SAMPLES_PREFIX), "samples", deadline
        )
        samples = parse_samples(line)
        assert samples is not None  # wait_for only returns lines with the prefix
        return Measurement(variance=mean_abs_difference(samples))
