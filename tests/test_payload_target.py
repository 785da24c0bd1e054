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
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, Peer, Recorder, fault_server
from faultserver import frame_bytes as wire_frame
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from memory import server_frame

import blockws
import blockws.connection
import blockws.frames as frames_module
import blockws.protocol as protocol_module
from blockws.connection import Connection
from blockws.deflate import PerMessageDeflate
from blockws.exceptions import MessageTooBig
from blockws.frames import Opcode, encode_header
from blockws.protocol import BinaryMessage, Protocol, Role
from blockws.readtoken import ReadToken
from blockws.transport import TCPTransport

pytestmark = [pytest.mark.timeout(60)]
unit = pytest.mark.unit

KB = 1024
INTO = 64 * KB  # blockws.protocol._INTO_FROM


#: For whom client() parses: ``on_binary`` (messages in pooled buffers), or
#: ``receive()`` (``binary_as_bytes``: messages in the bytes they become,
#: with the C speedups). Every test here runs for both, unless it pins one.
_FOR = ["on_binary"]
if frames_module.bytes_buffer is not None:
    _FOR.append("receive()")
_consumer = ["on_binary"]


@pytest.fixture(autouse=True, params=_FOR)
def consumer(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test for each consumer; checks that no bytes message had to
    be copied out of its buffer (a view of it left alive by the parser)."""
    _consumer[0] = request.param
    copied = protocol_module.copied_out
    yield request.param
    _consumer[0] = "on_binary"
    assert protocol_module.copied_out == copied


def for_on_binary(consumer: str) -> None:
    """A test of the pooled buffers (allocate, release): once, for on_binary."""
    if consumer != "on_binary":
        pytest.skip("pooled buffers: on_binary only")


def client(**kwargs: Any) -> Protocol:
    proto = Protocol(Role.CLIENT, **kwargs)
    proto.compact_messages = True
    proto.binary_as_bytes = _consumer[0] == "receive()"
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
            del target  # (a transport's read has returned, and its target is gone)
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
        del target  # (as a transport's read returns)
        events += proto.payload_received(n)
        pos += n
    assert targets >= 1
    # The message ended at its frame's end; what follows is parsed as usual.
    assert as_values(events) == [payload]
    assert as_values(proto.receive_data(wire[pos:])) == ["after"]


@unit
@pytest.mark.parametrize("scatter", [False, True])
def test_a_frame_whose_first_read_held_its_header_alone_gets_a_target(scatter: bool) -> None:
    """The first read of a large frame ended with its header: the message's
    buffer is still empty, and the target must not be (an empty one would
    read 0 bytes, the end of the stream, and drop the connection)."""
    payload = os.urandom(200 * KB)
    wire = server_frame(Opcode.BINARY, payload)
    head = len(wire) - len(payload)
    proto = client()
    assert proto.receive_data(wire[:head]) == []
    target = proto.payload_target(scatter)
    assert target is not None and not isinstance(target, list) and len(target) > 0
    events, _, _ = feed_scattered(proto, wire[head:], [127 * KB], scatter=scatter)
    assert as_values(events) == [payload]


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
        n = len(target)
        sizes.append(n)
        target[:] = b"y" * n
        del target
        assert proto.payload_received(n) == []
    # (A bytes message's buffer is not allocate's: the one it has now is its largest.)
    largest = max(allocated) if not proto.binary_as_bytes else len(proto._m_buf or b"")
    assert largest <= 2 * (128 * KB + sum(sizes))
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
    # The pooled buffers it outgrew went back (bytes buffers have no pool).
    assert bool(released) is not proto.binary_as_bytes


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
def test_no_target_where_the_bytes_must_be_parsed(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text, messages for receive() (built as bytes), a rest below 64 KiB,
    masked frames (the server role), compressed messages, data after the
    peer's close, and bytes held unparsed all go through receive_data.
    (Messages for receive() get targets with the C speedups: the bytes buffer.)"""
    if case == "receive()" and frames_module.bytes_buffer is not None:
        monkeypatch.setattr(frames_module, "bytes_buffer", None)
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
def test_receive_cleared_meanwhile_gets_bytes_and_the_buffer_back(consumer: str) -> None:
    """``on_binary`` cleared between the target and the message's end: the
    message comes as ``bytes``, and its pooled buffer goes back."""
    for_on_binary(consumer)
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
    # The drawn cuts, with a read of 37 KiB more between (reads of a byte or
    # two through 3 MiB took minutes).
    events, _, used = feed_scattered(proto, data, cuts, 37 * KB, scatter=False, into=into)
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
    # Every read through receive_data, where "end" is watched for: not the
    # fast paths of a read of whole small messages ("end" comes alone).
    monkeypatch.setattr(blockws.connection, "_receive_whole", None)
    monkeypatch.setattr(Connection, "_receive_one", lambda conn, data: False)
    return into, ended


# -- one read scattered over the next frames (payload_target(scatter=True)) ------------------


def fragmented(payload: bytes, step: int, opcode: int = Opcode.BINARY) -> bytes:
    """``payload`` in frames of ``step`` bytes, as a sender that fragments sends it."""
    parts = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    return b"".join(
        server_frame(opcode if i == 0 else Opcode.CONT, p, fin=i == len(parts) - 1)
        for i, p in enumerate(parts)
    )


def feed_scattered(
    proto: Protocol,
    data: bytes,
    cuts: list[int],
    bump: int = 0,
    scatter: bool = True,
    into: int | None = None,
) -> tuple[list[Any], int, int]:
    """``data`` as reads of the sizes ``cuts`` gives in turn (every other one
    ``bump`` bytes longer), each into what ``payload_target(scatter)`` gives (a
    list filled in order, as ``recvmsg_into`` fills it; a view, at most
    ``into`` bytes of it), else through receive_data. Returns the events, how
    many reads were scattered and how many went into a target at all."""
    events: list[Any] = []
    pos = k = scattered = used = 0
    while pos < len(data):
        cut = cuts[k % len(cuts)] + (bump if k & 1 else 0)
        k += 1
        target = proto.payload_target(scatter)
        used += target is not None
        # Never empty: a read of 0 bytes is the end of the stream.
        size = sum(map(len, target)) if isinstance(target, list) else len(target or b"")
        assert target is None or size
        if isinstance(target, list):
            scattered += 1
            n = min(sum(map(len, target)), len(data) - pos, cut)
            left, at = n, pos
            for view in target:
                take = min(len(view), left)
                view[:take] = data[at : at + take]
                at += take
                left -= take
            del target, view  # (as a transport's read returns)
            events += proto.payload_received(n)
        elif target is not None:
            n = min(len(target), len(data) - pos, into or len(target), cut)
            target[:n] = data[pos : pos + n]
            del target
            events += proto.payload_received(n)
        else:
            n = min(cut, len(data) - pos)
            events += proto.receive_data(data[pos : pos + n])
        pos += n
    return events, scattered, used


def outcome(proto: Protocol, events: list[Any]) -> list[Any]:
    """The events as comparable values (a failure as its class and close code)."""
    values = []
    for item in as_values(events):
        if isinstance(item, (bytes, str)):
            values.append(item)
        elif hasattr(item, "error"):
            values.append(("failure", type(item.error), item.error.close_code))
        else:
            values.append((type(item).__name__, getattr(item, "payload", None)))
    return values


@unit
def test_a_message_in_32_kib_frames_is_read_into_its_buffer_across_headers() -> None:
    """The W3 case: 1 MiB messages in the default 32 KiB frames. After each
    message's first read, the reads go straight into its buffer, headers to a
    side buffer: every message byte for byte, and none copied out."""
    messages = [os.urandom(1 << 20) for _ in range(4)]
    wire = b"".join(fragmented(m, 32 * KB) for m in messages)
    parsed: list[int] = []

    class Counting(Protocol):
        __slots__ = ()

        def receive_data(self, data: Any) -> list[Any]:
            parsed.append(len(data))
            return super().receive_data(data)

    proto = Counting(Role.CLIENT)
    proto.compact_messages = True
    proto.binary_as_bytes = _consumer[0] == "receive()"  # (W3 through receive() too)
    events, scattered, _ = feed_scattered(proto, wire, [127 * KB])
    assert as_values(events) == messages
    assert scattered >= 4 * 6  # of about 8 reads a message
    assert proto.failure is None
    # After the first message, each one's last frame too went into its
    # buffer: one parsed read a message (its start), nothing copied out.
    assert len(parsed) <= len(messages) + 1, parsed


@unit
@pytest.mark.parametrize("offset", range(-5, 10))
def test_reads_that_end_anywhere_around_a_frame_boundary(offset: int) -> None:
    """Every scattered read ends ``offset`` bytes from a frame's end (before
    it, in the next header, in the next payload): the same messages."""
    messages = [os.urandom(1 << 20) for _ in range(3)]
    wire = b"".join(fragmented(m, 32 * KB) for m in messages)
    frame = 32 * KB + 4
    cuts = [frame + 2 + offset, *[frame] * 40]
    events, scattered, _ = feed_scattered(client(), wire, cuts)
    assert as_values(events) == messages
    # (A read that ends in a header leaves its bytes unparsed: receive_data
    # takes the next read, and these reads all end there.)
    assert scattered or offset in (-1, 0, 1)


@unit
@pytest.mark.parametrize(
    "after",
    ["next message", "ping", "shorter frame", "text", "close"],
)
def test_bytes_that_break_the_guess_are_parsed_as_receive_data_would(after: str) -> None:
    """The frame after the guessed ones is something else: the bytes read from
    it on are copied out and parsed, with the same events in the same order."""
    first = os.urandom(300 * KB)
    wire = server_frame(Opcode.BINARY, first[: 32 * KB], fin=False)
    wire += server_frame(Opcode.CONT, first[32 * KB : 64 * KB], fin=False)
    rest = first[64 * KB :]
    if after == "ping":
        wire += server_frame(Opcode.PING, b"!") + fragmented(rest, 32 * KB, Opcode.CONT)
    elif after == "shorter frame":
        wire += server_frame(Opcode.CONT, rest[:1000], fin=False)
        wire += server_frame(Opcode.CONT, rest[1000:])
    else:
        wire += fragmented(rest, 32 * KB, Opcode.CONT)
    if after == "next message":
        wire += fragmented(os.urandom(200 * KB), 32 * KB)
    elif after == "text":
        wire += server_frame(Opcode.TEXT, "é".encode() * 10)
    elif after == "close":
        wire += server_frame(Opcode.CLOSE, b"\x03\xe8bye")
    wire += server_frame(Opcode.TEXT, b"end")
    for cuts in ([127 * KB], [40 * KB, 1, 3, 90 * KB], [1 << 20]):
        reference = client()
        expected = outcome(reference, reference.receive_data(wire))
        proto = client()
        proto.receive_data(wire[: 40 * KB])  # the first frame, and some of the second
        events, scattered, _ = feed_scattered(proto, wire[40 * KB :], cuts)
        assert outcome(proto, events) == expected
        assert scattered


@unit
@pytest.mark.parametrize("fault", ["masked", "rsv", "new message", "too big", "too many frames"])
def test_a_bad_guessed_frame_fails_as_receive_data_fails(fault: str) -> None:
    """A frame in the guessed place that breaks a rule fails the connection
    with the same error, after the same messages."""
    limit = 400 * KB if fault == "too big" else None
    # A message in 32 KiB frames first: the next one's buffer starts at its size.
    wire = fragmented(os.urandom(300 * KB), 32 * KB) + server_frame(Opcode.TEXT, b"before")
    wire += server_frame(Opcode.BINARY, os.urandom(32 * KB), fin=False)
    wire += server_frame(Opcode.CONT, os.urandom(32 * KB), fin=False)
    bad = server_frame(Opcode.CONT, os.urandom(32 * KB), fin=False)
    if fault == "masked":
        bad = bytes([bad[0], bad[1] | 0x80]) + bad[2:4] + b"abcd" + bad[4:]
    elif fault == "rsv":
        bad = bytes([bad[0] | 0x20]) + bad[1:]
    elif fault == "new message":
        bad = bytes([0x02]) + bad[1:]
    wire += bad * (16 if fault in ("too big", "too many frames") else 1)
    wire += server_frame(Opcode.CONT, b"", fin=True) + server_frame(Opcode.TEXT, b"end")
    kwargs: dict[str, Any] = {"max_message_size": limit}
    if fault == "too many frames":
        # Every frame counts at least one byte: empty continuation frames,
        # more of them than the limit's bytes.
        kwargs = {"max_message_size": 400 * KB}
        wire = wire.replace(bad * 16, server_frame(Opcode.CONT, b"", fin=False) * (400 * KB))
    for cuts in ([127 * KB], [33 * KB + 2, 7]):
        reference = client(**kwargs)
        expected = outcome(reference, reference.receive_data(wire))
        assert expected[-1][0] == "failure"
        proto = client(**kwargs)
        head = wire.index(b"before") + len(b"before") + 10 * KB
        events = proto.receive_data(wire[:head])
        more, scattered, _ = feed_scattered(proto, wire[head:], cuts)
        assert outcome(proto, events + more) == expected
        assert scattered


@unit
@pytest.mark.parametrize("cut", [127 * KB, 500 * KB, 300 * KB + 7])
def test_a_message_shorter_than_the_last_ends_the_guess_at_its_end(cut: int) -> None:
    """The guess runs to the last message's size; a shorter message ends
    sooner, and what the same read brought after it (the next message's
    first bytes, in the guessed places) is parsed as the next message."""
    # (Whole numbers of frames: a last frame as long as the others matches the guess.)
    long, short, after = os.urandom(1 << 20), os.urandom(320 * KB), os.urandom(200 * KB)
    wire = fragmented(long, 32 * KB) + fragmented(short, 32 * KB)
    wire += fragmented(after, 32 * KB) + server_frame(Opcode.TEXT, b"end")
    proto = client()
    events, scattered, _ = feed_scattered(proto, wire, [cut])
    assert as_values(events) == [long, short, after, "end"]
    assert scattered


@unit
def test_a_scatter_plan_never_grows_the_buffer_past_double() -> None:
    """Frames announced long but cut short: the guess grows the message's
    buffer by doubling at most, as receive_data does, and never reads past
    the message's limit."""
    allocated: list[int] = []

    def allocate(size: int) -> bytearray:
        allocated.append(size)
        return bytearray(size)

    proto = client(allocate=allocate, max_message_size=1 << 20)
    first = server_frame(Opcode.BINARY, b"a" * (900 * KB), fin=False)
    proto.receive_data(first)
    target = proto.payload_target(True)
    # 900 KiB held; one more frame of 900 KiB does not fit under 1 MiB.
    assert target is None
    allocated.clear()
    proto = client(allocate=allocate, max_message_size=None)
    proto.receive_data(server_frame(Opcode.BINARY, b"a" * (40 * KB), fin=False))
    target = proto.payload_target(True)
    assert isinstance(target, list)
    assert sum(map(len, target)) <= 40 * KB + 10  # one frame guessed: no hint yet
    assert len(proto._m_buf or b"") <= 2 * 40 * KB  # the 40 KiB buffer doubled, once


@unit
@pytest.mark.parametrize("fragment", [32 * KB, 200_000, 262_145, 300_000])
def test_a_scatter_plan_does_not_grow_the_buffer_for_a_shorter_last_frame(
    fragment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages of 1 MiB in frames of a size that may not divide it: from the
    second message on, each is assembled in one buffer of the last message's
    size, and the guess of one more whole frame where the last message ended
    never grows it (a doubled buffer copied the message into fresh memory,
    every message)."""
    allocated: list[int] = []

    def allocate(size: int) -> bytearray:
        allocated.append(size)
        return bytearray(size)

    make = frames_module.bytes_buffer
    if make is not None:  # (receive()'s messages are assembled in a bytes buffer)

        def counted(size: int) -> Any:
            allocated.append(size)
            return make(size)  # type: ignore[misc]

        monkeypatch.setattr(frames_module, "bytes_buffer", counted)
    messages = [os.urandom(1 << 20) for _ in range(3)]
    proto = client(allocate=allocate)
    events, _, _ = feed_scattered(proto, fragmented(messages[0], fragment), [fragment + 5000])
    allocated.clear()
    wire = b"".join(fragmented(m, fragment) for m in messages[1:])
    more, scattered, _ = feed_scattered(proto, wire, [fragment + 5000, 64 * KB, 333])
    assert as_values(events + more) == messages
    assert scattered
    assert allocated == [1 << 20] * 2  # one buffer a message: no growth


@unit
@pytest.mark.parametrize("fragment", [33 * KB, 200_000, 300_000])
def test_a_scatter_plan_ends_with_the_last_messages_shorter_last_frame(
    fragment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a message in frames that do not divide it, the plan for the next
    one of the same size ends with a place for its shorter last frame (the
    tail): one read then takes the rest of the message, nothing copied out. A
    longer message than the guess still parses (its last frame is no tail)."""
    joined: list[int] = []
    real_joined = protocol_module._joined

    def counting(views: list[memoryview], i: int, n: int) -> bytes:
        joined.append(n)
        return real_joined(views, i, n)

    monkeypatch.setattr(protocol_module, "_joined", counting)
    first, second, longer = (os.urandom(size) for size in (1 << 20, 1 << 20, (1 << 20) + 5000))
    proto = client()
    events = as_values(feed(proto, fragmented(first, fragment)))
    wire = fragmented(second, fragment)
    head = fragment + 20  # the first frame whole, and the next frame's first bytes
    events += as_values(proto.receive_data(wire[:head]))
    plan = proto.payload_target(True)
    assert isinstance(plan, list)
    tail = len(second) % fragment
    assert len(plan[-1]) == tail and len(plan[-2]) == (4 if tail < 65536 else 10)
    assert sum(map(len, plan)) == len(wire) - head  # the rest of the message, exactly
    del plan  # (as a transport lets go of its target: a view would keep the buffer exported)
    more, scattered, _ = feed_scattered(proto, wire[head:], [len(wire) - head])
    assert scattered == 1 and joined == []  # one read, nothing copied out
    events += as_values(more)
    events += as_values(feed_scattered(proto, fragmented(longer, fragment), [fragment + 5000])[0])
    assert events == [first, second, longer]


@unit
def test_a_count_beyond_the_scattered_buffers_is_refused() -> None:
    proto = client()
    proto.receive_data(server_frame(Opcode.BINARY, b"a" * (32 * KB), fin=False))
    target = proto.payload_target(True)
    assert isinstance(target, list)
    with pytest.raises(ValueError, match="outside the payload target"):
        proto.payload_received(sum(map(len, target)) + 1)


@unit
def test_a_plan_is_forgotten_by_the_next_target() -> None:
    """A scatter plan left unused (the read failed, or a caller read plainly)
    does not apply to a later count."""
    payload = os.urandom(1 << 20)
    wire = fragmented(payload, 32 * KB)
    proto = client()
    proto.receive_data(wire[: 40 * KB])
    assert isinstance(proto.payload_target(True), list)
    assert proto.payload_target(False) is None  # the rest of the frame is small
    events = as_values(proto.receive_data(wire[40 * KB :]))
    assert events == [payload]


_frame_steps = st.sampled_from([8 * KB, 8 * KB + 1, 32 * KB, 70 * KB, 1000])


@unit
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from([0, 5, 8 * KB, 100 * KB, 300 * KB, 1 << 20]),
            _frame_steps,
            st.sampled_from(["binary", "text", "ping after first", "bad after first"]),
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=400 * KB), min_size=1, max_size=8),
    limit=st.sampled_from([None, 16 << 20, 500 * KB]),
    seed=st.integers(0, 255),
)
def test_hypothesis_scattered_reads_match_receive_data(
    messages: list[tuple[int, int, str]], cuts: list[int], limit: int | None, seed: int
) -> None:
    """Any stream of messages in frames of any size (pings between frames, a
    broken frame, text, messages past the limit), cut into reads anywhere,
    read through scatter plans wherever there are some: the same events, in
    the same order, with the same failure, as receive_data alone makes."""
    wire = bytearray()
    for i, (size, step, kind) in enumerate(messages):
        payload = bytes([(seed + i) & 127]) * size
        opcode = Opcode.TEXT if kind == "text" else Opcode.BINARY
        pieces = [payload[j : j + step] for j in range(0, size, step)] or [b""]
        for k, piece in enumerate(pieces):
            wire += server_frame(opcode if k == 0 else Opcode.CONT, piece, fin=k == len(pieces) - 1)
            if k == 0 and len(pieces) > 1:
                if kind == "ping after first":
                    wire += server_frame(Opcode.PING, b"!")
                elif kind == "bad after first":
                    wire += bytes([0x20]) + bytes(server_frame(Opcode.CONT, b"x" * 300))[1:]
    data = bytes(wire)
    reference = client(max_message_size=limit)
    expected = outcome(reference, reference.receive_data(data))
    proto = client(max_message_size=limit)
    # (A read of 37 KiB more every other read: reads of a byte or two through
    # megabytes would take minutes.)
    events, scattered, _ = feed_scattered(proto, data, cuts, 37 * KB)
    event("scattered reads" if scattered else "no scattered read")
    assert outcome(proto, events) == expected
    assert (proto.failure is None) == (reference.failure is None)


