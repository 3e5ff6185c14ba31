"""The selector language of ARCHITECTURE §6, defined once.

`parse_selector` turns text such as `kind=pico2-ice,worker in (lab-a,lab-b),gpu_memory_mb>=16384`
into a `Selector`; `Selector.matches` evaluates it in Python and
`icefarm_control.storage.selector_sql` compiles the same semantics to SQL.

Semantics follow Kubernetes label selectors where they apply. Labels are strings and properties
are numbers: `k=v` holds when label k is "v" or, when v is a number, property k equals it;
negated forms (`!=`, `notin`, `!k`) are exactly the negation of their positive form, so a device
without k matches them. `<`, `<=`, `>`, `>=` need property k to exist. The keys `id`, `worker` and
`kind` name device fields, not labels, and take only `=`, `!=`, `in` and `notin`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from icefarm_control.domain.errors import SelectorError

MAX_LENGTH = 1024
MAX_REQUIREMENTS = 64
RESERVED_KEYS = frozenset({"id", "worker", "kind"})
"""Keys that name device fields (id, worker name, kind) instead of labels or properties."""

_KEY_START = frozenset(string.ascii_letters + string.digits + "_")
_KEY_CHARS = _KEY_START | frozenset("./-")
_VALUE_CHARS = _KEY_START | frozenset(".:/+@-")
# Characters that start an operator; a run of them that is not a known operator is reported
# whole ("unknown operator '=>'") rather than as a confusing value error.
_OPERATOR_CHARS = frozenset("=!<>~:")
_SPACE = frozenset(" \t\r\n")
_VALUE_END = _SPACE | frozenset(",)")
# Plain decimal numbers only: float() alone would also accept "nan", "inf" and "1_000".
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class Operator(enum.Enum):
    """How a requirement tests its key; the value is the operator's canonical spelling."""

    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    LESS = "<"
    LESS_OR_EQUAL = "<="
    GREATER = ">"
    GREATER_OR_EQUAL = ">="
    EXISTS = "exists"
    NOT_EXISTS = "!"

    @property
    def negated(self) -> bool:
        """Whether this operator is the negation of another (`!=`, `notin`, `!`)."""
        return self in _POSITIVE

    @property
    def positive(self) -> Operator:
        """The operator this one negates, or itself when it is not negated."""
        return _POSITIVE.get(self, self)


_POSITIVE = {
    Operator.NOT_EQUALS: Operator.EQUALS,
    Operator.NOT_IN: Operator.IN,
    Operator.NOT_EXISTS: Operator.EXISTS,
}
_SYMBOLS = {
    "=": Operator.EQUALS,
    "==": Operator.EQUALS,
    "!=": Operator.NOT_EQUALS,
    "<": Operator.LESS,
    "<=": Operator.LESS_OR_EQUAL,
    ">": Operator.GREATER,
    ">=": Operator.GREATER_OR_EQUAL,
}
_WORDS = {"in": Operator.IN, "notin": Operator.NOT_IN}
_FIELD_OPERATORS = frozenset({Operator.EQUALS, Operator.NOT_EQUALS, Operator.IN, Operator.NOT_IN})

COMPARATORS: Mapping[Operator, Callable[[Any, Any], Any]] = {
    Operator.LESS: operator.lt,
    Operator.LESS_OR_EQUAL: operator.le,
    Operator.GREATER: operator.gt,
    Operator.GREATER_OR_EQUAL: operator.ge,
}
"""The numeric comparisons; they work on floats and on SQLAlchemy column expressions alike."""


