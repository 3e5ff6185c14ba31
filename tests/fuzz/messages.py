"""Hypothesis strategies for whole protobuf messages, built from their descriptors.

`messages(cls)` sets any subset of the fields of `cls` to any value of their type (one member
of each oneof at most; repeated fields and maps short or past every limit; nested messages to
a few levels). `messages(cls, vocabulary)` does the same but fills the fields the vocabulary
knows (by `Message.field` or plain field name) with plausible values, so a case gets past
validation into the code behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.fuzz import values

F = FieldDescriptor
Vocabulary = Mapping[str, st.SearchStrategy[Any]]
MAX_DEPTH = 3

_SCALARS: dict[int, Callable[[], st.SearchStrategy[Any]]] = {
    F.TYPE_INT32: lambda: values.integers(*values.INT32),
    F.TYPE_SINT32: lambda: values.integers(*values.INT32),
    F.TYPE_SFIXED32: lambda: values.integers(*values.INT32),
    F.TYPE_INT64: lambda: values.integers(*values.INT64),
    F.TYPE_SINT64: lambda: values.integers(*values.INT64),
    F.TYPE_SFIXED64: lambda: values.integers(*values.INT64),
    F.TYPE_UINT32: lambda: values.integers(*values.UINT32),
    F.TYPE_FIXED32: lambda: values.integers(*values.UINT32),
    F.TYPE_UINT64: lambda: values.integers(*values.UINT64),
    F.TYPE_FIXED64: lambda: values.integers(*values.UINT64),
    F.TYPE_DOUBLE: lambda: values.floats(64),
    F.TYPE_FLOAT: lambda: values.floats(32),
    F.TYPE_BOOL: st.booleans,
    F.TYPE_STRING: values.text,
    F.TYPE_BYTES: values.binary,
}


def message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def message_type(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    found = field.message_type
    assert found is not None, field.full_name
    return found


def is_map(field: FieldDescriptor) -> bool:
    return bool(
        field.type == F.TYPE_MESSAGE
        and field.is_repeated
        and message_type(field).GetOptions().map_entry
    )


def descriptor_of(cls: type[Message]) -> Descriptor:
    return cast(Descriptor, cls.DESCRIPTOR)


def _single(field: FieldDescriptor, vocabulary: Vocabulary | None, depth: int) -> Any:
    """A strategy for one value of `field` (one element when repeated)."""
    if field.type == F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), values.integers(*values.INT32))
    if field.type == F.TYPE_MESSAGE:
        name = message_type(field).full_name
        if name == "google.protobuf.Duration":
            return values.duration()
        if name == "google.protobuf.Timestamp":
            return values.timestamp()
        return st.deferred(
            lambda: messages(message_class(message_type(field)), vocabulary, depth + 1)
        )
    return _SCALARS[field.type]()


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A few elements, or one element many times (past the per-request limits)."""
    many = st.tuples(element, st.integers(33, 2100)).map(lambda pair: [pair[0]] * _copies(*pair))
    return st.one_of(st.lists(element, max_size=4), many)


def distinct(items: list[Any], key: Callable[[Any], Any] = repr) -> list[Any]:
    """`items` without repeats. Done after drawing, never with hypothesis's unique lists: the
    values come from live pools, and a draw must not depend on anything but its choices."""
    seen: set[Any] = set()
    kept = []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            kept.append(item)
    return kept


def mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` nine times in ten, else `rare`."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 0 else usual)


def _copies(element: Any, wanted: int) -> int:
    """How many copies of `element` to send: many of a small one, few of a big one (a case
    stays well under gRPC's 4 MB message limit and the machine's memory)."""
    size = (
        len(element)
        if isinstance(element, str | bytes)
        else element.ByteSize()
        if isinstance(element, Message)
        else 8
    )
    return wanted if size < 256 else 3


def _mapping(field: FieldDescriptor, vocabulary: Vocabulary | None, depth: int) -> Any:
    entry = message_type(field)
    keys = _single(entry.fields_by_name["key"], vocabulary, depth)
    items = _single(entry.fields_by_name["value"], vocabulary, depth)
    many = st.tuples(items, st.integers(33, 200)).map(
        lambda pair: {f"k{i}": pair[0] for i in range(pair[1])}
    )
    return st.one_of(st.dictionaries(keys, items, max_size=4), many)


def _known(
    vocabulary: Vocabulary | None, descriptor: Descriptor, field: FieldDescriptor
) -> st.SearchStrategy[Any] | None:
    if vocabulary is None:
        return None
    return vocabulary.get(f"{descriptor.name}.{field.name}", vocabulary.get(field.name))


def _field_strategy(
    descriptor: Descriptor, field: FieldDescriptor, vocabulary: Vocabulary | None, depth: int
) -> st.SearchStrategy[Any]:
    known = _known(vocabulary, descriptor, field)
    if is_map(field):
        generic = _mapping(field, vocabulary, depth)
        return generic if known is None else mostly(known, generic)
    element = _single(field, vocabulary, depth)
    if known is not None:
        # Mostly plausible, sometimes anything: hostile values deep inside valid requests.
        element = mostly(known, element)
    if field.is_repeated:
        if known is not None:
            listed = st.lists(element, max_size=3).map(distinct)
            return mostly(listed, _repeated(element))
        return _repeated(element)
    return cast(st.SearchStrategy[Any], element)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    if is_map(field):
        target = getattr(message, field.name)
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def messages(
    cls: type[Message], vocabulary: Vocabulary | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of `cls` with any subset of fields set (see the module docstring)."""
    descriptor = descriptor_of(cls)
    fields: list[FieldDescriptor] = list(descriptor.fields)
    plain = [f for f in fields if f.containing_oneof is None]
    oneofs: list[list[FieldDescriptor]] = [
        list(o.fields) for o in descriptor.oneofs if not o.name.startswith("_")
    ]
    if depth >= MAX_DEPTH:
        return st.just(cls())
    strategies = {f.name: _field_strategy(descriptor, f, vocabulary, depth) for f in fields}
    # A plausible caller fills the fields it knows about more often than not.
    often = st.integers(0, 3).map(bool)
    present = {
        f.name: often if _known(vocabulary, descriptor, f) is not None else st.booleans()
        for f in plain
    }

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen = [f for f in plain if draw(present[f.name])]
        for members in oneofs:
            member: FieldDescriptor | None = draw(st.sampled_from([*members, None]))
            if member is not None:
                chosen.append(member)
        for field in chosen:
            _assign(message, field, draw(strategies[field.name]))
        return message

    return build()
