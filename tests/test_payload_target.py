"""Reads straight into the message being assembled (``Protocol.payload_target``).

The rest of a large frame of a binary message for ``on_binary`` may be read
into the message's pooled buffer instead of through :meth:`receive_data`:
the events, and every byte of them, must be what ``receive_data`` makes of
the same stream, however the stream is cut.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from faultserver import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, Peer, Recorder, fault_server
from faultserver import frame_bytes as wire_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory import server_frame

import blockws
from blockws.deflate import PerMessageDeflate
from blockws.exceptions import MessageTooBig
from blockws.frames import Opcode, encode_header
from blockws.protocol import BinaryMessage, Protocol, Role
from blockws.transport import TCPTransport

pytestmark = [pytest.mark.timeout(60)]
unit = pytest.mark.unit

KB = 1024
INTO = 64 * KB  # blockws.protocol._INTO_FROM


def client(**kwargs: Any) -> Protocol:
    proto = Protocol(Role.CLIENT, **kwargs)
    proto.compact_messages = True
    return proto


def as_values(events: list[Any]) -> list[Any]:
    return [bytes(e) if isinstance(e, BinaryMessage) else e for e in events]


def feed(proto: Protocol, data: bytes, into: int | None = None) -> list[Any]:
    """``data`` as reads: through the target wherever there is one (at most
    ``into`` bytes a read), else through receive_data, a read of up to 127 KiB."""
    events: list[Any] = []
    pos = 0
    while pos < len(data):
        target = proto.payload_target()
        if target is not None:
            n = min(len(target), len(data) - pos, into or len(target))
            target[:n] = data[pos : pos + n]
            events += proto.payload_received(n)
        else:
            n = min(127 * KB, len(data) - pos)
            events += proto.receive_data(data[pos : pos + n])
        pos += n
    return as_values(events)


@unit
def test_a_large_message_is_read_into_its_buffer_byte_for_byte() -> None:
    payload = os.urandom(1 << 20)
    wire = server_frame(Opcode.BINARY, payload) + server_frame(Opcode.TEXT, b"after")
    proto = client()
    events = proto.receive_data(wire[: 100 * KB])  # the header and the first piece
    assert events == []
    targets = 0
    pos = 100 * KB
    while (target := proto.payload_target()) is not None:
        targets += 1
        n = len(target)
        target[:] = wire[pos : pos + n]
        events += proto.payload_received(n)
        pos += n
    assert targets >= 1
    # The message ended at its frame's end; what follows is parsed as usual.
    assert as_values(events) == [payload]
    assert as_values(proto.receive_data(wire[pos:])) == ["after"]


@unit
def test_the_target_never_reaches_past_the_frame_or_the_buffer() -> None:
    """A peer announcing 16 MiB and sending little gets a buffer that doubles
    with what came, never one of the announced size."""
    allocated: list[int] = []

    def allocate(size: int) -> bytearray:
        allocated.append(size)
        return bytearray(size)

    proto = client(allocate=allocate, max_message_size=None)
    announced = 16 << 20
    proto.receive_data(encode_header(0x82, announced, None) + b"x" * (128 * KB))
    sizes = []
    for _ in range(3):
        target = proto.payload_target()
        assert target is not None
        sizes.append(len(target))
        target[:] = b"y" * len(target)
        assert proto.payload_received(len(target)) == []
    assert max(allocated) <= 2 * (128 * KB + sum(sizes))
    assert sum(sizes) < announced
    # And at the frame's end the view stops there.
    proto = client()
    proto.receive_data(encode_header(0x82, 200 * KB, None) + b"x" * (100 * KB))
    target = proto.payload_target()
    assert target is not None and len(target) == 100 * KB


@unit
def test_a_full_buffer_grows_and_keeps_what_it_held() -> None:
    released: list[int] = []
    proto = client(release=lambda b: released.append(len(b)))
    payload = os.urandom(900 * KB)
    wire = server_frame(Opcode.BINARY, payload)
    events = feed(proto, wire, into=64 * KB + 1)
    assert events == [payload]
    assert released  # the buffers it outgrew went back


@unit
def test_each_frame_of_a_fragmented_message_is_read_into_the_same_buffer() -> None:
    parts = [os.urandom(300 * KB), os.urandom(100 * KB), os.urandom(70 * KB), b"tail"]
    wire = b"".join(
        server_frame(Opcode.BINARY if i == 0 else Opcode.CONT, p, fin=i == len(parts) - 1)
        for i, p in enumerate(parts)
    )
    ping = server_frame(Opcode.PING, b"p")
    # A ping between two fragments, and a small message after.
    cut = len(server_frame(Opcode.BINARY, parts[0], fin=False))
    wire = wire[:cut] + ping + wire[cut:] + server_frame(Opcode.BINARY, b"small")
    proto = client()
    events = feed(proto, wire)
    assert [e for e in events if not isinstance(e, (bytes, str))][0].payload == b"p"
    assert [e for e in events if isinstance(e, bytes)] == [b"".join(parts), b"small"]


@unit
@pytest.mark.parametrize(
    "case",
    ["text", "receive()", "small rest", "server role", "deflate", "close received", "unparsed"],
)
@unit
def test_no_target_where_the_bytes_must_be_parsed(case: str) -> None:
    """Text, messages for receive() (built as bytes), a rest below 64 KiB,
    masked frames (the server role), compressed messages, data after the
    peer's close, and bytes held unparsed all go through receive_data."""
    size = 1 << 20
    proto = client(extensions=[PerMessageDeflate().fresh()] if case == "deflate" else [])
    frame = server_frame(Opcode.TEXT if case == "text" else Opcode.BINARY, b"a" * size)
    head = 100 * KB
    if case == "receive()":
        proto.binary_as_bytes = True
    elif case == "small rest":
        head = len(frame) - INTO + 1
    elif case == "server role":
        proto = Protocol(Role.SERVER)
        masker = Protocol(Role.CLIENT, mask_keys=lambda: b"abcd", max_fragment_size=size)
        frame = b"".join(masker.encode_data(Opcode.BINARY, b"a" * size))
    elif case == "deflate":
        frame = bytes([frame[0] | 0x40]) + frame[1:]  # RSV1: compressed
    elif case == "close received":
        proto.receive_data(server_frame(Opcode.CLOSE, b"\x03\xe8"))
    elif case == "unparsed":
        head = len(frame) + 1  # the whole frame, and a byte of the next header
        frame += server_frame(Opcode.BINARY, b"s" * size)
    proto.receive_data(frame[:head])
    assert proto.payload_target() is None
    if case in ("receive()", "small rest", "deflate"):
        return
    # The same cut of a plain binary frame has one (the cases differ in that only).
    plain = client()
    plain.receive_data(server_frame(Opcode.BINARY, b"a" * size)[: 100 * KB])
    assert plain.payload_target() is not None


