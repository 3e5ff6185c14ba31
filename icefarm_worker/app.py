"""The worker process: wires the hardware, the boards, the control stream and WorkerService.

`start()` serves WorkerService (with health and reflection) and starts the boards and the
control stream; `run_until_signalled()` drains on SIGTERM/SIGINT (a second signal stops at
once) and returns when the drain is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import signal
import socket

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from icefarm.handlers import add_servicer
from icefarm.health import HealthServicer
from icefarm.limits import MAX_WORKER_MESSAGE_BYTES
from icefarm.reflection import enable_reflection
from icefarm.server_options import server_options
from icefarm.v1 import worker_service_pb2
from icefarm_worker.access import Access
from icefarm_worker.backends import Hardware, open_hardware
from icefarm_worker.commands import CommandHandler
from icefarm_worker.config import WorkerConfig
from icefarm_worker.fleet import Fleet
from icefarm_worker.lifecycle import Timeouts
from icefarm_worker.service import WorkerServicer
from icefarm_worker.session import ControlSession, Identity

log = structlog.get_logger(__name__)
WORKER_SERVICE = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"]
SERVICE_NAME = WORKER_SERVICE.full_name
# The largest request is an EvaluateRequest: one bitstream plus its id and device id (room
# for those and the framing). A bigger message is refused by gRPC (RESOURCE_EXHAUSTED) before
# it is read whole; one between the two limits is INVALID_ARGUMENT naming bitstream.data.
MAX_MESSAGE_BYTES = MAX_WORKER_MESSAGE_BYTES
SERVER_OPTIONS = server_options(MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES)


class BindError(RuntimeError):
    """The WorkerService address could not be bound."""


def _version() -> str:
    try:
        return importlib.metadata.version("icefarm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def advertised_endpoint(listen: str, port: int, advertise: str = "") -> str:
    """Where clients reach this worker: --advertise, else the listen host (the host name
    when listening on every interface) with the bound port."""
    if advertise:
        return advertise
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


class WorkerApp:
    """One worker daemon."""

    def __init__(self, config: WorkerConfig, hardware: Hardware | None = None) -> None:
        self.config = config
        self.hardware = hardware
        self.port = 0
        self.endpoint = ""
        self._draining = False
        self.drained = asyncio.Event()
        self._drain_deadline: float | None = None
        self._drain_started = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._session_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ start and stop

    async def start(self) -> int:
        """Serve WorkerService, bring the boards up, connect to the control; the bound port."""
        config = self.config
        if self.hardware is None:
            self.hardware = await open_hardware(config)
        hw = self.hardware
        self.fleet = Fleet(
            hw.discovery,
            hw.make_board,
            usbip=hw.usbip,
            firmware=hw.firmware,
            modes=hw.modes,
            timeouts=Timeouts(
                flash=config.flash_timeout,
                test=config.test_timeout,
                ready=config.ready_timeout,
                evaluate=config.evaluate_timeout,
            ),
            # Every report carries the devices' properties and run-time labels.
            report=lambda update: self.session.report(hw.descriptions.complete(update)),
        )
        self.access = Access(self.fleet)
        try:
            self._bind()
        except BindError:
            await hw.close()
            raise
        self.endpoint = advertised_endpoint(config.listen, self.port, config.advertise)
        self.servicer.export_host = self.endpoint.rpartition(":")[0]
        self.commands = CommandHandler(self.fleet, lambda r: self.session.result(r), self)
        self.session = ControlSession(
            config.control,
            Identity(config.name, self.endpoint, _version(), sorted(hw.modes), config.labels),
            devices=lambda: [hw.descriptions.complete(u) for u in self.fleet.updates()],
            on_command=self.commands.handle,
            on_registered=lambda registered: self.access.set_key(registered.token_verification_key),
            reconnect_max=config.reconnect_max,
        )
        assert self._server is not None and self._health is not None
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.fleet.start()
        self._session_task = asyncio.create_task(self.session.run())
        log.info(
            "worker serving",
            port=self.port,
            endpoint=self.endpoint,
            worker=config.name,
            control=",".join(config.control),
            boards=len(self.fleet.boards),
        )
        return self.port

    def _bind(self) -> None:
        hw = self.hardware
        assert hw is not None
        server = grpc.aio.server(options=SERVER_OPTIONS)
        # Export answers with the advertised host, known once the port is bound.
        self.servicer = WorkerServicer(
            self.access,
            "",
            hw.usbip.port if hw.usbip is not None else None,
            self.config.evaluate_queue_per_board,
            hw.descriptions,
        )
        # Bytes that are not the request message are INVALID_ARGUMENT (icefarm/handlers.py).
        add_servicer(server, WORKER_SERVICE, self.servicer)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            raise BindError(f"cannot listen on {self.config.listen}: {exc}") from exc
        if self.port == 0:
            raise BindError(f"cannot listen on {self.config.listen}: address in use")
        self._server = server

    async def stop(self, grace: float = 2.0) -> None:
        """Close the control stream, stop serving, let go of the hardware."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._session_task is not None:
            await self.session.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._session_task), 10)
            except TimeoutError:
                self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session_task
        if self._server is not None:
            await self._server.stop(grace)
        await self.fleet.stop()
        if self.hardware is not None:
            await self.hardware.close()
        log.info("worker stopped")

    # ------------------------------------------------------------ drain

    @property
    def draining(self) -> bool:
        """True once a drain has begun."""
        return self._draining

    def begin_drain(self, timeout: float | None) -> None:
        """No new reservations; the control tells holders and sends DrainComplete once the
        last one has ended. Idempotent; a shorter timeout wins."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._drain_deadline is not None:
            deadline = min(deadline, self._drain_deadline)
        self._drain_deadline = deadline
        if not self._draining:
            log.info("draining", timeout=timeout)
            self._draining = True
            self.session.draining(timeout)
        self._drain_started.set()

    def drain_complete(self) -> None:
        """The control sent DrainComplete: the drain is over."""
        log.info("drain complete")
        self.drained.set()

    async def wait_drained(self) -> None:
        """Until the control says the drain is complete, or the drain timeout passes (or the
        control is out of reach and no board is held here)."""
        loop = asyncio.get_running_loop()
        while not self.drained.is_set():
            assert self._drain_deadline is not None
            remaining = self._drain_deadline - loop.time()
            if remaining <= 0:
                log.warning("drain timed out")
                return
            if not self.session.connected.is_set() and not self.fleet.any_held():
                log.info("control out of reach and nothing held: drain over")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), min(remaining, 1.0))

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT (or a Drain command), drain, stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop_now = asyncio.Event()

        def on_signal() -> None:
            if self._draining:
                stop_now.set()  # a second signal: stop without waiting
            else:
                self.begin_drain(None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await self._drain_started.wait()
            waiting = asyncio.create_task(self.wait_drained())
            interrupt = asyncio.create_task(stop_now.wait())
            await asyncio.wait({waiting, interrupt}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            interrupt.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
