"""A read of whole small messages, without the general parsing path:
``blockws._speedups.receive_whole`` (C: :meth:`Connection.data_received` for
any run of them) and, without the C speedups, ``Connection._receive_one``
with ``WSProtocol.receive_one`` (Python: a read of exactly one). Over memory
transports, without sockets.

Every script of reads runs with the general code alone, then with each fast
path, and must end the same way: the same messages delivered in the same
order, the same close code and error. Each read's fast-path call is
recorded, to check which reads it took (True) and which it left to the
general code (False).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from memory import MemoryOpener, opened, server_frame, use_memory

import blockws
import blockws.connection as connection_module
import blockws.websocket
from blockws.connection import Connection
from blockws.frames import Opcode, pack_close
from blockws.protocol import Protocol as WSProtocol
from blockws.protocol import Role

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

_real = connection_module._receive_whole
_real_one = Connection._receive_one

needs_c = pytest.mark.skipif(_real is None, reason="the C speedups are not in use")


def text(payload: bytes) -> bytes:
    return server_frame(Opcode.TEXT, payload)


def binary(payload: bytes) -> bytes:
    return server_frame(Opcode.BINARY, payload)


def masked_text(payload: bytes) -> bytes:
    key = b"\x01\x02\x03\x04"
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + key + body


#: name -> (the reads, what the C call returns for each, what the Python one
#: does, the socket's max_message_size).
SCRIPTS: dict[str, tuple[list[bytes], list[bool], list[bool], int]] = {
    "one text": ([text(b"hello")], [True], [True], 1024),
    "125 bytes alone": ([binary(b"m" * 125)], [True], [True], 1024),
    "126 bytes alone (a 16-bit length)": ([binary(b"m" * 126)], [True], [False], 1024),
    "a non-minimal 16-bit length (accepted)": (
        [bytes([0x81, 126, 0, 5]) + b"hello"],
        [True],
        [False],
        1024,
    ),
    "empty messages": ([text(b""), text(b"") + binary(b"")], [True, True], [True, False], 1024),
    "text and binary in one read": (
        [text(b"one") + binary(b"\x00\xfftwo") + text("é€😀".encode())],
        [True],
        [False],
        1024,
    ),
    "a 16-bit length": (
        [binary(bytes(range(256)) * 2) + text(b"x" * 126)],
        [True],
        [False],
        1024,
    ),
    "reads in a row": (
        [text(b"a"), binary(b"b"), text("€".encode())],
        [True, True, True],
        [True, True, True],
        1024,
    ),
    "a frame cut across reads": (
        [text(b"first") + text(b"second")[:3], text(b"second")[3:] + text(b"third")],
        [False, False],
        [False, False],
        1024,
    ),
    "a frame cut after its header": (
        [text(b"cut")[:2], text(b"cut")[2:], text(b"next")],
        [False, False, True],
        [False, False, True],
        1024,
    ),
    "a ping among messages": (
        [text(b"a") + server_frame(Opcode.PING, b"p") + text(b"b"), text(b"after")],
        [False, True],
        [False, True],
        1024,
    ),
    "a ping alone": (
        [server_frame(Opcode.PING, b"p"), text(b"after")],
        [False, True],
        [False, True],
        1024,
    ),
    "fragments": (
        [server_frame(Opcode.TEXT, b"fr", fin=False), server_frame(0, b"ag"), text(b"whole")],
        [False, False, True],
        [False, False, True],
        1024,
    ),
    "a fragment started in the same read": (
        [text(b"a") + server_frame(Opcode.TEXT, b"fr", fin=False), server_frame(0, b"ag")],
        [False, False],
        [False, False],
        1024,
    ),
    "a read over 4 KiB": (
        [text(b"x" * 100) * 50, text(b"y")],
        [False, True],
        [False, True],
        1024,
    ),
    "a 64-bit length": (
        [binary(b"z" * 70_000), text(b"next")],
        [False, True],
        [False, True],
        100_000,
    ),
    "a masked frame (1002)": ([masked_text(b"bad")], [False], [False], 1024),
    "a masked frame after a message (1002)": (
        [text(b"ok") + masked_text(b"bad")],
        [False],
        [False],
        1024,
    ),
    "an RSV bit (1002)": ([server_frame(Opcode.TEXT, b"r", rsv=0x40)], [False], [False], 1024),
    "invalid UTF-8 (1007)": ([text(b"ok"), text(b"\xff\xfe")], [True, False], [True, False], 1024),
    "UTF-8 cut inside a message (1007)": ([text("é".encode()[:1])], [False], [False], 1024),
    "too large (1009)": ([text(b"ok"), binary(b"q" * 2000)], [True, False], [True, False], 1024),
    "too large for a small limit (1009)": (
        [text(b"ok"), binary(b"q" * 65)],
        [True, False],
        [True, False],
        64,
    ),
    "a reserved opcode (1002)": ([server_frame(3, b"")], [False], [False], 1024),
}


#: The server's close frame that ends each run (after the script's reads).
CLOSE = server_frame(Opcode.CLOSE, pack_close(1000))


class Recorder:
    """Stands in for ``_receive_whole``: calls the C one and keeps what it returned."""

    def __init__(self) -> None:
        self.results: list[bool] = []

    def __call__(self, conn: Any, data: Any, clock: Any) -> bool:
        result = _real(conn, data, clock)
        if data and data != CLOSE:  # (the script's reads only)
            self.results.append(result)
        return result


class OneRecorder:
    """Stands in for ``Connection._receive_one``: keeps what it returned."""

    def __init__(self) -> None:
        self.results: list[bool] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def receive_one(conn: Connection, data: bytes) -> bool:
            result = _real_one(conn, data)
            if data and data != CLOSE:
                self.results.append(result)
            return result

        monkeypatch.setattr(connection_module, "_receive_whole", None)
        monkeypatch.setattr(Connection, "_receive_one", receive_one)


def close_cleanly(ws: blockws.WebSocket, transport: Any) -> None:
    """Close, the server answering: the socket's threads end."""
    ws.close()
    transport.feed(CLOSE)
    transport.feed_eof()
    assert ws.join(5)


