"""A client process that opens a Session, says so, and then does nothing until it is killed.

Run as `python -m tests.integration.session_holder ADDRESS CLIENT_ID` from the repository root.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from icefarm.v1 import reservation_service_pb2 as rpb
from icefarm.v1 import reservation_service_pb2_grpc as rpb_grpc


async def hold(address: str, client_id: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: rpb_grpc.ReservationServiceAsyncStub = rpb_grpc.ReservationServiceStub(channel)
        call = stub.Session(metadata=(("icefarm-client-id", client_id),))
        await call.write(rpb.SessionRequest(hello=rpb.Hello()))
        first = await call.read()
        assert isinstance(first, rpb.SessionResponse)
        print(f"welcomed {first.welcome.client_id}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(hold(sys.argv[1], sys.argv[2]))
