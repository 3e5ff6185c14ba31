"""What the evaluating modes share: wait for the firmware, send the bitstream, read one answer."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Mapping

from icefarm_worker.hardware.base import SerialLink
from icefarm_worker.modes.base import EvaluationFailed, Measurement, Mode
from icefarm_worker.modes.protocol import WAITING_LINE, check_bitstream, send_bitstream, wait_for


class BitstreamMode(Mode):
    """A mode whose firmware announces `Waiting for bitstream transfer`, takes a bitstream and
    answers one line. Subclasses say which line is the answer and what it measures."""

    def __init__(self, args: Mapping[str, str]) -> None:
        super().__init__(args)
        for key in self.args:
            raise ValueError(f"mode {self.name} takes no argument {key!r}")
        # The link whose announcement `ready` already consumed; evaluate need not wait for it.
        self._announced: SerialLink | None = None

    async def ready(self, link: SerialLink, timeout: float) -> None:
        """Wait for the firmware's first announcement."""
        deadline = asyncio.get_running_loop().time() + timeout
        await wait_for(link, lambda line: line == WAITING_LINE, "announcement", deadline)
        self._announced = link

    async def evaluate(self, link: SerialLink, bitstream: bytes, timeout: float) -> Measurement:
        """Send `bitstream` and return what the firmware measured."""
        check_bitstream(bitstream)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                if self._announced is not link:
                    await wait_for(
                        link, lambda line: line == WAITING_LINE, "announcement", deadline
                    )
                self._announced = None
                await send_bitstream(link, bitstream)
                return await self.read_answer(link, deadline)
        except TimeoutError:
            # Only a firmware that stopped reading gets here (the write could not finish).
            raise EvaluationFailed(f"the board did not answer within {timeout:g}s") from None

    @abstractmethod
    async def read_answer(self, link: SerialLink, deadline: float) -> Measurement:
        """Read this firmware's answer line before the loop time reaches `deadline`."""