def general_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither fast path: every read through the general code."""
    monkeypatch.setattr(connection_module, "_receive_whole", None)
    monkeypatch.setattr(Connection, "_receive_one", lambda conn, data: False)


def run(
    memory: MemoryOpener, reads: list[bytes], mode: str, **options: Any
) -> tuple[list[Any], int | None, str]:
    """Feed the reads and a close; what was delivered, the close code, the error's type."""
    got: list[Any] = []
    codes: list[int] = []
    if mode == "callbacks":
        options["on_message"] = lambda ws, message: got.append(message)
        options["on_binary"] = lambda ws, segment: got.append(bytes(segment))
    options["on_closed"] = lambda ws, code, reason: codes.append(code)
    options.setdefault("max_message_size", 1024)
    ws, transport = opened(memory, **options)
    for read in reads:
        transport.feed(read)
    transport.feed(CLOSE)
    transport.feed_eof()
    deadline = time.monotonic() + 10
    if mode == "receive":
        while True:
            try:
                got.append(ws.receive(5))
            except blockws.ConnectionClosed:
                break
    while not codes:
        assert time.monotonic() < deadline, "the socket did not close"
        ws.wait(0.05)
        ws.update()
    assert ws.join(5)
    return got, codes[0], type(ws.error).__name__


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    if _real is None:  # pragma: no cover - depends on the build
        pytest.skip("the C speedups are not in use")
    recorder = Recorder()
    monkeypatch.setattr(connection_module, "_receive_whole", recorder)
    yield recorder


