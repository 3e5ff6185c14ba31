"""A test's side of ReservationService.Session and small waiting helpers (no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from icefarm.v1 import control_service_pb2_grpc, types_pb2
from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc
from icefarm_control.app import ControlApp
from icefarm_control.config import ControlConfig
from tests.integration.conftest import RunningControl, as_client

T = TypeVar("T")
WAIT = 10.0


class SessionClient:
    """One Session stream, written and read with the call's own write()/read()."""

    def __init__(self, call: Any, welcome: rpb.Welcome) -> None:
        self.call = call
        self.welcome = welcome

    @classmethod
    async def open(
        cls, stub: rpb_grpc.ReservationServiceStub, client_id: str, resume_after: int = 0
    ) -> SessionClient:
        call = stub.Session(metadata=as_client(client_id))
        await call.write(rpb.SessionRequest(hello=rpb.Hello(resume_after=resume_after)))
        first = await asyncio.wait_for(call.read(), WAIT)
        assert first.WhichOneof("kind") == "welcome", first
        return cls(call, first.welcome)

    async def send(self, request: rpb.SessionRequest) -> None:
        await self.call.write(request)

    async def receive(self, timeout: float = WAIT) -> rpb.SessionResponse:
        message = await asyncio.wait_for(self.call.read(), timeout)
        assert message is not grpc.aio.EOF, "the stream ended"
        response: rpb.SessionResponse = message
        return response

    async def next_event(self, timeout: float = WAIT) -> types_pb2.Event:
        """The next event, skipping pongs."""
        while True:
            response = await self.receive(timeout)
            if response.WhichOneof("kind") == "event":
                return response.event

    async def events(self, count: int, timeout: float = WAIT) -> list[types_pb2.Event]:
        return [await self.next_event(timeout) for _ in range(count)]

    async def ping(self, nonce: int) -> list[types_pb2.Event]:
        """Round-trip a ping; the events that arrived before its pong."""
        await self.send(rpb.SessionRequest(ping=rpb.Ping(nonce=nonce)))
        before: list[types_pb2.Event] = []
        while True:
            response = await self.receive()
            if response.WhichOneof("kind") == "pong":
                assert response.pong.nonce == nonce
                return before
            before.append(response.event)

    async def watch(self, selector: str, count: int) -> None:
        await self.send(
            rpb.SessionRequest(watch=rpb.WatchAvailability(selector=selector, count=count))
        )

    async def status(self, timeout: float = WAIT) -> grpc.aio.AioRpcError:
        """Read until the stream fails; the error it failed with."""
        try:
            while True:
                message = await asyncio.wait_for(self.call.read(), timeout)
                assert message is not grpc.aio.EOF, "the stream ended with OK"
        except grpc.aio.AioRpcError as error:
            return error

    def close(self) -> None:
        self.call.cancel()


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = WAIT, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something other than None/False, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def kinds(events: list[types_pb2.Event]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


async def start_control(database_url: str, **settings: Any) -> RunningControl:
    """An in-process control with the given settings (timers shortened by the caller)."""
    config = ControlConfig(
        listen="127.0.0.1:0",
        database=database_url,
        shutdown_grace=timedelta(seconds=1),
        log_level="warning",
        **settings,
    )
    app = ControlApp(config)
    port = await app.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    return RunningControl(
        app,
        address,
        channel,
        rpb_grpc.ReservationServiceStub(channel),
        control_service_pb2_grpc.ControlServiceStub(channel),
    )


async def stop_control(control: RunningControl) -> None:
    await control.channel.close()
    await control.app.stop()
