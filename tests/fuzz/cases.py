"""Fuzz cases: which RPC, what is sent (messages, or raw bytes on the wire), with which headers.

Three origins, mixed in every RPC's strategy:
- "arbitrary": any message the descriptor allows, any header value gRPC can carry;
- "plausible": messages filled from the farm's real ids (pools.py), so the case reaches the
  code behind validation (and still carries hostile values in some fields);
- "raw": bytes that are not a valid message: garbage, truncated or corrupted encodings of a
  plausible message, invalid UTF-8 in a string field (impossible through the Python API).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from icefarm.v1 import control_service_pb2, reservation_service_pb2, worker_service_pb2
from tests.fuzz.messages import (
    Vocabulary,
    descriptor_of,
    is_map,
    message_class,
    message_type,
    messages,
    mostly,
)
from tests.fuzz.pools import Pools, shapes, vocabulary

CLIENT_ID_HEADER = "icefarm-client-id"
TOKEN_HEADER = "icefarm-reservation-token"
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/icefarm.v1.{self.service}/{self.name}"

    @property
    def key(self) -> str:
        return f"{self.service}.{self.name}"


def _rpcs(module: Any) -> list[Rpc]:
    found = []
    for service in module.DESCRIPTOR.services_by_name.values():
        method: MethodDescriptor
        for method in service.methods:
            found.append(
                Rpc(
                    service.name,
                    method.name,
                    message_class(method.input_type),
                    message_class(method.output_type),
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    return found


RESERVATION_RPCS = _rpcs(reservation_service_pb2)
CONTROL_RPCS = _rpcs(control_service_pb2)
WORKER_RPCS = _rpcs(worker_service_pb2)


@dataclass
class Case:
    rpc: Rpc
    origin: str
    metadata: Metadata
    requests: tuple[Message, ...] = ()
    # Sent instead of `requests` when set (identity serializers).
    raw: tuple[bytes, ...] | None = None
    # Streams: half-close after the last request (else the stream stays open until the end).
    half_close: bool = True
    # WorkerSession: answer each command received (ok or not) while the stream is open.
    answer_commands: bool | None = None

    def __repr__(self) -> str:
        # Short: hypothesis prints the cases of a round when the run stops.
        return f"Case({self.describe(120)!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis's printer would list every field

    def undecodable(self) -> bool:
        """Raw bytes the server cannot decode as the request (it cannot go on reading)."""
        for data in self.raw or ():
            try:
                self.rpc.request.FromString(data)
            except Exception:  # any decoding failure counts
                return True
        return False

    def must_end(self) -> bool:
        """The server must end this stream by itself: after a message it cannot decode (gRPC
        cannot skip one), or an Evaluate whose caller half-closed (every result is due)."""
        return self.undecodable() or (self.rpc.name == "Evaluate" and self.half_close)

    def strings(self) -> list[str]:
        """Every string the case sends (an answer may quote them back; that is no leak)."""
        found = [v for _, v in self.metadata]
        for message in self.requests:
            found.extend(_strings(message))
        return found

    def describe(self, limit: int = 600) -> str:
        """One line a person can turn into a grpcurl call."""
        if self.raw is not None:
            body = " | ".join(repr(_squeeze_bytes(b)) for b in self.raw)
        else:
            body = " | ".join(
                text_format.MessageToString(m, as_one_line=True) or "{}" for m in self.requests
            )
        meta = " ".join(f"{k}={_squeeze(_shorten(v))!r}" for k, v in self.metadata)
        extra = (
            f" answer_commands={self.answer_commands}" if self.answer_commands is not None else ""
        )
        text = f"{self.rpc.key} [{self.origin}] {meta} half_close={self.half_close}{extra} :: "
        return (text + _squeeze(body))[:limit]


def _strings(message: Message) -> list[str]:
    found: list[str] = []
    for fd, value in message.ListFields():
        items = value.values() if is_map(fd) else value if fd.is_repeated else [value]
        if is_map(fd):
            found.extend(value.keys())
        for item in items:
            if isinstance(item, str):
                found.append(item)
            elif isinstance(item, Message):
                found.extend(_strings(item))
    return found


def _squeeze(text: str) -> str:
    """Long runs of one character shown as a count (a 70,000-character case stays readable)."""
    return re.sub(r"(.)\1{15,}", lambda m: f"{m.group(1)}*{len(m.group(0))}", text, flags=re.S)


def _shorten(value: str) -> str:
    """A long header (a reservation token) shown by its start and end."""
    return value if len(value) <= 48 or len(set(value)) == 1 else f"{value[:16]}…{value[-8:]}"


def _squeeze_bytes(data: bytes) -> bytes:
    return data if len(data) <= 80 else data[:40] + b"..." + data[-20:]


# ---------------------------------------------------------------------------- headers


def printable(max_size: int = 300) -> st.SearchStrategy[str]:
    """What gRPC lets a header value carry (visible ASCII and space)."""
    return st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=max_size
    )


def header_value() -> st.SearchStrategy[str]:
    return st.one_of(
        printable(40),
        st.sampled_from(["", " ", " lead", "trail ", "x" * 256, "x" * 257, "%00", "a\\x00b"]),
        st.integers(300, 20000).map(lambda n: "c" * n),
    )


def client_headers(pools: Pools, plausible: bool) -> st.SearchStrategy[Metadata]:
    named = pools.client_id() if plausible else header_value()
    one = named.map(lambda v: ((CLIENT_ID_HEADER, v),))
    odd = st.one_of(
        st.just(()),
        st.tuples(named, header_value()).map(lambda vs: tuple((CLIENT_ID_HEADER, v) for v in vs)),
    )
    return mostly(one, odd) if plausible else st.one_of(one, odd)


def worker_headers(pools: Pools, plausible: bool) -> st.SearchStrategy[Metadata]:
    token = pools.token() if plausible else st.one_of(pools.token(), header_value())
    one = token.map(lambda t: ((TOKEN_HEADER, t),))
    odd = st.one_of(
        st.tuples(token, header_value()).map(
            lambda p: ((TOKEN_HEADER, p[0]), (CLIENT_ID_HEADER, p[1]))
        ),
        st.tuples(header_value(), token).map(
            lambda p: ((TOKEN_HEADER, p[0]), (TOKEN_HEADER, p[1]))
        ),
        st.just(()),
    )
    return mostly(one, odd) if plausible else st.one_of(one, odd)


# ---------------------------------------------------------------------------- raw bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bad_utf8_fields(descriptor: Descriptor) -> list[int]:
    return [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]


def raw_bytes(rpc: Rpc, plausible: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes that do not decode as the request (or decode to something odd)."""
    encoded = plausible.map(lambda m: m.SerializeToString())
    options = [
        st.binary(max_size=64),
        st.tuples(encoded, st.integers(0, 1 << 16)).map(
            lambda p: p[0][: p[1] % (len(p[0]) + 1)] if p[0] else b"\xff"
        ),
        st.tuples(encoded, st.integers(0, 1 << 16), st.integers(1, 255)).map(
            lambda p: _flip(p[0], p[1], p[2])
        ),
        st.tuples(encoded, st.binary(min_size=1, max_size=8)).map(lambda p: p[0] + p[1]),
        # A length prefix far longer than what follows.
        st.just(b"\x0a\xff\xff\xff\x0f"),
    ]
    strings = _bad_utf8_fields(descriptor_of(rpc.request))
    if strings:
        options.append(
            st.tuples(
                st.sampled_from(strings), st.sampled_from([b"\xff", b"\xc3", b"a\xed\xa0\x80"])
            ).map(lambda p: _varint(p[0] << 3 | 2) + _varint(len(p[1])) + p[1])
        )
    return st.one_of(options)