@pytest.mark.parametrize("mode", ["callbacks", "receive"])
@pytest.mark.parametrize("path", ["c", "python"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_each_fast_path_ends_every_script_as_the_general_code_does(
    monkeypatch: pytest.MonkeyPatch, name: str, path: str, mode: str
) -> None:
    reads, c_taken, py_taken, limit = SCRIPTS[name]
    if path == "c" and _real is None:  # pragma: no cover - depends on the build
        pytest.skip("the C speedups are not in use")
    with use_memory(monkeypatch) as memory:
        general_only(monkeypatch)
        expected = run(memory, reads, mode, max_message_size=limit)
        monkeypatch.undo()
    recorder: Recorder | OneRecorder
    if path == "c":
        recorder, taken = Recorder(), c_taken
        monkeypatch.setattr(connection_module, "_receive_whole", recorder)
    else:
        recorder, taken = OneRecorder(), py_taken
        recorder.install(monkeypatch)
    with use_memory(monkeypatch) as memory:
        actual = run(memory, reads, mode, max_message_size=limit)
    assert actual == expected
    # Each read has its own data_received call, until a failure stops reading.
    if expected[1] == 1000:
        assert recorder.results == taken
    else:
        assert recorder.results
        assert recorder.results == taken[: len(recorder.results)]


@pytest.mark.parametrize("path", ["c", "python"])
def test_a_clean_script_delivers_what_it_should(
    monkeypatch: pytest.MonkeyPatch, memory: MemoryOpener, path: str
) -> None:
    """Not only the same every way: right (the differential test's anchor)."""
    if path == "c" and _real is None:  # pragma: no cover - depends on the build
        pytest.skip("the C speedups are not in use")
    recorder: Recorder | OneRecorder
    if path == "c":
        recorder = Recorder()
        monkeypatch.setattr(connection_module, "_receive_whole", recorder)
    else:
        recorder = OneRecorder()
        recorder.install(monkeypatch)
    reads = SCRIPTS["text and binary in one read"][0] + SCRIPTS["reads in a row"][0]
    got, code, error = run(memory, reads, "callbacks")
    assert got == ["one", b"\x00\xfftwo", "é€😀", "a", b"b", "€"]
    assert (code, error) == (1000, "NoneType")
    assert recorder.results == ([True] * 4 if path == "c" else [False, True, True, True])


@pytest.mark.parametrize(
    ("name", "code", "error"),
    [
        ("invalid UTF-8 (1007)", 1007, "ProtocolError"),
        ("too large (1009)", 1009, "MessageTooBig"),
        ("a masked frame after a message (1002)", 1002, "ProtocolError"),
    ],
)
def test_a_bad_read_fails_the_connection_with_its_code(
    monkeypatch: pytest.MonkeyPatch, memory: MemoryOpener, name: str, code: int, error: str
) -> None:
    if _real is None:  # (the Python fast path, then)
        OneRecorder().install(monkeypatch)
    got, actual_code, actual_error = run(memory, SCRIPTS[name][0], "callbacks")
    assert got == ["ok"]
    assert actual_code == code
    assert issubclass(getattr(blockws, actual_error), getattr(blockws, error))


@needs_c
def test_what_the_call_sets_as_data_received_does(memory: MemoryOpener) -> None:
    """The engine's state after a taken read: the clock, the send queue's
    reply flag, the protocol's per-read fields and the delivery's count."""
    ws, transport = opened(memory, on_message=lambda ws, message: None)
    engine = ws._engine  # noqa: SLF001 - the engine under test
    proto = engine._proto  # noqa: SLF001
    queued = engine.delivery.queued
    engine.queue.direct_ok = False
    proto.other_events, proto.more, proto._inflated = 7, True, 9  # noqa: SLF001
    proto.binary_as_bytes = True
    assert _real(engine, text(b"abc") + binary(b"de"), lambda: 12345.0) is True
    assert engine.last_received == 12345.0
    assert engine.queue.direct_ok is True
    assert (proto.other_events, proto.more, proto._inflated) == (0, False, 0)  # noqa: SLF001
    assert proto.binary_as_bytes is True  # no on_binary: binary messages come as bytes
    assert engine.delivery.queued == queued + 5
    assert engine.dispatcher.pending  # posted, for update()
    got: list[Any] = []
    ws.on_message = lambda ws, message: got.append(message)
    ws.on_binary = lambda ws, segment: got.append(bytes(segment))
    ws.update()
    assert got == ["abc", b"de"]
    assert engine.delivery.queued == queued
    assert _real(engine, text(b"f"), lambda: 1.0) is True
    assert proto.binary_as_bytes is False  # on_binary now set
    close_cleanly(ws, transport)


@needs_c
def test_an_exception_from_the_clock_changes_nothing(memory: MemoryOpener) -> None:
    """The first Python call fails: nothing is parsed, and the read still
    goes through data_received afterwards."""
    got: list[str] = []
    ws, transport = opened(memory, on_message=lambda ws, message: got.append(message))
    engine = ws._engine  # noqa: SLF001

    def broken() -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _real(engine, text(b"kept"), broken)
    assert not engine.dispatcher.pending
    engine.data_received(text(b"kept"))
    ws.update()
    assert got == ["kept"]
    close_cleanly(ws, transport)


class _FailingLock:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def acquire(self) -> bool:
        raise self.exc

    def release(self) -> None:  # pragma: no cover - never acquired
        raise AssertionError


@needs_c
def test_an_interrupt_in_the_locks_wait_parses_nothing(memory: MemoryOpener) -> None:
    """proto_lock's acquire raising (Ctrl-C while another thread holds it):
    the exception propagates and the read is not parsed."""
    ws, transport = opened(memory, on_message=lambda ws, message: None)
    engine = ws._engine  # noqa: SLF001
    lock = engine.proto_lock
    engine.proto_lock = _FailingLock(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            _real(engine, text(b"x"), time.monotonic)
    finally:
        engine.proto_lock = lock
    assert not engine.dispatcher.pending
    assert engine._proto._buf == b""  # noqa: SLF001
    close_cleanly(ws, transport)


@needs_c
def test_declined_without_a_change_when_the_protocol_holds_a_partial_frame(
    memory: MemoryOpener,
) -> None:
    ws, transport = opened(memory, on_message=lambda ws, message: None)
    engine = ws._engine  # noqa: SLF001
    engine.data_received(text(b"held")[:2])  # a header without its payload
    proto = engine._proto  # noqa: SLF001

    def snapshot() -> tuple[Any, ...]:
        return (proto._buf, proto._phase, len(engine.dispatcher.pending))  # noqa: SLF001

    before = snapshot()
    assert _real(engine, text(b"y"), time.monotonic) is False
    assert snapshot() == before
    close_cleanly(ws, transport)


@needs_c
@pytest.mark.parametrize("data", [bytearray(b"\x81\x01a"), memoryview(b"\x81\x01a"), 3, b""])
def test_declined_for_what_is_not_a_bytes_read(memory: MemoryOpener, data: Any) -> None:
    ws, transport = opened(memory)
    engine = ws._engine  # noqa: SLF001
    assert _real(engine, data, time.monotonic) is False
    assert not engine.dispatcher.pending
    close_cleanly(ws, transport)


@needs_c
def test_declined_for_a_stand_in_without_the_slots() -> None:
    class StandIn:
        pass

    assert _real(StandIn(), text(b"x"), time.monotonic) is False
    with pytest.raises(TypeError):
        _real(StandIn(), text(b"x"))  # type: ignore[call-arg]


def test_a_subclass_is_taken_and_the_class_still_is(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder, memory: MemoryOpener
) -> None:
    """The slots' offsets are found per class: a subclass (seen first in a
    process that runs this test alone) does not keep the engine's own class
    from the C call."""

    class Engine(Connection):
        __slots__ = ("extra",)

    monkeypatch.setattr(blockws.websocket, "Connection", Engine)
    sub = run(memory, [text(b"sub")], "callbacks")
    monkeypatch.setattr(blockws.websocket, "Connection", Connection)
    base = run(memory, [text(b"base")], "callbacks")
    assert (sub, base) == ((["sub"], 1000, "NoneType"), (["base"], 1000, "NoneType"))
    assert recorder.results == [True, True]


@pytest.mark.parametrize("path", ["c", "python"])
def test_backpressure_pauses_reading_at_the_limit(
    monkeypatch: pytest.MonkeyPatch, memory: MemoryOpener, path: str
) -> None:
    """The delivery's slow path (at max_queued_bytes) runs from the fast
    path: reading stops until update() drains the queue."""
    recorder: Recorder | OneRecorder
    if path == "c":
        if _real is None:  # pragma: no cover - depends on the build
            pytest.skip("the C speedups are not in use")
        recorder = Recorder()
        monkeypatch.setattr(connection_module, "_receive_whole", recorder)
    else:
        recorder = OneRecorder()
        recorder.install(monkeypatch)
    got: list[str] = []
    ws, transport = opened(
        memory,
        on_message=lambda ws, message: got.append(message),
        max_queued_bytes=100,
        max_message_size=100,
    )
    for i in range(5):
        transport.feed(text(b"%02d" % i + b"x" * 38))
    deadline = time.monotonic() + 5
    while not ws._engine.delivery.paused:  # noqa: SLF001
        assert time.monotonic() < deadline, "reading did not pause"
        time.sleep(0.01)
    # The third read (120 bytes queued: over the limit) waits inside its call.
    assert recorder.results == [True, True]
    assert ws.queued_amount == 120
    while len(got) < 5:
        assert time.monotonic() < deadline
        ws.wait(0.05)
        ws.update()
    assert [m[:2] for m in got] == ["00", "01", "02", "03", "04"]
    assert recorder.results == [True] * 5
    close_cleanly(ws, transport)


@needs_c
def test_no_reference_leaks_on_any_path(memory: MemoryOpener) -> None:
    """Taken, declined and failing calls leave every object's count as it was,
    and 20,000 taken calls leave no memory behind (tracemalloc)."""
    import sys
    import tracemalloc

    ws, transport = opened(memory, on_message=lambda ws, message: None)
    engine = ws._engine  # noqa: SLF001
    proto, lock = engine._proto, engine.proto_lock  # noqa: SLF001
    data = text(b"count me")
    watched = [data, proto, lock, engine.delivery, engine.dispatcher, ws, engine.queue]

    def counts() -> list[int]:
        return [sys.getrefcount(o) for o in watched]

    def broken() -> float:
        raise RuntimeError

    assert _real(engine, data, time.monotonic) is True
    ws.update()
    before = counts()
    for _ in range(100):
        assert _real(engine, data, time.monotonic) is True
        ws.update()
        assert _real(engine, data + data[:1], time.monotonic) is False  # not whole
        with pytest.raises(RuntimeError):
            _real(engine, data, broken)
        engine.proto_lock = _FailingLock(RuntimeError())
        with pytest.raises(RuntimeError):
            _real(engine, data, time.monotonic)
        engine.proto_lock = lock
        assert _real(engine, text(b"\xff"), time.monotonic) is False  # invalid UTF-8
    assert counts() == before
    tracemalloc.start()
    try:
        for _ in range(1000):
            _real(engine, data, time.monotonic)
            ws.update()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            _real(engine, data, time.monotonic)
            ws.update()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 16_384, grown
    close_cleanly(ws, transport)


@needs_c
def test_straight_to_the_inbox_only_when_data_received_would(memory: MemoryOpener) -> None:
    """A thread in receive() (``_to_inbox``), nothing queued or running, no
    handler: the messages go to the inbox, and the waiter is nudged; else
    through the dispatcher."""
    ws, transport = opened(memory)
    engine = ws._engine  # noqa: SLF001
    nudged: list[int] = []
    engine._nudge = lambda: nudged.append(1)  # noqa: SLF001
    engine._to_inbox = True  # noqa: SLF001
    try:
        assert _real(engine, text(b"in") + binary(b"box"), time.monotonic) is True
        assert list(engine.delivery.inbox) == ["in", b"box"]
        assert not engine.dispatcher.pending and nudged == [1]
        ws.on_message = lambda ws, message: None  # a handler: through the dispatcher
        assert _real(engine, text(b"cb"), time.monotonic) is True
        assert len(engine.dispatcher.pending) == 1 and nudged == [1]
        ws.on_message = None
        assert _real(engine, text(b"behind"), time.monotonic) is True  # queued before it
        assert len(engine.dispatcher.pending) == 2 and nudged == [1]
    finally:
        engine._to_inbox = False  # noqa: SLF001
    assert [ws.receive(1) for _ in range(4)] == ["in", b"box", "cb", "behind"]
    close_cleanly(ws, transport)


def fresh_protocol(limit: int | None = 1024) -> WSProtocol:
    proto = WSProtocol(Role.CLIENT, max_message_size=limit)
    proto.compact_messages = True
    return proto


def state(proto: WSProtocol) -> list[Any]:
    """The protocol's slots: values compared as values, other objects (the
    pieces of a message, bound methods) by their class."""
    plain = (int, bytes, str, list, tuple, type(None))
    values = [getattr(proto, name, None) for name in WSProtocol.__slots__]
    return [v if isinstance(v, plain) else type(v).__name__ for v in values]


#: Frames receive_one is tried on: every first byte here, length byte, body
#: length against it, body content and message size limit.
FIRSTS = [0x81, 0x82, 0x01, 0x02, 0x80, 0x88, 0x89, 0xC1, 0x91, 0x83]
LENGTHS = [0, 1, 64, 65, 125, 126, 127, 128, 255]
BODIES = [b"plain", "é€😀".encode(), b"\xff\xfe", "é".encode()[:1]]


def test_receive_one_agrees_with_receive_data_or_changes_nothing() -> None:
    """WSProtocol.receive_one gives receive_data's one message and leaves the
    protocol as receive_data does, or returns None and changes nothing; it
    takes exactly the reads of one whole small valid text or binary frame
    (4,320 frames, in one test: a test each cost a minute of CI's run)."""
    tried = taken = 0
    for limit, first, length, extra, payload in itertools.product(
        [None, 1024, 64, 0], FIRSTS, LENGTHS, [-1, 0, 1], BODIES
    ):
        case = (limit, hex(first), length, extra, payload)
        body = (payload * (length // len(payload) + 1))[: max(length + extra, 0)]
        data = bytes([first, length]) + body
        proto, reference = fresh_protocol(limit), fresh_protocol(limit)
        before = state(proto)
        message = proto.receive_one(data)
        try:
            body.decode()
            valid = True
        except UnicodeDecodeError:
            valid = False
        takes = (
            first in (0x81, 0x82)
            and len(body) == length <= 125
            and (limit is None or length <= limit)
            and (first == 0x82 or valid)
        )
        assert (message is not None) == takes, case
        if message is None:
            assert state(proto) == before, case
        else:
            assert reference.receive_data(data) == [message], case
            assert state(proto) == state(reference), case
            taken += 1
        tried += 1
    assert (tried, taken) == (4320, 116)


def test_receive_one_only_between_messages() -> None:
    """Inside a fragmented message, or with a partial frame held: None."""
    proto = fresh_protocol()
    assert proto.receive_data(server_frame(Opcode.TEXT, b"fr", fin=False)) == []
    assert proto.receive_one(text(b"x")) is None
    assert proto.receive_data(server_frame(0, b"ag")) == ["frag"]
    assert proto.receive_one(text(b"x")) == "x"
    assert proto.receive_data(text(b"held")[:3]) == []
    assert proto.receive_one(text(b"x")) is None
    masked = WSProtocol(Role.SERVER)  # a server's protocol expects masked frames
    masked.compact_messages = True
    assert masked.receive_one(text(b"x")) is None
    plain = WSProtocol(Role.CLIENT)  # not compact: messages as event objects
    assert plain.receive_one(text(b"x")) is None


def test_neither_fast_path_takes_a_read_of_a_socket_that_inflates(memory: MemoryOpener) -> None:
    """Compressed reads are parsed in installments (see data_received)."""
    ws, transport = opened(memory)
    engine = ws._engine  # noqa: SLF001
    engine._inflate_limit = 1 << 20  # noqa: SLF001 - as with permessage-deflate accepted
    try:
        if _real is not None:
            assert _real(engine, text(b"x"), time.monotonic) is False
        assert engine._receive_one(text(b"x")) is False  # noqa: SLF001
        assert not engine.dispatcher.pending
    finally:
        engine._inflate_limit = None  # noqa: SLF001
    assert engine._receive_one(text(b"x")) is True  # noqa: SLF001
    assert ws.receive(1) == "x"
    close_cleanly(ws, transport)
