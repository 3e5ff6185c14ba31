"""Reading google.rpc details off a failed call, for assertions."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


def _status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no status details on {error.code()}: {error.details()}")


def reason_of(error: grpc.aio.AioRpcError) -> str:
    for detail in _status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "icefarm.dev"
            return info.reason
    raise AssertionError("no ErrorInfo detail")


def bad_fields_of(error: grpc.aio.AioRpcError) -> list[str]:
    for detail in _status(error).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return [v.field for v in bad.field_violations]
    return []
