"""Where the control's time comes from (replaceable in tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock UTC. Replicas are expected to keep their clocks in step (NTP)."""

    def now(self) -> datetime:
        return datetime.now(UTC)
