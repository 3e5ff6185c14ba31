"""The real servers the fuzz cases hit, started the way the other tests start them.

- `ControlTarget`: a control served in this process on 127.0.0.1:0 (SQLite or PostgreSQL)
  with second-scale timers, and stand-in workers (tests/standin_worker.py) that answer their
  commands, so Reserve, Release, commands and reports all do real work. Cases may drain,
  remove and break all of it; the upkeep ends the fuzz clients' reservations and brings new
  stand-ins when the farm runs out of free boards.
- `WorkerTarget`: a control (SQLite) and the real worker daemon on simulated boards; its
  WorkerService is fuzzed with valid tokens (boards held and READY), tokens of released and
  other reservations, expired and forged tokens, and signed tokens with odd claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select

from icefarm.tokens import TokenClaims
from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import types_pb2 as tpb
from icefarm_control.app import ControlApp
from icefarm_control.storage.database import Database
from icefarm_control.storage.models import devices, reservations, worker_commands, workers
from tests.fuzz.cases import Rpc
from tests.fuzz.pools import CLIENTS, Pools
from tests.integration.conftest import RunningControl, as_client
from tests.integration.worker_farm import connected, fast_config
from tests.standin_worker import StandinWorker

MIN_FREE = 3
MAX_STANDINS = 40
BOARDS_PER_STANDIN = 4
WORKER_BOARDS = 3
# How long the worker target waits for a board it reserved to be READY (flashing its mode).
READY_SECONDS = 10.0


async def _ids(database: Database) -> tuple[list[str], list[str], list[str], list[str]]:
    """Recent device, reservation, worker and command ids (what a plausible case names)."""
    async with database.read() as conn:
        device_ids = await conn.scalars(
            select(devices.c.id).order_by(devices.c.state_time.desc()).limit(60)
        )
        reservation_ids = await conn.scalars(
            select(reservations.c.id).order_by(reservations.c.create_time.desc()).limit(60)
        )
        worker_names = await conn.scalars(
            select(workers.c.name).order_by(workers.c.last_seen_time.desc()).limit(40)
        )
        correlation_ids = await conn.scalars(
            select(worker_commands.c.correlation_id).order_by(worker_commands.c.id.desc()).limit(30)
        )
        return list(device_ids), list(reservation_ids), list(worker_names), list(correlation_ids)


@dataclass
class ControlTarget:
    """A control on `backend` with stand-in workers."""

    backend: str
    app: ControlApp
    control: RunningControl
    stack: contextlib.AsyncExitStack
    standins: list[StandinWorker] = field(default_factory=list)
    pools: Pools = field(default_factory=Pools)
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    async def start(cls, backend: str, database_url: str, standins: int = 2) -> ControlTarget:
        stack = contextlib.AsyncExitStack()
        app = ControlApp(fast_config(database_url))
        port = await app.start()
        stack.push_async_callback(app.stop)
        control = await stack.enter_async_context(connected(f"127.0.0.1:{port}", app))
        target = cls(backend, app, control, stack)
        for _ in range(standins):
            await target.add_standin()
        await target.refresh()
        return target

    async def stop(self) -> None:
        for worker in self.standins:
            await worker.close()
        await self.stack.aclose()

    @property
    def database(self) -> Database:
        return self.app.database

    def channel_for(self, rpc: Rpc) -> grpc.aio.Channel:
        return self.control.channel

    async def add_standin(self) -> None:
        worker = StandinWorker(self.control.address, f"fz-s{next(self._names)}", BOARDS_PER_STANDIN)
        self.standins.append(worker)
        await worker.start()

    async def refresh(self) -> None:
        ids = await _ids(self.database)
        self.pools.devices, self.pools.reservations, self.pools.workers = ids[0], ids[1], ids[2]
        self.pools.correlation_ids = ids[3]

    async def free_count(self) -> int:
        answer = await self.control.reservations.GetAvailability(  # type: ignore[misc]
            rpb.GetAvailabilityRequest(), timeout=10
        )
        return int(answer.count)

    async def upkeep(self) -> None:
        """Keep boards to reserve: restart stand-ins the control ended, end what the fuzz
        clients hold, and add a stand-in when that is not enough."""
        for worker in self.standins:
            if worker.ended.is_set():
                with contextlib.suppress(grpc.aio.AioRpcError, AssertionError):
                    await worker.close()
                    await worker.start()
        if await self.free_count() >= MIN_FREE:
            return
        for client in CLIENTS:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.control.control.EndReservations(  # type: ignore[misc]
                    cpb.EndReservationsRequest(client_id=client), timeout=10
                )
        if await self.free_count() < MIN_FREE and len(self.standins) < MAX_STANDINS:
            await self.add_standin()


@dataclass
class WorkerTarget:
    """A control and the real worker daemon on simulated boards."""

    control: RunningControl
    worker: Any  # icefarm_worker.app.WorkerApp
    stack: contextlib.AsyncExitStack
    worker_channel: grpc.aio.Channel
    held: list[rpb.ReserveResponse] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    pools: Pools = field(default_factory=Pools)
    backend: str = "sqlite"

    @classmethod
    async def start(cls, database_url: str, root: Path) -> WorkerTarget:
        from tests.worker.daemon.harness import (
            all_in_state,
            running_control,
            simulated_worker,
        )

        stack = contextlib.AsyncExitStack()
        control = await stack.enter_async_context(running_control(database_url))
        app, _ = await stack.enter_async_context(
            simulated_worker(control.address, root, WORKER_BOARDS)
        )
        await all_in_state(control, WORKER_BOARDS, tpb.DEVICE_STATE_AVAILABLE)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        stack.push_async_callback(channel.close)
        target = cls(control, app, stack, channel)
        await target.upkeep()
        return target

    async def stop(self) -> None:
        await self.stack.aclose()

    @property
    def database(self) -> Database:
        return self.control.app.database

    def channel_for(self, rpc: Rpc) -> grpc.aio.Channel:
        return self.worker_channel if rpc.service == "WorkerService" else self.control.channel

    async def _board_states(self) -> dict[str, int]:
        answer = await self.control.control.ListDevices(cpb.ListDevicesRequest(), timeout=10)  # type: ignore[misc]
        return {d.id: d.state for d in answer.devices}

    async def upkeep(self) -> None:
        """Hold two boards READY (one reservation each); a reservation whose board the cases
        broke is released (its token joins the stale ones) and replaced when a board is free."""
        states = await self._board_states()
        for answer in list(self.held):
            board = answer.reservation.devices[0].id
            if states.get(board) not in (tpb.DEVICE_STATE_READY, tpb.DEVICE_STATE_RESERVED):
                self.held.remove(answer)
                self.stale.append(answer.token)
                await self._release(answer)
        free = [d for d, s in states.items() if s == tpb.DEVICE_STATE_AVAILABLE]
        while len(self.held) < 2 and free:
            free.pop()
            reserved = await self._reserve_ready(CLIENTS[len(self.held)])
            if reserved is not None:
                self.held.append(reserved)
        self.refresh_pools(await self._board_states())

    async def _reserve_ready(self, client: str) -> rpb.ReserveResponse | None:
        """One board in pulsecount, READY within READY_SECONDS; else released again."""
        try:
            answer: rpb.ReserveResponse = await self.control.reservations.Reserve(  # type: ignore[misc]
                rpb.ReserveRequest(count=1, mode="pulsecount"),
                metadata=as_client(client),
                timeout=10,
            )
        except grpc.aio.AioRpcError:
            return None
        board = answer.reservation.devices[0].id
        deadline = asyncio.get_running_loop().time() + READY_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            if (await self._board_states()).get(board) == tpb.DEVICE_STATE_READY:
                return answer
            await asyncio.sleep(0.05)
        await self._release(answer)
        return None

    async def _release(self, answer: rpb.ReserveResponse) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.control.reservations.Release(  # type: ignore[misc]
                rpb.ReleaseRequest(reservation_ids=[answer.reservation.id]),
                metadata=as_client(answer.reservation.client_id),
                timeout=10,
            )

    def refresh_pools(self, states: dict[str, int]) -> None:
        self.pools.devices = sorted(states)
        self.pools.reservations = [a.reservation.id for a in self.held]
        self.pools.tokens = [a.token for a in self.held]
        self.pools.holders = [(a.token, a.reservation.devices[0].id) for a in self.held]
        self.pools.bad_tokens = self.stale[-3:] + self._odd_tokens()

    async def refresh(self) -> None:
        return None

    def _odd_tokens(self) -> list[str]:
        """Tokens a client should never have: expired, forged, signed with odd claims."""
        signer = self.control.app.engine.signer
        boards = tuple(self.pools.devices)
        now = datetime.now(UTC)
        odd = [
            TokenClaims("fz-no-reservation", "fz-alice", boards, now + timedelta(hours=1)),
            TokenClaims("", "", (), now + timedelta(hours=1)),
            TokenClaims("a\x00b", "\x00", ("\x00", "x" * 5000), now + timedelta(hours=1)),
        ]
        for answer in self.held:
            rid, cid = answer.reservation.id, answer.reservation.client_id
            odd.append(TokenClaims(rid, cid, boards, now + timedelta(hours=1)))
            odd.append(TokenClaims(rid, cid, boards, now - timedelta(seconds=1)))
        tokens = [signer.sign(c) for c in odd]
        for answer in self.held:
            body, _, signature = answer.token.partition(".")
            tokens.append(f"{body}.{signature[::-1]}")
            tokens.append(f"{body[:-4]}.{signature}")
        return tokens