def _sends_fragmented(peer: Peer) -> None:
    peer.handshake()
    data = b""
    for i, message in enumerate(FRAGMENTED):
        step = 32 * KB if i != 2 else 20 * KB
        parts = [message[j : j + step] for j in range(0, len(message), step)]
        for k, part in enumerate(parts):
            data += wire_frame(OP_BINARY if k == 0 else OP_CONT, part, fin=k == len(parts) - 1)
            if i == 1 and k == 5:
                data += wire_frame(OP_PING, b"!")
    data += wire_frame(OP_BINARY, b"small") + wire_frame(OP_TEXT, b"end")
    for i in range(0, len(data), 300 * KB):
        peer.send(data[i : i + 300 * KB])
    code, _ = peer.read_until_close()
    peer.send_frame(OP_CLOSE, code.to_bytes(2, "big") if code else b"")
    peer.close()


#: 1 MiB messages in 32 KiB frames (a ping inside the second), and one in 20 KiB frames.
FRAGMENTED = [os.urandom(1 << 20), os.urandom(1 << 20), os.urandom(700 * KB), os.urandom(1 << 20)]

#: What each server sends, and the messages it makes: large frames (the rest of
#: each read into its message's buffer), and messages in 32 KiB and 20 KiB frames
#: (every read into a buffer scattered over guessed frames: no frame is large).
STREAMS = {
    "large frames": (_sends_messages, [*MESSAGES, "end"]),
    "fragmented": (_sends_fragmented, [*FRAGMENTED, b"small", "end"]),
}


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("reader", ["caller", "reader thread"])
def test_messages_read_into_their_buffers_arrive_whole(
    reader: str, stream: str, consumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``ws.wait()`` or ``ws.receive()`` (the caller reads) and
    through the reader thread (the caller only pumps, or receives, once "end"
    was parsed): every message byte for byte, in order, the pings answered,
    and ``bytes_received`` counts what went into the buffers too."""
    sends, expected = STREAMS[stream]
    into, ended = _counting(monkeypatch)
    rec = Recorder()
    with fault_server(sends) as server:
        if consumer == "receive()":
            ws = blockws.WebSocket(server.url, extensions=[])
            ws.open()
            if reader != "caller":
                assert ended.wait(10)
            got: list[Any] = []
            while "end" not in got:
                got.append(ws.receive(10))
            assert got == expected
            assert all(type(m) is bytes for m in got[:-1])
            assert reader != "caller" or ws.queued_amount == 0
        else:
            ws = blockws.WebSocket(server.url, extensions=[], **rec.callbacks())
            ws.open()
            if reader == "caller":
                rec.pump_until(ws, lambda: "end" in rec.messages, what="end")
            else:
                assert ended.wait(10)
                ws.update()
            assert rec.messages == expected
        assert into, "nothing was read into a buffer"
        caller = threading.current_thread().name
        assert (caller in into) == (reader == "caller")
        assert ws.bytes_received > sum(len(m) for m in expected if isinstance(m, bytes))
        ws.close()
        if consumer == "receive()":
            assert ws.join(10) and ws.close_code == 1000
        else:
            assert rec.wait_closed(ws)[0] == 1000


@pytest.mark.parametrize("stream", list(STREAMS))
def test_an_interrupt_after_a_read_into_a_buffer_loses_nothing(
    stream: str, consumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C just after a caller's read into a message's buffer (the count is
    kept, as read bytes are, and a scattered read's plan with it): the next
    reader takes the count, and every message arrives once, whole."""
    sends, expected = STREAMS[stream]
    into, _ = _counting(monkeypatch)
    real_read = TCPTransport.read
    interrupted: list[int] = []
    caller = threading.current_thread()
    opened = threading.Event()  # ws.open() has returned
    caller_asks = threading.Event()  # the caller asked for the reading: the server may send
    # What the connection calls for a caller's read (the C speedup's, when built).
    real_read_here = blockws.connection._read_here

    def read_here(token: ReadToken, *args: Any, **kwargs: Any) -> bool:
        if threading.current_thread() is caller and opened.is_set():
            caller_asks.set()
        return bool(real_read_here(token, *args, **kwargs))

    def read(self: TCPTransport, timeout: float | None) -> Any:
        data = real_read(self, timeout)
        if (
            threading.current_thread() is caller
            and isinstance(data, int)
            and data
            and len(interrupted) < 3
        ):
            interrupted.append(data)
            raise KeyboardInterrupt
        return data

    def gated(peer: Peer) -> None:
        """The stream waits for the caller to ask for the reading (else, on a
        loaded machine, the reader thread could read all of it first). The
        reader thread then lends the reading between two of its reads."""
        send = peer.send
        sent = [0]  # the handshake's response, then the stream's pieces

        def then_wait(data: bytes) -> None:
            if sent[0] == 1:
                assert caller_asks.wait(10), "the caller never asked for the reading"
            sent[0] += 1
            send(data)

        peer.send = then_wait  # type: ignore[method-assign]
        sends(peer)

    monkeypatch.setattr(blockws.connection, "_read_here", read_here)
    monkeypatch.setattr(TCPTransport, "read", read)
    rec = Recorder()
    with fault_server(gated) as server:
        deadline = time.monotonic() + 20
        if consumer == "receive()":
            ws = blockws.WebSocket(server.url, extensions=[])
            ws.open()
            opened.set()
            got: list[Any] = []
            while "end" not in got and time.monotonic() < deadline:
                try:
                    got.append(ws.receive(10))
                except KeyboardInterrupt:
                    pass
            messages = got
        else:
            ws = blockws.WebSocket(server.url, extensions=[], **rec.callbacks())
            ws.open()
            opened.set()
            while "end" not in rec.messages and time.monotonic() < deadline:
                try:
                    rec.pump_until(ws, lambda: "end" in rec.messages, what="end")
                except KeyboardInterrupt:
                    pass
            messages = rec.messages
        assert len(interrupted) == 3
        assert messages == expected
        assert ws.is_open and ws.error is None
        ws.close()
        if consumer == "receive()":
            assert ws.join(10) and ws.close_code == 1000
        else:
            assert rec.wait_closed(ws)[0] == 1000
