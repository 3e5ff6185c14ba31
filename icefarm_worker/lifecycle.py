"""One board's life on its worker: an asyncio state machine (no thread per request).

States and the moves between them follow the control's transition table
(icefarm_control/domain/states.py); every change is reported at once as a DeviceUpdate:

    plugged in:  DISCOVERED → FLASHING (default firmware) → TESTING → AVAILABLE
    prepare:     RESERVED → (flash the mode's firmware, mode.ready) → READY
    release:     (mode stopped, usbip unbound) FLASHING → TESTING → AVAILABLE
    any failure: BROKEN with the reason; unplug or remove: REMOVED

Hardware steps hold the board's lock, so a release queues behind the bitstream in hand. The
hold (which reservation may use the board) changes at once, without the lock, when a command
arrives: a release is refused to the holder from that moment even while the board still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from icefarm.states import HELD_STATES
from icefarm.states import DeviceState as State  # the worker calls it State
from icefarm.v1 import control_service_pb2 as cpb
from icefarm.v1 import types_pb2
from icefarm_worker.hardware.base import Board, DiscoveredDevice, HardwareError, SerialLink, Usbip
from icefarm_worker.modes.base import Measurement, Mode

log = structlog.get_logger(__name__)
T = TypeVar("T")
# The default firmware prints this line when it runs (ARCHITECTURE §8).
DEFAULT_FIRMWARE_GREETING = "default firmware"


def proto_state(state: State) -> types_pb2.DeviceState.ValueType:
    """The icefarm.v1.DeviceState value of a state."""
    return types_pb2.DeviceState.Value(f"DEVICE_STATE_{state.value}")


HELD = HELD_STATES


class BoardFailed(Exception):
    """A lifecycle step failed; the message is the reason the holder and operator see."""


class NotHeld(Exception):
    """The reservation does not hold this board (any more)."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds each hardware step may take."""

    flash: float = 30.0
    test: float = 10.0
    ready: float = 10.0
    evaluate: float = 10.0


Reporter = Callable[[cpb.DeviceUpdate], None]


