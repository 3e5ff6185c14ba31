"""Selectors compiled to SQLAlchemy Core, with the semantics of `Selector.matches`.

The same expressions run on SQLite (JSON1) and PostgreSQL (JSONB). Keys and values are always
bound parameters. Every clause is two-valued (never SQL NULL), so negating one is exactly the
Python negation: a device without the key matches `k!=v`, `k notin (...)` and `!k`.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Table, and_, not_, or_, true

from icefarm_control.domain.selectors import COMPARATORS, Operator, Requirement, Selector
from icefarm_control.storage import models

# The reserved selector keys and the device columns they name.
_FIELD_COLUMNS = {"id": "id", "worker": "worker_name", "kind": "kind"}


def selector_clause(selector: Selector, devices: Table = models.devices) -> ColumnElement[bool]:
    """A WHERE clause over `devices` that holds exactly for the rows the selector matches."""
    if selector.is_empty:
        return true()
    return and_(*(_requirement_clause(r, devices) for r in selector.requirements))


def _requirement_clause(requirement: Requirement, devices: Table) -> ColumnElement[bool]:
    clause = _positive_clause(requirement, devices)
    return not_(clause) if requirement.operator.negated else clause


def _positive_clause(requirement: Requirement, devices: Table) -> ColumnElement[bool]:
    """The clause for the operator's positive form (`=` for `!=`, `in` for `notin`, ...)."""
    key, op = requirement.key, requirement.operator.positive
    if requirement.is_device_field:
        # Device columns are NOT NULL, so IN is already two-valued.
        column: ColumnElement[str] = devices.c[_FIELD_COLUMNS[key]]
        return column.in_(requirement.values)
    # A missing key reads as SQL NULL on both back ends; each test below guards against it.
    label: ColumnElement[str] = devices.c.labels[key].as_string()
    number: ColumnElement[float] = devices.c.properties[key].as_float()
    if op is Operator.EXISTS:
        return or_(label.is_not(None), number.is_not(None))
    if op in COMPARATORS:
        compared: ColumnElement[bool] = COMPARATORS[op](number, requirement.numbers[0])
        return and_(number.is_not(None), compared)
    numbers = [n for n in requirement.numbers if n is not None]
    label_equals = and_(label.is_not(None), label.in_(requirement.values))
    if not numbers:
        return label_equals
    return or_(label_equals, and_(number.is_not(None), number.in_(numbers)))
