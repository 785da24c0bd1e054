"""The parser's fast path for compressed messages (``Protocol._split_deflated``)
against its general path, byte for byte: the same events, the same failure
(its type, close code and message), the same inflate-budget installments,
whatever the stream and however it is cut into reads; each on the C loop
(``_speedups.inflate_run``) and on the pure one.

The stream is what a permessage-deflate server sends: compressed text and
binary whole (the fast path's case) among everything the fast path must
leave alone -- fragmented and uncompressed messages, control frames, a
64-bit length -- and faults it must fail on in the general path's order
(text that is not UTF-8, a message over ``max_message_size``, corrupt
deflate data, data after the final block, RSV bits on a continuation).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockws.deflate as deflate_module
from blockws.deflate import PerMessageDeflate
from blockws.frames import RSV1
from blockws.protocol import (
    BinaryMessage,
    Failure,
    Ping,
    Pong,
    Protocol,
    Role,
    TextMessage,
)

pytestmark = pytest.mark.unit



@pytest.fixture(autouse=True, params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both loops of the fast path: the C one
    (blockws._speedups.inflate_run, through PerMessageDeflate.decode_run) and
    the pure-Python reference (decode() per message)."""
    if request.param == "python":
        monkeypatch.setattr(deflate_module, "_inflate_run", None)
    elif deflate_module._inflate_run is None:
        if os.environ.get("BLOCKWS_PURE_PYTHON"):
            pytest.skip("the C loop is off (BLOCKWS_PURE_PYTHON)")
        pytest.fail("the C speedups are not built")
    return str(request.param)


KEY = b"\x01\x02\x03\x04"
TAIL = b"\x00\x00\xff\xff"


def frame(b0: int, payload: bytes, long64: bool = False) -> bytes:
    n = len(payload)
    if long64:
        return bytes((b0, 127)) + struct.pack("!Q", n) + payload
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return bytes((b0, 126)) + struct.pack("!H", n) + payload
    return bytes((b0, 127)) + struct.pack("!Q", n) + payload


class Server:
    """A permessage-deflate sender with context takeover (one zlib stream)."""

    def __init__(self) -> None:
        self.comp = zlib.compressobj(6, zlib.DEFLATED, -15)

    def deflate(self, data: bytes) -> bytes:
        out = self.comp.compress(data) + self.comp.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(TAIL)
        return out[:-4]

    def piece(self, kind: str, text: str) -> bytes:
        raw = text.encode()
        if kind == "text":  # the fast path's frame: FIN, RSV1, text
            return frame(0xC1, self.deflate(raw))
        if kind == "text64":  # the same with a 64-bit length: the general path
            return frame(0xC1, self.deflate(raw), long64=True)
        if kind == "plain":
            return frame(0x81, raw)
        if kind == "binary":
            return frame(0xC2, self.deflate(raw))
        if kind == "fragmented":
            body = self.deflate(raw)
            half = len(body) // 2
            return frame(0x41, body[:half]) + frame(0x80, body[half:])
        b0 = 0xC1
        if kind.startswith("binary-"):  # the same, as a binary message
            kind, b0 = kind[len("binary-") :], 0xC2
        if kind == "final":  # ends in a block with BFINAL set: a new stream follows
            body = self.comp.compress(raw) + self.comp.flush(zlib.Z_FINISH)
            self.comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            return frame(b0, body)
        if kind == "large":  # compresses to more than one inflate call takes
            noise = random.Random(len(raw)).randbytes(12_000).hex()
            return frame(b0, self.deflate((text + noise).encode()))
        if kind == "empty":  # no payload at all: inflates to nothing
            return frame(b0, b"")
        if kind == "ping":
            return frame(0x89, raw[:125])
        if kind == "bad-utf8":
            return frame(0xC1, self.deflate(b"ok \xff\xfe"))
        if kind == "after-final":  # bytes after the final block
            body = self.comp.compress(raw) + self.comp.flush(zlib.Z_FINISH)
            self.comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            return frame(0xC1, body + b"\x00")
        if kind == "corrupt":
            return frame(0xC1, b"\xff\xff\xff\xff" + raw)
        if kind == "rsv-continuation":
            body = self.deflate(raw)
            return frame(0x41, body) + frame(0xC0, b"")
        raise AssertionError(kind)


def client(fast: bool, compact_messages: bool = False, **options: Any) -> Protocol:
    ext = PerMessageDeflate().fresh()
    ext.accept([])
    proto = Protocol(Role.CLIENT, extensions=[ext], mask_keys=lambda: KEY, **options)
    proto.compact_messages = compact_messages
    if not fast:
        proto._whole_decode = None  # the general path for every frame
    return proto


def summary(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, str):
            out.append(("text", e))
        elif isinstance(e, TextMessage):
            out.append(("text", e.text))
        elif isinstance(e, (bytes, BinaryMessage)):
            out.append(("binary", bytes(e)))
        elif isinstance(e, (Ping, Pong)):
            out.append((type(e).__name__, e.payload))
        elif isinstance(e, Failure):
            out.append(("failure", type(e.error).__name__, e.error.close_code, str(e.error)))
        else:
            out.append(("other", repr(e)))
    return out


