"""The usbip tools (`usbipd`, `usbip bind/unbind/list`) run as asyncio subprocesses."""

from __future__ import annotations

import asyncio
import re

from icefarm_worker.hardware.base import HardwareError

DEFAULT_PORT = 3240
COMMAND_TIMEOUT = 15.0
# `usbip list -r` prints "      1-1.4: vendor : product (2e8a:000a)" for each exported device.
_EXPORTED_LINE = re.compile(r"^\s*(\d+-[\d.]+):\s")
# Failures that mean "already in the state asked for", from usbip's own messages.
_ALREADY_UNBOUND = ("is not bound to usbip-host", "specified bus ID does not exist")
_ALREADY_BOUND = ("is already bound to usbip-host",)


def parse_exported(output: str) -> list[str]:
    """Bus ids in the output of `usbip list -r HOST`."""
    found = []
    for line in output.splitlines():
        match = _EXPORTED_LINE.match(line)
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found


class UsbipTools:
    """The host's usbip tools. `usbip` and `usbipd` are looked up on PATH unless given."""

    def __init__(
        self,
        *,
        port: int = DEFAULT_PORT,
        usbip: str = "usbip",
        usbipd: str = "usbipd",
        timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._port = port
        self._usbip = usbip
        self._usbipd = usbipd
        self._timeout = timeout

    @property
    def port(self) -> int:
        """The TCP port usbipd listens on."""
        return self._port

    async def start(self) -> None:
        """Start `usbipd -D` unless a daemon already answers on our port."""
        code, _ = await self._run("usbip-start", [*self._client(), "list", "-r", "localhost"])
        if code == 0:
            return
        command = [self._usbipd, "-D"]
        if self._port != DEFAULT_PORT:
            command += ["--tcp-port", str(self._port)]
        code, output = await self._run("usbip-start", command)
        if code != 0:
            raise HardwareError("usbip-start", f"usbipd -D failed: {output.strip()}")

    async def bind(self, bus_id: str) -> None:
        """Export `bus_id` (binding it to usbip-host); binding a bound device is fine."""
        code, output = await self._run("usbip-bind", [self._usbip, "bind", "-b", bus_id])
        if code != 0 and not _says(output, _ALREADY_BOUND):
            raise HardwareError("usbip-bind", f"usbip bind -b {bus_id} failed: {output.strip()}")

    async def unbind(self, bus_id: str) -> None:
        """Give `bus_id` back to its normal driver; a device that is not bound is fine."""
        code, output = await self._run("usbip-unbind", [self._usbip, "unbind", "-b", bus_id])
        if code != 0 and not _says(output, _ALREADY_UNBOUND):
            raise HardwareError(
                "usbip-unbind", f"usbip unbind -b {bus_id} failed: {output.strip()}"
            )

    async def exported(self) -> list[str]:
        """Bus ids usbipd currently exports."""
        code, output = await self._run("usbip-list", [*self._client(), "list", "-r", "localhost"])
        if code != 0:
            raise HardwareError("usbip-list", f"usbip list -r localhost failed: {output.strip()}")
        return parse_exported(output)

    def _client(self) -> list[str]:
        if self._port == DEFAULT_PORT:
            return [self._usbip]
        return [self._usbip, "--tcp-port", str(self._port)]

    async def _run(self, step: str, command: list[str]) -> tuple[int, str]:
        """Exit code and combined output; HardwareError when the tool is missing or hangs."""
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except FileNotFoundError as exc:
            raise HardwareError(step, f"{command[0]} not found (is usbip installed?)") from exc
        except OSError as exc:
            raise HardwareError(step, f"cannot run {command[0]}: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout):
                stdout, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise HardwareError(step, f"{' '.join(command)} hung for {self._timeout:g}s") from None
        assert process.returncode is not None
        return process.returncode, stdout.decode(errors="replace")


def _says(output: str, phrases: tuple[str, ...]) -> bool:
    return any(phrase in output for phrase in phrases)
