"""Send one case over a real channel and record how the server answered.

Unary calls wait for their answer. Streams write every request, then stay open for a short
window reading what comes back (a WorkerSession may answer the commands it gets), and are
cancelled by the fuzzer if the server has not ended them: that end is ours, not the server's,
and counts as OK. Raw cases use identity serializers, so the bytes go on the wire as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from icefarm.v1 import control_service_pb2 as cpb
from tests.fuzz.cases import Case

# Client deadlines. A Reserve may wait (its wait_timeout is mostly short, sometimes not).
UNARY_TIMEOUT = 10.0
RESERVE_TIMEOUT = 2.0
EVALUATE_TIMEOUT = 15.0
STREAM_WINDOW = {"Session": 0.12, "WorkerSession": 0.3, "WatchEvents": 0.1, "Evaluate": 10.0}
# A stream the server must end by itself (Case.must_end) gets this long at least: ending it is
# immediate, so only a server that never ends it waits this out (a loaded machine does not).
MUST_END_WINDOW = 3.0
CLOSED_BY_FUZZER = "closed by the fuzzer"


def window_for(case: Case) -> float:
    seconds = STREAM_WINDOW.get(case.rpc.name, 0.2)
    return max(seconds, MUST_END_WINDOW) if case.must_end() else seconds


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    responses: list[Any] = field(default_factory=list)
    # The call could not be sent at all (the client library refused the headers), or its
    # status was lost to the client library: a write racing the server's end makes grpc
    # replace the server's status with its own INTERNAL "Internal error from Core".
    unsendable: str = ""
    closed_by_fuzzer: bool = False


def _serializers(case: Case, response_type: type[Message] | None) -> dict[str, Any]:
    if case.raw is not None or response_type is None:
        return {"request_serializer": None, "response_deserializer": None}
    return {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_type.FromString,
    }


def _payloads(case: Case) -> list[Any]:
    return list(case.raw) if case.raw is not None else list(case.requests)


def _from_error(error: grpc.aio.AioRpcError, responses: list[Any]) -> Outcome:
    return Outcome(
        error.code(),
        error.details() or "",
        tuple(error.trailing_metadata() or ()),
        responses,
    )


async def run(channel: grpc.aio.Channel, case: Case) -> Outcome:
    """Send `case` on `channel`; how it ended."""
    response_type = case.rpc.response
    try:
        if case.rpc.client_streaming:
            return await _bidi(channel, case, response_type)
        if case.rpc.server_streaming:
            return await _server_stream(channel, case, response_type)
        return await _unary(channel, case, response_type)
    except grpc.aio.AioRpcError as error:
        return _from_error(error, [])
    except grpc.aio.UsageError as error:
        return Outcome(grpc.StatusCode.OK, unsendable=f"usage: {error}")
    except Exception as error:
        # grpc refuses some headers before sending (ExecuteBatchError); nothing reached the server.
        if type(error).__name__ == "ExecuteBatchError":
            return Outcome(grpc.StatusCode.OK, unsendable=str(error)[:80])
        raise


async def _unary(channel: grpc.aio.Channel, case: Case, response_type: type[Message]) -> Outcome:
    method = channel.unary_unary(case.rpc.path, **_serializers(case, response_type))
    timeout = RESERVE_TIMEOUT if case.rpc.name == "Reserve" else UNARY_TIMEOUT
    call = method(_payloads(case)[0], metadata=case.metadata, timeout=timeout)
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return _from_error(error, [])
    trailing = tuple(await call.trailing_metadata() or ())
    return Outcome(grpc.StatusCode.OK, "", trailing, [response])


class _Window:
    """Cancels a call after `seconds` unless it ended first; remembers that it did."""

    def __init__(self, call: Any, seconds: float) -> None:
        self.call = call
        self.fired = False
        self._task = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self.call.cancel()

    def close_now(self) -> None:
        """Everything awaited has come: end the call (the fuzzer's end, not the server's)."""
        self._task.cancel()
        self._fire()

    def stop(self) -> None:
        self._task.cancel()


async def _read_all(call: Any, responses: list[Any], on_response: Any = None) -> None:
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            return
        responses.append(message)
        if on_response is not None:
            await on_response(message)


LOCAL_INTERNAL = "Internal error from Core"


async def _finish(call: Any, window: _Window, responses: list[Any]) -> Outcome:
    window.stop()
    if window.fired:
        return Outcome(grpc.StatusCode.OK, CLOSED_BY_FUZZER, (), responses, closed_by_fuzzer=True)
    code = await call.code()
    details = await call.details() or ""
    trailing = tuple(await call.trailing_metadata() or ())
    if code == grpc.StatusCode.INTERNAL and details == LOCAL_INTERNAL and not trailing:
        return Outcome(code, details, (), responses, unsendable="status lost to a write race")
    return Outcome(code, details, trailing, responses)


async def _server_stream(
    channel: grpc.aio.Channel, case: Case, response_type: type[Message]
) -> Outcome:
    method = channel.unary_stream(case.rpc.path, **_serializers(case, response_type))
    call = method(_payloads(case)[0], metadata=case.metadata, timeout=UNARY_TIMEOUT)
    window = _Window(call, window_for(case))
    responses: list[Any] = []
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        await _read_all(call, responses)
    return await _finish(call, window, responses)


async def _bidi(channel: grpc.aio.Channel, case: Case, response_type: type[Message]) -> Outcome:
    method = channel.stream_stream(case.rpc.path, **_serializers(case, response_type))
    timeout = EVALUATE_TIMEOUT if case.rpc.name == "Evaluate" else UNARY_TIMEOUT
    call = method(metadata=case.metadata, timeout=timeout)
    lock = asyncio.Lock()
    closed = False

    async def write(message: Any) -> None:
        async with lock:
            if not closed:
                await call.write(message)

    async def answer(response: Any) -> None:
        if case.rpc.name == "Evaluate" and not case.half_close and len(responses) >= len(payloads):
            window.close_now()  # a result for each bitstream: nothing more will come
            return
        # A worker that does its job: every command gets a result with its correlation id.
        if case.answer_commands is None or not isinstance(response, cpb.WorkerSessionResponse):
            return
        if response.WhichOneof("kind") == "command":
            result = cpb.CommandResult(
                correlation_id=response.command.correlation_id,
                ok=case.answer_commands,
                error="" if case.answer_commands else "fuzz refuses",
            )
            await write(cpb.WorkerSessionRequest(command_result=result))

    responses: list[Any] = []
    payloads = _payloads(case)
    window = _Window(call, window_for(case))
    reader = asyncio.create_task(_read_all(call, responses, answer))
    try:
        for payload in payloads:
            await write(payload)
        if case.half_close and case.answer_commands is None:
            async with lock:
                closed = True
                await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the server ended the call while we wrote: its status says why
    except asyncio.CancelledError:
        # grpc raises this from a write when the call is cancelled under it (our window);
        # any other cancellation is the caller's and goes on.
        if not window.fired:
            raise
    with contextlib.suppress(
        grpc.aio.AioRpcError, asyncio.CancelledError, asyncio.InvalidStateError
    ):
        await reader
    return await _finish(call, window, responses)
