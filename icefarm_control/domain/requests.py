"""What callers ask the reservation engine for, checked field by field before anything runs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from icefarm.settings import format_duration
from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.domain.selectors import Selector, parse_selector
from icefarm_control.domain.settings import Limits

_MODE = re.compile(r"^[a-z][a-z0-9_-]*$")
_ID = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class ReserveSpec:
    """A checked Reserve request."""

    count: int
    device_ids: tuple[str, ...]
    selector: Selector | None
    mode: str
    mode_args: dict[str, str]
    lease: timedelta
    wait: timedelta
    request_id: str | None = None
    selector_text: str = field(default="")
    # Queue even when the farm has fewer matching devices (in any state) than wanted.
    wait_for_new_devices: bool = False

    @property
    def needed(self) -> int:
        return len(self.device_ids) or self.count


def check_device_ids(name: str, device_ids: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(device_ids) > limits.max_device_ids:
        raise InvalidArgument(name, f"at most {limits.max_device_ids} ids per request")
    seen: set[str] = set()
    for device_id in device_ids:
        if not device_id or len(device_id) > limits.max_id_length or not _ID.match(device_id):
            raise InvalidArgument(name, f"{device_id!r} is not a device id")
        if device_id in seen:
            raise InvalidArgument(name, f"{device_id!r} is named twice")
        seen.add(device_id)
    return tuple(device_ids)


def check_ids(name: str, ids: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(ids) > limits.max_device_ids:
        raise InvalidArgument(name, f"at most {limits.max_device_ids} ids per request")
    for one in ids:
        if not one or len(one) > limits.max_id_length or not _ID.match(one):
            raise InvalidArgument(name, f"{one!r} is not an id")
    return tuple(dict.fromkeys(ids))


def check_lease(
    name: str, lease: timedelta | None, default: timedelta, limits: Limits
) -> timedelta:
    if lease is None:
        return default
    if lease < limits.min_lease:
        raise InvalidArgument(name, f"must be at least {format_duration(limits.min_lease)}")
    if lease > limits.max_lease:
        raise InvalidArgument(name, f"must be at most {format_duration(limits.max_lease)}")
    return lease


def check_selector(text: str, name: str = "selector") -> Selector | None:
    selector = parse_selector(text, field=name)
    return None if selector.is_empty else selector


def check_reserve(
    *,
    count: int,
    device_ids: Sequence[str],
    selector: str,
    mode: str,
    mode_args: Mapping[str, str],
    lease: timedelta | None,
    wait: timedelta | None,
    request_id: str,
    default_lease: timedelta,
    limits: Limits,
    wait_for_new_devices: bool = False,
) -> ReserveSpec:
    """Check every field of a Reserve request; InvalidArgument names the first bad one."""
    ids = check_device_ids("device_ids", device_ids, limits)
    if ids:
        if count not in (0, len(ids)):
            raise InvalidArgument("count", "give either count or device_ids, not both")
        if selector.strip():
            raise InvalidArgument("selector", "a selector cannot be combined with device_ids")
    elif count <= 0:
        raise InvalidArgument("count", f"must be at least 1 (got {count})")
    elif count > limits.max_count:
        raise InvalidArgument("count", f"must be at most {limits.max_count} (got {count})")
    parsed = check_selector(selector)
    if len(mode) > limits.max_mode_length or (mode and not _MODE.match(mode)):
        raise InvalidArgument("mode", f"{mode[:80]!r} is not a mode name")
    if len(mode_args) > limits.max_mode_args:
        raise InvalidArgument("mode_args", f"at most {limits.max_mode_args} entries")
    for key, value in mode_args.items():
        if not key or len(key) > limits.max_mode_arg_key_length:
            raise InvalidArgument("mode_args", f"key {key[:80]!r} is empty or too long")
        if len(value) > limits.max_mode_arg_value_length:
            raise InvalidArgument("mode_args", f"value of {key!r} is too long")
    lease_checked = check_lease("duration", lease, default_lease, limits)
    wait_checked = wait or timedelta(0)
    if wait_checked < timedelta(0):
        raise InvalidArgument("wait_timeout", "must not be negative")
    if wait_checked > limits.max_wait:
        raise InvalidArgument("wait_timeout", f"must be at most {format_duration(limits.max_wait)}")
    if len(request_id) > limits.max_request_id_length:
        raise InvalidArgument("request_id", f"at most {limits.max_request_id_length} characters")
    return ReserveSpec(
        count=len(ids) or count,
        device_ids=ids,
        selector=parsed,
        mode=mode,
        mode_args=dict(mode_args),
        lease=lease_checked,
        wait=wait_checked,
        request_id=request_id or None,
        selector_text=str(parsed) if parsed else "",
        wait_for_new_devices=wait_for_new_devices,
    )
