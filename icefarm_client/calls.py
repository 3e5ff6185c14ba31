"""How every unary call is made: the right stub, metadata, a deadline, bounded jittered retries
of UNAVAILABLE, and translation of any failure into the client's exceptions."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from icefarm.metadata import REQUEST_ID_HEADER
from icefarm.v1 import control_service_pb2_grpc as cpb_grpc
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_client.connection import Settings
from icefarm_client.errors import Source, reason_of, translate

Response = TypeVar("Response")


def _is_unavailable(error: BaseException) -> bool:
    """Worth retrying: the control or its database is unreachable for a moment, or the call
    lost a deadlock (ABORTED, reason CONFLICT: nothing was committed)."""
    if not isinstance(error, grpc.RpcError):
        return False
    code = getattr(error, "code", None)
    if not callable(code):
        return False
    if code() is grpc.StatusCode.UNAVAILABLE:
        return True
    return code() is grpc.StatusCode.ABORTED and reason_of(error) == "CONFLICT"


class CallBase:
    """The connection to the control (and to the workers) that every API method uses.

    `channel` may be an asyncio channel, or a plain (sync) `grpc.Channel` such as
    `grpc_testing.channel(...)`; a sync channel's calls run in a thread."""

    def __init__(self, settings: Settings, channel: grpc.aio.Channel | grpc.Channel | None) -> None:
        self.settings = settings
        self._own_channel = channel is None
        self._channel: Any = (
            channel if channel is not None else settings.open_channel(settings.control)
        )
        self._sync = isinstance(channel, grpc.Channel)
        self._reservations: Any = rpb_grpc.ReservationServiceStub(self._channel)
        self._control: Any = cpb_grpc.ControlServiceStub(self._channel)
        self._workers: dict[str, grpc.aio.Channel] = {}

    @property
    def client_id(self) -> str:
        """The identity this client acts as."""
        return self.settings.client_id

    async def _call(
        self,
        service: str,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        retry: bool = True,
    ) -> Any:
        """Call `service.method` ("reservations" or "control") with retries of UNAVAILABLE."""
        stub = self._reservations if service == "reservations" else self._control
        function = getattr(stub, method)
        deadline = timeout if timeout is not None else self.settings.timeout
        # One id for the call and its retries: the control's log lines of it carry it. A
        # Reserve's is its idempotency key, so its retries are found with it too.
        call_id = getattr(request, "request_id", "") or uuid.uuid4().hex[:12]
        metadata = (*self.settings.metadata(), (REQUEST_ID_HEADER, call_id))
        policy = self.settings.retry

        async def invoke() -> Any:
            if self._sync:
                call = functools.partial(function, request, metadata=metadata, timeout=deadline)
                return await asyncio.to_thread(call)
            return await function(request, metadata=metadata, timeout=deadline)

        return await self._retrying(invoke, policy.attempts if retry else 1, "control")

    async def _retrying(self, invoke: Any, attempts: int, source: Source) -> Any:
        policy = self.settings.retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential_jitter(
                multiplier=policy.initial_backoff,
                max=policy.max_backoff,
                jitter=policy.initial_backoff,
            ),
            retry=retry_if_exception(_is_unavailable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await invoke()
        except grpc.RpcError as error:
            raise translate(error, source) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def worker_channel(self, endpoint: str) -> grpc.aio.Channel:
        """The (cached) channel to a worker's WorkerService."""
        channel = self._workers.get(endpoint)
        if channel is None:
            channel = self._workers[endpoint] = self.settings.open_channel(endpoint)
        return channel

    def worker_stub(self, endpoint: str) -> Any:
        """A WorkerService stub for the worker at `endpoint`."""
        return wpb_grpc.WorkerServiceStub(self.worker_channel(endpoint))

    async def _worker_call(self, endpoint: str, method: str, request: Any, token: str) -> Any:
        function = getattr(self.worker_stub(endpoint), method)
        metadata = self.settings.metadata(token)

        async def invoke() -> Any:
            return await function(request, metadata=metadata, timeout=self.settings.timeout)

        return await self._retrying(invoke, 2, "worker")

    async def _close_channels(self) -> None:
        for channel in self._workers.values():
            await channel.close()
        self._workers.clear()
        if self._own_channel:
            await self._channel.close()
