"""Simulated pico2-ice boards (ptys and directories) that the real worker code runs against."""

from icefarm_worker.simulator.farm import SimulatedDiscovery, SimulatedFarm, SimulatedUsbip
from icefarm_worker.simulator.faults import Fault, FaultSpec, parse_faults
from icefarm_worker.simulator.firmware import (
    expected_pulse_count,
    expected_samples,
    expected_variance,
)

__all__ = [
    "Fault",
    "FaultSpec",
    "SimulatedDiscovery",
    "SimulatedFarm",
    "SimulatedUsbip",
    "expected_pulse_count",
    "expected_samples",
    "expected_variance",
    "parse_faults",
]
