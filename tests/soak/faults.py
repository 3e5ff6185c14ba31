"""The fault injector: at seeded random intervals, one fault at a time, each kind in a seeded
order (every kind once per round), and the seconds until the farm served again.

Recovery, per kind (`recovery` of a `FaultRecord`; the figure the issue sets targets for):

- control-kill, postgresql-restart: from the fault until a Reserve needing a board of every
  worker succeeds (one probe per worker, `worker=wN`; the slowest counts).
- worker-kill, worker-drain: from the worker's restart until a Reserve of one of its boards
  succeeds (`from_fault` counts from the kill or the SIGTERM).
- worker-stop, network-cut: from SIGCONT / the link coming up until a Reserve of its boards.
- client-kill: from the SIGKILL until the control ended every reservation it held (the client
  grace), the client restarted at once.
- board-hang, board-short-read, board-slow: injected to fire at the board's next evaluation;
  from when it fired (the simulator's `fired.jsonl`) until that holder's next rerun result
  (attempt >= 2), or for a slow board its next result from the board (report.py).
- board-unplug: from the unplug until the holder's next rerun result.
- board-flash-failure: fires at the board's next flash (its release); from that flash until
  the board is AVAILABLE again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc
from tests.soak.farm import OFFLINE_SECONDS, Farm
from tests.soak.monitor import Monitor

PROBE_DEADLINE = 60.0
# Not "soak-N": the probe's reservations are not a soak client's.
PROBE_CLIENT = "recovery-probe"
PROCESS_KINDS = [
    "control-kill",
    "worker-kill",
    "client-kill",
    "worker-stop",
    "postgresql-restart",
    "worker-drain",
    "network-cut",
]
BOARD_KINDS = [
    "board-hang",
    "board-flash-failure",
    "board-unplug",
    "board-short-read",
    "board-slow",
]
BOARD_FAULTS = {
    "board-hang": {"fault": "no-answer", "once": True},
    "board-short-read": {"fault": "short-read", "once": True},
    "board-slow": {"fault": "slow", "once": True, "delay": 1.0},
    "board-flash-failure": {"fault": "flash-failure", "once": True},
}


@dataclass
class FaultRecord:
    kind: str
    t: float
    target: str = ""
    how: str = ""
    holder: str = ""
    recovery: float | None = None
    from_fault: float | None = None
    ended: float = 0.0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


async def probe_reserve(target: str, selector: str) -> bool:
    """One Reserve of one board matching `selector`, released at once; True when granted."""
    metadata = (("icefarm-client-id", PROBE_CLIENT),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reservation_service_pb2_grpc.ReservationServiceStub(channel)
        try:
            answer = await stub.Reserve(
                rpb.ReserveRequest(count=1, selector=selector), metadata=metadata, timeout=3
            )
        except grpc.aio.AioRpcError:
            return False
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Release(
                rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]),
                metadata=metadata,
                timeout=3,
            )
        return True


async def seconds_until_reserved(target: str, selector: str, since: float) -> float | None:
    """Poll until a board matching `selector` is granted; seconds since `since` (epoch), or
    None after PROBE_DEADLINE."""
    while time.time() - since < PROBE_DEADLINE:
        if await probe_reserve(target, selector):
            return time.time() - since
        await asyncio.sleep(0.2)
    return None


class Injector:
    def __init__(self, farm: Farm, monitor: Monitor, rng: random.Random, netns: bool) -> None:
        self.farm = farm
        self.monitor = monitor
        self.rng = rng
        self.netns = netns
        self.records: list[FaultRecord] = []
        self.kinds = [*PROCESS_KINDS, *BOARD_KINDS]
        if farm.backend != "postgresql":
            self.kinds.remove("postgresql-restart")
        self._round: list[str] = []
        self.last_fault_end = 0.0

    def next_kind(self) -> str:
        if not self._round:
            self._round = list(self.kinds)
            self.rng.shuffle(self._round)
        return self._round.pop()

    async def run(self, until: float, gap: tuple[float, float]) -> None:
        """Faults one after another until `until` (epoch); none starts after it."""
        while True:
            pause = self.rng.uniform(*gap)
            if time.time() + pause >= until:
                return
            await asyncio.sleep(pause)
            kind = self.next_kind()
            record = FaultRecord(kind, time.time())
            self.monitor.note(f"fault {kind} begins")
            try:
                await getattr(self, "_" + kind.replace("-", "_"))(record)
            except Exception as exc:  # a fault that could not be acted out is reported
                record.error = f"{type(exc).__name__}: {exc}"
            record.ended = time.time()
            self.last_fault_end = record.ended
            self.monitor.note(f"fault {kind} on {record.target} ends ({record.error or 'ok'})")
            self.records.append(record)

    async def _blocking(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(call, *args)

    async def _every_worker(self, since: float) -> float | None:
        probes: list[Awaitable[float | None]] = [
            seconds_until_reserved(self.farm.target, f"worker={self.farm.worker_name(w)}", since)
            for w in range(self.farm.sizes.workers)
        ]
        found = await asyncio.gather(*probes)
        return None if any(f is None for f in found) else max(f for f in found if f is not None)

    async def _one_worker(self, worker: int, since: float) -> float | None:
        selector = f"worker={self.farm.worker_name(worker)}"
        return await seconds_until_reserved(self.farm.target, selector, since)

    # ------------------------------------------------------------ process faults

    async def _control_kill(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.replicas)
        record.target = f"control-{index}"
        await self._blocking(self.farm.kill, self.farm.controls[index])
        await self._blocking(self.farm.start_control, index)
        record.recovery = await self._every_worker(record.t)

    async def _postgresql_restart(self, record: FaultRecord) -> None:
        assert self.farm.cluster is not None
        record.target = "postgresql"
        await self._blocking(self.farm.cluster.restart)
        record.recovery = await self._every_worker(record.t)

    async def _worker_kill(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.workers)
        record.target = self.farm.worker_name(index)
        await self._blocking(self.farm.kill, self.farm.workers[index])
        restarted = time.time()
        await self._blocking(self.farm.start_worker, index)
        record.recovery = await self._one_worker(index, restarted)
        record.from_fault = None if record.recovery is None else time.time() - record.t

    async def _worker_drain(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.workers)
        record.target = self.farm.worker_name(index)
        proc = self.farm.workers[index]
        proc.ended_on_purpose = True
        proc.popen.terminate()
        try:
            await self._blocking(proc.popen.wait, 40)
            record.how = f"drained, exit {proc.popen.returncode}"
        except Exception:
            record.how = "drain did not finish in 40 s: killed"
            await self._blocking(self.farm.kill, proc)
        restarted = time.time()
        await self._blocking(self.farm.start_worker, index)
        record.recovery = await self._one_worker(index, restarted)
        record.from_fault = None if record.recovery is None else time.time() - record.t

    async def _worker_stop(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.workers)
        record.target = self.farm.worker_name(index)
        proc = self.farm.workers[index]
        self.farm.pause(proc)
        await asyncio.sleep(OFFLINE_SECONDS + 3)
        self.farm.resume(proc)
        resumed = time.time()
        record.recovery = await self._one_worker(index, resumed)

    async def _network_cut(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.workers)
        record.target = self.farm.worker_name(index)
        space = self.farm.namespaces.get(index)
        if space is None:
            record.how = "SIGSTOP (no ip netns here)"
            proc = self.farm.workers[index]
            self.farm.pause(proc)
            await asyncio.sleep(OFFLINE_SECONDS + 3)
            self.farm.resume(proc)
        else:
            record.how = "ip netns: link down"
            await self._blocking(space.cut)
            await asyncio.sleep(OFFLINE_SECONDS + 3)
            await self._blocking(space.mend)
        mended = time.time()
        record.recovery = await self._one_worker(index, mended)

    async def _client_kill(self, record: FaultRecord) -> None:
        index = self.rng.randrange(self.farm.sizes.clients)
        client_id = f"soak-{index}-{self.farm.client_lives[index]}"
        record.target = client_id
        await self._blocking(self.farm.kill, self.farm.clients[index])
        await self._blocking(self.farm.start_client, index)
        held = [
            r["id"]
            for r in await self.monitor.reservations()
            if r["client_id"] == client_id and r["state"] == "ACTIVE"
        ]
        record.extra["held"] = held
        while time.time() - record.t < PROBE_DEADLINE:
            rows = {r["id"]: r for r in await self.monitor.reservations()}
            if all(rows[i]["state"] != "ACTIVE" for i in held):
                record.recovery = time.time() - record.t
                return
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------ board faults

    async def _held_board(
        self, record: FaultRecord, with_another: bool = False
    ) -> tuple[int, str] | None:
        """A READY board a client holds; `with_another`: preferably one whose holder holds
        another board too (where a bitstream of the faulty board can rerun)."""
        holders = await self.monitor.holders()
        ready = sorted(
            d for d in holders if self.monitor.state_at(d) == "READY" and d.startswith("w")
        )
        if with_another:
            held = Counter(holders.values())
            ready = [d for d in ready if held[holders[d]] >= 2] or ready
        if not ready:
            record.error = "no READY board held by a client"
            return None
        device = self.rng.choice(ready)
        record.target = device
        record.holder = holders[device]
        return int(device.split("-")[0][1:]), device

    async def _board_fault(self, record: FaultRecord) -> None:
        chosen = await self._held_board(record)
        if chosen is None:
            return
        worker, device = chosen
        spec = BOARD_FAULTS[record.kind]
        await self._blocking(self.farm.inject, worker, [{"device": device, **spec}])

    _board_hang = _board_fault
    _board_short_read = _board_fault
    _board_slow = _board_fault

    async def _board_flash_failure(self, record: FaultRecord) -> None:
        await self._board_fault(record)
        if not record.target:
            return
        # It fires at the board's next flash: the holder's release (or a reboot).
        left = await self._wait_state(record.target, lambda s: s not in ("READY", "RESERVED"))
        if left is None:
            record.how = "still held at the end of the wait: never flashed"
            return
        back = await self._wait_state(record.target, lambda s: s == "AVAILABLE", since=left)
        record.recovery = None if back is None else back - left

    async def _board_unplug(self, record: FaultRecord) -> None:
        chosen = await self._held_board(record, with_another=True)
        if chosen is None:
            return
        worker, device = chosen
        await self._blocking(self.farm.inject, worker, [{"device": device, "action": "unplug"}])
        await asyncio.sleep(3.0)
        await self._blocking(self.farm.inject, worker, [{"device": device, "action": "plug"}])
        plugged = time.time()
        back = await self._wait_state(device, lambda s: s == "AVAILABLE", since=plugged)
        record.extra["available_after_replug"] = None if back is None else back - plugged

    async def _wait_state(
        self, device: str, accept: Callable[[str], bool], since: float | None = None
    ) -> float | None:
        start = since if since is not None else time.time()
        while time.time() - start < PROBE_DEADLINE:
            seen = self.monitor.first_change(device, start, accept)
            if seen is not None:
                return seen
            if since is None and accept(self.monitor.state_at(device)):
                return time.time()
            await asyncio.sleep(0.2)
        return None
