"""The control process: wires storage, domain, timers and transport together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health

from icefarm_control.config import ControlConfig
from icefarm_control.domain.clients import ClientSessions
from icefarm_control.domain.clock import SystemClock
from icefarm_control.domain.inventory import Inventory
from icefarm_control.domain.liveness import WorkerLiveness
from icefarm_control.domain.reservations import ReservationEngine
from icefarm_control.domain.settings import Limits
from icefarm_control.domain.tokens import load_signer
from icefarm_control.domain.workers import WorkerRegistry
from icefarm_control.notifier import (
    Notifier,
    PostgresAnnouncer,
    PostgresListener,
    stop_task,
)
from icefarm_control.storage.database import Database
from icefarm_control.storage.migrate import upgrade
from icefarm_control.storage.sequencer import UNSEQUENCED, run_sequencer
from icefarm_control.transport.client_session import ClientSessionHandler
from icefarm_control.transport.control import ControlServicer
from icefarm_control.transport.reservations import ReservationServicer
from icefarm_control.transport.server import build_server, mark_serving
from icefarm_control.transport.worker_session import WorkerSessionHandler

log = structlog.get_logger(__name__)


def tune_garbage_collector() -> None:
    """Keep collector pauses out of call latency: what start-up built lives for the whole
    process, so freeze it out of every later collection, and collect the young generation less
    often (a serving control allocates many short-lived objects, few cycles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


@dataclass
class ControlApp:
    """One control replica. `start()` serves; `stop()` shuts down gracefully."""

    config: ControlConfig
    port: int = 0
    database: Database = field(init=False)
    engine: ReservationEngine = field(init=False)
    workers: WorkerRegistry = field(init=False)
    liveness: WorkerLiveness = field(init=False)
    worker_sessions: WorkerSessionHandler = field(init=False)
    clients: ClientSessions = field(init=False)
    sessions: ClientSessionHandler = field(init=False)
    _server: grpc.aio.Server | None = field(init=False, default=None)
    _health: health.aio.HealthServicer | None = field(init=False, default=None)
    _timers: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    notifier: Notifier = field(init=False)
    listener: PostgresListener | None = field(init=False, default=None)
    _listener_task: asyncio.Task[None] | None = field(init=False, default=None)
    announcer: PostgresAnnouncer | None = field(init=False, default=None)
    _sequencer: asyncio.Task[None] | None = field(init=False, default=None)
    _announcer_task: asyncio.Task[None] | None = field(init=False, default=None)

    async def start(self) -> int:
        self.database = Database(
            self.config.database,
            pool_size=self.config.db_pool_size,
            concurrency=self.config.db_concurrency,
        )
        await upgrade(self.database)
        clock = SystemClock()
        try:
            # The key every replica of this database signs with (domain/tokens.py).
            signer = await load_signer(self.database, self.config.token_key, clock)
        except ValueError:  # SigningKeyMismatch, or a stored key that is not one: exit cleanly
            await self.database.dispose()
            raise
        self.notifier = Notifier()
        self.database.on_commit = self.notifier.wake
        if self.database.is_postgresql:
            announcer = PostgresAnnouncer(self.config.database)
            self.announcer = announcer
            self._announcer_task = asyncio.create_task(announcer.run())
            self.listener = PostgresListener(self.config.database, self.notifier, announcer)
            self._listener_task = asyncio.create_task(self.listener.run())
            await asyncio.wait_for(self.listener.connected.wait(), timeout=30)

            def wake_everywhere(topics: set[str]) -> None:
                self.notifier.wake(topics)
                announcer.announce(topics)

            self.database.on_commit = wake_everywhere
            self._sequencer = asyncio.create_task(
                run_sequencer(self.database, self.notifier, self._stopping), name="sequencer"
            )
        self.engine = ReservationEngine(
            self.database,
            signer=signer,
            clock=clock,
            timers=self.config.timers,
            limits=Limits(),
            notifier=self.notifier,
        )
        inventory = Inventory(self.database, self.engine, clock, self.engine.limits)
        timers, limits, replica = self.engine.timers, self.engine.limits, self.engine.replica_id
        self.workers = WorkerRegistry(self.database, self.engine, clock, timers, limits, replica)
        self.liveness = WorkerLiveness(self.database, self.engine, clock, timers)
        # Before serving: sessions of replicas known to be gone must not block their workers.
        await self.workers.start_replica()
        self.worker_sessions = WorkerSessionHandler(self.workers, self.notifier)
        self.clients = ClientSessions(self.engine)
        self.sessions = ClientSessionHandler.for_engine(self.engine, self.clients)
        self._server, self._health, self.port = build_server(
            ReservationServicer(self.engine, sessions=self.sessions),
            ControlServicer(
                self.engine,
                inventory,
                workers=self.workers,
                worker_sessions=self.worker_sessions,
            ),
            self.config.listen,
        )
        await self._server.start()
        await mark_serving(self._health)
        self._timers = [
            *([self._sequencer] if self._sequencer is not None else []),
            asyncio.create_task(
                self._every(
                    self.engine.timers.lease_scan_interval.total_seconds(),
                    self._end_expired_leases,
                )
            ),
            asyncio.create_task(self._every(5.0, self.engine.tidy_waiters)),
            # Worker liveness, command time-outs and drains (domain/liveness.py).
            asyncio.create_task(
                self._every(
                    timers.replica_refresh_interval.total_seconds(), self.workers.refresh_replica
                )
            ),
            asyncio.create_task(self._every(1.0, self.liveness.sweep_liveness)),
            asyncio.create_task(self._every(1.0, self.liveness.time_out_commands)),
            asyncio.create_task(self._every(1.0, self.liveness.check_drains)),
            asyncio.create_task(self._every(1.0, self.clients.sweep_client_liveness)),
            asyncio.create_task(self._every(1.0, self.clients.sweep_ending_soon)),
            asyncio.create_task(self._every(60.0, self.clients.prune_events)),
            asyncio.create_task(self._every(self.sessions.upkeep_interval, self.sessions.upkeep)),
        ]
        log.info(
            "control serving",
            listen=self.config.listen,
            port=self.port,
            database=self.database.dialect,
            replica=self.engine.replica_id,
        )
        return self.port

    async def _end_expired_leases(self) -> None:
        while await self.engine.expire_due():
            pass

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run `job` every `seconds` until stopping; a failure is logged, never fatal."""
        while not self._stopping.is_set():
            try:
                await job()
            except Exception:
                log.exception("timer job failed", job=getattr(job, "__name__", str(job)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def stop(self) -> None:
        """Health NOT_SERVING, no new calls, in-flight calls get the grace, then close."""
        self._stopping.set()
        self.notifier.wake([UNSEQUENCED])  # the sequencer numbers what is left, then ends
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # Streams first: told to reconnect elsewhere, they record their disconnect.
            self.notifier.announce_stopping()
            await self.sessions.shut_down(self.config.shutdown_grace.total_seconds())
            await self.worker_sessions.shut_down(self.config.shutdown_grace.total_seconds())
            await self._server.stop(self.config.shutdown_grace.total_seconds())
        if self._timers:
            # Each timer finishes the job in hand: a database call cancelled half-way leaves
            # its pooled connection unusable (and logs a spurious failure).
            await asyncio.wait(self._timers, timeout=self.config.shutdown_grace.total_seconds())
        for task in self._timers:
            task.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        await self.engine.close()
        if self.announcer is not None:
            await self.announcer.flush(timeout=1.0)
        await stop_task(self._announcer_task)
        await stop_task(self._listener_task)
        await self.database.dispose()
        log.info("control stopped")

    async def run_until_signalled(self) -> None:
        await self.start()
        tune_garbage_collector()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", grace=self.config.shutdown_grace.total_seconds())
        await self.stop()