def _flip(data: bytes, position: int, mask: int) -> bytes:
    if not data:
        return b"\x08"
    i = position % len(data)
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


# ---------------------------------------------------------------------------- cases


def _as_holder(pair: tuple[tuple[str, str], Case]) -> Case:
    """`case` sent by the holder of a board: its token, about its board."""
    (token, board), case = pair
    request = case.requests[0].__class__()
    request.CopyFrom(case.requests[0])
    request.device_id = board  # type: ignore[attr-defined]  # every such request has one
    case.metadata = ((TOKEN_HEADER, token),)
    case.requests = (request,)
    return case


def _first_kind(rpc: Rpc) -> str | None:
    """The message a stream must open with (its oneof member), if any."""
    return {"Session": "hello", "WorkerSession": "register"}.get(rpc.name)


def _opening(rpc: Rpc, words: Vocabulary, plausible: st.SearchStrategy[Message]) -> Any:
    """A plausible first message of a stream: the one its handshake expects (Hello, Register)."""
    kind = _first_kind(rpc)
    if kind is None:
        return plausible
    member = descriptor_of(rpc.request).fields_by_name[kind]

    def wrap(inner: Message) -> Message:
        outer = rpc.request()
        getattr(outer, kind).CopyFrom(inner)
        return outer

    return messages(message_class(message_type(member)), words).map(wrap)


