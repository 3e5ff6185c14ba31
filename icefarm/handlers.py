"""Adding a servicer to a gRPC server so that bytes which are not the method's request message
are answered INVALID_ARGUMENT, not UNKNOWN.

The generated `add_*Servicer_to_server` functions parse requests with `FromString`; garbage
raises DecodeError inside gRPC, which answers UNKNOWN with nothing the caller can act on. Here
the parser returns `UNDECODABLE` instead and the method is not called: a unary call or a bad
first stream message is refused naming `request`; a bad later stream message is logged and
skipped (the stream goes on, as for any other refused message). Shared by control and worker.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc
import structlog
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from icefarm.metadata import REQUEST_ID_HEADER

log = structlog.get_logger(__name__)
ERROR_DOMAIN = "icefarm.dev"
Context = grpc.aio.ServicerContext[Any, Any]


class _Undecodable:
    """What a request that does not parse becomes."""


UNDECODABLE: Final = _Undecodable()


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register every method of `service` on `server`, served by `servicer`'s methods of the
    same names, with requests parsed leniently (see the module docstring)."""
    handlers = {method.name: _handler(method, servicer) for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _handler(method: MethodDescriptor, servicer: object) -> grpc.RpcMethodHandler[Any, Any]:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    parse = _lenient(request_class)
    serialize = response_class.SerializeToString
    name = method.input_type.name
    target = getattr(servicer, method.name)
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streamed(target, name, method.full_name), parse, serialize
        )
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _streamed_unary(target, name, method.full_name), parse, serialize
        )
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_to_stream(target, name), parse, serialize)
    return grpc.unary_unary_rpc_method_handler(_unary(target, name), parse, serialize)


def _lenient(request_class: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return request_class.FromString(data)
        except DecodeError:
            return UNDECODABLE

    return parse


def refusal(type_name: str) -> grpc.Status:
    """INVALID_ARGUMENT naming `request`: the bytes are not a `type_name` message."""
    description = f"the bytes received are not an icefarm.v1.{type_name} message"
    info, bad = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain=ERROR_DOMAIN))
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="request", description=description
    )
    bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=f"request: {description}", details=[info, bad]
    )
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


async def _refuse(context: Context, type_name: str) -> None:
    await context.abort_with_status(refusal(type_name))


def request_id(context: Context) -> str:
    """The caller's `x-request-id` (kept when it is short and printable), else a new one: every
    log line of the call carries it, so one call's lines can be found together."""
    for key, value in context.invocation_metadata() or ():
        usable = isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable()
        if key == REQUEST_ID_HEADER and usable:
            return str(value)
    return secrets.token_hex(6)


def _unary(target: Callable[..., Any], type_name: str) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> Any:
        with structlog.contextvars.bound_contextvars(request_id=request_id(context)):
            if request is UNDECODABLE:
                await _refuse(context, type_name)
            return await target(request, context)

    return call


def _to_stream(target: Callable[..., Any], type_name: str) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        with structlog.contextvars.bound_contextvars(request_id=request_id(context)):
            if request is UNDECODABLE:
                await _refuse(context, type_name)
            async for response in target(request, context):
                yield response

    return call


def _streamed(target: Callable[..., Any], type_name: str, rpc: str) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        with structlog.contextvars.bound_contextvars(request_id=request_id(context)):
            async for response in target(_decoded(requests, context, type_name, rpc), context):
                yield response

    return call


def _streamed_unary(target: Callable[..., Any], type_name: str, rpc: str) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: Context) -> Any:
        with structlog.contextvars.bound_contextvars(request_id=request_id(context)):
            return await target(_decoded(requests, context, type_name, rpc), context)

    return call


async def _decoded(
    requests: AsyncIterator[Any], context: Context, type_name: str, rpc: str
) -> AsyncIterator[Any]:
    first = True
    async for request in requests:
        if request is not UNDECODABLE:
            first = False
            yield request
        elif first:
            await _refuse(context, type_name)
        else:
            log.warning("undecodable stream message skipped", rpc=rpc)
