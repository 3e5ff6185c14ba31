"""Which label and property keys a worker may set: the keys a selector can name.

The selector grammar (icefarm_control/domain/selectors.py) reads a key as a letter, digit or
`_` followed by letters, digits and `_ . / -`; `id`, `worker` and `kind` name device fields.
A key outside that could be stored but never matched, so the worker refuses it up front.
"""

from __future__ import annotations

import re

MAX_KEY_LENGTH = 128
MAX_VALUE_LENGTH = 1024
DEVICE_FIELDS = frozenset({"id", "worker", "kind"})
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
# Control characters (C0, DEL, C1), which the control refuses in every string.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be a label or property key; None when it can."""
    if not key:
        return "a key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"key {key[:20]!r}… is longer than {MAX_KEY_LENGTH} characters"
    if not _KEY.fullmatch(key):
        return (
            f"key {key!r} is not a selector key (a letter, digit or _, then letters, "
            "digits and _ . / -)"
        )
    if key in DEVICE_FIELDS:
        return f"key {key!r} names a device field (id, worker, kind), not a label"
    return None


def value_problem(key: str, value: str) -> str | None:
    """Why `value` cannot be the value of label `key`; None when it can."""
    if len(value) > MAX_VALUE_LENGTH:
        return f"label {key}: the value is longer than {MAX_VALUE_LENGTH} characters"
    if _CONTROL.search(value):
        return f"label {key}: the value has a control character"
    return None