@unit
def test_a_count_beyond_the_target_is_refused() -> None:
    proto = client()
    proto.receive_data(encode_header(0x82, 1 << 20, None) + b"x" * (100 * KB))
    target = proto.payload_target()
    assert target is not None
    with pytest.raises(ValueError, match="outside the payload target"):
        proto.payload_received(len(target) + 1)
    assert proto.payload_received(0) == []


@unit
def test_receive_cleared_meanwhile_gets_bytes_and_the_buffer_back() -> None:
    """``on_binary`` cleared between the target and the message's end: the
    message comes as ``bytes``, and its pooled buffer goes back."""
    released: list[int] = []
    proto = client(release=lambda b: released.append(len(b)))
    payload = os.urandom(300 * KB)
    wire = server_frame(Opcode.BINARY, payload)
    proto.receive_data(wire[: 100 * KB])
    pos = 100 * KB
    events: list[Any] = []
    while pos < len(wire):
        target = proto.payload_target()
        assert target is not None
        n = len(target)
        target[:] = wire[pos : pos + n]
        pos += n
        proto.binary_as_bytes = pos == len(wire)  # cleared before the last read
        events += proto.payload_received(n)
    assert events == [payload] and type(events[0]) is bytes
    assert released


@unit
def test_max_message_size_still_fails_at_the_header() -> None:
    proto = client(max_message_size=1 << 20)
    events = proto.receive_data(encode_header(0x82, (1 << 20) + 1, None))
    assert isinstance(proto.failure, MessageTooBig) and proto.payload_target() is None
    assert events


_chunks = st.lists(st.integers(min_value=1, max_value=300 * KB), min_size=1, max_size=12)