class BoardLifecycle:
    """The state, hold and mode of one board, and the steps that change them."""

    def __init__(
        self,
        device: DiscoveredDevice,
        board: Board | None,
        *,
        firmware: Mapping[str, Path],
        modes: Mapping[str, type[Mode]],
        usbip: Usbip | None,
        timeouts: Timeouts,
        report: Reporter,
    ) -> None:
        self.device = device
        self.board = board
        self.firmware = firmware
        self.modes = modes
        self.usbip = usbip
        self.timeouts = timeouts
        self._report = report
        self.state = State.DISCOVERED
        self.error = ""
        self.reservation_id = ""
        self.mode: Mode | None = None
        self.mode_name = ""
        self.mode_args: dict[str, str] = {}
        self.firmware_name = ""
        self.link: SerialLink | None = None
        self.lock = asyncio.Lock()
        self.since = time.monotonic()
        # Bumped on every plug-in: steps of an earlier plug-in report nothing.
        self.generation = 0
        # Set when this plug-in's board is unplugged: its hardware steps stop waiting at once.
        self._gone = asyncio.Event()

    # ------------------------------------------------------------ what it is

    @property
    def device_id(self) -> str:
        """The board's serial number."""
        return self.device.device_id

    @property
    def reset_on_release(self) -> bool:
        """Boards are re-flashed after each reservation; other devices are not."""
        return self.device.flashable

    def update(self) -> cpb.DeviceUpdate:
        """The board as it is now (for Register, and for every change)."""
        return cpb.DeviceUpdate(
            device_id=self.device_id,
            kind=self.device.kind,
            state=proto_state(self.state),
            labels=dict(self.device.labels),
            error=self.error if self.state == State.BROKEN else "",
            reset_on_release=self.reset_on_release,
            reservation_id=self.reservation_id if self.state in HELD else "",
        )

    def holds(self, reservation_id: str) -> bool:
        """True when `reservation_id` holds the board now."""
        return bool(reservation_id) and self.reservation_id == reservation_id

    def _set(self, state: State, generation: int, error: str = "") -> None:
        if generation != self.generation or (
            self.state == State.REMOVED and state != State.REMOVED
        ):
            return  # a step of an unplugged board finishing late
        self.state = state
        self.error = error
        self.since = time.monotonic()
        log.info("board state", device=self.device_id, state=state.value, error=error or None)
        self._report(self.update())

    # ------------------------------------------------------------ plug, unplug, remove

    def plugged(self, device: DiscoveredDevice, board: Board | None) -> int:
        """(Re)plugged: forget what it did before; returns the new generation."""
        self.device, self.board = device, board
        self.generation += 1
        self._gone = asyncio.Event()
        self.reservation_id = ""
        self.mode = None
        self.state, self.error = State.DISCOVERED, ""
        self._report(self.update())
        return self.generation

    async def unplugged(self) -> None:
        """Gone from USB: REMOVED at once; a step in progress fails and reports nothing."""
        self._gone.set()
        self.generation += 1
        self.reservation_id = ""
        self.mode = None
        self._set(State.REMOVED, self.generation)
        await self._close_link()

    async def remove(self) -> None:
        """Taken out of the farm by an operator: REMOVED until it is plugged in again."""
        generation = self.generation
        self.reservation_id = ""
        async with self.lock:
            self.mode = None
            await self._close_link()
            await self._unbind()
            self._set(State.REMOVED, generation)

    # ------------------------------------------------------------ default firmware

    async def reset(self) -> None:
        """Flash the default firmware, test it, AVAILABLE; BROKEN (and BoardFailed) if not."""
        generation = self.generation
        async with self.lock:
            if self.state == State.REMOVED:
                return
            self.mode, self.mode_name, self.mode_args = None, "", {}
            await self._close_link()
            await self._unbind()
            await self._reset_locked(generation)

    async def _reset_locked(self, generation: int) -> None:
        if not self.device.flashable or self.board is None:
            # Nothing to flash: a held device is free at once, a new one is checked first.
            if self.state == State.BROKEN:
                self._set(State.DISCOVERED, generation)
            if self.state == State.DISCOVERED:
                self._set(State.TESTING, generation)
            self._set(State.AVAILABLE, generation)
            return
        last_error = ""
        for _ in range(2):  # a board that does not answer is flashed once more
            self._set(State.FLASHING, generation)
            try:
                await self._flash("default")
                self._set(State.TESTING, generation)
                await self._while_plugged(self._test())
            except HardwareError as exc:
                last_error = f"default firmware: {exc}"
                log.warning("board reset failed", device=self.device_id, error=last_error)
                continue
            self._set(State.AVAILABLE, generation)
            return
        self._set(State.BROKEN, generation, last_error)
        raise BoardFailed(last_error)

    async def _test(self) -> None:
        assert self.board is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.test
        self.link = await self.board.open_serial(self.timeouts.test)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HardwareError("test", f"no {DEFAULT_FIRMWARE_GREETING!r} line")
            line = await self.link.read_line(remaining)
            if DEFAULT_FIRMWARE_GREETING in line.lower():
                return

    # ------------------------------------------------------------ holds and modes

    def hold(self, reservation_id: str) -> None:
        """The control granted the board to a reservation (PrepareDevice arrived)."""
        self.reservation_id = reservation_id

    def let_go(self, reservation_id: str) -> bool:
        """The control ended the hold (ReleaseDevice arrived): refuse the holder from now on.
        False when the board is held by another reservation (a stale release)."""
        if self.reservation_id and self.reservation_id != reservation_id:
            return False
        self.reservation_id = ""
        return True

    def mode_class(self, name: str) -> type[Mode]:
        """The mode registered under `name`; KeyError when there is none."""
        return self.modes[name]

    async def prepare(self, reservation_id: str, mode_name: str, args: Mapping[str, str]) -> None:
        """RESERVED → the mode's firmware → READY; BROKEN and BoardFailed when that fails."""
        generation = self.generation
        async with self.lock:
            if not self.holds(reservation_id):
                return  # released before it could start
            if self.state == State.REMOVED:
                raise BoardFailed("the board was unplugged")
            self._set(State.RESERVED, generation)
            await self._start_mode(reservation_id, mode_name, args, generation)

    async def _start_mode(
        self, reservation_id: str, mode_name: str, args: Mapping[str, str], generation: int
    ) -> None:
        try:
            mode = self._make_mode(mode_name, args)
            await self._close_link()
            if mode is not None and self.device.flashable and self.board is not None:
                await self._flash(mode.firmware)
                self.link = await self._while_plugged(self.board.open_serial(self.timeouts.ready))
                await self._while_plugged(mode.ready(self.link, self.timeouts.ready))
        except (HardwareError, BoardFailed) as exc:
            reason = f"{mode_name or 'no mode'}: {exc}"
            self.mode = None
            self._set(State.BROKEN, generation, reason)
            raise BoardFailed(reason) from exc
        if not self.holds(reservation_id):
            return  # released meanwhile: the release resets it next
        self.mode, self.mode_name, self.mode_args = mode, mode_name, dict(args)
        self._set(State.READY, generation)

    def _make_mode(self, mode_name: str, args: Mapping[str, str]) -> Mode | None:
        if not mode_name:
            return None
        try:
            mode = self.modes[mode_name](args)
        except KeyError as exc:
            raise BoardFailed(f"this worker has no mode {mode_name!r}") from exc
        except ValueError as exc:
            raise BoardFailed(f"mode_args: {exc}") from exc
        if self.device.flashable and mode.firmware not in self.firmware:
            raise BoardFailed(f"no {mode.firmware!r} firmware configured")
        return mode

    async def reboot_mode(self, reservation_id: str) -> None:
        """Re-flash the current mode and carry on (READY → RESERVED → READY)."""
        await self.set_mode(reservation_id, self.mode_name, self.mode_args)

    async def set_mode(self, reservation_id: str, mode_name: str, args: Mapping[str, str]) -> None:
        """Switch a held board to another mode (or the same one again)."""
        generation = self.generation
        async with self.lock:
            if not self.holds(reservation_id):
                raise NotHeld(self.device_id)
            if self.state not in HELD:
                # The table has no way back from BROKEN while held: release, then reboot.
                raise BoardFailed(f"the board is {self.state.value}: {self.error or 'not held'}")
            self._set(State.RESERVED, generation)
            await self._start_mode(reservation_id, mode_name, args, generation)

    async def reboot(self) -> None:
        """The control asked for a reboot: a held board re-flashes its mode, a free one (or a
        broken one) is reset to the default firmware."""
        if self.reservation_id and self.state in HELD:
            await self.reboot_mode(self.reservation_id)
        else:
            await self.reset()

    async def release(self) -> None:
        """Stop the mode, unbind usbip (always), back to the default firmware."""
        await self.reset()

    # ------------------------------------------------------------ the mode at work

    async def evaluate(self, reservation_id: str, bitstream: bytes) -> Measurement:
        """Run one bitstream in the board's mode. NotHeld when the reservation lost the board;
        EvaluationFailed or HardwareError from the mode."""
        async with self.lock:
            if not self.holds(reservation_id):
                raise NotHeld(self.device_id)
            if self.state != State.READY or self.mode is None or self.link is None:
                raise HardwareError("mode", f"the board is {self.state.value}, not READY")
            return await self.mode.evaluate(self.link, bitstream, self.timeouts.evaluate)

    def fail(self, reason: str) -> None:
        """The board misbehaved beyond a reboot: BROKEN with the reason."""
        self.mode = None
        self._set(State.BROKEN, self.generation, reason)

    async def export(self) -> str:
        """usbip: bind the board for a client to attach; its bus id."""
        if self.usbip is None or not self.device.bus_id:
            raise BoardFailed("this board cannot be exported over usbip (no bus id)")
        async with self.lock:
            await self._close_link()
            await self.usbip.bind(self.device.bus_id)
        return self.device.bus_id

    async def close(self) -> None:
        """Close the serial link (the worker is stopping)."""
        await self._close_link()

    # ------------------------------------------------------------ hardware helpers

    async def _flash(self, firmware_name: str) -> None:
        assert self.board is not None
        path = self.firmware.get(firmware_name)
        if path is None:
            raise HardwareError("copy", f"no {firmware_name!r} firmware configured")
        await self._while_plugged(self.board.flash(path, self.timeouts.flash))
        self.firmware_name = firmware_name

    async def _while_plugged(self, step: Coroutine[Any, Any, T]) -> T:
        """Run a hardware step; HardwareError at once if the board is unplugged meanwhile (a
        flash would otherwise wait out its timeout for a drive that never comes)."""
        gone = self._gone
        if gone.is_set():
            step.close()
            raise HardwareError("usb", "the board was unplugged")
        work = asyncio.ensure_future(step)
        unplugged = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({work, unplugged}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unplugged.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
        if not work.done() or work.cancelled():
            raise HardwareError("usb", "the board was unplugged")
        return work.result()

    async def _close_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            with contextlib.suppress(Exception):
                await link.close()

    async def _unbind(self) -> None:
        # Always, even when not listed as exported: a client that vanished mid-attach leaves
        # a stale binding otherwise (ARCHITECTURE §8).
        if self.usbip is None or not self.device.bus_id:
            return
        try:
            await self.usbip.unbind(self.device.bus_id)
        except HardwareError as exc:
            log.warning("usbip unbind failed", device=self.device_id, error=str(exc))
