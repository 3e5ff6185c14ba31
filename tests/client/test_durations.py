"""Every duration the client takes is a timedelta, seconds, or text as people write it ("90s",
"5m", "1h30m"); a bad one is InvalidArgument naming the parameter, raised before any call
(`duration=600` used to be a TypeError from protobuf)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import icefarm_client as ic
from icefarm_client.convert import to_timedelta
from tests.client.conftest import RunningFarm

Clients = Callable[..., ic.Client]
NOWHERE = "127.0.0.1:1"  # nothing listens: a call that were made would fail differently


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (timedelta(minutes=2), 120),
        (600, 600),
        (1.5, 1.5),
        (0, 0),
        ("90", 90),
        ("90s", 90),
        ("1500ms", 1.5),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2d3h4m5s", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1.5h", 5400),
        (" 7s ", 7),
    ],
)
def test_durations_read_as_people_write_them(given: Any, seconds: float) -> None:
    assert to_timedelta(given) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (-1, "must not be negative"),
        (timedelta(seconds=-5), "must not be negative"),
        ("-5m", "must not be negative"),
        ("soon", "'soon' is not a duration (e.g. 90, 90s"),
        ("5m3", "is not a duration"),
        ("", "is not a duration"),
        ("h", "is not a duration"),
        ([1], "not list"),
        (True, "not bool"),
        (None, "not NoneType"),
        (float("nan"), "must be finite"),
        (10**30, "is too long"),
    ],
)
def test_a_bad_duration_is_invalid_argument_naming_the_parameter(given: Any, says: str) -> None:
    with pytest.raises(ic.InvalidArgument) as caught:
        to_timedelta(given, "wait")
    assert caught.value.field == "wait"
    assert says in caught.value.message and caught.value.message.startswith("wait: ")


def test_every_call_rejects_a_bad_duration_before_calling(clients: Clients) -> None:
    client = clients(NOWHERE, "alice", retry=ic.RetryPolicy(attempts=1), timeout=2.0)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("duration", lambda: client.create_reservation(1, duration="soon")),
        ("wait", lambda: client.create_reservation(1, wait=-1)),
        ("duration", lambda: client.reserve(1, duration=[10])),
        ("wait", lambda: client.reserve(1, wait="5 minutes")),
        ("ready_timeout", lambda: client.reserve(1, ready_timeout="later")),
        ("duration", lambda: client.extend("r-1", duration=-30)),
        ("duration", lambda: client.extend_all("1h-5m")),
        ("duration", lambda: client.extend_reservations(client_id="bob", duration="x")),
        ("timeout", lambda: client.drain_worker("lab-a", timeout="forever")),
        ("timeout", lambda: client.wait_available(1, timeout="soon")),
        ("duration", lambda: client.resume("r-1", duration="soon")),
        ("ready_timeout", lambda: client.resume("r-1", ready_timeout=-1)),
    ]
    for field, call in calls:
        with pytest.raises(ic.InvalidArgument) as caught:
            call()
        assert caught.value.field == field, caught.value.message
        assert caught.value.code == ""  # no call was made


def assert_ends_in(reservation: ic.Reservation, seconds: float) -> None:
    assert reservation.end_time is not None
    left = (reservation.end_time - datetime.now(UTC)).total_seconds()
    assert seconds - 15 < left <= seconds + 1, left


def test_seconds_and_text_work_wherever_a_duration_is_taken(
    farm: RunningFarm, clients: Clients
) -> None:
    alice = clients(farm.address, "alice")
    made = alice.create_reservation(1, duration=600)
    assert_ends_in(made, 600)
    (extended,) = alice.extend(made.id, duration="1h30m")
    assert_ends_in(extended, 5400)
    (everything,) = alice.extend_all(7200.0)
    assert_ends_in(everything, 7200)
    operator = clients(farm.address, "operator")
    (by_operator,) = operator.extend_reservations(client_id="alice", duration="3h")
    assert_ends_in(by_operator, 3 * 3600)
    alice.release(made.id)
    assert alice.wait_available(1, timeout="20s").count >= 1
    with alice.reserve(1, duration="20m", wait="10s", ready_timeout="1m") as held:
        assert_ends_in(held.reservation, 1200)
        assert_ends_in(held.extend("25m"), 1500)
    drained = operator.drain_worker("lab-a", timeout="90s")
    assert drained.state is ic.WorkerState.DRAINING


async def test_the_async_client_takes_the_same_durations(farm: RunningFarm) -> None:
    async with ic.AsyncClient(farm.address, client_id="carol") as carol:
        made = await carol.create_reservation(1, duration="10m")
        assert_ends_in(made, 600)
        (extended,) = await carol.extend(made.id, duration=1800)
        assert_ends_in(extended, 1800)
        with pytest.raises(ic.InvalidArgument) as caught:
            await carol.extend(made.id, duration="a while")
        assert caught.value.field == "duration"
        await carol.release(made.id)