def run(proto: Protocol, data: bytes, cuts: list[int], budget: int | None) -> list[Any]:
    """Feed ``data`` cut at ``cuts``; with a budget, in installments as the
    connection does (``receive_data(b"")`` while ``more``)."""
    proto.inflate_budget = budget
    events: list[Any] = []
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        if end <= start:
            continue
        events += proto.receive_data(data[start:end])
        installments = 0
        while proto.more:
            events += proto.receive_data(b"")
            installments += 1
            assert installments < 10_000
        events.append(("read", installments))
        start = end
    return events


KINDS = ["text"] * 6 + ["binary"] * 3 + [
    "final", "large", "empty", "binary-final", "binary-large", "binary-empty",
    "text64", "plain", "fragmented", "ping",
]
FAULTS = ["bad-utf8", "corrupt", "after-final", "rsv-continuation"]

texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=300
) | st.sampled_from(["{\"t\": 1, \"x\": 2.5}", "é" * 100, "a" * 5000])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.tuples(st.sampled_from(KINDS), texts), min_size=1, max_size=12),
    fault=st.none() | st.tuples(st.sampled_from(FAULTS), st.integers(0, 12)),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
    limit=st.none() | st.integers(0, 400),
    budget=st.none() | st.integers(1, 600),
    compact=st.booleans(),
    binary_as_bytes=st.booleans(),
)
def test_the_fast_path_agrees_with_the_general_path(
    pieces: list[tuple[str, str]],
    fault: tuple[str, int] | None,
    cuts: list[int],
    limit: int | None,
    budget: int | None,
    compact: bool,
    binary_as_bytes: bool,
) -> None:
    if fault is not None:
        pieces.insert(min(fault[1], len(pieces)), (fault[0], "x" * 20))
    server = Server()
    data = b"".join(server.piece(kind, text) for kind, text in pieces)
    options = {"max_message_size": limit, "compact_messages": compact}
    fast, general = client(True, **options), client(False, **options)
    fast.binary_as_bytes = general.binary_as_bytes = binary_as_bytes
    assert summary(run(fast, data, cuts, budget)) == summary(run(general, data, cuts, budget))


def test_the_fast_path_takes_whole_compressed_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """It is used (and the general path's header parsing is not) for a run of
    compressed text and binary frames; a fragment in between goes the general way."""
    server = Server()
    proto = client(True, compact_messages=True)
    headers: list[int] = []
    original = Protocol._read_header

    def counting(self: Protocol, buf: bytes, pos: int, end: int) -> int:
        headers.append(pos)
        return original(self, buf, pos, end)

    monkeypatch.setattr(Protocol, "_read_header", counting)
    data = b"".join(server.piece("text", f"message {i}") for i in range(50))
    assert proto.receive_data(data) == [f"message {i}" for i in range(50)]
    assert headers == []
    data = b"".join(server.piece(("binary", "text")[i % 2], f"m{i}") for i in range(50))
    assert proto.receive_data(data) == [(b"m%d" % i, f"m{i}")[i % 2] for i in range(50)]
    assert headers == []  # compressed binary too, as bytes
    data = server.piece("text", "a") + server.piece("fragmented", "b" * 300)
    data += server.piece("text", "c")
    assert proto.receive_data(data) == ["a", "b" * 300, "c"]
    assert len(headers) == 2  # the fragment's two frames only


def test_the_fast_path_fails_as_the_general_path_does() -> None:
    for kind, error, code in (
        ("bad-utf8", "InvalidPayload", 1007),
        ("corrupt", "ProtocolError", 1002),
    ):
        server = Server()
        data = server.piece("text", "fine") + server.piece(kind, "x" * 20)
        data += server.piece("text", "never")
        events = summary(client(True, compact_messages=True).receive_data(data))
        assert [e[:3] for e in events] == [("text", "fine"), ("failure", error, code)]
    server = Server()
    data = server.piece("text", "x" * 50) + server.piece("text", "y" * 500)
    events = summary(client(True, compact_messages=True, max_message_size=100).receive_data(data))
    assert events == [
        ("text", "x" * 50),
        ("failure", "MessageTooBig", 1009, "inflated message exceeds the 100 bytes left"),
    ]


def test_the_fast_path_stops_at_the_inflate_budget() -> None:
    """Installments: each stops once the budget of inflated bytes is spent."""
    server = Server()
    data = b"".join(server.piece("text", "z" * 100) for _ in range(10))
    proto = client(True, compact_messages=True)
    proto.inflate_budget = 250
    first = proto.receive_data(data)
    assert len(first) == 3 and proto.more  # 300 bytes inflated: over the budget
    rest: list[Any] = []
    while proto.more:
        rest += proto.receive_data(b"")
    assert first + rest == ["z" * 100] * 10


