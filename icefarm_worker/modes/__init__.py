"""The modes a reserved board can run, by name. Adding one: a file here and a line below."""

from __future__ import annotations

from icefarm_worker.modes.base import EvaluationFailed, Measurement, Mode
from icefarm_worker.modes.pulsecount import PulseCountMode
from icefarm_worker.modes.usbip import UsbipMode
from icefarm_worker.modes.varmax import VarMaxMode

MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (PulseCountMode, VarMaxMode, UsbipMode)}


class UnknownMode(ValueError):
    """A reservation or config named a mode this worker does not have."""


def get_mode(name: str) -> type[Mode]:
    """The mode class registered as `name`; UnknownMode listing the known ones otherwise."""
    try:
        return MODES[name]
    except KeyError:
        known = ", ".join(sorted(MODES))
        raise UnknownMode(f"unknown mode {name!r} (known: {known})") from None


__all__ = ["MODES", "EvaluationFailed", "Measurement", "Mode", "UnknownMode", "get_mode"]
