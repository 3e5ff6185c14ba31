"""Which boards this worker is flashing right now.

Entering the UF2 bootloader makes a board's CDC port vanish and come back, which udev reports
as remove/add. `UdevDiscovery` asks this registry so that a board's own reflash is not mistaken
for an unplug; when a flash ends with the board still gone, it reports the removal then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_active: dict[str, int] = {}
_listeners: list[Callable[[str], None]] = []


def is_flashing(device_id: str) -> bool:
    """True while a `flashing(device_id)` block runs."""
    return _active.get(device_id, 0) > 0


def on_flash_end(listener: Callable[[str], None]) -> Callable[[], None]:
    """Call `listener(device_id)` when a flash ends; returns the function that unsubscribes."""
    _listeners.append(listener)

    def unsubscribe() -> None:
        if listener in _listeners:
            _listeners.remove(listener)

    return unsubscribe


@contextmanager
def flashing(device_id: str) -> Iterator[None]:
    """Mark `device_id` as being flashed for the duration of the block."""
    _active[device_id] = _active.get(device_id, 0) + 1
    try:
        yield
    finally:
        _active[device_id] -= 1
        if _active[device_id] == 0:
            del _active[device_id]
            for listener in list(_listeners):
                listener(device_id)
