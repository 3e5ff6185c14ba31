"""The worker's reconnect pauses: short while a control is expected back within seconds (a
restart, a replica taking over), growing after that (issue 9, defect 5)."""

from __future__ import annotations

from dataclasses import dataclass

from icefarm_worker.session import FIRST_ATTEMPTS, FIRST_ATTEMPTS_MAX_PAUSE, reconnect_pauses


@dataclass
class Attempt:
    attempt_number: int


def pauses(attempt: int, samples: int = 300) -> list[float]:
    wait = reconnect_pauses(30.0)
    return [wait(Attempt(attempt)) for _ in range(samples)]  # type: ignore[arg-type]


def test_the_first_attempts_pause_at_most_a_second_and_a_half_with_jitter() -> None:
    for attempt in range(1, FIRST_ATTEMPTS + 1):
        seen = pauses(attempt)
        assert max(seen) <= FIRST_ATTEMPTS_MAX_PAUSE
        assert len(set(seen)) > 1  # jittered: workers do not come back in lockstep


def test_later_attempts_back_off_up_to_the_configured_longest_pause() -> None:
    seen = pauses(FIRST_ATTEMPTS + 5)
    assert max(seen) > FIRST_ATTEMPTS_MAX_PAUSE
    assert max(seen) <= 30.0
