"""Server reflection that also answers for method symbols, shared by the control and workers.

The upb descriptor pool does not find the file declaring a service method (grpc/grpc#34743),
so `grpcurl describe icefarm.v1.ReservationService.Reserve` would fail; this wrapper finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha import reflection


class MethodAwarePool:
    """A descriptor pool that also finds the file declaring a service method."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, name: str) -> descriptor.FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(name) from None
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Reflection for `service_names` (and the reflection service itself) on `server`."""
    reflection.enable_server_reflection(
        (*service_names, reflection.SERVICE_NAME),
        server,
        pool=cast(descriptor_pool.DescriptorPool, MethodAwarePool(descriptor_pool.Default())),
    )
