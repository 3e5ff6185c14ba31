"""The selector language: parsing, canonical form, error positions and matching semantics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from icefarm_control.domain.errors import Reason, SelectorError
from icefarm_control.domain.selectors import (
    MAX_LENGTH,
    MAX_REQUIREMENTS,
    Operator,
    Requirement,
    Selector,
    parse_selector,
)


@dataclass(frozen=True)
class Device:
    id: str = "d1"
    worker: str = "lab-a"
    kind: str = "pico2-ice"
    labels: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, float] = field(default_factory=dict)


def requirements(text: str) -> list[tuple[str, Operator, tuple[str, ...]]]:
    return [(r.key, r.operator, r.values) for r in parse_selector(text).requirements]


def matches(text: str, device: Device) -> bool:
    return parse_selector(text).matches(device)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=b", [("a", Operator.EQUALS, ("b",))]),
        ("a==b", [("a", Operator.EQUALS, ("b",))]),
        ("a!=b", [("a", Operator.NOT_EQUALS, ("b",))]),
        ("a in (x,y)", [("a", Operator.IN, ("x", "y"))]),
        ("a in(x)", [("a", Operator.IN, ("x",))]),
        ("a notin (x)", [("a", Operator.NOT_IN, ("x",))]),
        ("a<1", [("a", Operator.LESS, ("1",))]),
        ("a<=-1.5", [("a", Operator.LESS_OR_EQUAL, ("-1.5",))]),
        ("a>1e3", [("a", Operator.GREATER, ("1e3",))]),
        ("a>=.5", [("a", Operator.GREATER_OR_EQUAL, (".5",))]),
        ("a", [("a", Operator.EXISTS, ())]),
        ("!a", [("a", Operator.NOT_EXISTS, ())]),
        ("a.b/c-d_9=x:y/z+w@h-1.2", [("a.b/c-d_9", Operator.EQUALS, ("x:y/z+w@h-1.2",))]),
        ('a="x y, (z)"', [("a", Operator.EQUALS, ("x y, (z)",))]),
        (r'a="q\"b\\c"', [("a", Operator.EQUALS, ('q"b\\c',))]),
        ('a in ("", "1,2")', [("a", Operator.IN, ("", "1,2"))]),
        ("in in (in)", [("in", Operator.IN, ("in",))]),
        ("kind=pico2-ice", [("kind", Operator.EQUALS, ("pico2-ice",))]),
        ("worker notin (a)", [("worker", Operator.NOT_IN, ("a",))]),
        ("id!=x", [("id", Operator.NOT_EQUALS, ("x",))]),
        (
            " a = b ,\tc notin ( x , y ) , ! d , e >= 2 ",
            [
                ("a", Operator.EQUALS, ("b",)),
                ("c", Operator.NOT_IN, ("x", "y")),
                ("d", Operator.NOT_EXISTS, ()),
                ("e", Operator.GREATER_OR_EQUAL, ("2",)),
            ],
        ),
    ],
)
def test_parses_every_form(
    text: str, expected: list[tuple[str, Operator, tuple[str, ...]]]
) -> None:
    assert requirements(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_selector_is_valid_and_matches_every_device(text: str) -> None:
    selector = parse_selector(text)

    assert selector.is_empty
    assert selector.requirements == ()
    assert selector.matches(Device())
    assert str(selector) == ""


def test_selector_keeps_its_text_and_numbers() -> None:
    selector = parse_selector("a in (1, x, -2.5), b>=10")

    assert selector.text == "a in (1, x, -2.5), b>=10"
    assert not selector.is_empty
    assert selector.requirements[0].numbers == (1.0, None, -2.5)
    assert selector.requirements[1].numbers == (10.0,)


def test_nonfinite_and_non_decimal_values_are_not_numbers() -> None:
    (requirement,) = parse_selector("a in (nan, inf, 1_000, 0x10, 1e999)").requirements

    assert requirement.numbers == (None, None, None, None, None)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("a==b", "a=b"),
        (" a = b , c ", "a=b,c"),
        ("a in ( x ,y )", "a in (x,y)"),
        ("a notin(x)", "a notin (x)"),
        ("! a", "!a"),
        ("a >= 1e3", "a>=1e3"),
        ('a="plain"', "a=plain"),
        ('a="x y"', 'a="x y"'),
        (r'a="q\"\\"', r'a="q\"\\"'),
        ('a in ("",",")', 'a in ("",",")'),
        (
            "kind=pico2-ice,worker in (lab-a,lab-b),firmware!=old,gpu_memory_mb>=16384,!broken",
            "kind=pico2-ice,worker in (lab-a,lab-b),firmware!=old,gpu_memory_mb>=16384,!broken",
        ),
    ],
)
def test_str_is_canonical_and_parses_back_to_the_same_requirements(
    text: str, canonical: str
) -> None:
    selector = parse_selector(text)

    assert str(selector) == canonical
    assert parse_selector(canonical).requirements == selector.requirements


def test_requirements_built_directly_equal_parsed_ones() -> None:
    built = Selector("a=5", (Requirement("a", Operator.EQUALS, ("5",)),))

    assert parse_selector("a=5") == built
    assert built.requirements[0].numbers == (5.0,)


def test_limits_are_inclusive() -> None:
    longest = "a=" + "b" * (MAX_LENGTH - 2)
    most = ",".join(f"k{i}" for i in range(MAX_REQUIREMENTS))

    assert len(parse_selector(longest).requirements) == 1
    assert len(parse_selector(most).requirements) == MAX_REQUIREMENTS


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        # Unknown or missing operators.
        ("kind=>3", "unknown operator '=>'", 4),
        ("a===b", "unknown operator '==='", 1),
        ("a~=b", "unknown operator '~='", 1),
        ("a:b", "unknown operator ':'", 1),
        ("a!b", "unknown operator '!'", 1),
        ("a like b", "unknown operator 'like'", 2),
        ("a b", "unknown operator 'b'", 2),
        ("a (x)", "expected an operator after 'a'", 2),
        # Missing or malformed values.
        ("kind=", "empty value", 5),
        ("a=,b", "empty value", 2),
        ("a!= ", "empty value", 4),
        ("a=$x", "invalid character '$' in value (quote the value)", 2),
        ("a=b$", "invalid character '$' in value (quote the value)", 3),
        ("a=(x)", "invalid character '(' in value (quote the value)", 2),
        ("a=b c", "expected ',' or the end of the selector", 4),
        ('a="x"y', "expected ',' or the end of the selector", 5),
        ('a="abc', "unclosed '\"'", 2),
        ('a="abc\\', "unclosed '\"'", 2),
        ('a="x\\n"', "unknown escape '\\n' (only \\\" and \\\\)", 4),
        # In-lists.
        ("worker in (a,b", "unclosed '('", 10),
        ("a in (x, ", "unclosed '('", 5),
        ("a in ()", "'in' needs at least one value", 6),
        ("a notin ( )", "'notin' needs at least one value", 10),
        ("a in (x,)", "empty value", 8),
        ("a in (x,,y)", "empty value", 8),
        ("a in (x y)", "expected ',' or ')'", 8),
        ("a in x", "expected '(' after 'in'", 5),
        ("a notin", "expected '(' after 'notin'", 7),
        # Numeric comparisons.
        ("gpu_memory>=abc", "expected a number after '>='", 12),
        ("a<", "expected a number after '<'", 2),
        ("a> x", "expected a number after '>'", 3),
        ('a<="5"', "expected a number after '<='", 3),
        ("a>5x", "expected a number after '>'", 2),
        ("a>nan", "expected a number after '>'", 2),
        ("a>1e999", "expected a number after '>'", 2),
        # Requirement separators.
        ("a=b,", "expected a requirement after ','", 4),
        ("a=b,,c", "expected a requirement after ','", 4),
        (",a", "expected a key (a letter, digit or '_')", 0),
        ("  ,", "expected a key (a letter, digit or '_')", 2),
        # Reserved keys.
        ("kind", "expected an operator after 'kind'", 4),
        ("a=b, worker ,c", "expected an operator after 'worker'", 12),
        ("!id", "'id' is a device field and cannot be tested with '!'", 0),
        ("kind>3", "'kind' is a device field and takes only =, !=, in or notin", 4),
        ("worker <= 3", "'worker' is a device field and takes only =, !=, in or notin", 7),
        # Keys.
        ("-a=b", "expected a key (a letter, digit or '_')", 0),
        ("a=b,.c", "expected a key (a letter, digit or '_')", 4),
        ("!", "expected a key (a letter, digit or '_')", 1),
        ("!=b", "expected a key (a letter, digit or '_')", 1),
        ("k\u00e9=v", "invalid character '\u00e9' in key 'k'", 1),
        ("a$b=c", "invalid character '$' in key 'a'", 1),
        ("!a=b", "expected ',' or the end of the selector", 2),
        # Limits.
        ("a=" + "b" * (MAX_LENGTH - 1), f"selector is longer than {MAX_LENGTH} characters", 1024),
        (
            ",".join(["a"] * (MAX_REQUIREMENTS + 1)),
            f"selector has more than {MAX_REQUIREMENTS} requirements",
            2 * MAX_REQUIREMENTS,
        ),
    ],
)
def test_malformed_selectors_report_what_and_where(text: str, message: str, position: int) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)

    assert caught.value.description == f"{message} at position {position}"
    assert caught.value.position == position
    assert caught.value.field == "selector"
    assert caught.value.reason is Reason.INVALID_SELECTOR


def test_errors_name_the_field_they_came_from() -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector("kind", field="watch_selector")

    assert caught.value.field == "watch_selector"
    assert str(caught.value) == "watch_selector: expected an operator after 'kind' at position 4"


# --- matching ------------------------------------------------------------------------------

LABELLED = Device(
    id="d1",
    worker="lab-a",
    kind="pico2-ice",
    labels={"firmware": "v1", "version": "5", "kind": "fake", "note": "x y"},
    properties={"gpu_memory_mb": 16384, "temp": -2.5, "count": 5, "ratio": 0.1},
)
BARE = Device(id="d2", worker="lab-b", kind="pico-ice")


@pytest.mark.parametrize(
    ("text", "labelled", "bare"),
    [
        # Device fields, not labels: the `kind` label is never consulted.
        ("kind=pico2-ice", True, False),
        ("kind=fake", False, False),
        ("kind!=pico2-ice", False, True),
        ("worker in (lab-a, lab-c)", True, False),
        ("worker notin (lab-a)", False, True),
        ("id=d2", False, True),
        ("id in (d1,d2)", True, True),
        # Labels: string equality; negations match devices without the key.
        ("firmware=v1", True, False),
        ("firmware=v2", False, False),
        ("firmware!=v1", False, True),
        ("firmware!=v2", True, True),
        ("firmware in (v2, v1)", True, False),
        ("firmware notin (v2, v1)", False, True),
        ("firmware notin (v2)", True, True),
        ('note="x y"', True, False),
        # Numbers in equality: a label compares as text, a property numerically.
        ("version=5", True, False),
        ("version=5.0", False, False),
        ("count=5", True, False),
        ("count=5.0", True, False),
        ("count=+5e0", True, False),
        ("count!=5.0", False, True),
        ("count in (x, 5.0)", True, False),
        ("count notin (5)", False, True),
        ("ratio=0.1", True, False),
        ("gpu_memory_mb=16384", True, False),
        # Numeric comparisons need the property; labels are never compared numerically.
        ("gpu_memory_mb>=16384", True, False),
        ("gpu_memory_mb>16384", False, False),
        ("gpu_memory_mb<=16384", True, False),
        ("gpu_memory_mb<16384", False, False),
        ("temp<0", True, False),
        ("temp>-3", True, False),
        ("version>1", False, False),
        ("missing<1", False, False),
        # Existence: a label or a property.
        ("firmware", True, False),
        ("temp", True, False),
        ("!firmware", False, True),
        ("!temp", False, True),
        ("missing", False, False),
        ("!missing", True, True),
        # Conjunction.
        ("kind=pico2-ice,firmware=v1,gpu_memory_mb>=16384", True, False),
        ("kind=pico2-ice,firmware=v2", False, False),
        ("!firmware,kind=pico-ice", False, True),
    ],
)
def test_matching_semantics(text: str, labelled: bool, bare: bool) -> None:
    assert matches(text, LABELLED) is labelled
    assert matches(text, BARE) is bare


@pytest.mark.parametrize(
    "text",
    ["firmware=v1", "count=5", "version in (5,6)", "missing=1", "kind=pico-ice", "worker in (x)"],
)
def test_negations_are_exact_complements(text: str) -> None:
    negated = text.replace("=", "!=", 1) if " in " not in text else text.replace(" in ", " notin ")

    for device in (LABELLED, BARE):
        assert matches(negated, device) is not matches(text, device)


def test_label_and_property_with_one_key_both_count() -> None:
    device = Device(labels={"x": "1"}, properties={"x": 2})

    assert matches("x=1", device)
    assert matches("x=2", device)
    assert not matches("x!=1", device)
    assert matches("x in (3, 2)", device)
    assert matches("x>1.5", device)