class DeviceFacts(Protocol):
    """What a selector can see of a device."""

    @property
    def id(self) -> str: ...
    @property
    def worker(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def properties(self) -> Mapping[str, float]: ...


def parse_number(text: str) -> float | None:
    """The finite number `text` spells, or None when it is not a plain decimal number."""
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Requirement:
    """One comma-separated term of a selector. Build them with `parse_selector`.

    `values` holds the values as written (one for `=`, `!=` and the comparisons, none for the
    existence tests); `numbers` holds each value read as a number, or None where it is not one.
    """

    key: str
    operator: Operator
    values: tuple[str, ...] = ()
    numbers: tuple[float | None, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numbers", tuple(parse_number(v) for v in self.values))

    @property
    def is_device_field(self) -> bool:
        """Whether the key names a device field (`id`, `worker`, `kind`) rather than a label."""
        return self.key in RESERVED_KEYS

    def matches(self, device: DeviceFacts) -> bool:
        """Whether the device satisfies this requirement."""
        return self._holds_positive(device) != self.operator.negated

    def _holds_positive(self, device: DeviceFacts) -> bool:
        op = self.operator.positive
        if self.is_device_field:
            # The reserved keys are also the names of the DeviceFacts attributes.
            return getattr(device, self.key) in self.values
        label = device.labels.get(self.key)
        prop = device.properties.get(self.key)
        if op is Operator.EXISTS:
            return label is not None or prop is not None
        if op in COMPARATORS:
            return prop is not None and bool(COMPARATORS[op](prop, self.numbers[0]))
        return any(
            label == value or (number is not None and prop is not None and prop == number)
            for value, number in zip(self.values, self.numbers, strict=True)
        )

    def __str__(self) -> str:
        op = self.operator
        if op is Operator.EXISTS:
            return self.key
        if op is Operator.NOT_EXISTS:
            return f"!{self.key}"
        if op in (Operator.IN, Operator.NOT_IN):
            return f"{self.key} {op.value} ({','.join(map(_format_value, self.values))})"
        return f"{self.key}{op.value}{_format_value(self.values[0])}"


@dataclass(frozen=True)
class Selector:
    """A parsed selector: every requirement must hold. No requirements match every device."""

    text: str
    requirements: tuple[Requirement, ...]

    @property
    def is_empty(self) -> bool:
        """Whether the selector has no requirements and so matches every device."""
        return not self.requirements

    def matches(self, device: DeviceFacts) -> bool:
        """Whether the device satisfies every requirement."""
        return all(requirement.matches(device) for requirement in self.requirements)

    def __str__(self) -> str:
        """The canonical form: no optional spaces, `=` for `==`, quotes only where needed."""
        return ",".join(str(requirement) for requirement in self.requirements)


def parse_selector(text: str, *, field: str = "selector") -> Selector:
    """Parse selector text; raise `SelectorError` naming `field` and the offending position."""
    return Selector(text, _Parser(text, field).parse())


def _format_value(value: str) -> str:
    if value and all(c in _VALUE_CHARS for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class _Parser:
    """A hand-written scanner: it knows exactly where each error is, which a regex does not."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.pos = 0

    def parse(self) -> tuple[Requirement, ...]:
        if len(self.text) > MAX_LENGTH:
            raise self.error(f"selector is longer than {MAX_LENGTH} characters", MAX_LENGTH)
        self.skip_space()
        if self.at_end():
            return ()
        requirements: list[Requirement] = []
        while True:
            self.skip_space()
            if len(requirements) == MAX_REQUIREMENTS:
                raise self.error(f"selector has more than {MAX_REQUIREMENTS} requirements")
            requirements.append(self.requirement(after_comma=bool(requirements)))
            self.skip_space()
            if self.at_end():
                return tuple(requirements)
            if self.peek() != ",":
                raise self.error("expected ',' or the end of the selector")
            self.pos += 1

    def requirement(self, *, after_comma: bool) -> Requirement:
        if after_comma and (self.at_end() or self.peek() == ","):
            raise self.error("expected a requirement after ','")
        if self.peek() == "!":
            bang = self.pos
            self.pos += 1
            self.skip_space()
            key = self.key()
            if key in RESERVED_KEYS:
                raise self.error(f"'{key}' is a device field and cannot be tested with '!'", bang)
            return Requirement(key, Operator.NOT_EXISTS)
        key = self.key()
        key_end = self.pos
        self.skip_space()
        op_start = self.pos
        op = self.operator(key, key_end)
        if key in RESERVED_KEYS and op not in _FIELD_OPERATORS:
            if op is Operator.EXISTS:
                raise self.error(f"expected an operator after '{key}'", op_start)
            raise self.error(
                f"'{key}' is a device field and takes only =, !=, in or notin", op_start
            )
        if op is Operator.EXISTS:
            return Requirement(key, op)
        if op in (Operator.IN, Operator.NOT_IN):
            return Requirement(key, op, self.value_list(op))
        self.skip_space()
        if op in COMPARATORS:
            return Requirement(key, op, (self.number(op),))
        return Requirement(key, op, (self.value(),))

    def key(self) -> str:
        start = self.pos
        if self.peek() not in _KEY_START:
            raise self.error("expected a key (a letter, digit or '_')")
        while self.peek() in _KEY_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def operator(self, key: str, key_end: int) -> Operator:
        """The operator after a key; EXISTS when the requirement ends with the key."""
        start, c = self.pos, self.peek()
        if self.at_end() or c == ",":
            return Operator.EXISTS
        if c in _OPERATOR_CHARS:
            while self.peek() in _OPERATOR_CHARS:
                self.pos += 1
            symbol = self.text[start : self.pos]
            if symbol not in _SYMBOLS:
                raise self.error(f"unknown operator '{symbol}'", start)
            return _SYMBOLS[symbol]
        if c in _KEY_CHARS:
            # The key scan stopped at whitespace, so this is a word such as `in` or `notin`.
            while self.peek() in _KEY_CHARS:
                self.pos += 1
            word = self.text[start : self.pos]
            if word not in _WORDS:
                raise self.error(f"unknown operator '{word}'", start)
            return _WORDS[word]
        if start == key_end:
            raise self.error(f"invalid character {c!r} in key '{key}'", start)
        raise self.error(f"expected an operator after '{key}'", start)

    def value_list(self, op: Operator) -> tuple[str, ...]:
        self.skip_space()
        if self.peek() != "(":
            raise self.error(f"expected '(' after '{op.value}'")
        opening = self.pos
        self.pos += 1
        values: list[str] = []
        while True:
            self.skip_space()
            if self.at_end():
                raise self.error("unclosed '('", opening)
            if self.peek() == ")" and not values:
                raise self.error(f"'{op.value}' needs at least one value")
            values.append(self.value())
            self.skip_space()
            if self.at_end():
                raise self.error("unclosed '('", opening)
            if self.peek() == ")":
                self.pos += 1
                return tuple(values)
            if self.peek() != ",":
                raise self.error("expected ',' or ')'")
            self.pos += 1

    def value(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        start = self.pos
        while self.peek() in _VALUE_CHARS:
            self.pos += 1
        c = self.peek()
        if self.pos == start and c in ("", ",", ")"):
            raise self.error("empty value")
        if c and c not in _VALUE_END:
            raise self.error(f"invalid character {c!r} in value (quote the value)")
        return self.text[start : self.pos]

    def quoted(self) -> str:
        opening = self.pos
        self.pos += 1
        chars: list[str] = []
        while not self.at_end():
            c = self.peek()
            self.pos += 1
            if c == '"':
                return "".join(chars)
            if c == "\\":
                escaped = self.peek()
                if not escaped:
                    break
                if escaped not in ('"', "\\"):
                    raise self.error(
                        f"unknown escape '\\{escaped}' (only \\\" and \\\\)", self.pos - 1
                    )
                self.pos += 1
                c = escaped
            chars.append(c)
        raise self.error("unclosed '\"'", opening)

    def number(self, op: Operator) -> str:
        start = self.pos
        while self.peek() in _VALUE_CHARS:
            self.pos += 1
        text = self.text[start : self.pos]
        if parse_number(text) is None:
            raise self.error(f"expected a number after '{op.value}'", start)
        return text

    def peek(self) -> str:
        """The current character, or '' at the end (which no character set contains)."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while self.peek() in _SPACE:
            self.pos += 1

    def error(self, message: str, position: int | None = None) -> SelectorError:
        return SelectorError(message, self.pos if position is None else position, field=self.field)