def _stream_requests(
    rpc: Rpc, first: st.SearchStrategy[Message], rest: st.SearchStrategy[Message]
) -> st.SearchStrategy[tuple[Message, ...]]:
    return st.one_of(
        st.tuples(first, st.lists(rest, max_size=5)).map(lambda p: (p[0], *p[1])),
        st.lists(rest, max_size=3).map(tuple),
    )


ORIGINS = frozenset({"plausible", "arbitrary", "raw"})


def cases(rpc: Rpc, pools: Pools, origins: frozenset[str] = ORIGINS) -> st.SearchStrategy[Case]:
    """Every kind of case for one RPC (of the origins asked for)."""
    words = vocabulary(pools)
    plausible = messages(rpc.request, words)
    arbitrary = messages(rpc.request)
    headers = worker_headers if rpc.service == "WorkerService" else client_headers
    flags = st.tuples(st.booleans(), st.sampled_from([None, True, False]))

    def build(origin: str) -> Any:
        def make(args: tuple[Any, ...]) -> Case:
            metadata, requests, (half_close, answer) = args
            if rpc.name != "WorkerSession":
                answer = None
            return Case(rpc, origin, metadata, tuple(requests), None, half_close, answer)

        return make

    if rpc.client_streaming:
        plausible_requests = _stream_requests(rpc, _opening(rpc, words, plausible), plausible)
        arbitrary_requests = _stream_requests(rpc, arbitrary, arbitrary)
    else:
        plausible_requests = plausible.map(lambda m: (m,))
        arbitrary_requests = arbitrary.map(lambda m: (m,))
    shaped = shapes(pools).get(rpc.key)
    if shaped is not None:
        plausible_requests = mostly(shaped, plausible_requests)
    raw_count = st.integers(1, 3) if rpc.client_streaming else st.just(1)
    raw = st.tuples(
        headers(pools, True),
        raw_count.flatmap(lambda n: st.lists(raw_bytes(rpc, plausible), min_size=n, max_size=n)),
        st.booleans(),
    ).map(lambda p: Case(rpc, "raw", p[0], (), tuple(p[1]), p[2]))
    plausible_case = st.tuples(headers(pools, True), plausible_requests, flags).map(
        build("plausible")
    )
    if rpc.service == "WorkerService" and not rpc.client_streaming:
        # Half the time the token and the board of one reservation that holds it now: the
        # call gets past the worker's checks and does the real work (flash, export, ...).
        plausible_case = st.one_of(
            plausible_case, st.tuples(pools.holder(), plausible_case).map(_as_holder)
        )
    made = {
        "plausible": plausible_case,
        "arbitrary": st.tuples(headers(pools, False), arbitrary_requests, flags).map(
            build("arbitrary")
        ),
        "raw": raw,
    }
    # Plausible cases most often: they are the ones that reach the code behind validation.
    weights = {"plausible": 6, "arbitrary": 3, "raw": 2}
    # Plausible first: hypothesis leans towards the first of a list it samples.
    order = [o for o in ("plausible", "arbitrary", "raw") if o in origins]
    weighted = [made[o] for o in order for _ in range(weights[o])]
    return st.sampled_from(weighted).flatmap(lambda strategy: strategy)
