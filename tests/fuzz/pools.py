"""The farm's real ids, kept fresh while the cases run, and the plausible values built on them.

Strategies read the pools when they draw (not when they are built), so a case drawn late in a
run names the devices, reservations, workers and commands that exist by then.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from icefarm.limits import PICO2_ICE_BITSTREAM_BYTES
from tests.fuzz import values
from tests.fuzz.messages import Vocabulary, distinct, mostly

BITSTREAM_SIZE = PICO2_ICE_BITSTREAM_BYTES
CLIENTS = ("fz-alice", "fz-bob", "fz-carol")


def full_bitstream(seed: int) -> bytes:
    """A bitstream of the size the pulsecount firmware expects (so it really runs)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (BITSTREAM_SIZE // len(block) + 1))[:BITSTREAM_SIZE]


BITSTREAMS = tuple(full_bitstream(i) for i in range(3))


@dataclass
class Pools:
    """Ids seen in the farm (refreshed by the farm between cases)."""

    devices: list[str] = field(default_factory=list)
    reservations: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    correlation_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    bad_tokens: list[str] = field(default_factory=list)
    # (token, board) of each reservation holding a board of the fuzzed worker now.
    holders: list[tuple[str, str]] = field(default_factory=list)
    clients: tuple[str, ...] = CLIENTS

    def pick(
        self, items: Callable[[], Sequence[str]], fallback: str = ""
    ) -> st.SearchStrategy[str]:
        """One of the live items (read at draw time), or `fallback` while there are none."""

        def choose(index: int) -> str:
            live = items()
            return live[index % len(live)] if live else fallback

        return st.integers(0, 1 << 20).map(choose)

    def device_id(self) -> st.SearchStrategy[str]:
        return st.one_of(
            self.pick(lambda: self.devices, "fz-no-device"),
            self.pick(lambda: self.devices, "fz-no-device"),
            st.sampled_from(["", "fz-no-such-device"]),
        )

    def reservation_id(self) -> st.SearchStrategy[str]:
        return st.one_of(
            self.pick(lambda: self.reservations, "fz-no-reservation"),
            self.pick(lambda: self.reservations, "fz-no-reservation"),
            st.sampled_from(["", "fz-no-such-reservation", "00000000-0000-0000-0000-000000000000"]),
        )

    def worker(self) -> st.SearchStrategy[str]:
        return st.one_of(
            self.pick(lambda: self.workers, "fz-no-worker"), st.sampled_from(["", "fz-no-worker"])
        )

    def client_id(self) -> st.SearchStrategy[str]:
        return st.sampled_from(self.clients)

    def token(self) -> st.SearchStrategy[str]:
        """Mostly a token of a reservation that holds a board now, else one that must fail."""
        bad = st.one_of(
            self.pick(lambda: self.bad_tokens, "no-token"),
            st.sampled_from(["", "not-a-token", "a.b", ".", "e30.AAAA"]),
        )
        return st.one_of(self.pick(lambda: self.tokens, "no-token"), bad)

    def holder(self) -> st.SearchStrategy[tuple[str, str]]:
        def choose(index: int) -> tuple[str, str]:
            live = self.holders
            return live[index % len(live)] if live else ("no-token", "")

        return st.integers(0, 1 << 20).map(choose)

    def page_token(self) -> st.SearchStrategy[str]:
        return st.one_of(self.pick(lambda: self.page_tokens, ""), crafted_page_tokens())


def crafted_page_tokens() -> st.SearchStrategy[str]:
    """Tokens shaped like the server's (base64 of "time|key"): naive times, odd years, junk."""
    times = st.sampled_from(
        [
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+00:00",
            "9999-12-31T23:59:59+00:00",
            "0001-01-01T00:00:00",
            "2026-13-45T99:00:00",
            "now",
            "",
        ]
    )
    keys = st.sampled_from(["", "x", "fz-alice", "\x00", "|"])
    shaped = st.tuples(times, keys).map(
        lambda p: base64.urlsafe_b64encode(f"{p[0]}|{p[1]}".encode()).decode()
    )
    return st.one_of(shaped, st.sampled_from(["!!!", "AAAA", "=", "a" * 5000, "\u00e9"]))


SELECTORS = (
    "",
    "kind=pico2-ice",
    "kind!=pico2-ice",
    "kind in (pico2-ice,usb)",
    "kind notin (usb)",
    "rack",
    "!rack",
    "rack=a",
    "gpu_memory_mb>=16384",
    "gpu_memory_mb<1",
    "temp>-1",
    "firmware!=old,!broken_before",
    "kind=pico2-ice,rack in (a,b)",
    "kind=",
    "kind=pico2-ice,",
    "gpu_memory_mb>=x",
    "kind ~ a",
)


def selector(pools: Pools) -> st.SearchStrategy[str]:
    named = st.one_of(
        pools.pick(lambda: pools.workers).map(lambda w: f"worker={w}"),
        pools.pick(lambda: pools.devices).map(lambda d: f"id={d}"),
        st.tuples(pools.pick(lambda: pools.workers), pools.pick(lambda: pools.workers)).map(
            lambda p: f"worker in ({p[0]},{p[1]})"
        ),
    )
    return st.one_of(st.sampled_from(SELECTORS), named)


def lease() -> st.SearchStrategy[Any]:
    valid = st.one_of(values.short_duration(3), values.short_duration(7200))
    return mostly(valid, values.duration())


def vocabulary(pools: Pools) -> Vocabulary:
    """Plausible values by field name ("Message.field" first): what a real caller sends."""
    fresh_worker = st.integers(0, 10**6).map(lambda i: f"fz-w{i}")
    fresh_device = st.integers(0, 10**6).map(lambda i: f"fz-d{i}")
    labels = st.dictionaries(
        st.sampled_from(["rack", "firmware", "broken_before"]),
        st.sampled_from(["", "a", "b", "old"]),
        max_size=3,
    )
    properties = st.dictionaries(
        st.sampled_from(["gpu_memory_mb", "temp"]),
        st.one_of(st.sampled_from([0.0, 16384.0, -1.0]), values.floats()),
        max_size=2,
    )
    return {
        "device_id": pools.device_id(),
        "device_ids": pools.device_id(),
        "reservation_id": pools.reservation_id(),
        "reservation_ids": pools.reservation_id(),
        "client_id": st.one_of(pools.client_id(), st.just("")),
        "worker": pools.worker(),
        "Register.name": st.one_of(fresh_worker, pools.worker()),
        "DeviceUpdate.device_id": st.one_of(fresh_device, pools.device_id()),
        "selector": selector(pools),
        "mode": st.sampled_from(["", "pulsecount", "pulsecount", "varmax", "usbip", "nosuch"]),
        "mode_args": st.one_of(
            st.just({}), st.dictionaries(st.sampled_from(["a", "n"]), st.just("1"))
        ),
        "count": st.integers(0, 6),
        "page_size": st.integers(-1, 5),
        "page_token": pools.page_token(),
        "duration": lease(),
        "wait_timeout": values.short_duration(0.4),
        "timeout": values.short_duration(3),
        "state": st.integers(0, 9),
        "resume_after": st.one_of(st.integers(0, 40), values.integers(*values.UINT64)),
        "instance": st.sampled_from(["", "a", "b"]),
        "labels": labels,
        "properties": properties,
        "kind": st.sampled_from(["pico2-ice", "usb", "machine", ""]),
        "endpoint": st.sampled_from(["127.0.0.1:7000", ""]),
        "version": st.just("0.1.0"),
        "modes": st.sampled_from(["pulsecount", "varmax", "usbip"]),
        "error": st.sampled_from(["", "flash failed"]),
        "correlation_id": pools.pick(lambda: pools.correlation_ids, "fz-no-command"),
        "request_id": st.sampled_from(["", "r1", "r2", "r3"]),
        "Bitstream.data": st.one_of(st.sampled_from(BITSTREAMS), st.binary(max_size=16)),
        "Bitstream.id": st.sampled_from(["b1", "b2", "b3", ""]),
        "WatchAvailability.count": st.integers(0, 5),
    }


def shapes(pools: Pools) -> dict[str, st.SearchStrategy[Any]]:
    """Requests shaped the way a real caller builds them (by RPC key): the fields that go
    together set together, so the case passes validation and does the real work."""
    from icefarm.v1 import control_service_pb2 as cpb
    from icefarm.v1 import reservation_service_pb2 as rpb
    from icefarm.v1 import types_pb2 as tpb
    from icefarm.v1 import worker_service_pb2 as wpb

    mode = st.sampled_from(["", "pulsecount", "varmax"])
    by_count = st.builds(
        rpb.ReserveRequest,
        count=st.integers(1, 3),
        selector=st.sampled_from(["", "", "kind=pico2-ice", "rack=a", "kind=usb"]),
        mode=mode,
        duration=values.short_duration(7200).filter(lambda d: d.seconds >= 1),
        wait_timeout=values.short_duration(0.4),
        request_id=st.sampled_from(["", "", "r1", "r2"]),
        wait_for_new_devices=st.booleans(),
    )
    by_ids = st.builds(
        rpb.ReserveRequest,
        device_ids=st.lists(pools.device_id(), min_size=1, max_size=2).map(distinct),
        mode=mode,
        wait_timeout=values.short_duration(0.3),
    )

    def reports(device_id: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
        return st.builds(
            cpb.DeviceUpdate,
            device_id=device_id,
            kind=st.sampled_from(["pico2-ice", "usb"]),
            state=st.sampled_from(
                [tpb.DEVICE_STATE_AVAILABLE] * 3
                + [tpb.DEVICE_STATE_FLASHING, tpb.DEVICE_STATE_READY, tpb.DEVICE_STATE_BROKEN]
            ),
            reset_on_release=st.booleans(),
            reservation_id=st.one_of(st.just(""), st.just(""), pools.reservation_id()),
            # What a worker's report carries, now and then with a hostile key or value in it.
            labels=mostly(
                st.dictionaries(st.sampled_from(["rack", "firmware"]), st.sampled_from(["a", ""])),
                st.dictionaries(values.text(), values.text(), max_size=2),
            ),
            properties=st.one_of(
                st.dictionaries(st.sampled_from(["temp"]), st.floats(-100, 100)),
                st.dictionaries(st.sampled_from(["temp", ""]), values.floats(), max_size=2),
            ),
        )

    # A board of its own (new), or one another worker has: stealing is refused.
    update = reports(
        st.one_of(
            st.integers(0, 10**6).map(lambda i: f"fz-d{i}"),
            pools.pick(lambda: pools.devices, "fz-d0"),
        )
    )

    def then_reports(register: Any) -> st.SearchStrategy[Any]:
        """After the Register, reports about its own boards mostly (they are applied)."""
        own = [d.device_id for d in register.devices] or ["fz-d0"]
        # Drawn by index: how many boards it has depends on the live pools, the draws must not.
        device = st.integers(0, 7).map(lambda i: own[i % len(own)])
        later = st.one_of(reports(device), reports(device), update)
        return st.lists(later.map(lambda u: cpb.WorkerSessionRequest(device_update=u)), max_size=3)

    register = st.builds(
        cpb.Register,
        name=st.one_of(st.integers(0, 10**6).map(lambda i: f"fz-w{i}"), pools.worker()),
        endpoint=st.just("127.0.0.1:7000"),
        version=st.just("0.1.0"),
        modes=st.just(["pulsecount", "varmax"]),
        devices=st.lists(update, max_size=3).map(lambda us: distinct(us, lambda u: u.device_id)),
    )
    session_messages = st.one_of(
        st.builds(rpb.SessionRequest, ping=st.builds(rpb.Ping, nonce=st.integers(0, 99))),
        st.builds(
            rpb.SessionRequest,
            watch=st.builds(
                rpb.WatchAvailability, selector=selector(pools), count=st.integers(1, 4)
            ),
        ),
    )
    bitstream = st.builds(
        wpb.Bitstream,
        id=st.sampled_from(["b1", "b2", "b3"]),
        data=st.sampled_from(BITSTREAMS),
        device_id=st.one_of(st.just(""), pools.device_id()),
    )
    return {
        "ReservationService.Reserve": st.one_of(by_count, by_count, by_ids).map(lambda m: (m,)),
        "ReservationService.Session": st.tuples(
            st.builds(
                rpb.Hello, resume_after=st.integers(0, 5), instance=st.sampled_from(["", "a"])
            ),
            st.lists(session_messages, max_size=3),
        ).map(lambda p: (rpb.SessionRequest(hello=p[0]), *p[1])),
        "ControlService.WorkerSession": register.flatmap(
            lambda r: then_reports(r).map(lambda u: (cpb.WorkerSessionRequest(register=r), *u))
        ),
        "WorkerService.Evaluate": st.lists(bitstream, min_size=1, max_size=3).map(
            lambda items: tuple(wpb.EvaluateRequest(bitstream=b) for b in items)
        ),
    }
