"""A worker cut off the network for real: it runs inside its own network namespace, reached
only through a relay, and a cut takes the namespace's link (its loopback) down, so packets are
dropped in silence (no reset, no error) until the link comes back up.

Everything stays on 127.0.0.1: inside the namespace the relay listens on 127.0.0.1:P for each
control port P and carries the bytes to the control's 127.0.0.1:P outside; outside it listens
on 127.0.0.1:W for the worker's port W and carries them to 127.0.0.1:W inside. Sockets are
opened in the namespace with setns(2) on the relay's own thread (the rest of the process
stays outside). Where `ip netns` is not allowed, `available()` is False and the soak cuts a
worker off with SIGSTOP instead (and says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

CLONE_NEWNET = 0x40000000
CHUNK = 256 * 1024


def available() -> bool:
    """True when this process may create network namespaces (root, `ip` installed)."""
    name = f"icefarm-probe-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return True


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespace:
    """One named network namespace with its loopback up; `cut()` and `mend()` its link."""

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        self.mend()

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec` execs it: the pid is argv's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "down")

    def mend(self) -> None:
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _ip("netns", "del", self.name)


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    """This thread in namespace `name` for the block (sockets made now stay in it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(home)
        os.close(target)


def _socket(namespace: str | None) -> socket.socket:
    if namespace is None:
        sock = socket.socket()
    else:
        with _inside(namespace):
            sock = socket.socket()
    sock.setblocking(False)
    return sock


class Relay:
    """Byte relays between the host's loopback and namespaces' loopbacks, on its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _call(self, make: Callable[[], Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(make(), self.loop)
        return future.result(timeout=10)

    def forward(self, listen_in: str | None, port: int, connect_in: str | None) -> None:
        """Listen on 127.0.0.1:`port` in `listen_in` (None: the host), carry each connection
        to 127.0.0.1:`port` in `connect_in`."""
        self._call(lambda: self._serve(listen_in, port, connect_in))

    async def _serve(self, listen_in: str | None, port: int, connect_in: str | None) -> None:
        listener = _socket(listen_in)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._pipe(reader, writer, port, connect_in)
            finally:
                self._tasks.discard(task)

        self._servers.append(await asyncio.start_server(accepted, sock=listener))

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        connect_in: str | None,
    ) -> None:
        outbound = _socket(connect_in)
        try:
            await self.loop.sock_connect(outbound, ("127.0.0.1", port))
            far_reader, far_writer = await asyncio.open_connection(sock=outbound)
        except OSError:
            outbound.close()
            writer.close()
            return
        await asyncio.gather(
            _copy(reader, far_writer), _copy(far_reader, writer), return_exceptions=True
        )

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()

        with contextlib.suppress(Exception):
            self._call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(Exception):
            sink.close()
