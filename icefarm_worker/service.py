"""WorkerService: what the holder of a reservation does with its boards on this worker.

Thin on purpose: every method checks the caller (access.py), calls one lifecycle step, and maps
the outcome to a response or a status with google.rpc details (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2

from icefarm.labels import key_problem, value_problem
from icefarm.limits import MAX_BITSTREAM_BYTES
from icefarm.states import DeviceState
from icefarm.tokens import TokenClaims
from icefarm.v1 import worker_service_pb2 as wpb
from icefarm.v1 import worker_service_pb2_grpc as wpb_grpc
from icefarm_worker.access import Access
from icefarm_worker.descriptions import DeviceDescriptions
from icefarm_worker.errors import (
    MODE_UNSUPPORTED,
    ServiceError,
    abort,
    failed_precondition,
    invalid_field,
    permission_denied,
)
from icefarm_worker.evaluation import EvaluationRun
from icefarm_worker.hardware.base import HardwareError
from icefarm_worker.lifecycle import HELD, BoardFailed, BoardLifecycle, NotHeld, proto_state

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000" — gRPC writes peers
    as URIs —, "unix:…") is this host over loopback."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme == "unix":
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def device_info(board: BoardLifecycle) -> wpb.DeviceInfo:
    """What GetDeviceInfo (and the mode-changing calls) answer."""
    uptime = duration_pb2.Duration()
    uptime.FromNanoseconds(int((time.monotonic() - board.since) * 1e9))
    return wpb.DeviceInfo(
        device_id=board.device_id,
        kind=board.device.kind,
        state=proto_state(board.state),
        mode=board.mode_name,
        mode_args=board.mode_args,
        reservation_id=board.reservation_id,
        serial_port=board.device.serial_port or "",
        firmware=board.firmware_name,
        uptime=uptime,
        error=board.error,
    )


class WorkerServicer(wpb_grpc.WorkerServiceServicer):
    """icefarm.v1.WorkerService for the holders of this worker's boards."""

    def __init__(
        self,
        access: Access,
        export_host: str,
        usbip_port: int | None,
        queue_per_board: int = 4,
        descriptions: DeviceDescriptions | None = None,
    ) -> None:
        self.access = access
        self.descriptions = descriptions or DeviceDescriptions()
        self.export_host = export_host
        self.usbip_port = usbip_port
        self.queue_per_board = queue_per_board
        # The Evaluate streams being served (tests and diagnostics read their counts).
        self.runs: set[EvaluationRun] = set()

    async def _held(self, context: Context, device_id: str) -> tuple[TokenClaims, BoardLifecycle]:
        try:
            claims = self.access.claims(context)
            return claims, self.access.board(claims, device_id)
        except ServiceError as error:
            log.info("worker call refused", reason=error.reason, error=error.message)
            await abort(context, error)

    async def _change_mode(
        self, context: Context, board: BoardLifecycle, rid: str, mode: str, args: dict[str, str]
    ) -> wpb.DeviceInfo:
        try:
            await board.set_mode(rid, mode, args)
        except NotHeld:
            await abort(context, permission_denied(f"device {board.device_id} was released"))
        except (BoardFailed, HardwareError) as exc:
            await abort(context, failed_precondition(f"device {board.device_id}: {exc}"))
        return device_info(board)

    async def SetMode(self, request: wpb.SetModeRequest, context: Context) -> wpb.SetModeResponse:
        """Switch a held board to another mode (re-flash, ready)."""
        claims, board = await self._held(context, request.device_id)
        if not request.mode:
            await abort(context, invalid_field("mode", "is required"))
        try:
            board.mode_class(request.mode)(request.mode_args)
        except KeyError:
            error = invalid_field("mode", f"this worker has no mode {request.mode!r}")
            error.reason = MODE_UNSUPPORTED
            await abort(context, error)
        except ValueError as exc:
            await abort(context, invalid_field("mode_args", str(exc)))
        info = await self._change_mode(
            context, board, claims.reservation_id, request.mode, dict(request.mode_args)
        )
        return wpb.SetModeResponse(device=info)

    async def RebootDevice(
        self, request: wpb.WorkerServiceRebootDeviceRequest, context: Context
    ) -> wpb.WorkerServiceRebootDeviceResponse:
        """Re-flash a held board's mode; the queue carries on after."""
        claims, board = await self._held(context, request.device_id)
        info = await self._change_mode(
            context, board, claims.reservation_id, board.mode_name, board.mode_args
        )
        return wpb.WorkerServiceRebootDeviceResponse(device=info)

    async def Export(self, request: wpb.ExportRequest, context: Context) -> wpb.ExportResponse:
        """usbip mode: bind the board and say where to attach it."""
        _, board = await self._held(context, request.device_id)
        if board.mode_name != "usbip" or self.usbip_port is None:
            await abort(
                context,
                failed_precondition(f"device {board.device_id} is not in usbip mode"),
            )
        try:
            bus_id = await board.export()
        except (BoardFailed, HardwareError) as exc:
            await abort(context, failed_precondition(f"device {board.device_id}: {exc}"))
        return wpb.ExportResponse(bus_id=bus_id, host=self.export_host, port=self.usbip_port)

    async def GetDeviceInfo(
        self, request: wpb.GetDeviceInfoRequest, context: Context
    ) -> wpb.GetDeviceInfoResponse:
        """What a held board is doing."""
        _, board = await self._held(context, request.device_id)
        return wpb.GetDeviceInfoResponse(device=device_info(board))

    async def UpdateDevice(
        self, request: wpb.UpdateDeviceRequest, context: Context
    ) -> wpb.UpdateDeviceResponse:
        """Merge labels and properties into a device ("" and NaN remove a key) and tell the
        control at once. Only from this host (loopback), so no token is needed."""
        try:
            board = self._updatable(context.peer() or "", request)
        except ServiceError as error:
            log.info("device update refused", reason=error.reason, error=error.message)
            await abort(context, error)
        device_id = board.device_id
        self.descriptions.change(device_id, dict(request.labels), dict(request.properties))
        self.access.fleet.report(self.descriptions.labels_update(device_id))
        labels = self.descriptions.labels(device_id, board.device.labels)
        properties = self.descriptions.properties(device_id)
        log.info("device updated", device=device_id, labels=labels, properties=properties)
        return wpb.UpdateDeviceResponse(device_id=device_id, labels=labels, properties=properties)

    def _updatable(self, peer: str, request: wpb.UpdateDeviceRequest) -> BoardLifecycle:
        """The device an UpdateDevice may change; ServiceError otherwise."""
        if not is_loopback(peer):
            raise permission_denied(
                f"UpdateDevice is accepted only from this host (loopback), not {peer}"
            )
        if not request.device_id:
            raise invalid_field("device_id", "is required")
        board = self.access.fleet.boards.get(request.device_id)
        if board is None or board.state == DeviceState.REMOVED:
            raise invalid_field("device_id", f"no device {request.device_id!r} on this worker")
        for key, value in request.labels.items():
            problem = key_problem(key) or value_problem(key, value)
            if problem:
                raise invalid_field("labels", problem)
        for key, number in request.properties.items():
            problem = key_problem(key)
            if problem is None and math.isinf(number):
                problem = f"property {key}: must be finite (NaN removes it)"
            if problem:
                raise invalid_field("properties", problem)
        return board

    async def Evaluate(
        self, request_iterator: AsyncIterator[wpb.EvaluateRequest], context: Context
    ) -> AsyncIterator[wpb.EvaluateResponse]:
        """Bitstreams in, one result each out as soon as it exists."""
        try:
            claims = self.access.claims(context)
            boards = self.access.held_boards(claims)
            if not boards:
                raise permission_denied(
                    f"reservation {claims.reservation_id} holds no board on this worker"
                )
        except ServiceError as error:
            log.info("evaluate refused", reason=error.reason, error=error.message)
            await abort(context, error)
        # Broken boards take no bitstreams; with none working, each gets a failed result.
        working = [b for b in boards if b.state in HELD]
        limit = self.queue_per_board * max(1, len(working))
        run = EvaluationRun(working, claims.reservation_id, limit)
        run.start()
        self.runs.add(run)
        refused: list[ServiceError] = []
        reader = asyncio.create_task(self._read(request_iterator, run, claims, refused))
        try:
            async for result in run.results():
                yield wpb.EvaluateResponse(result=result)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await run.stop()
            self.runs.discard(run)
        if refused:
            await abort(context, refused[0])

    async def _read(
        self,
        requests: AsyncIterator[wpb.EvaluateRequest],
        run: EvaluationRun,
        claims: TokenClaims,
        refused: list[ServiceError],
    ) -> None:
        try:
            async for request in requests:
                bitstream = request.bitstream
                self._check_bitstream(bitstream, run, claims)
                run.submit(bitstream)
                # Back-pressure: unread messages stay in gRPC's flow-control window.
                await run.room()
        except ServiceError as error:
            refused.append(error)
            run.end()
            return
        except grpc.aio.AioRpcError:
            run.end()
            return
        run.finish_input()

    def _check_bitstream(
        self, bitstream: wpb.Bitstream, run: EvaluationRun, claims: TokenClaims
    ) -> None:
        if not bitstream.id:
            raise invalid_field("bitstream.id", "is required")
        if not bitstream.data:
            raise invalid_field("bitstream.data", "is empty")
        if len(bitstream.data) > MAX_BITSTREAM_BYTES:
            raise invalid_field(
                "bitstream.data",
                f"is {len(bitstream.data)} bytes; at most {MAX_BITSTREAM_BYTES} are accepted",
            )
        device_id = bitstream.device_id
        if device_id and device_id not in run.boards:
            # Unknown or not the caller's: refused. Held but broken (or readied after the
            # stream began): it runs on another board of the stream, or fails as a result.
            self.access.board(claims, device_id, "bitstream.device_id")