@unit
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(
        st.sampled_from([0, 5, 200, 70 * KB, 130 * KB, 600 * KB]), min_size=1, max_size=5
    ),
    fragment=st.sampled_from([None, 65 * KB, 100 * KB]),
    cuts=_chunks,
    into=st.sampled_from([None, 1000, 4096, 65 * KB]),
    seed=st.integers(0, 255),
)
def test_hypothesis_reads_into_targets_match_receive_data(
    sizes: list[int], fragment: int | None, cuts: list[int], into: int | None, seed: int
) -> None:
    """Any stream of binary messages (fragmented or not, with pings between
    frames), cut into reads anywhere, reads into targets where there are
    some: the same messages as receive_data alone makes of it."""
    wire = bytearray()
    messages = []
    for i, size in enumerate(sizes):
        payload = bytes([(seed + i) & 255]) * size
        messages.append(payload)
        step = fragment or max(size, 1)
        pieces = [payload[j : j + step] for j in range(0, max(size, 1), step)] or [b""]
        for k, piece in enumerate(pieces):
            op = Opcode.BINARY if k == 0 else Opcode.CONT
            wire += server_frame(op, piece, fin=k == len(pieces) - 1)
            if k == 0 and len(pieces) > 1:
                wire += server_frame(Opcode.PING, b"!")
    data = bytes(wire)
    reference = client()
    expected = [e for e in as_values(reference.receive_data(data)) if isinstance(e, bytes)]
    assert expected == messages
    proto = client()
    events: list[Any] = []
    pos, k, used = 0, 0, 0
    while pos < len(data):
        target = proto.payload_target()
        used += target is not None
        # The drawn cuts, every other read; a read of 37 KiB more between
        # (reads of a byte or two through 3 MiB took minutes).
        cut = cuts[(k // 2) % len(cuts)] + (37 * KB if k & 1 else 0)
        k += 1
        if target is not None:
            n = min(len(target), len(data) - pos, into or len(target), cut)
            target[:n] = data[pos : pos + n]
            events += proto.payload_received(n)
        else:
            n = min(cut, len(data) - pos)
            events += proto.receive_data(data[pos : pos + n])
        pos += n
    assert [e for e in as_values(events) if isinstance(e, bytes)] == messages
    assert proto.failure is None
    if fragment is None and 600 * KB in sizes:
        assert used  # the rest of such a frame is 263 KiB or more: read into


# -- over a socket -----------------------------------------------------------------------

#: What the server sends: a 1 MiB message in one frame, one in three frames
#: with a ping between, a small one, and 700 KiB more; then "end".
MESSAGES = [os.urandom(1 << 20), os.urandom(600 * KB), b"small", os.urandom(700 * KB)]


def _sends_messages(peer: Peer) -> None:
    peer.handshake()
    first, second, small, last = MESSAGES
    data = wire_frame(OP_BINARY, first)
    data += wire_frame(OP_BINARY, second[: 250 * KB], fin=False)
    data += wire_frame(OP_PING, b"!")
    data += wire_frame(OP_CONT, second[250 * KB : 500 * KB], fin=False)
    data += wire_frame(OP_CONT, second[500 * KB :])
    data += wire_frame(OP_BINARY, small) + wire_frame(OP_BINARY, last)
    data += wire_frame(OP_TEXT, b"end")
    for i in range(0, len(data), 200 * KB):  # in pieces, so that reads end mid-frame
        peer.send(data[i : i + 200 * KB])
    code, _ = peer.read_until_close()  # (the pongs before it)
    peer.send_frame(OP_CLOSE, code.to_bytes(2, "big") if code else b"")
    peer.close()


def _counting(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Event]:
    """Records the thread of each read into a target, and sets the Event when
    the parser has seen "end" (whichever thread parsed it)."""
    into: list[str] = []
    ended = threading.Event()
    real_into, real_data = Protocol.payload_received, Protocol.receive_data

    def payload_received(self: Protocol, n: int) -> list[Any]:
        into.append(threading.current_thread().name)
        return real_into(self, n)

    def receive_data(self: Protocol, data: Any) -> list[Any]:
        events = real_data(self, data)
        if "end" in events:
            ended.set()
        return events

    monkeypatch.setattr(Protocol, "payload_received", payload_received)
    monkeypatch.setattr(Protocol, "receive_data", receive_data)
    return into, ended


@pytest.mark.parametrize("reader", ["caller", "reader thread"])
def test_large_messages_read_into_their_buffers_arrive_whole(
    reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``ws.wait()`` (the caller reads) and through the reader thread
    (the caller only pumps, once "end" was parsed): every message byte for
    byte, in order, the pings answered, and ``bytes_received`` counts what
    went into the buffers too."""
    into, ended = _counting(monkeypatch)
    rec = Recorder()
    with fault_server(_sends_messages) as server:
        ws = blockws.WebSocket(server.url, extensions=[], **rec.callbacks())
        ws.open()
        if reader == "caller":
            rec.pump_until(ws, lambda: "end" in rec.messages, what="end")
        else:
            assert ended.wait(10)
            ws.update()
        assert rec.messages == [*MESSAGES, "end"]
        assert into, "nothing was read into a buffer"
        caller = threading.current_thread().name
        if reader == "reader thread":
            assert caller not in into
        else:
            assert caller in into
        sent = sum(len(wire_frame(OP_BINARY, m)) for m in MESSAGES)
        assert ws.bytes_received > sent
        ws.close()
        assert rec.wait_closed(ws)[0] == 1000


def test_an_interrupt_after_a_read_into_a_buffer_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C just after a caller's read into a message's buffer (the count is
    kept, as read bytes are): the next reader takes the count, and every
    message arrives once, whole."""
    into, _ = _counting(monkeypatch)
    real_read = TCPTransport.read
    interrupted: list[int] = []

    def read(self: TCPTransport, timeout: float | None) -> Any:
        data = real_read(self, timeout)
        if isinstance(data, int) and data and len(interrupted) < 3:
            interrupted.append(data)
            raise KeyboardInterrupt
        return data

    monkeypatch.setattr(TCPTransport, "read", read)
    rec = Recorder()
    with fault_server(_sends_messages) as server:
        ws = blockws.WebSocket(server.url, extensions=[], **rec.callbacks())
        ws.open()
        deadline = time.monotonic() + 20
        while "end" not in rec.messages and time.monotonic() < deadline:
            try:
                rec.pump_until(ws, lambda: "end" in rec.messages, what="end")
            except KeyboardInterrupt:
                pass
        assert len(interrupted) == 3
        assert rec.messages == [*MESSAGES, "end"]
        assert ws.is_open and ws.error is None
        ws.close()
        assert rec.wait_closed(ws)[0] == 1000
