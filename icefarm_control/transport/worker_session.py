"""ControlService.WorkerSession: the stream a worker opens to the control (it works behind NAT).

The shape follows labgrid's coordinator: a handshake with a timeout (the first message must be
Register), then a receive task over the request iterator dispatching on the `oneof`, while the
handler itself sends the worker's commands. Commands come from the outbox, oldest first; a
wake-up on the topic "worker:<name>" (from any replica) or a slow poll makes the handler look.
No lock is held while waiting on the network: every step is a short database transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from icefarm.v1 import control_service_pb2 as pb
from icefarm_control.domain.errors import (
    IcefarmDomainError,
    Internal,
    InvalidArgument,
    Reason,
    Unavailable,
)
from icefarm_control.domain.settings import WORKER_COMMAND_POLL_SECONDS
from icefarm_control.domain.workers import Session, SessionExpired, WorkerRegistry
from icefarm_control.notifier import Flag, Notifier, Subscription
from icefarm_control.storage.outbox import worker_topic
from icefarm_control.transport import convert, worker_messages
from icefarm_control.transport.errors import (
    abort,
    domain_status,
    failure_status,
    is_database_unreachable,
    is_transaction_conflict,
    to_status,
)

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
Requests = AsyncIterator[pb.WorkerSessionRequest]
# Commands are re-read this often even without a wake-up (a lost NOTIFY only costs this much).
# The slow re-read that catches a lost wake-up. Wake-ups do the real work, so this is long and
# jittered: a thousand idle workers must not turn into a steady stream of queries.
POLL_SECONDS = WORKER_COMMAND_POLL_SECONDS
BATCH = 100
# A message that lost a deadlock is tried again this often before the stream ends (the worker
# then registers again with its whole state, so nothing it reported is lost).
CONFLICT_ATTEMPTS = 3


class WorkerSessionHandler:
    def __init__(
        self, registry: WorkerRegistry, notifier: Notifier, poll_seconds: float = POLL_SECONDS
    ) -> None:
        self.registry = registry
        self.notifier = notifier
        self.poll_seconds = poll_seconds
        self._closing = False
        # Open streams: their wake-up, and an event set once their end is recorded.
        self._live: dict[Session, tuple[Subscription, Flag]] = {}

    async def serve(
        self, requests: Requests, context: Context
    ) -> AsyncIterator[pb.WorkerSessionResponse]:
        iterator = aiter(requests)
        register = await self._handshake(iterator, context)
        if self._closing:
            await abort(context, _SHUTTING_DOWN)
        try:
            session = await self.registry.register(worker_messages.registration(register))
        except IcefarmDomainError as error:
            log.info("worker session refused", worker=register.name, reason=error.reason.value)
            await abort(context, domain_status(error))
        except Exception as error:
            await abort(context, failure_status(error, "WorkerSession"))
        finished = Flag()
        try:
            yield pb.WorkerSessionResponse(
                registered=pb.Registered(
                    worker_name=session.worker,
                    timers=convert.timers(self.registry.timers),
                    token_verification_key=self.registry.engine.signer.public_key,
                )
            )
            with self.notifier.subscribe(worker_topic(session.worker)) as wake:
                self._live[session] = (wake, finished)
                receiver = asyncio.create_task(self._receive(iterator, session, wake))
                ending: grpc.Status | None = None
                try:
                    async for response in self._send_commands(session, wake, receiver):
                        yield response
                    if self._closing:
                        ending = _SHUTTING_DOWN
                    elif receiver.done() and not receiver.cancelled():
                        ending = receiver.result()
                except _Ended as ended:
                    ending = ended.status
                finally:
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await receiver
            if ending is not None:
                await abort(context, ending)
        finally:
            await self._end(session)
            self._live.pop(session, None)
            finished.set()

    async def shut_down(self, timeout: float) -> None:
        """End every worker stream with UNAVAILABLE (workers reconnect, to another replica if
        there is one) and wait, up to `timeout`, for each to record its end."""
        self._closing = True
        streams = list(self._live.values())
        for wake, _ in streams:
            wake.event.set()
        if streams:
            waiting = [asyncio.ensure_future(finished.wait()) for _, finished in streams]
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            for task in pending:
                task.cancel()

    async def _handshake(self, iterator: Requests, context: Context) -> pb.Register:
        timeout = self.registry.timers.handshake_timeout.total_seconds()
        try:
            first = await asyncio.wait_for(anext(iterator), timeout)
        except TimeoutError:
            await abort(
                context,
                to_status(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"register: no Register within {timeout:g} s of opening the stream",
                    Reason.INVALID_FIELD.value,
                    "register",
                ),
            )
        except StopAsyncIteration:
            await abort(context, _protocol_error("the stream closed before Register"))
        except Exception as error:  # the edge check refused the first message, or the stream broke
            await abort(context, failure_status(error, "WorkerSession"))
        if first.WhichOneof("kind") != "register":
            await abort(context, _protocol_error("the first message must be Register"))
        return first.register

    async def _send_commands(
        self, session: Session, wake: Subscription, receiver: asyncio.Task[grpc.Status | None]
    ) -> AsyncIterator[pb.WorkerSessionResponse]:
        """Deliver the worker's commands in order until the receive side ends (it then wakes
        us) or this stream stops holding the worker's current session."""
        while not receiver.done() and not self._closing:
            try:
                commands = await asyncio.shield(self.registry.take_commands(session, BATCH))
            except SessionExpired as error:
                log.info("worker session replaced", worker=session.worker)
                raise _Ended(domain_status(error)) from error
            except Exception as error:
                # The worker reconnects and gets everything again (nothing was marked SENT).
                raise _Ended(failure_status(error, "WorkerSession")) from error
            for row in commands:
                message = worker_messages.command(row)
                if message is not None:
                    yield pb.WorkerSessionResponse(command=message)
            if len(commands) < BATCH:
                await wake.wait(self.poll_seconds * random.uniform(0.75, 1.25))

    async def _receive(
        self, iterator: Requests, session: Session, wake: Subscription
    ) -> grpc.Status | None:
        """Handle what the worker sends until it closes its side; the status to end with."""
        try:
            async for request in iterator:
                ending = await self._handle(session, request)
                if ending is not None:
                    return ending
            return None
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return failure_status(error, "WorkerSession")
        finally:
            wake.event.set()

    async def _handle(
        self, session: Session, request: pb.WorkerSessionRequest
    ) -> grpc.Status | None:
        """Apply one message; the status to end the stream with, or None to go on."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                # A message received is handled whole even if the stream is cancelled
                # meanwhile (never a transaction cut off halfway by a disconnect).
                await asyncio.shield(self._dispatch(session, request))
                return None
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if is_transaction_conflict(error) and attempt < CONFLICT_ATTEMPTS:
                    continue
                return _refuse(session, request, error)
        return None

    async def _dispatch(self, session: Session, request: pb.WorkerSessionRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind == "heartbeat":
            await self.registry.heartbeat(session)
        elif kind == "device_update":
            report = worker_messages.device_report(request.device_update)
            await self.registry.update_device(session, report)
        elif kind == "command_result":
            result = request.command_result
            await self.registry.command_result(
                session, result.correlation_id, ok=result.ok, error=result.error
            )
        elif kind == "draining":
            timeout = convert.optional_duration(
                "draining.timeout",
                request.draining.timeout,
                request.draining.HasField("timeout"),
            )
            await self.registry.drain(session.worker, timeout, tell_worker=False)
        elif kind == "register":
            raise InvalidArgument("register", "send Register only once, first")
        else:
            log.debug("empty or unknown worker message", worker=session.worker)

    async def _end(self, session: Session) -> None:
        try:
            await asyncio.shield(self.registry.end_session(session))
        except Exception:
            log.exception("could not record the end of a worker session", worker=session.worker)


class _Ended(Exception):
    """Raised out of the command loop to end the stream with a status."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


_SHUTTING_DOWN = to_status(
    grpc.StatusCode.UNAVAILABLE,
    "the control is shutting down; reconnect",
    Reason.SHUTTING_DOWN.value,
)


def _refuse(
    session: Session, request: pb.WorkerSessionRequest, error: Exception
) -> grpc.Status | None:
    """Only a session that is over or a database out of reach ends the stream (the worker
    registers again with its whole state, so nothing it reported is lost). Any other failure
    refuses this one message, with nothing applied, and is logged: one bad report must not cut
    off a worker that runs many boards. Call inside the `except` that caught `error`."""
    over = isinstance(error, Unavailable)
    if over or is_database_unreachable(error) or is_transaction_conflict(error):
        return failure_status(error, "WorkerSession")
    if isinstance(error, IcefarmDomainError) and not isinstance(error, Internal):
        log.warning(
            "worker message refused",
            worker=session.worker,
            kind=request.WhichOneof("kind"),
            reason=error.reason.value,
            error=error.message,
        )
    else:
        failure_status(error, "WorkerSession")  # a bug: logged with its traceback and incident
    return None


def _protocol_error(message: str) -> grpc.Status:
    return to_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"register: {message}",
        Reason.INVALID_FIELD.value,
        "register",
    )
