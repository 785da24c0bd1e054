"""The sans-I/O protocol: the streaming parser, fail-fast checks and the close handshake.

No sockets: bytes go into ``Protocol.receive_data`` and the events and the frames
queued in ``data_to_send()`` are checked byte for byte.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from thorough import examples

import blockws.frames as frames_module
import blockws.protocol as protocol_module
from blockws.exceptions import InvalidPayload, InvalidState, MessageTooBig, ProtocolError
from blockws.frames import RSV1, RSV2, RSV3, Frame, Opcode, is_valid_close_code, pack_close
from blockws.protocol import (
    TRANSITIONS,
    BinaryMessage,
    CloseReceived,
    Failure,
    Ping,
    Pong,
    Protocol,
    Received,
    Role,
    State,
    TextMessage,
    batch_room,
)

pytestmark = pytest.mark.unit

# The receive path's loops: the pure ones (split_messages' reference, and
# _binary_run's own continuation loop) or the C ones (split_messages and
# copy_continuations from blockws._speedups).
# The C side also assembles bytes messages in the bytes they become
# (frames.bytes_buffer); the pure side keeps their pieces and joins them.
_SPLITS = [pytest.param((frames_module.py_split_messages, None, None), id="py-split")]
if frames_module.c_split_messages is not None:
    _SPLITS.append(
        pytest.param(
            (
                frames_module.c_split_messages,
                frames_module.c_copy_continuations,
                frames_module.c_BytesBuffer,
            ),
            id="c-split",
        )
    )


def _use_loops(loops: tuple[Any, Any, Any]) -> None:
    (
        frames_module.split_messages,
        frames_module.copy_continuations,
        frames_module.bytes_buffer,
    ) = loops


@pytest.fixture(autouse=True, scope="module", params=_SPLITS)
def split_impl(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Every test here runs on both fast receive loops (the C one and the pure
    reference): events, queued frames and the order of failures must not differ."""
    saved = (
        frames_module.split_messages,
        frames_module.copy_continuations,
        frames_module.bytes_buffer,
    )
    _use_loops(request.param)
    try:
        yield request.param
    finally:
        _use_loops(saved)


KEY = b"\x37\xfa\x21\x3d"
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]
RESERVED_OPCODES = [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]

Summary = tuple[Any, ...]


# -- helpers ----------------------------------------------------------------------


def make(role: Role, **kwargs: Any) -> Protocol:
    """A protocol with a fixed masking key, so the frames it queues are predictable."""
    return Protocol(role, mask_keys=lambda: KEY, **kwargs)