@pytest.mark.parametrize("budget", [-5, 0, 1])
def test_a_budget_of_zero_or_less_stops_after_a_message(budget: int) -> None:
    """Each installment inflates one message when the budget is spent from the
    start, on either loop (the C one takes -1 for no budget)."""
    server = Server()
    data = b"".join(server.piece("text", f"m{i}") for i in range(4))
    proto = client(True, compact_messages=True)
    proto.inflate_budget = budget
    got = [proto.receive_data(data)]
    while proto.more:
        got.append(proto.receive_data(b""))
    assert got == [["m0"], ["m1"], ["m2"], ["m3"]]


def test_no_fast_path_without_deflate_or_in_the_server_role() -> None:
    assert Protocol(Role.CLIENT)._whole_decode is None
    ext = PerMessageDeflate().fresh()
    ext.accept([])
    assert Protocol(Role.SERVER, extensions=[ext])._whole_decode is None
    assert client(True)._whole_decode is not None
    assert RSV1 == 0x40


def test_whole_messages_go_through_the_c_loop_when_built(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the C loop, a run of whole compressed text messages is inflated
    without one decode() call; a message ending the deflate stream (BFINAL)
    and one too large to inflate in one call go through decode(), and the
    stream carries on. Without it, decode() takes every message."""
    calls: list[int] = []
    original = PerMessageDeflate.decode

    def counting(self: PerMessageDeflate, data: bytes, end: bool, limit: int) -> bytes:
        calls.append(len(data))
        return original(self, data, end, limit)

    monkeypatch.setattr(PerMessageDeflate, "decode", counting)
    server = Server()
    proto = client(True, compact_messages=True)
    data = b"".join(server.piece("text", f"message {i}") for i in range(50))
    data += b"".join(server.piece("binary", f"binary {i}") for i in range(50))
    assert proto.receive_data(data) == [f"message {i}" for i in range(50)] + [
        b"binary %d" % i for i in range(50)
    ]
    assert len(calls) == (0 if loop == "c" else 100)
    calls.clear()
    data = server.piece("final", "end") + server.piece("text", "new stream")
    data += server.piece("large", "big") + server.piece("text", "after")
    events = proto.receive_data(data)
    assert events[:2] == ["end", "new stream"] and events[3] == "after"
    assert events[2].startswith("big") and len(events[2]) == 24_003
    # The C loop: "end" inflates there and stops it, the parser's own loop
    # takes the next frame ("new stream", the first of the new stream), and
    # "big" (over 8 KiB compressed) is decode()'s too; "after" is C's again.
    assert len(calls) == (2 if loop == "c" else 4)


@pytest.mark.parametrize("limit", [None, 4095, 4096, 4097, 4999, 5000, 5001, 20_000])
@pytest.mark.parametrize("kind", ["text", "final", "binary", "binary-final"])
@pytest.mark.parametrize("size", [4095, 4096, 4097, 5000])
def test_messages_around_the_first_inflate_size(limit: int | None, kind: str, size: int) -> None:
    """The C loop inflates at most 4 KiB of a message at first, then the rest up
    to the room in a second call: messages on either side of that, each ending
    in a sync flush or a final block, under limits on either side of their
    size, come out (or fail) as in the general path."""
    text = "é" * (size // 2) + "a" * (size % 2)
    assert len(text.encode()) == size
    server = Server()
    data = server.piece("text", "before") + server.piece(kind, text) + server.piece("text", "after")
    fast = summary(client(True, max_message_size=limit).receive_data(data))
    assert fast == summary(client(False, max_message_size=limit).receive_data(data))
    if limit is None or limit >= size:
        middle = ("binary", text.encode()) if kind.startswith("binary") else ("text", text)
        assert fast == [("text", "before"), middle, ("text", "after")]
    else:
        assert fast[0] == ("text", "before") and fast[1][:3] == ("failure", "MessageTooBig", 1009)


def test_an_extension_without_its_own_loop_decodes_each_message_in_the_fast_path() -> None:
    """Extension.decode_run's default decodes nothing: the parser's own loop then
    calls decode() for each whole message an RSV1 extension claims."""
    from blockws.extensions import Extension

    class Upper(Extension):
        name = "x-upper"
        rsv_bits = RSV1
        claims_by_rsv = True

        def begin_message(self, opcode: int, rsv: int) -> bool:
            return bool(rsv & RSV1)

        def decode(self, data: bytes, end: bool, limit: int) -> bytes:
            return data.upper()

    ext = Upper()
    assert ext.decode_run(b"\xc1\x01a", 0, 10, None, None, 0, [], None, None) == (0, 0)
    proto = Protocol(Role.CLIENT, extensions=[ext], mask_keys=lambda: KEY)
    proto.compact_messages = True
    assert proto._whole_run is not None
    data = frame(0xC1, b"abc") + frame(0xC2, b"def") + frame(0x81, b"ghi")
    assert proto.receive_data(data) == ["ABC", b"DEF", "ghi"]
