"""A scripted stand-in for the worker daemon: drives a real WorkerSession over a real channel.

As a library (`StandinWorker`) a test registers N boards, reports state changes and watches
the commands arrive; commands are answered the way a worker would (prepare → READY then ok;
release → FLASHING → TESTING → AVAILABLE then ok), unless the test asks it to refuse or
ignore some kinds. As a script it is a process a test can SIGKILL:

    python -m tests.standin_worker --control 127.0.0.1:50051 --name lab-a --devices 4

The script prints one JSON line {"event": "registered", ...} each time it registers, and
registers again (same name, same boards) whenever its stream ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import grpc

from icefarm.v1 import control_service_pb2 as pb
from icefarm.v1 import control_service_pb2_grpc as pb_grpc
from icefarm.v1 import types_pb2

S = types_pb2
COMMAND_KINDS = frozenset(f.name for f in pb.WorkerCommand.DESCRIPTOR.oneofs_by_name["kind"].fields)


@dataclass
class Board:
    state: int = S.DEVICE_STATE_AVAILABLE
    reservation_id: str = ""


class StandinWorker:
    def __init__(
        self,
        address: str,
        name: str,
        devices: int | Sequence[str] = 2,
        *,
        endpoint: str = "127.0.0.1:7000",
        kind: str = "pico2-ice",
        reset_on_release: bool = True,
        state: int = S.DEVICE_STATE_AVAILABLE,
        ignore: Collection[str] = (),
        refuse: Collection[str] = (),
    ) -> None:
        ids = [f"{name}-{i:03d}" for i in range(devices)] if isinstance(devices, int) else devices
        self.address = address
        self.name = name
        self.endpoint = endpoint
        self.kind = kind
        self.reset_on_release = reset_on_release
        self.boards = {device_id: Board(state) for device_id in ids}
        # Command kinds (oneof names) received but never answered / answered with ok=False.
        self.ignore = set(ignore)
        self.refuse = set(refuse)
        self.received: list[pb.WorkerCommand] = []
        # Correlation ids already carried out: a command sent again after a reconnect is
        # answered without doing it twice (the real worker does the same).
        self.done: set[str] = set()
        self.on_command: Callable[[pb.WorkerCommand], None] | None = None
        self.registered: pb.Registered | None = None
        self.heartbeats = True
        self.error: grpc.aio.AioRpcError | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[pb.WorkerSessionRequest, pb.WorkerSessionResponse]
        self._write_lock = asyncio.Lock()
        self._closing = False
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.ended = asyncio.Event()

    @property
    def device_ids(self) -> list[str]:
        return sorted(self.boards)

    # ------------------------------------------------------------ the stream

    async def open(self) -> None:
        """Open the stream without registering (for handshake tests)."""
        self._closing = False
        self._tasks = []
        self.ended.clear()
        self.error = None
        self._channel = grpc.aio.insecure_channel(self.address)
        self._call = pb_grpc.ControlServiceStub(self._channel).WorkerSession()

    async def start(self) -> pb.Registered:
        """Open the stream, register the boards, and start answering commands."""
        await self.open()
        await self.send(pb.WorkerSessionRequest(register=self.register_message()))
        first = await self._call.read()
        if not isinstance(first, pb.WorkerSessionResponse) or not first.HasField("registered"):
            raise AssertionError(f"expected Registered, got {first!r}")
        self.registered = first.registered
        self._tasks = [
            asyncio.create_task(self._read_commands()),
            asyncio.create_task(self._beat()),
        ]
        return self.registered

    def register_message(self) -> pb.Register:
        return pb.Register(
            name=self.name,
            endpoint=self.endpoint,
            version="standin",
            modes=["pulsecount", "varmax"],
            devices=[self._update(d) for d in self.device_ids],
        )

    async def send(self, request: pb.WorkerSessionRequest) -> None:
        async with self._write_lock:
            if not self._closing:
                await self._call.write(request)

    async def close(self) -> None:
        """End the stream cleanly (half-close, then wait for the control to finish it)."""
        if self._channel is None:
            return
        async with self._write_lock:
            self._closing = True  # what is still being answered is dropped, like a real exit
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), 5)
        await self._stop()

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def status(self, timeout: float = 10) -> grpc.StatusCode:
        """Wait for the stream to end; its status code."""
        return await asyncio.wait_for(self._call.code(), timeout)

    async def details(self) -> str:
        """The message the stream ended with."""
        details: str = await self._call.details()
        return details

    async def _beat(self) -> None:
        assert self.registered is not None
        interval = self.registered.timers.heartbeat_interval.ToTimedelta().total_seconds()
        nonce = 0
        while True:
            await asyncio.sleep(interval)
            if self.heartbeats:
                nonce += 1
                await self.send(pb.WorkerSessionRequest(heartbeat=pb.Heartbeat(nonce=nonce)))

    async def _read_commands(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if not isinstance(response, pb.WorkerSessionResponse):
                    return  # EOF: the control ended the stream
                if response.HasField("command"):
                    self.received.append(response.command)
                    if self.on_command is not None:
                        self.on_command(response.command)
                    self._arrived.set()
                    await self._answer(response.command)
        except grpc.aio.AioRpcError as error:
            self.error = error
        finally:
            self.ended.set()
            self._arrived.set()

    # ------------------------------------------------------------ what a worker does

    async def _answer(self, command: pb.WorkerCommand) -> None:
        kind = command.WhichOneof("kind") or ""
        if kind in self.ignore:
            return
        if command.correlation_id in self.done:
            await self.result(command.correlation_id, ok=True)
            return
        self.done.add(command.correlation_id)
        if kind in self.refuse:
            await self.result(command.correlation_id, ok=False, error="refused by the stand-in")
            return
        if kind == "prepare_device":
            prepare = command.prepare_device
            await self.report(
                prepare.device_id, S.DEVICE_STATE_READY, reservation_id=prepare.reservation_id
            )
        elif kind == "release_device":
            await self._reset(command.release_device.device_id)
        elif kind == "reboot_device":
            device_id = command.reboot_device.device_id
            held = self.boards[device_id].reservation_id
            if held:
                await self.report(device_id, S.DEVICE_STATE_RESERVED, reservation_id=held)
                await self.report(device_id, S.DEVICE_STATE_READY, reservation_id=held)
            else:
                await self._reset(device_id)
        elif kind == "remove_device":
            await self.report(command.remove_device.device_id, S.DEVICE_STATE_REMOVED)
        await self.result(command.correlation_id, ok=True)

    async def _reset(self, device_id: str) -> None:
        for state in (S.DEVICE_STATE_FLASHING, S.DEVICE_STATE_TESTING, S.DEVICE_STATE_AVAILABLE):
            await self.report(device_id, state, reservation_id="")

    async def result(self, correlation_id: str, *, ok: bool, error: str = "") -> None:
        result = pb.CommandResult(correlation_id=correlation_id, ok=ok, error=error)
        await self.send(pb.WorkerSessionRequest(command_result=result))

    def _update(self, device_id: str, **extra: object) -> pb.DeviceUpdate:
        board = self.boards[device_id]
        return pb.DeviceUpdate(
            device_id=device_id,
            kind=self.kind,
            state=board.state,  # type: ignore[arg-type]
            reset_on_release=self.reset_on_release,
            reservation_id=board.reservation_id,
            **extra,  # type: ignore[arg-type]
        )

    async def report(
        self,
        device_id: str,
        state: int,
        *,
        reservation_id: str | None = None,
        labels: dict[str, str] | None = None,
        properties: dict[str, float] | None = None,
        error: str = "",
    ) -> None:
        """Tell the control what a board is doing now (and remember it)."""
        board = self.boards.setdefault(device_id, Board())
        board.state = state
        if reservation_id is not None:
            board.reservation_id = reservation_id
        update = self._update(
            device_id, labels=labels or {}, properties=properties or {}, error=error
        )
        await self.send(pb.WorkerSessionRequest(device_update=update))

    async def draining(self, seconds: float) -> None:
        message = pb.Draining()
        message.timeout.FromMilliseconds(int(seconds * 1000))
        await self.send(pb.WorkerSessionRequest(draining=message))

    # ------------------------------------------------------------ for assertions

    async def wait_for(
        self,
        kind: str,
        matching: Callable[[pb.WorkerCommand], bool] = lambda _: True,
        timeout: float = 10,
    ) -> pb.WorkerCommand:
        """The first command of `kind` received (now or within `timeout`) that matches."""
        assert kind in COMMAND_KINDS, kind
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for command in self.received:
                if command.WhichOneof("kind") == kind and matching(command):
                    return command
            remaining = deadline - loop.time()
            if remaining <= 0 or self.ended.is_set():
                kinds = [c.WhichOneof("kind") for c in self.received]
                raise AssertionError(f"no {kind} command within {timeout}s; got {kinds}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def kinds(self) -> list[str]:
        return [c.WhichOneof("kind") or "" for c in self.received]


# ------------------------------------------------------------ as a process


async def run_forever(addresses: Sequence[str], name: str, devices: int) -> None:
    """Register, answer commands, and register again whenever the stream ends, trying the
    next control address after a failure. Boards and finished commands survive reconnects."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    boards: dict[str, Board] | None = None
    done: set[str] = set()
    attempt = 0

    def log_command(command: pb.WorkerCommand) -> None:
        kind = command.WhichOneof("kind") or ""
        payload = getattr(command, kind)
        device_id = getattr(payload, "device_id", "")
        line = {
            "event": "command",
            "kind": kind,
            "id": command.correlation_id,
            "device": device_id,
            "repeat": command.correlation_id in done,
        }
        print(json.dumps(line), flush=True)

    while not stop.is_set():
        address = addresses[attempt % len(addresses)]
        worker = StandinWorker(address, name, devices)
        if boards is not None:
            worker.boards = boards
        worker.done = done
        worker.on_command = log_command
        try:
            registered = await worker.start()
        except (grpc.aio.AioRpcError, AssertionError) as error:
            await worker._stop()
            attempt += 1
            print(json.dumps({"event": "refused", "error": str(error)[:200]}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            continue
        boards = worker.boards
        line = {"event": "registered", "worker": registered.worker_name, "control": address}
        print(json.dumps(line), flush=True)
        stopping = asyncio.create_task(stop.wait())
        ended = asyncio.create_task(worker.ended.wait())
        await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        ended.cancel()
        await (worker.close() if stop.is_set() else worker._stop())
        attempt += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--control", required=True, help="HOST:PORT of the control (comma-separated to fail over)"
    )
    parser.add_argument("--name", required=True, help="the worker's name")
    parser.add_argument("--devices", type=int, default=2, help="how many boards")
    args = parser.parse_args(argv)
    asyncio.run(run_forever(args.control.split(","), args.name, args.devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