def wire(role: Role, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A frame as the peer of a ``role`` endpoint sends it (masked towards a server)."""
    frame = Frame(opcode, payload, fin, rsv)
    return frame.serialize(KEY if role is Role.SERVER else None)


def summarize(events: Iterable[Received]) -> list[Summary]:
    out: list[Summary] = []
    for e in events:
        if type(e) is str:  # compact_messages
            out.append(("text", e))
        elif type(e) is bytes:  # compact_messages, exact bytes
            out.append(("binary", e))
        elif isinstance(e, TextMessage):
            out.append(("text", e.text))
        elif isinstance(e, BinaryMessage):
            assert len(e.data) >= e.length
            out.append(("binary", bytes(e)))
        elif isinstance(e, Ping):
            out.append(("ping", e.payload))
        elif isinstance(e, Pong):
            out.append(("pong", e.payload))
        elif isinstance(e, CloseReceived):
            out.append(("close", e.code, e.reason))
        elif isinstance(e, Failure):
            out.append(("failure", type(e.error), e.error.close_code))
        else:  # pragma: no cover
            raise AssertionError(e)
    return out


_MESSAGE_TYPES = (bytes, str, TextMessage, BinaryMessage)


def receive(proto: Protocol, data: bytes) -> list[Received]:
    """``proto.receive_data(data)``, checking ``other_events``: how many of
    the events are not messages (a consumer skips looking at each on 0)."""
    events = proto.receive_data(data)
    assert proto.other_events == sum(type(e) not in _MESSAGE_TYPES for e in events)
    return events


def feed(proto: Protocol, data: bytes, chunks: Sequence[int] | None = None) -> list[Summary]:
    """Feed ``data`` whole, or cut at the offsets in ``chunks``; summarize the events."""
    if chunks is None:
        return summarize(receive(proto, data))
    events: list[Received] = []
    start = 0
    for cut in [*chunks, len(data)]:
        events.extend(receive(proto, data[start:cut]))
        start = cut
    return summarize(events)


def feed_bytewise(proto: Protocol, data: bytes) -> list[Summary]:
    events: list[Received] = []
    for i in range(len(data)):
        events.extend(receive(proto, data[i : i + 1]))
    return summarize(events)


def sent_frames(proto: Protocol) -> list[Frame]:
    """Parse what ``proto`` queued in ``data_to_send()`` (masked iff it is a client)."""
    data = b"".join(proto.data_to_send())
    frames = []
    while data:
        parsed = Frame.parse(data, masked=proto.role is Role.CLIENT)
        assert parsed is not None, "data_to_send() holds an incomplete frame"
        frame, used = parsed
        frames.append(frame)
        data = data[used:]
    return frames


def close_frame(code: int | None, reason: str = "") -> Frame:
    return Frame(Opcode.CLOSE, pack_close(code, reason))


def text_of(size: int) -> str:
    return ("abcdefghij" * (size // 10 + 1))[:size]


def binary_of(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


BOTH_ROLES = pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER], ids=["client", "server"])


# -- messages of every size -----------------------------------------------------------


@BOTH_ROLES
@pytest.mark.parametrize("size", SIZES)
def test_text_message_every_size(role: Role, size: int) -> None:
    text = text_of(size)
    proto = make(role)
    assert feed(proto, wire(role, Opcode.TEXT, text.encode())) == [("text", text)]
    assert proto.data_to_send() == []
    assert proto.state is State.OPEN


@BOTH_ROLES
@pytest.mark.parametrize("size", SIZES)
def test_binary_message_every_size(role: Role, size: int) -> None:
    data = binary_of(size)
    proto = make(role)
    events = proto.receive_data(wire(role, Opcode.BINARY, data))
    assert len(events) == 1 and isinstance(events[0], BinaryMessage)
    assert events[0].length == size
    assert bytes(events[0]) == data


@BOTH_ROLES
@pytest.mark.parametrize("size", [126, 65536, 1 << 20])
def test_message_split_in_two_reads_at_every_header_offset(role: Role, size: int) -> None:
    frame = wire(role, Opcode.BINARY, binary_of(size))
    for cut in range(1, 16):
        proto = make(role)
        assert feed(proto, frame, [cut]) == [("binary", binary_of(size))]


@BOTH_ROLES
def test_several_messages_in_one_read(role: Role) -> None:
    stream = b"".join(
        [
            wire(role, Opcode.TEXT, b"one"),
            wire(role, Opcode.BINARY, b"\x00\x01"),
            wire(role, Opcode.TEXT, b""),
            wire(role, Opcode.BINARY, b""),
            wire(role, Opcode.PONG, b"pp"),
            wire(role, Opcode.TEXT, "héllo €".encode()),
        ]
    )
    proto = make(role)
    assert feed(proto, stream) == [
        ("text", "one"),
        ("binary", b"\x00\x01"),
        ("text", ""),
        ("binary", b""),
        ("pong", b"pp"),
        ("text", "héllo €"),
    ]


def test_input_types_bytes_bytearray_memoryview() -> None:
    frame = wire(Role.SERVER, Opcode.TEXT, b"Hello")
    for data in (frame, bytearray(frame), memoryview(b"xx" + frame)[2:]):
        proto = make(Role.SERVER)
        assert summarize(proto.receive_data(data[:3])) == []
        assert summarize(proto.receive_data(data[3:])) == [("text", "Hello")]


def test_a_message_in_pieces_grows_its_buffer_through_the_hooks() -> None:
    """Pieces are copied into allocate's memory as they come; an outgrown buffer
    goes back through release, and the next such message starts at the last one's size."""
    sizes: list[int] = []
    released: list[int] = []

    def allocate(n: int) -> bytearray:
        sizes.append(n)
        return bytearray(n)

    proto = Protocol(Role.CLIENT, allocate=allocate, release=lambda b: released.append(len(b)))
    payload = bytes(range(256)) * 64  # 16 KiB in 1 KiB fragments
    frames = b"".join(
        wire(
            Role.CLIENT,
            Opcode.BINARY if i == 0 else Opcode.CONT,
            payload[i : i + 1024],
            fin=i + 1024 >= len(payload),
        )
        for i in range(0, len(payload), 1024)
    )
    (event,) = proto.receive_data(frames)
    assert isinstance(event, BinaryMessage) and bytes(event) == payload
    assert sizes == [1024, 2048, 4096, 8192, 16384]  # doubling from the first fragment
    assert released == [1024, 2048, 4096, 8192]  # every outgrown buffer given back
    sizes.clear()
    (event,) = proto.receive_data(frames)
    assert bytes(event) == payload and sizes == [16384]  # sized by the last message


def test_binary_message_uses_the_allocate_hook() -> None:
    sizes: list[int] = []

    def allocate(n: int) -> bytearray:
        sizes.append(n)
        return bytearray(n + 100)  # larger than asked, like a pooled buffer

    proto = Protocol(Role.CLIENT, allocate=allocate)
    # A whole single-frame message in one read takes the fast path: exact bytes,
    # no allocation at all.
    (event,) = proto.receive_data(wire(Role.CLIENT, Opcode.BINARY, b"abc"))
    assert isinstance(event, BinaryMessage) and type(event.data) is bytes
    assert event.length == 3 and bytes(event) == b"abc" and sizes == []
    # A message split across reads (or fragmented) is assembled in allocated memory
    # as it comes: room for the first piece and as much again of what the frame
    # announces (here 1 + 1 bytes); the pool's larger buffer takes the rest.
    data = wire(Role.CLIENT, Opcode.BINARY, b"abc")
    assert proto.receive_data(data[:3]) == []
    (event,) = proto.receive_data(data[3:])
    assert sizes == [2]
    assert isinstance(event, BinaryMessage)
    assert event.length == 3 and len(event.data) == 102
    assert bytes(event) == b"abc"
    assert repr(event) == "BinaryMessage(<3 bytes>)"


# -- fragmentation and interleaved control frames -----------------------------------------


@BOTH_ROLES
def test_fragmented_text_with_interleaved_ping_pongs_at_once(role: Role) -> None:
    proto = make(role)
    first = wire(role, Opcode.TEXT, b"Hel", fin=False)
    ping = wire(role, Opcode.PING, b"are you there")
    last = wire(role, Opcode.CONT, b"lo")
    assert feed(proto, first) == []
    assert feed(proto, ping) == [("ping", b"are you there")]
    # The pong is queued immediately, before the message is complete.
    pong = Frame(Opcode.PONG, b"are you there")
    expected = pong.serialize(KEY) if role is Role.CLIENT else pong.serialize()
    assert proto.data_to_send() == [expected]
    assert feed(proto, last) == [("text", "Hello")]
    assert proto.data_to_send() == []


def test_pong_bytes_exact() -> None:
    client = make(Role.CLIENT)
    client.receive_data(b"\x89\x05Hello")
    # The RFC 6455 5.7 masked pong.
    assert client.data_to_send() == [
        bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    ]
    server = make(Role.SERVER)
    server.receive_data(Frame(Opcode.PING, b"Hello").serialize(KEY))
    assert server.data_to_send() == [b"\x8a\x05Hello"]


@BOTH_ROLES
def test_fragmented_binary_with_every_control_frame_between(role: Role) -> None:
    parts = [binary_of(300), b"", binary_of(70000), b"x"]
    stream = b""
    for i, part in enumerate(parts):
        op = Opcode.BINARY if i == 0 else Opcode.CONT
        stream += wire(role, op, part, fin=i == len(parts) - 1)
        stream += wire(role, Opcode.PING, bytes([i])) + wire(role, Opcode.PONG, b"p" * 125)
    expected: list[Summary] = []
    for i in range(len(parts)):
        if i == len(parts) - 1:
            expected.append(("binary", b"".join(parts)))
        expected += [("ping", bytes([i])), ("pong", b"p" * 125)]
    assert feed(make(role), stream) == expected
    assert feed_bytewise(make(role), stream) == expected


@BOTH_ROLES
def test_fragmented_text_split_inside_characters(role: Role) -> None:
    text = "€uro 😀 ok"
    data = text.encode()
    stream = b""
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per frame
    for i, piece in enumerate(pieces):
        op = Opcode.TEXT if i == 0 else Opcode.CONT
        stream += wire(role, op, piece, fin=i == len(pieces) - 1)
    assert feed(make(role), stream) == [("text", text)]


@BOTH_ROLES
def test_empty_fragments(role: Role) -> None:
    stream = (
        wire(role, Opcode.TEXT, b"", fin=False)
        + wire(role, Opcode.CONT, b"", fin=False)
        + wire(role, Opcode.CONT, b"")
        + wire(role, Opcode.BINARY, b"", fin=False)
        + wire(role, Opcode.CONT, b"")
    )
    assert feed(make(role), stream) == [("text", ""), ("binary", b"")]


# -- one byte at a time -----------------------------------------------------------------


def mixed_stream(role: Role) -> bytes:
    out = []
    for size in [0, 1, 125, 126, 127, 1000, 65535, 65536]:
        out.append(wire(role, Opcode.BINARY, binary_of(size)))
        out.append(wire(role, Opcode.TEXT, ("ü" * size)[: size // 2].encode()))
    out.append(wire(role, Opcode.TEXT, "日本".encode(), fin=False))
    out.append(wire(role, Opcode.PING, b"mid"))
    out.append(wire(role, Opcode.CONT, "語 😀".encode(), fin=False))
    out.append(wire(role, Opcode.PONG, b""))
    out.append(wire(role, Opcode.CONT, b"!"))
    out.append(wire(role, Opcode.CLOSE, pack_close(1000, "bye")))
    return b"".join(out)


@BOTH_ROLES
def test_bytewise_feeding_gives_the_same_events(role: Role) -> None:
    stream = mixed_stream(role)
    whole = make(role)
    expected = feed(whole, stream)
    assert len(expected) == 16 + 3 + 1
    assert expected[-1] == ("close", 1000, "bye")
    assert ("text", "日本語 😀!") in expected
    bytewise = make(role)
    assert feed_bytewise(bytewise, stream) == expected
    assert bytewise.data_to_send() == whole.data_to_send()
    assert bytewise.state is whole.state is State.CLOSED


# -- hypothesis round trips --------------------------------------------------------------

TextOrBinary = Union[str, bytes]

messages_strategy = st.lists(
    st.one_of(st.text(max_size=200), st.binary(max_size=600)),
    max_size=8,
)


#: How a receiver reports messages: (compact_messages, binary_as_bytes).
MODES = [(False, False), (False, True), (True, False), (True, True)]


def round_trip(
    sender_role: Role,
    messages: Sequence[TextOrBinary],
    fragment: int,
    cuts: Sequence[int],
    pings: Sequence[bool],
    mode: tuple[bool, bool] = (False, False),
) -> None:
    receiver_role = Role.SERVER if sender_role is Role.CLIENT else Role.CLIENT
    sender = Protocol(sender_role, max_fragment_size=fragment)
    receiver = Protocol(receiver_role)
    receiver.compact_messages, receiver.binary_as_bytes = mode
    stream = b""
    expected: list[Summary] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, str):
            stream += b"".join(sender.encode_data(Opcode.TEXT, msg.encode()))
            expected.append(("text", msg))
        else:
            stream += b"".join(sender.encode_data(Opcode.BINARY, msg))
            expected.append(("binary", msg))
        if i < len(pings) and pings[i]:
            stream += sender.encode_control(Opcode.PING, bytes([i]))
            expected.append(("ping", bytes([i])))
    stream += sender.encode_close(1000, "done")
    expected.append(("close", 1000, "done"))
    offsets = sorted({c % (len(stream) + 1) for c in cuts})
    assert feed(receiver, stream, offsets) == expected
    # The receiver answered every ping and echoed the close; the sender takes it all.
    replies = b"".join(receiver.data_to_send())
    assert receiver.state is State.CLOSED
    back = feed(sender, replies)
    assert back[-1] == ("close", 1000, "")
    assert back[:-1] == [("pong", e[1]) for e in expected if e[0] == "ping"]
    assert sender.state is State.CLOSED


@pytest.mark.parametrize("mode", MODES)
def test_large_binary_messages_in_32_kib_frames_arrive_whole(mode: tuple[bool, bool]) -> None:
    """Frames of 4 KiB or more of a binary message reach its buffer as views of
    the read (Protocol._piece), not copies: every way the reads can cut them,
    with pings between, into every way of reporting a message."""
    big = bytes(range(256)) * 4096  # 1 MiB
    messages: list[TextOrBinary] = [big, big[: 100 * 1024 + 7], "text between", big[:4096]]
    for cuts in ([], [127 * 1024 * k for k in range(1, 12)], [1, 2, 4097, 32770, 70000, 900001]):
        round_trip(Role.SERVER, messages, 32768, cuts, [True, False, True], mode)
        round_trip(Role.SERVER, messages, 4096, cuts, [], mode)


_hypothesis = settings(
    max_examples=examples(300),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def on_every_split(check: Callable[[], None]) -> None:
    """Run ``check`` on each fast receive loop in turn (the C one and the pure reference).

    The hypothesis tests below draw an example once and try it on every loop,
    instead of being run once per loop by the module's ``split_impl``: with
    ``derandomize=True`` both runs drew the same examples, so the checks are the
    same while drawing them (most of these tests' time) is done once. A failure
    names the loop it happened on in hypothesis's report of the example.
    """
    saved = (
        frames_module.split_messages,
        frames_module.copy_continuations,
        frames_module.bytes_buffer,
    )
    try:
        for param in _SPLITS:
            (loops,) = param.values
            note(f"receive loop: {param.id}")
            _use_loops(loops)
            check()
    finally:
        _use_loops(saved)


class TestEachExampleOnEverySplit:
    """Property tests that check each example on every receive loop themselves."""

    @pytest.fixture(autouse=True, scope="class")
    def split_impl(self) -> Iterator[None]:
        """Overrides the module's per-loop parametrization: see ``on_every_split``."""
        yield None

    @_hypothesis
    @given(
        messages=messages_strategy,
        fragment=st.integers(1, 700),
        cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
        pings=st.lists(st.booleans(), max_size=8),
        mode=st.sampled_from(MODES),
    )
    def test_hypothesis_client_to_server(
        self,
        messages: list[TextOrBinary],
        fragment: int,
        cuts: list[int],
        pings: list[bool],
        mode: tuple[bool, bool],
    ) -> None:
        on_every_split(lambda: round_trip(Role.CLIENT, messages, fragment, cuts, pings, mode))

    @_hypothesis
    @given(
        messages=messages_strategy,
        fragment=st.integers(1, 700),
        cuts=st.lists(st.integers(0, 1 << 16), max_size=30),
        pings=st.lists(st.booleans(), max_size=8),
        mode=st.sampled_from(MODES),
    )
    def test_hypothesis_server_to_client(
        self,
        messages: list[TextOrBinary],
        fragment: int,
        cuts: list[int],
        pings: list[bool],
        mode: tuple[bool, bool],
    ) -> None:
        on_every_split(lambda: round_trip(Role.SERVER, messages, fragment, cuts, pings, mode))

    @settings(max_examples=examples(60), deadline=None, derandomize=True, database=None)
    @given(
        sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=4),
        fragment=st.integers(3000, 20_000),
        cuts=st.lists(st.integers(0, 1 << 17), max_size=20),
        pings=st.lists(st.booleans(), max_size=4),
        mode=st.sampled_from(MODES),
    )
    def test_hypothesis_large_binary_fragments(
        self,
        sizes: list[int],
        fragment: int,
        cuts: list[int],
        pings: list[bool],
        mode: tuple[bool, bool],
    ) -> None:
        """Binary messages in fragments around and above the 4 KiB from which
        the parser passes pieces on as views of the read (Protocol._piece)."""
        messages: list[TextOrBinary] = [bytes((i * 7 + n) & 0xFF for i in range(n)) for n in sizes]
        on_every_split(lambda: round_trip(Role.SERVER, messages, fragment, cuts, pings, mode))

    @settings(max_examples=examples(40), deadline=None, derandomize=True, database=None)
    @given(
        messages=st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), max_size=4),
        fragment=st.integers(1, 20),
    )
    def test_hypothesis_bytewise(self, messages: list[TextOrBinary], fragment: int) -> None:
        def check() -> None:
            for sender_role in (Role.CLIENT, Role.SERVER):
                for mode in MODES:
                    round_trip(sender_role, messages, fragment, list(range(1, 2000)), [True], mode)

        on_every_split(check)


@pytest.mark.parametrize("binary_as_bytes", [False, True])
def test_compact_messages_report_str_and_bytes(binary_as_bytes: bool) -> None:
    # Whole frames (the fast path), fragments and frames cut across reads: a
    # text message is always a str; a binary one is bytes when it came whole in
    # one read or binary_as_bytes joins it, else a BinaryMessage in pooled memory.
    proto = make(Role.CLIENT)
    proto.compact_messages, proto.binary_as_bytes = True, binary_as_bytes
    whole = wire(Role.CLIENT, Opcode.TEXT, b"hi") + wire(Role.CLIENT, Opcode.BINARY, b"\x01\x02")
    events = proto.receive_data(whole)
    assert events == ["hi", b"\x01\x02"] and [type(e) for e in events] == [str, bytes]
    fragmented = (
        wire(Role.CLIENT, Opcode.TEXT, b"a", fin=False)
        + wire(Role.CLIENT, Opcode.CONT, "\u00e9".encode())
        + wire(Role.CLIENT, Opcode.BINARY, b"x", fin=False)
        + wire(Role.CLIENT, Opcode.CONT, b"yz")
    )
    events = proto.receive_data(fragmented)
    assert events[0] == "a\u00e9"
    if binary_as_bytes:
        assert events[1] == b"xyz"
    else:
        assert isinstance(events[1], BinaryMessage) and bytes(events[1]) == b"xyz"
    big = wire(Role.CLIENT, Opcode.BINARY, b"b" * 300)
    first = proto.receive_data(big[:100])
    rest = proto.receive_data(big[100:])
    assert first == [] and len(rest) == 1
    if binary_as_bytes:
        assert rest[0] == b"b" * 300
    else:
        assert isinstance(rest[0], BinaryMessage) and bytes(rest[0]) == b"b" * 300


# -- sending ------------------------------------------------------------------------------


def test_encode_data_client_masks_with_the_key() -> None:
    client = make(Role.CLIENT)
    assert client.encode_data(Opcode.TEXT, b"Hello") == [
        bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    ]


def test_encode_data_server_does_not_mask() -> None:
    server = make(Role.SERVER)
    assert b"".join(server.encode_data(Opcode.TEXT, b"Hello")) == b"\x81\x05Hello"
    assert (
        b"".join(server.encode_data(Opcode.BINARY, memoryview(b"\x00\xff"))) == b"\x82\x02\x00\xff"
    )


def test_encode_data_fragments_exactly() -> None:
    server = make(Role.SERVER, max_fragment_size=3)
    assert b"".join(server.encode_data(Opcode.TEXT, b"Hello")) == b"\x01\x03Hel\x80\x02lo"
    assert b"".join(server.encode_data(Opcode.BINARY, b"abcdef")) == b"\x02\x03abc\x80\x03def"
    assert b"".join(server.encode_data(Opcode.BINARY, b"abc")) == b"\x82\x03abc"
    client = make(Role.CLIENT, max_fragment_size=3)
    assert client.encode_data(Opcode.TEXT, b"Hello") == [
        Frame(Opcode.TEXT, b"Hel", fin=False).serialize(KEY),
        Frame(Opcode.CONT, b"lo").serialize(KEY),
    ]


_BATCHERS = [pytest.param(frames_module.py_encode_frames, id="py-batch")]
if frames_module.c_encode_frames is not None:
    _BATCHERS.append(pytest.param(frames_module.c_encode_frames, id="c-batch"))


@BOTH_ROLES
@pytest.mark.parametrize("batcher", _BATCHERS)
@pytest.mark.parametrize("size", [0, 5, 3000, 70_000, 300_000])
def test_data_batches_are_encode_data_in_batches(
    role: Role, batcher: Any, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's large messages: the same frames as encode_data, in batches
    of at least the budget (the last one aside), a server's never cut between
    a frame's header and its payload."""
    monkeypatch.setattr(frames_module, "encode_frames", batcher)
    payload = binary_of(size)
    for fragment, budget in ((32768, 65536), (1000, 4000), (1 << 20, 1), (7, 100)):
        proto = make(role, max_fragment_size=fragment)
        whole = b"".join(proto.encode_data(Opcode.BINARY, payload))
        pairs = list(proto.data_batches(Opcode.BINARY, payload, budget))
        assert [last for _, last, _ in pairs] == [False] * (len(pairs) - 1) + [True]
        batches = [batch for batch, _, _ in pairs]
        assert b"".join(b"".join(batch) for batch in batches) == whole
        assert all(sum(map(len, batch)) >= budget for batch in batches[:-1])
        for batch in batches:
            joined = b"".join(batch)
            parsed = Frame.parse(joined, masked=role is Role.CLIENT)
            while joined:  # every batch is whole frames
                assert parsed is not None
                joined = joined[parsed[1] :]
                parsed = Frame.parse(joined, masked=role is Role.CLIENT) if joined else None


@pytest.mark.parametrize(
    "into", [frames_module.py_encode_frames_into, frames_module.c_encode_frames_into, None]
)
@pytest.mark.parametrize("size", [5, 70_000, 300_000, 1 << 20])
def test_data_batches_into_a_buffer_are_the_same_bytes(
    into: Any, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's batches encoded into a caller's buffer (one view of it a
    batch, overwritten by the next; a message of one fragment too, and
    fragments larger than a batch): the same bytes as the frames, in the same
    batches; without the encoder (the pure path), the frames as ever."""
    monkeypatch.setattr(frames_module, "encode_frames_into", into)
    payload = binary_of(size)
    for fragment, budget in ((32768, 1 << 18), (1000, 4000), (7, 100), (1 << 20, 1 << 18)):
        whole = b"".join(make(Role.CLIENT, max_fragment_size=fragment).encode_data(2, payload))
        buf = bytearray(batch_room(budget, fragment))
        got = []
        for batch, _last, _pos in make(Role.CLIENT, max_fragment_size=fragment).data_batches(
            2, payload, budget, into=buf
        ):
            if into is not None:
                assert len(batch) == 1 and type(batch[0]) is memoryview
                assert batch[0].obj is buf
            got.append(b"".join(batch))  # (copied before the next batch overwrites it)
        assert b"".join(got) == whole
    # A buffer too small for a batch is not used.
    small = bytearray(100)
    batches = list(make(Role.CLIENT).data_batches(2, payload, 1 << 18, into=small))
    assert b"".join(b"".join(b) for b, _, _ in batches) == b"".join(
        make(Role.CLIENT).encode_data(2, payload)
    )
    assert small == bytearray(100)


@pytest.mark.parametrize(
    "piece", [frames_module.py_encode_piece_into, frames_module.c_encode_piece_into, None]
)
@pytest.mark.parametrize("size", [0, 5, 70_000, 300_000, (5 << 20) // 2])
def test_data_batches_into_a_small_buffer_are_pieces_of_frames(
    piece: Any, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments larger than a batch, with a buffer of a batch and a header
    (smaller than batch_room): each batch is a piece of one frame, one view of
    the buffer, with the payload's position after it; joined, the same bytes
    as the frames (with the same keys); without the encoder (the pure path),
    the frames as ever. A message no larger than a batch is not cut."""
    if piece is None and frames_module.c_encode_piece_into is None:
        pytest.skip("the C piece encoder is not built")  # (the C param is None then)
    monkeypatch.setattr(frames_module, "encode_piece_into", piece)
    payload = binary_of(size)
    fragment, budget = (1 << 20) + 3, 1 << 18
    whole = b"".join(make(Role.CLIENT, max_fragment_size=fragment).encode_data(2, payload))
    buf = bytearray(budget + 14)
    got, positions = [], []
    for batch, last, pos in make(Role.CLIENT, max_fragment_size=fragment).data_batches(
        2, payload, budget, into=buf
    ):
        if piece is not None and size > budget:
            assert len(batch) == 1 and type(batch[0]) is memoryview and batch[0].obj is buf
            before = positions[-1] if positions else 0
            # A piece stops at the budget or at its frame's end.
            assert pos - before == min(budget, fragment - before % fragment, size - before)
        got.append(b"".join(batch))
        positions.append(pos)
        assert last == (pos == size)
    assert b"".join(got) == whole
    assert positions[-1] == size and positions == sorted(positions)


@pytest.mark.parametrize("batcher", _BATCHERS)
def test_a_large_messages_keys_are_taken_a_batch_at_a_time(
    batcher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``MaskKeys.take`` a batch, for its frames (not a call a frame), and
    every frame of the message with a key of its own."""
    monkeypatch.setattr(frames_module, "encode_frames", batcher)

    class Counting(frames_module.MaskKeys):
        def __init__(self) -> None:
            super().__init__()
            self.takes: list[int] = []

        def take(self, count: int) -> bytes:
            self.takes.append(count)
            return super().take(count)

    keys = Counting()
    proto = Protocol(Role.CLIENT, mask_keys=keys)
    payload = bytes(range(256)) * 4096  # 1 MiB in 32 KiB fragments
    batches = [batch for batch, _, _ in proto.data_batches(Opcode.BINARY, payload, 1 << 18)]
    assert keys.takes == [len(batch) for batch in batches] == [8, 8, 8, 8]
    frames = [f for batch in batches for f in batch]
    assert len({f[4:8] for f in frames}) == 32  # (a 32 KiB frame's key follows 4 bytes)
    assert b"".join(Frame.parse(f, masked=True)[0].payload for f in frames) == payload  # type: ignore[index]


_MESSAGE_ENCODERS = [pytest.param(frames_module.py_encode_messages, id="py-run")]
if frames_module.c_encode_messages is not None:
    _MESSAGE_ENCODERS.append(pytest.param(frames_module.c_encode_messages, id="c-run"))

_run_items = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.BINARY | 0x100]),
            st.sampled_from([0, 1, 4, 64, 125, 126, 1000, 40000, 65536]),
            st.sampled_from([bytes, bytearray, memoryview]),
        ),
        st.just((-1, 0, bytes)),  # the writer's close frame
    ),
    max_size=12,
)


@BOTH_ROLES
@pytest.mark.parametrize("encoder", _MESSAGE_ENCODERS)
@settings(max_examples=examples(150), deadline=None, derandomize=True, database=None)
@given(
    specs=_run_items,
    fragment=st.sampled_from([1, 125, 126, 1000, 32768, 1 << 20]),
    start=st.integers(0, 12),
    ext=st.booleans(),
)
def test_hypothesis_encode_messages_is_encode_data_per_message(
    role: Role,
    encoder: Any,
    specs: list[tuple[int, int, Any]],
    fragment: int,
    start: int,
    ext: bool,
) -> None:
    """The writer's runs: encode_messages gives, byte for byte, what
    encode_data(compress=False) gives for each message (the same keys, in
    order), and stops before a close frame or a message that needs fragments;
    with permessage-deflate negotiated too (a run is never compressed)."""
    extensions = []
    if ext:
        from blockws.deflate import PerMessageDeflate

        deflate = PerMessageDeflate().fresh()
        deflate.accept([])
        extensions.append(deflate)
    items: list[tuple[Any, ...]] = [
        (opcode, kind(binary_of(size)), None, size) for opcode, size, kind in specs
    ]
    start = min(start, len(items))
    note(f"items {[(o, len(p)) for o, p, _s, _n in items]}, start {start}")
    numbered = itertools.count()

    def keys() -> bytes:
        return (next(numbered) * 0x9E3779B1 & 0xFFFFFFFF).to_bytes(4, "big")

    proto = Protocol(role, mask_keys=keys, max_fragment_size=fragment, extensions=extensions)
    saved = protocol_module.encode_messages
    protocol_module.encode_messages = encoder  # (a fixture would outlive hypothesis' examples)
    try:
        got, end = proto.encode_messages(items, start)
    finally:
        protocol_module.encode_messages = saved
    numbered = itertools.count()  # the same keys again, one a message
    reference = Protocol(role, mask_keys=keys, max_fragment_size=fragment, extensions=extensions)
    expected: list[bytes] = []
    stop = start
    while stop < len(items) and items[stop][0] >= 0 and len(items[stop][1]) <= fragment:
        expected += reference.encode_data(items[stop][0] & 0xF, items[stop][1], compress=False)
        stop += 1
    assert end == stop
    assert b"".join(got) == b"".join(expected)
    if role is Role.SERVER:
        assert got == expected  # a header and a payload a message
    else:
        assert len(got) == (1 if end > start else 0)  # one bytes for the run


def test_encode_messages_draws_a_runs_keys_from_a_mask_keys_at_once() -> None:
    """A client protocol on a MaskKeys (every socket's) takes a run's keys in
    one call; each frame has its own key, and unmasks to its payload."""
    taken: list[int] = []

    class Counted(frames_module.MaskKeys):
        def take(self, count: int) -> bytes:
            taken.append(count)
            return super().take(count)

    source = Counted()
    proto = Protocol(Role.CLIENT, mask_keys=source)
    payloads = [binary_of(n) for n in (0, 3, 125, 126, 5000)]
    items = [(Opcode.BINARY, p, None, len(p)) for p in payloads]
    got, end = proto.encode_messages(items)
    assert end == len(items) and taken == [len(items)] and len(got) == 1
    data, frames, keys = got[0], [], set()
    while data:
        parsed = Frame.parse(data, masked=True)
        assert parsed is not None
        frames.append(parsed[0].payload)
        keys.add(data[2 + (2 if len(parsed[0].payload) >= 126 else 0) :][:4])
        data = data[parsed[1] :]
    assert frames == payloads
    assert len(keys) == len(items)
    with pytest.raises(ValueError):
        proto.encode_messages(items, len(items) + 1)


def test_encode_control() -> None:
    server = make(Role.SERVER)
    assert server.encode_control(Opcode.PING, b"Hello") == b"\x89\x05Hello"
    assert server.encode_control(Opcode.PONG) == b"\x8a\x00"
    assert server.encode_control(Opcode.PING, b"x" * 125)[:2] == b"\x89\x7d"
    with pytest.raises(ValueError):
        server.encode_control(Opcode.PING, b"x" * 126)
    with pytest.raises(ValueError):
        server.encode_control(Opcode.CLOSE)
    with pytest.raises(ValueError):
        server.encode_control(Opcode.TEXT, b"hi")
    client = make(Role.CLIENT)
    assert client.encode_control(Opcode.PONG, b"Hello") == bytes(
        [0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]
    )


def test_client_uses_fresh_random_keys_by_default() -> None:
    client = Protocol(Role.CLIENT)
    frames = [client.encode_data(Opcode.BINARY, b"same")[0] for _ in range(20)]
    keys = {f[2:6] for f in frames}
    assert len(keys) > 10
    for f in frames:
        assert Frame.parse(f, masked=True) == (Frame(Opcode.BINARY, b"same"), 10)


# -- fail fast ------------------------------------------------------------------------------


def assert_failed(
    proto: Protocol,
    events: list[Summary],
    error: type[ProtocolError],
    code: int,
    before: Sequence[Frame] = (),
) -> None:
    """The last event is the Failure; a close with ``code`` is queued (after the
    frames in ``before``); the state is CLOSE_SENT; later data yields nothing."""
    assert events[-1] == ("failure", error, code)
    assert isinstance(proto.failure, error)
    assert proto.state is State.CLOSE_SENT
    assert sent_frames(proto) == [*before, close_frame(code)]
    assert proto.close_sent == (code, "")
    # After a Failure, nothing more comes out, whatever arrives.
    for more in (wire(proto.role, Opcode.TEXT, b"late"), b"\x89\x00", b"\xff" * 20):
        assert proto.receive_data(more) == []
    assert proto.data_to_send() == []


PRELUDE = [("text", "before"), ("ping", b"p")]
PRELUDE_PONG = [Frame(Opcode.PONG, b"p")]


def prelude(role: Role) -> bytes:
    return wire(role, Opcode.TEXT, b"before") + wire(role, Opcode.PING, b"p")


def fail_case(role: Role, bad: bytes, error: type[ProtocolError], code: int, **kw: Any) -> None:
    """Feed good frames then ``bad`` in one read, and in two; check the failure either way."""
    for split in (False, True):
        proto = make(role, **kw)
        data = prelude(role) + bad
        events = feed(proto, data, [len(prelude(role))] if split else None)
        assert events[:-1] == PRELUDE, "events before the bad frame must be delivered"
        # The pong for the prelude's ping is queued before the close.
        assert_failed(proto, events, error, code, before=PRELUDE_PONG)


@BOTH_ROLES
@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY, Opcode.PING])
def test_rsv_bits_without_extension(role: Role, rsv: int, opcode: Opcode) -> None:
    fail_case(role, wire(role, opcode, b"x", rsv=rsv), ProtocolError, 1002)


@BOTH_ROLES
@pytest.mark.parametrize("opcode", RESERVED_OPCODES)
def test_reserved_opcodes(role: Role, opcode: int) -> None:
    fail_case(role, wire(role, opcode, b"x"), ProtocolError, 1002)


@BOTH_ROLES
@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_fragmented_control_frame(role: Role, opcode: Opcode) -> None:
    fail_case(role, wire(role, opcode, b"", fin=False), ProtocolError, 1002)


@BOTH_ROLES
@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
@pytest.mark.parametrize("size", [126, 127, 65536])
def test_control_frame_over_125_bytes(role: Role, opcode: Opcode, size: int) -> None:
    payload = pack_close(1000) + bytes(size - 2) if opcode is Opcode.CLOSE else bytes(size)
    fail_case(role, wire(role, opcode, payload), ProtocolError, 1002)


def test_long_control_frame_fails_on_its_first_two_bytes() -> None:
    proto = make(Role.CLIENT)
    assert feed(proto, b"\x89\x7e") == [("failure", ProtocolError, 1002)]


def test_masked_frame_to_client() -> None:
    fail_case(Role.CLIENT, wire(Role.SERVER, Opcode.TEXT, b"masked"), ProtocolError, 1002)


def test_unmasked_frame_to_server() -> None:
    fail_case(Role.SERVER, wire(Role.CLIENT, Opcode.TEXT, b"plain"), ProtocolError, 1002)


@BOTH_ROLES
def test_continuation_with_nothing_to_continue(role: Role) -> None:
    fail_case(role, wire(role, Opcode.CONT, b"orphan"), ProtocolError, 1002)


@BOTH_ROLES
@pytest.mark.parametrize("second", [Opcode.TEXT, Opcode.BINARY])
def test_new_data_frame_during_fragmented_message(role: Role, second: Opcode) -> None:
    bad = wire(role, Opcode.TEXT, b"part", fin=False) + wire(role, second, b"new")
    fail_case(role, bad, ProtocolError, 1002)


@BOTH_ROLES
def test_rsv_on_continuation_frame(role: Role) -> None:
    bad = wire(role, Opcode.BINARY, b"a", fin=False) + wire(role, Opcode.CONT, b"b", rsv=RSV1)
    fail_case(role, bad, ProtocolError, 1002)


def test_64_bit_length_with_top_bit_set() -> None:
    fail_case(Role.CLIENT, b"\x82\x7f\x80" + bytes(7), ProtocolError, 1002)


@BOTH_ROLES
def test_invalid_utf8_fails_before_the_frame_is_complete(role: Role) -> None:
    payload = b"ok \xf4\x90" + b"x" * 995  # U+110000 and above do not exist
    frame = wire(role, Opcode.TEXT, payload)
    head = 4 + (4 if role is Role.SERVER else 0)
    proto = make(role)
    events = feed(proto, prelude(role) + frame[: head + 5])
    # Only 5 of the 1000 announced bytes arrived, and the Failure is already there.
    assert events == [*PRELUDE, ("failure", InvalidPayload, 1007)]
    assert_failed(proto, events, InvalidPayload, 1007, before=PRELUDE_PONG)


@BOTH_ROLES
def test_invalid_utf8_in_first_fragment_fails_at_once(role: Role) -> None:
    proto = make(role)
    events = feed(proto, wire(role, Opcode.TEXT, b"\xc0\xaf", fin=False))  # overlong "/"
    assert_failed(proto, events, InvalidPayload, 1007)


@BOTH_ROLES
@pytest.mark.parametrize(
    "first, second",
    [
        (b"ok \xf4", b"\x90\x80\x80 and more"),  # the bad byte is in the next fragment
        (b"ok \xe2\x82", b"x"),  # a character cut by an ASCII byte
        (b"fine", b"\xff"),
        (b"fine", b"\xed\xa0\x80"),  # a UTF-16 surrogate
    ],
)
def test_invalid_utf8_across_fragments(role: Role, first: bytes, second: bytes) -> None:
    bad = wire(role, Opcode.TEXT, first, fin=False) + wire(role, Opcode.CONT, second, fin=False)
    fail_case(role, bad, InvalidPayload, 1007)


@BOTH_ROLES
def test_invalid_utf8_detected_before_the_last_fragment(role: Role) -> None:
    proto = make(role)
    assert feed(proto, wire(role, Opcode.TEXT, b"ab\xe2", fin=False)) == []
    events = feed(proto, wire(role, Opcode.CONT, b"\x28", fin=False))
    assert_failed(proto, events, InvalidPayload, 1007)


@BOTH_ROLES
@pytest.mark.parametrize(
    "frames",
    [
        [(b"ends in \xe2\x82", True)],
        [(b"ends in \xe2", False), (b"\x82", True)],
        [(b"ends in \xf0\x9f\x98", False), (b"", True)],
    ],
    ids=["one-frame", "two-frames", "empty-last-frame"],
)
def test_message_ending_inside_a_character(role: Role, frames: list[tuple[bytes, bool]]) -> None:
    bad = b""
    for i, (payload, fin) in enumerate(frames):
        bad += wire(role, Opcode.TEXT if i == 0 else Opcode.CONT, payload, fin=fin)
    fail_case(role, bad, InvalidPayload, 1007)


@BOTH_ROLES
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_message_too_big_fails_at_the_header(role: Role, opcode: Opcode) -> None:
    frame = wire(role, opcode, b"a" * 101)
    head = 2 + (4 if role is Role.SERVER else 0)
    fail_case(role, frame[:head], MessageTooBig, 1009, max_message_size=100)
    # Exactly the limit is fine.
    proto = make(role, max_message_size=100)
    assert len(feed(proto, wire(role, opcode, b"a" * 100))) == 1


@BOTH_ROLES
def test_message_too_big_across_fragments(role: Role) -> None:
    first = wire(role, Opcode.BINARY, b"a" * 60, fin=False)
    second = wire(role, Opcode.CONT, b"b" * 41)
    head = 2 + (4 if role is Role.SERVER else 0)
    fail_case(role, first + second[:head], MessageTooBig, 1009, max_message_size=100)
    proto = make(role, max_message_size=100)
    ok = wire(role, Opcode.CONT, b"b" * 40)
    assert feed(proto, first + ok) == [("binary", b"a" * 60 + b"b" * 40)]


@BOTH_ROLES
def test_text_too_big_across_fragments(role: Role) -> None:
    first = wire(role, Opcode.TEXT, b"a" * 60, fin=False)
    second = wire(role, Opcode.CONT, b"b" * 60)
    head = 2 + (4 if role is Role.SERVER else 0)
    fail_case(role, first + second[:head], MessageTooBig, 1009, max_message_size=100)


def test_huge_announced_length_fails_without_allocating() -> None:
    allocated: list[int] = []

    def allocate(n: int) -> bytearray:
        allocated.append(n)
        return bytearray(n)

    proto = Protocol(Role.CLIENT, allocate=allocate)  # default 16 MiB limit
    events = feed(proto, b"\x82\x7f" + (1 << 40).to_bytes(8, "big"))
    assert events == [("failure", MessageTooBig, 1009)]
    assert allocated == []


def test_no_message_size_limit() -> None:
    proto = make(Role.CLIENT, max_message_size=None)
    assert feed(proto, wire(Role.CLIENT, Opcode.BINARY, bytes(70000))) == [("binary", bytes(70000))]


def test_failure_while_close_sent_queues_no_second_close() -> None:
    proto = make(Role.CLIENT)
    proto.encode_close(1001, "going away")
    events = feed(proto, wire(Role.CLIENT, Opcode.CONT, b"x"))
    assert events == [("failure", ProtocolError, 1002)]
    assert proto.state is State.CLOSE_SENT
    assert proto.data_to_send() == []
    assert proto.close_sent == (1001, "going away")


def test_fail_from_outside_the_parser() -> None:
    proto = make(Role.SERVER)
    events = summarize(proto.fail(InvalidPayload("bad")))
    assert events == [("failure", InvalidPayload, 1007)]
    assert proto.state is State.CLOSE_SENT
    assert proto.data_to_send() == [b"\x88\x02\x03\xef"]
    assert proto.receive_data(wire(Role.SERVER, Opcode.TEXT, b"x")) == []


def test_failure_repr() -> None:
    assert repr(Failure(ProtocolError("x"))) == "Failure(ProtocolError('x'))"


# -- the close handshake and codes ------------------------------------------------------------

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CODES += [3000, 3001, 3999, 4000, 4242, 4999]
INVALID_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


def test_is_valid_close_code_over_the_whole_range() -> None:
    valid = {c for c in range(65536) if is_valid_close_code(c)}
    expected = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
    assert valid == expected


@BOTH_ROLES
@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_code_is_echoed(role: Role, code: int) -> None:
    proto = make(role)
    events = feed(proto, wire(role, Opcode.CLOSE, pack_close(code, "reason ✓")))
    assert events == [("close", code, "reason ✓")]
    assert proto.close_received == (code, "reason ✓")
    assert proto.state is State.CLOSED
    # The reply echoes the code, without the reason.
    assert sent_frames(proto) == [close_frame(code)]
    assert proto.close_sent == (code, "")


def test_close_reply_bytes_exact() -> None:
    server = make(Role.SERVER)
    server.receive_data(Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(KEY))
    assert server.data_to_send() == [b"\x88\x02\x03\xe8"]
    client = make(Role.CLIENT)
    client.receive_data(b"\x88\x02\x0f\xa0")  # 4000
    assert client.data_to_send() == [b"\x88\x82" + KEY + bytes([0x0F ^ 0x37, 0xA0 ^ 0xFA])]


@BOTH_ROLES
@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_close_code_fails_with_1002(role: Role, code: int) -> None:
    bad = wire(role, Opcode.CLOSE, code.to_bytes(2, "big") + b"why")
    fail_case(role, bad, ProtocolError, 1002)


@BOTH_ROLES
def test_one_byte_close_payload(role: Role) -> None:
    fail_case(role, wire(role, Opcode.CLOSE, b"\x03"), ProtocolError, 1002)


@BOTH_ROLES
def test_close_reason_not_utf8(role: Role) -> None:
    fail_case(role, wire(role, Opcode.CLOSE, b"\x03\xe8ok\xff"), InvalidPayload, 1007)


@BOTH_ROLES
def test_empty_close_gets_an_empty_reply(role: Role) -> None:
    proto = make(role)
    assert feed(proto, wire(role, Opcode.CLOSE)) == [("close", 1005, "")]
    assert proto.close_received == (1005, "")
    expected = b"\x88\x80" + KEY if role is Role.CLIENT else b"\x88\x00"
    assert proto.data_to_send() == [expected]
    assert proto.close_sent == (None, "")
    assert proto.state is State.CLOSED


def test_close_received_repr() -> None:
    assert repr(CloseReceived(1000, "bye")) == "CloseReceived(1000, 'bye')"


def test_transitions_table() -> None:
    assert TRANSITIONS == {
        (State.OPEN, "send_close"): State.CLOSE_SENT,
        (State.OPEN, "receive_close"): State.CLOSE_RECEIVED,
        (State.CLOSE_SENT, "receive_close"): State.CLOSED,
        (State.CLOSE_RECEIVED, "send_close"): State.CLOSED,
    }


@BOTH_ROLES
def test_we_close_first(role: Role) -> None:
    proto = make(role)
    frame = proto.encode_close(1000, "bye")
    assert Frame.parse(frame, masked=role is Role.CLIENT) == (
        close_frame(1000, "bye"),
        len(frame),
    )
    assert proto.state is State.CLOSE_SENT
    assert proto.close_sent == (1000, "bye")
    # Messages the peer sent before seeing our close are still delivered.
    assert feed(proto, wire(role, Opcode.TEXT, b"in flight")) == [("text", "in flight")]
    assert feed(proto, wire(role, Opcode.CLOSE, pack_close(1000))) == [("close", 1000, "")]
    assert proto.state is State.CLOSED
    assert proto.data_to_send() == []  # no second close
    assert proto.receive_data(wire(role, Opcode.TEXT, b"after")) == []


@BOTH_ROLES
def test_peer_closes_first_auto_reply(role: Role) -> None:
    proto = make(role)
    assert feed(proto, wire(role, Opcode.CLOSE, pack_close(1001, "away"))) == [
        ("close", 1001, "away")
    ]
    assert proto.state is State.CLOSED
    assert sent_frames(proto) == [close_frame(1001)]
    with pytest.raises(InvalidState):
        proto.encode_close(1000)


@BOTH_ROLES
def test_peer_closes_first_manual_reply(role: Role) -> None:
    proto = make(role, auto_close_reply=False)
    assert feed(proto, wire(role, Opcode.CLOSE, pack_close(4001, "custom"))) == [
        ("close", 4001, "custom")
    ]
    assert proto.state is State.CLOSE_RECEIVED
    assert proto.data_to_send() == []
    # Whatever the peer sends after its close is ignored, even a second close.
    assert proto.receive_data(wire(role, Opcode.TEXT, b"after")) == []
    assert proto.receive_data(wire(role, Opcode.CLOSE, pack_close(1000))) == []
    assert proto.receive_data(wire(role, Opcode.PING, b"late")) == []
    assert proto.data_to_send() == []
    frame = proto.encode_close(1000, "ok")
    assert Frame.parse(frame) == (close_frame(1000, "ok"), len(frame))
    assert proto.state is State.CLOSED
    with pytest.raises(InvalidState):
        proto.encode_close(1000)


@BOTH_ROLES
def test_sending_close_twice_raises(role: Role) -> None:
    proto = make(role)
    proto.encode_close(1000)
    with pytest.raises(InvalidState, match="close_sent"):
        proto.encode_close(1000)
    with pytest.raises(InvalidState):
        proto.encode_close(None)
    assert proto.state is State.CLOSE_SENT


def test_encode_close_rejects_invalid_code_without_changing_state() -> None:
    proto = make(Role.CLIENT)
    for code in INVALID_CODES:
        with pytest.raises(ValueError):
            proto.encode_close(code)
    with pytest.raises(ValueError):
        proto.encode_close(1000, "x" * 124)
    assert proto.state is State.OPEN
    assert proto.close_sent is None
    proto.encode_close(None)
    assert proto.close_sent == (None, "")


def test_encode_close_exact_bytes() -> None:
    server = make(Role.SERVER)
    assert server.encode_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert make(Role.SERVER).encode_close(None) == b"\x88\x00"
    assert make(Role.CLIENT).encode_close(None) == b"\x88\x80" + KEY


def test_pack_close() -> None:
    assert pack_close(1000) == b"\x03\xe8"
    assert pack_close(4999, "é") == b"\x13\x87\xc3\xa9"
    assert pack_close(None) == b""
    assert len(pack_close(1000, "x" * 123)) == 125
    assert len(pack_close(1000, "é" * 61 + "x")) == 125
    with pytest.raises(ValueError):
        pack_close(1000, "x" * 124)
    with pytest.raises(ValueError):
        pack_close(1000, "é" * 62)  # 124 bytes in UTF-8
    with pytest.raises(ValueError):
        pack_close(None, "a reason needs a code")
    for code in INVALID_CODES:
        with pytest.raises(ValueError):
            pack_close(code)
    for code in VALID_CODES:
        assert pack_close(code) == code.to_bytes(2, "big")


@BOTH_ROLES
def test_data_after_close_is_ignored(role: Role) -> None:
    proto = make(role)
    stream = (
        wire(role, Opcode.TEXT, b"before")
        + wire(role, Opcode.CLOSE, pack_close(1000))
        + wire(role, Opcode.TEXT, b"after")
        + wire(role, Opcode.PING, b"after")
        + wire(role, Opcode.CLOSE, pack_close(1000))
    )
    assert feed(proto, stream) == [("text", "before"), ("close", 1000, "")]
    assert sent_frames(proto) == [close_frame(1000)]
    assert proto.receive_data(stream) == []
    assert proto.data_to_send() == []


@BOTH_ROLES
def test_close_mid_fragmented_message_discards_it(role: Role) -> None:
    proto = make(role)
    stream = (
        wire(role, Opcode.TEXT, b"par", fin=False)
        + wire(role, Opcode.CLOSE, pack_close(1000))
        + wire(role, Opcode.CONT, b"tial")
    )
    assert feed(proto, stream) == [("close", 1000, "")]


@BOTH_ROLES
@pytest.mark.parametrize("state", ["open", "close_sent"])
def test_close_split_across_reads_then_more_data(role: Role, state: str) -> None:
    # Regression: a close frame whose payload arrived in a later read let the
    # parser carry on, and a second close then raised InvalidState out of
    # receive_data.
    close = wire(role, Opcode.CLOSE, pack_close(1000, "bye"))
    for cut in range(1, len(close)):
        proto = make(role)
        if state == "close_sent":
            proto.encode_close(1000)
        assert feed(proto, close, [cut]) == [("close", 1000, "bye")]
        assert proto.state is State.CLOSED
        assert proto.receive_data(close + wire(role, Opcode.TEXT, b"x")) == []


@BOTH_ROLES
def test_bytewise_close_handshake(role: Role) -> None:
    proto = make(role)
    close = wire(role, Opcode.CLOSE, pack_close(3000, "x" * 100))
    assert feed_bytewise(proto, close + close) == [("close", 3000, "x" * 100)]
    assert sent_frames(proto) == [close_frame(3000)]


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_ping_after_our_close_still_gets_a_pong(role: Role) -> None:
    # RFC 6455 5.5.2: a pong answers every ping until the peer's close arrives.
    proto = make(role)
    proto.encode_close(1000, "bye")
    assert proto.state is State.CLOSE_SENT
    assert feed(proto, wire(role, Opcode.PING, b"still there?")) == [("ping", b"still there?")]
    assert sent_frames(proto) == [Frame(Opcode.PONG, b"still there?")]
    # Once the peer's close arrives, nothing more is answered.
    assert feed(proto, wire(role, Opcode.CLOSE, pack_close(1000))) == [("close", 1000, "")]
    assert proto.state is State.CLOSED
    assert feed(proto, wire(role, Opcode.PING, b"late")) == []
    assert sent_frames(proto) == []


def test_max_fragment_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Protocol(Role.CLIENT, max_fragment_size=0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_binary_as_bytes_joins_pieces_once(chunk: int) -> None:
    # For receive() consumers: every binary message comes out as exact bytes,
    # whether it arrived whole, split across reads, or fragmented.
    proto = make(Role.CLIENT)
    proto.binary_as_bytes = True
    payload = bytes(range(256)) * 20
    data = (
        wire(Role.CLIENT, Opcode.BINARY, payload[:3000], fin=False)
        + wire(Role.CLIENT, Opcode.PING, b"p")
        + wire(Role.CLIENT, Opcode.CONT, payload[3000:])
        + wire(Role.CLIENT, Opcode.BINARY, b"")
    )
    events = []
    for i in range(0, len(data), chunk):
        events.extend(proto.receive_data(data[i : i + chunk]))
    binaries = [e for e in events if isinstance(e, BinaryMessage)]
    assert [type(e.data) for e in binaries] == [bytes, bytes]
    assert [bytes(e) for e in binaries] == [payload, b""]
    assert [e.length for e in binaries] == [len(payload), 0]


def test_binary_as_bytes_still_bounds_the_message_size() -> None:
    proto = make(Role.CLIENT, max_message_size=100)
    proto.binary_as_bytes = True
    events = proto.receive_data(
        wire(Role.CLIENT, Opcode.BINARY, b"x" * 60, fin=False)
        + wire(Role.CLIENT, Opcode.CONT, b"y" * 60)
    )
    assert summarize(events) == [("failure", MessageTooBig, 1009)]


@pytest.mark.parametrize("compact", [False, True])
def test_bad_utf8_among_many_small_messages_fails_in_order(compact: bool) -> None:
    """The fast loop (C or Python) stops before a text frame that is not UTF-8;
    the general parser fails on it: the messages before it are reported, the
    ones after it are not, and the close carries 1007."""
    proto = make(Role.CLIENT)
    proto.compact_messages = compact
    good = b"".join(wire(Role.CLIENT, Opcode.TEXT, b"m%d" % i) for i in range(50))
    bad = wire(Role.CLIENT, Opcode.TEXT, b"ok\xc3(")
    after = wire(Role.CLIENT, Opcode.BINARY, b"never")
    got = summarize(proto.receive_data(good + bad + after))
    assert got == [("text", f"m{i}") for i in range(50)] + [("failure", InvalidPayload, 1007)]
    assert [f.payload[:2] for f in sent_frames(proto)] == [b"\x03\xef"]


def test_a_message_spanning_reads_is_copied_once_into_pooled_memory() -> None:
    """Regression: ``bytearray[a:b] = chunk`` copied every chunk of a message that
    spans reads into a temporary bytearray before copying it into the pooled
    buffer (a second copy of every byte, 1 MiB per W3 message). The middle reads
    of a message now allocate nothing near their size."""
    import tracemalloc

    pooled = bytearray(2 << 20)
    proto = make(Role.CLIENT, allocate=lambda n: pooled if n <= len(pooled) else bytearray(n))
    size, piece = 1 << 20, 64 * 1024
    stream = wire(Role.CLIENT, Opcode.BINARY, binary_of(size))
    head = len(stream) - size
    assert proto.receive_data(stream[: head + piece]) == []
    middle = [stream[i : i + piece] for i in range(head + piece, len(stream) - piece, piece)]
    tracemalloc.start()
    try:
        for data in middle:
            assert proto.receive_data(data) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < piece // 4, peak
    events = proto.receive_data(stream[len(stream) - piece :])
    assert summarize(events) == [("binary", binary_of(size))]
    assert isinstance(events[0], BinaryMessage) and events[0].data is pooled


# -- the run of a fragmented binary message's continuation frames (Protocol._binary_run) --


def _raw_frame(b0: int, payload: bytes, enc: str = "min", mask: bool = False) -> bytes:
    """A frame as a server could send it, any header bits and length encoding:
    ``min``imal, ``16``- or ``64``-bit, or ``top`` (a 64-bit length with its
    top bit set, which must fail)."""
    n = len(payload)
    if enc == "16" and n > 65535:
        enc = "64"
    if enc == "top":
        head = bytes((b0, 127)) + ((1 << 63) | n).to_bytes(8, "big")
    elif enc == "64" or (enc == "min" and n > 65535):
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    elif enc == "16" or (enc == "min" and n > 125):
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, n))
    if mask:
        return bytes((head[0], head[1] | 0x80)) + head[2:] + KEY + payload
    return head + payload


_run_frames = st.lists(
    st.tuples(
        st.sampled_from(["cont"] * 8 + ["ping", "pong", "binary", "text", "close", "reserved"]),
        st.booleans(),  # FIN
        st.sampled_from([0] * 12 + [RSV1, RSV2 | RSV3]),
        st.sampled_from([False] * 15 + [True]),  # MASK bit (a server must not set it)
        st.sampled_from([0, 1, 3, 125, 126, 200, 4095, 4096, 5000, 9000, 70000]),
        st.sampled_from(["min"] * 6 + ["16", "64", "top"]),
    ),
    max_size=12,
)


def _run_stream(first: tuple[int, int], specs: Sequence[tuple[Any, ...]]) -> bytes:
    opcodes = {"cont": 0, "ping": 9, "pong": 10, "binary": 2, "text": 1, "close": 8, "reserved": 3}
    size, enc = first
    out = [_raw_frame(0x02, binary_of(size), enc)]  # a binary message's first frame, not FIN
    for i, (kind, fin, rsv, mask, n, enc) in enumerate(specs):
        op = opcodes[kind]
        if op >= 8:
            n = min(n, 125)
        payload = bytes((i,)) * n if kind != "text" else b"t" * n
        if kind == "close":
            payload = pack_close(1000, "x" * max(0, n - 2))[:125] if n else b""
        out.append(_raw_frame((0x80 if fin else 0) | rsv | op, payload, enc, mask))
    return b"".join(out) + _raw_frame(0x88, pack_close(1000, "end"))


def _run_receiver(
    cont_run: bool, mode: tuple[bool, bool], limit: int | None, ext: bool
) -> Protocol:
    extensions = []
    if ext:
        from blockws.deflate import PerMessageDeflate

        deflate = PerMessageDeflate().fresh()
        deflate.accept([])
        extensions.append(deflate)
    pooled = bytearray(48 * 1024)  # smaller than some messages: the buffer must grow
    proto = make(
        Role.CLIENT,
        max_message_size=limit,
        extensions=extensions,
        allocate=lambda n: pooled if n <= len(pooled) else bytearray(n),
    )
    proto.compact_messages, proto.binary_as_bytes = mode
    proto._cont_run = cont_run  # the reference: the general path alone
    return proto


@settings(max_examples=examples(600), deadline=None, derandomize=True, database=None)
@given(
    first=st.tuples(st.sampled_from([0, 5, 126, 4096, 40000]), st.sampled_from(["min", "64"])),
    specs=_run_frames,
    cuts=st.lists(st.integers(0, 1 << 18), max_size=12),
    mode=st.sampled_from(MODES),
    limit=st.sampled_from([None, 3, 5000, 50000, 1 << 20]),
    ext=st.booleans(),
)
def test_hypothesis_binary_run_matches_the_general_path(
    first: tuple[int, int],
    specs: list[tuple[Any, ...]],
    cuts: list[int],
    mode: tuple[bool, bool],
    limit: int | None,
    ext: bool,
) -> None:
    """Whatever follows a fragmented binary message's first frame (continuation
    frames legal or not, control frames, a new message, lengths in any
    encoding, limits on either side), cut anywhere: the fast run gives the
    general path's events, failure (type, close code and message), state and
    replies."""
    stream = _run_stream(first, specs)
    offsets = sorted({c % (len(stream) + 1) for c in cuts})
    results = []
    for cont_run in (True, False):
        proto = _run_receiver(cont_run, mode, limit, ext)
        got = feed(proto, stream, offsets)
        failure = proto.failure
        results.append((got, proto.state, failure and str(failure), b"".join(proto.data_to_send())))
    assert results[0] == results[1]


def test_the_c_loop_copies_a_pooled_messages_whole_continuation_frames(
    split_impl: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the C loops, a 1 MiB message in 32 KiB frames, read 127 KiB at a
    time, goes to its pooled buffer mostly through copy_continuations: every
    whole non-final frame of a read in one call; the Python loop is left the
    frames each read cuts and the final one. The message is the same."""
    copier = split_impl[1]
    if copier is None:
        pytest.skip("the pure loops: _binary_run's own loop (the reference)")
    payload = binary_of(1 << 20)
    stream = b"".join(
        _raw_frame((0x80 if i + 32768 >= len(payload) else 0) | (2 if i == 0 else 0),
                   payload[i : i + 32768])
        for i in range(0, len(payload), 32768)
    )  # fmt: skip
    taken = []

    def spy(buf: Any, pos: int, end: int, *rest: Any) -> tuple[int, int, int]:
        result = copier(buf, pos, end, *rest)
        taken.append((result[0] - pos) // (32768 + 4))
        return result

    monkeypatch.setattr(frames_module, "copy_continuations", spy)
    pooled = bytearray(2 << 20)  # a pool's buffer, reused: room for the whole message
    proto = make(Role.CLIENT, max_message_size=None, allocate=lambda n: pooled)
    got = feed(proto, stream, list(range(127 * 1024, len(stream), 127 * 1024)))
    assert got == [("binary", payload)]
    # Of the 30 frames between the first and the final one, the 8 reads cut 7
    # (a read's first frame, the rest of one cut short, is the Python loop's).
    assert sum(taken) == 23, taken
    assert taken == [2] + [3] * 7, taken  # a call a read, then on to the frame it cut


@pytest.mark.parametrize("mode", MODES)
def test_binary_run_takes_whole_and_cut_continuation_frames(
    mode: tuple[bool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MiB message in 32 KiB frames, read 128 KiB at a time as a socket
    gives it: the run takes every continuation frame, the cut ones too (the
    general path only reads the message's first frame), with a ping between."""
    payload = binary_of(1 << 20)
    frames = [
        _raw_frame((0x80 if i + 32768 >= len(payload) else 0) | (2 if i == 0 else 0),
                   payload[i : i + 32768])
        for i in range(0, len(payload), 32768)
    ]  # fmt: skip
    frames.insert(5, _raw_frame(0x89, b"p"))
    stream = b"".join(frames)
    proto = make(Role.CLIENT)
    proto.compact_messages, proto.binary_as_bytes = mode
    calls = []
    general = Protocol._read_header

    def counting(self: Protocol, buf: bytes, pos: int, end: int) -> int:
        calls.append(buf[pos])
        return general(self, buf, pos, end)

    monkeypatch.setattr(Protocol, "_read_header", counting)
    got = feed(proto, stream, list(range(131072, len(stream), 131072)))
    assert got == [("ping", b"p"), ("binary", payload)]
    assert calls == [0x02, 0x89]


def test_binary_run_keeps_views_only_of_reads_it_mostly_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``binary_as_bytes`` without a bytes buffer (the pure path): pieces of
    4 KiB or more wait for the message's end as views of their read only if
    they make up half of it or more; else as copies, so a message in progress
    holds no read it barely uses."""
    monkeypatch.setattr(frames_module, "bytes_buffer", None)
    proto = make(Role.CLIENT)
    proto.binary_as_bytes = True
    first = _raw_frame(0x02, b"")
    big = _raw_frame(0x00, b"b" * 8192)
    assert proto.receive_data(first + big) == []  # 8 KiB of an 8 KiB read: a view
    assert [type(p) for p in proto._m_parts.parts] == [memoryview]
    pings = b"".join(_raw_frame(0x89, b"z" * 125) for _ in range(80))  # 10 KiB of pings
    events = proto.receive_data(big + pings)  # 8 KiB of an 18 KiB read: a copy
    assert [type(p) for p in proto._m_parts.parts] == [memoryview, bytes]
    assert len(events) == 80
    events = proto.receive_data(_raw_frame(0x80, b"c" * 3))
    assert summarize(events) == [("binary", b"b" * 16384 + b"ccc")]
    assert not proto._m_parts.parts


@pytest.mark.parametrize("cut", [127 * 1024, 4096, 32768 + 4, 200 * 1024 + 3])
def test_a_bytes_message_is_assembled_in_the_bytes_it_becomes(cut: int) -> None:
    """``binary_as_bytes`` with the C speedups: a 1 MiB message in 32 KiB
    frames, a ping among them, cut anywhere, is assembled in a bytes buffer
    (no pieces kept) and comes out as that ``bytes``, never copied out of it;
    the next, shorter message in the same buffer's place too. On the pure
    path the pieces are joined: the same messages."""
    import blockws.protocol as protocol_module

    first, second = binary_of(1 << 20), binary_of(300 * 1024 + 5)[::-1]
    frames = [
        _raw_frame((0x80 if i + 32768 >= len(m) else 0) | (2 if i == 0 else 0), m[i : i + 32768])
        for m in (first, second)
        for i in range(0, len(m), 32768)
    ]
    frames.insert(3, _raw_frame(0x89, b"p"))
    stream = b"".join(frames) + _raw_frame(0x82, b"small")
    proto = make(Role.CLIENT)
    proto.compact_messages = proto.binary_as_bytes = True
    copied = protocol_module.copied_out
    events: list[Received] = []
    parts_seen = 0
    for start in range(0, len(stream), cut):
        events += proto.receive_data(stream[start : start + cut])
        parts_seen += len(proto._m_parts.parts or ())
    assert summarize(events) == [("ping", b"p"), ("binary", first), ("binary", second),
                                 ("binary", b"small")]  # fmt: skip
    assert all(type(e) is bytes for e in events[1:])
    assert protocol_module.copied_out == copied
    assert (parts_seen == 0) is (frames_module.bytes_buffer is not None)


def test_a_bytes_message_whose_consumer_changes_midway_is_whole() -> None:
    """Begun for ``receive()`` (in a bytes buffer where there is one), ended
    for ``on_binary``, and the other way round: the same message either way."""
    payload = binary_of(200 * 1024)
    stream = b"".join(
        _raw_frame((0x80 if i + 32768 >= len(payload) else 0) | (2 if i == 0 else 0),
                   payload[i : i + 32768])
        for i in range(0, len(payload), 32768)
    )  # fmt: skip
    for begin in (True, False):
        proto = make(Role.CLIENT)
        proto.compact_messages = True
        proto.binary_as_bytes = begin
        events = proto.receive_data(stream[:100_000])
        proto.binary_as_bytes = not begin
        events += proto.receive_data(stream[100_000:])
        assert summarize(events) == [("binary", payload)]


@pytest.mark.parametrize("mode", MODES)
def test_binary_run_bytewise_and_at_the_frame_count_limit(mode: tuple[bool, bool]) -> None:
    """Headers of every length cut at every byte, and empty continuation
    frames past ``max_message_size`` frames (each counts as one byte): the run
    and the general path alone agree, the failure included."""
    specs = [
        ("cont", False, 0, False, n, enc) for n in (0, 5, 300, 5000) for enc in ("min", "16", "64")
    ] + [("ping", True, 0, False, 3, "min"), ("cont", True, 0, False, 7, "64")]
    stream = _run_stream((4096, "min"), specs)
    empties = _run_stream((1, "min"), [("cont", False, 0, False, 0, "min")] * 5)
    for data, limit in ((stream, None), (stream, 1 << 20), (empties, 4), (empties, 100)):
        results = []
        for cont_run in (True, False):
            proto = _run_receiver(cont_run, mode, limit, False)
            got = feed_bytewise(proto, data)
            results.append((got, proto.state, str(proto.failure), proto.data_to_send()))
        assert results[0] == results[1]
        assert results[0][0][-1][0] == ("close" if limit != 4 else "failure")
