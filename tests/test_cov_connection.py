"""blockws.connection: the engine paths the other test files leave out.

Most run over the memory transport (tests/memory.py, no sockets); the ones
about the socket itself run against blockws's embedded echo server.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import pytest
from memory import MEMORY_URL, MemoryOpener, MemoryTransport, opened, server_frame, use_memory

import blockws
import blockws.connection
from blockws.connection import queue_limit
from blockws.frames import Frame, Opcode, pack_close, parse_close
from blockws.opening import Opened
from blockws.options import Options
from blockws.reconnect import Reconnect
from blockws.server import EchoServer

URL = MEMORY_URL




def pump_until(test: Any, timeout: float = 5.0) -> None:
    """Wait for a state change that has no event of its own."""
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


# -- over a real socket ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_abort_reports_the_same_error_every_time() -> None:
    """``ws.abort()`` on an open socket: its connector, still holding the socket,
    shut it down and closed it under the reader thread, whose read then failed, in
    about one abort out of fifty, with "connection lost: Bad file descriptor" in
    place of the usual "connection closed without a close frame". The transport
    alone ends the socket now (and closes it once the reader is done)."""
    errors: collections.Counter[str] = collections.Counter()
    with EchoServer() as server:
        for _ in range(1000):
            ws = blockws.connect(server.url, timeout=10)
            ws.abort()
            assert ws.join(5)
            ws.update()
            assert ws.close_code == 1006
            errors[repr(ws.error)] += 1
    assert errors == {
        "ConnectionLost('connection closed without a close frame')": 1000
    }, errors


# -- over memory transports ------------------------------------------------------------------


class Events:
    """Every callback in the order it ran."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_open": lambda ws: self.log.append(("open",)),
            "on_message": lambda ws, text: self.log.append(("text", text)),
            "on_reconnecting": lambda ws, attempt, delay: self.log.append(
                ("reconnecting", attempt)
            ),
            "on_closed": lambda ws, code, reason: self.log.append(("closed", code, reason)),
        }

    def count(self, kind: str) -> int:
        return sum(1 for e in self.log if e[0] == kind)

    def pump(self, ws: blockws.WebSocket, test: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline, f"condition not reached: {self.log}"
            ws.wait(0.05)
            ws.update()


def closes(frames: list[Frame]) -> list[tuple[int, str]]:
    return [parse_close(f.payload) for f in frames if f.opcode == Opcode.CLOSE]


@pytest.mark.unit
def test_max_queued_bytes_none_means_no_limit() -> None:
    assert queue_limit(Options.build(max_queued_bytes=None)) is None
    # A limit is at least one whole message.
    assert queue_limit(Options.build(max_queued_bytes=10, max_message_size=1000)) == 1000
    assert queue_limit(Options.build(max_queued_bytes=5000, max_message_size=None)) == 5000


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_without_a_queue_limit_the_reader_never_pauses(memory: MemoryOpener) -> None:
    """With ``max_queued_bytes=None`` every message is read and queued, however many
    wait for update(); the socket's end is read too."""
    events = Events()
    ws = blockws.WebSocket(URL, extensions=[], max_queued_bytes=None, max_message_size=1000,
                           **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = memory.transports[-1]
    flood = server_frame(Opcode.TEXT, b"x" * 900) * 200  # 180 kB, far over one message
    transport.feed(flood)
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000, "done")))
    transport.feed_eof()
    assert ws.join(5)  # read to the end without update()
    ws.update()
    assert events.count("text") == 200 and events.log[-1] == ("closed", 1000, "done")


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_flood_with_the_close_in_the_same_read_closes_without_update(
    memory: MemoryOpener,
) -> None:
    """Past the queue limit the reader waits for update(), unless the socket is
    closing: the server's close in the same read is answered and the socket ends
    without anyone calling update()."""
    events = Events()
    ws = blockws.WebSocket(URL, extensions=[], max_queued_bytes=1000, max_message_size=1000,
                           **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = memory.transports[-1]
    transport.feed(server_frame(Opcode.TEXT, b"x" * 900) * 3
                   + server_frame(Opcode.CLOSE, pack_close(1001, "bye")))
    transport.wait_for(lambda fs: closes(fs) == [(1001, "")])  # our reply echoes the code
    transport.feed_eof()
    assert ws.join(5)
    ws.update()
    assert events.count("text") == 3 and events.log[-1] == ("closed", 1001, "bye")
    assert ws.error is None


class WithholdingTransport(MemoryTransport):
    """Takes the pause on itself, as an HTTP/2 stream does (it withholds credit)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> bool:
        self.paused += 1
        return True

    def resume_reading(self) -> None:
        self.resumed += 1


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_stream_that_ended_while_paused_is_not_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream withheld its credit (queue past the limit) and then ended: update()
    delivers every message and on_closed, and the ended stream is never resumed."""
    opener = MemoryOpener(WithholdingTransport)
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    events = Events()
    ws = blockws.WebSocket(URL, extensions=[], max_queued_bytes=1000, max_message_size=1000,
                           **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = opener.transports[-1]
    assert isinstance(transport, WithholdingTransport)
    transport.feed(server_frame(Opcode.TEXT, b"x" * 900) * 4)
    transport.feed_eof()  # the stream ends before update() drained the queue
    assert ws.join(5)
    assert transport.paused >= 1
    ws.update()
    assert events.count("text") == 4 and events.log[-1] == ("closed", 1006, "")
    assert transport.resumed == 0


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_fragment_size_set_before_open_applies_once_open(memory: MemoryOpener) -> None:
    ws = blockws.WebSocket(URL, extensions=[])
    ws.max_fragment_size = 10
    ws.open()
    assert ws.wait(5)
    ws.update()
    ws.send("x" * 25)
    frames = memory.transports[-1].wait_for(lambda fs: len(fs) == 3)
    assert [len(f.payload) for f in frames] == [10, 10, 5]
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CONT, Opcode.CONT]
    ws.abort()
    assert ws.join(5)


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_send_pings_takes_a_bool_and_may_be_set_before_open(memory: MemoryOpener) -> None:
    # (open_timeout=None: no open timer to cancel once open)
    ws = blockws.WebSocket(URL, extensions=[], ping_frequency=0.1, close_after_no_message=5.0,
                           open_timeout=None)
    with pytest.raises(TypeError, match="^send_pings must be a bool, not int$"):
        ws.send_pings = 1  # type: ignore[assignment]
    assert ws.send_pings is False
    ws.send_pings = True  # before open(): the keepalive starts with the socket
    ws.open()
    assert ws.wait(5)
    ws.update()
    memory.transports[-1].wait_for(lambda fs: any(f.opcode == Opcode.PING for f in fs))
    ws.abort()
    assert ws.join(5)
    ws.send_pings = False  # after the end: accepted, nothing to stop
    assert ws.send_pings is False


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_replies_before_a_failure_go_out_and_its_close_waits_for_update(
    memory: MemoryOpener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read: a message, a ping, then a bad frame. The pong goes out at once; the
    failing close (1002) waits until update() has run the message's callback, so
    what it sends goes first."""
    # No release by the grace timer (0.5 s, a slow machine's stall): by update() only.
    monkeypatch.setattr(blockws.connection, "FAILURE_GRACE", 30.0)
    ws, transport = opened(memory, on_message=lambda ws, text: ws.send("echo " + text))
    transport.feed(server_frame(Opcode.TEXT, b"hi") + server_frame(Opcode.PING, b"p")
                   + server_frame(0x3))
    transport.wait_for(lambda fs: any(f.opcode == Opcode.PONG for f in fs))
    assert ws.wait(5)  # the message's callback is pending (it may lag the pong)
    assert closes(transport.frames()) == []  # held back: the message is not delivered yet
    ws.update()
    frames = transport.wait_for(lambda fs: bool(closes(fs)))
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.PONG, b"p"), (Opcode.TEXT, b"echo hi"), (Opcode.CLOSE, pack_close(1002, ""))
    ]
    transport.feed_eof()
    assert ws.join(5)


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_failure_with_nothing_to_deliver_answers_the_ping_then_closes_at_once(
    memory: MemoryOpener,
) -> None:
    ws, transport = opened(memory)
    transport.feed(server_frame(Opcode.PING, b"p") + server_frame(0x3))
    frames = transport.wait_for(lambda fs: bool(closes(fs)))  # no update() needed
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.PONG, b"p"), (Opcode.CLOSE, pack_close(1002, ""))
    ]
    # Closing, with the failure as the error: send() says why it refuses.
    with pytest.raises(blockws.ConnectionClosedError, match="^the socket is closing: ") as info:
        ws.send("late")
    assert info.value.code is None and info.value.cause is ws.error
    assert isinstance(ws.error, blockws.ProtocolError)
    transport.feed_eof()
    assert ws.join(5)
    ws.update()
    assert ws.close_code == 1002


class ErrorAtWrite(MemoryTransport):
    """Records, for each write, the socket's ``error`` at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.ws: blockws.WebSocket | None = None
        self.errors_at_write: list[tuple[bytes, BaseException | None]] = []

    def write(self, chunks: Any) -> None:
        data = b"".join(bytes(c) for c in chunks)
        self.errors_at_write.append((data, self.ws.error if self.ws is not None else None))
        super().write([data])


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_failing_close_frame_is_written_only_once_the_error_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A send() racing the failure saw the socket closing with no error
    # (ConnectionClosedOK): the close frame could be written before the reader
    # recorded the error. The slower the reader is to get there, the surer the
    # race; the error must be set under the lock that queues the frame.
    original = blockws.connection.Connection._set_error

    def slow_set_error(self: Any, exc: BaseException, closing: bool = True) -> None:
        time.sleep(0.2)
        original(self, exc, closing)

    monkeypatch.setattr(blockws.connection.Connection, "_set_error", slow_set_error)
    with use_memory(monkeypatch) as memory:
        memory.factory = ErrorAtWrite
        ws, transport = opened(memory)
        assert isinstance(transport, ErrorAtWrite)
        transport.ws = ws
        transport.feed(server_frame(0x3))
        transport.wait_for(lambda fs: bool(closes(fs)))
        closing = [err for data, err in transport.errors_at_write if data[:1] == b"\x88"]
        assert len(closing) == 1 and isinstance(closing[0], blockws.ProtocolError)
        with pytest.raises(blockws.ConnectionClosedError, match="^the socket is closing: "):
            ws.send("late")
        transport.feed_eof()
        assert ws.join(5)
        ws.update()
        assert ws.close_code == 1002


class UninterruptibleOpener:
    """An opening that close() cannot cut short (a resolver or handshake that ignores
    the abort): it waits for ``go``, then registers its transport and succeeds."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.go = threading.Event()
        self.transports: list[MemoryTransport] = []

    def __call__(self, request: Any, options: Any, connector: Any, register: Any,
                 *rest: Any) -> Opened:
        self.arrived.set()
        assert self.go.wait(10)
        transport = MemoryTransport()
        self.transports.append(transport)
        register(transport)
        return Opened(transport, None, [])


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_close_during_an_opening_that_ignores_it_wins_over_the_open_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() while the opening cannot be interrupted: the open timeout that falls
    due meanwhile records nothing (the socket is closing, not timing out); the
    transport the opening registers afterwards is aborted at once, the opening's
    success is thrown away, and on_closed reports the close, without an error."""
    opener = UninterruptibleOpener()
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    events = Events()
    ws = blockws.WebSocket(URL, extensions=[], open_timeout=0.1, **events.callbacks())
    ws.open()
    assert opener.arrived.wait(5)
    ws.close()
    assert not ws.join(0.3)  # past the open timeout: still ending (the opening waits)
    opener.go.set()
    assert ws.join(5)
    ws.update()
    assert events.log == [("closed", 1006, "")]
    assert ws.error is None
    (transport,) = opener.transports
    assert transport.aborted and transport.written() == b""


class FailingWrites(MemoryTransport):
    """Its writes fail once ``hung_up`` is set (a peer that went away)."""

    def __init__(self) -> None:
        super().__init__()
        self.hung_up = False

    def write(self, chunks: Any) -> None:
        if self.hung_up:
            raise blockws.ConnectionLost("connection lost: Broken pipe")
        super().write(chunks)


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_failed_close_reply_after_the_server_s_close_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opener = MemoryOpener(FailingWrites)
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    events = Events()
    ws, transport = opened(opener, **events.callbacks())
    assert isinstance(transport, FailingWrites)
    transport.hung_up = True  # the server closes and hangs up at once
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000, "bye")))
    assert ws.join(5)  # the failed write aborted the transport: the reader saw the end
    ws.update()
    assert events.log[-1] == ("closed", 1000, "bye") and ws.error is None


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_close_while_a_failing_close_is_held_back_sends_the_failure_s_close(
    memory: MemoryOpener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A protocol error holds its close (1002) back until update() has delivered the
    messages before it; close() meanwhile sends that close, once, not a 1000."""
    monkeypatch.setattr(blockws.connection, "FAILURE_GRACE", 30.0)  # still held at close()
    ws, transport = opened(memory)
    transport.feed(server_frame(Opcode.TEXT, b"before") + server_frame(0x3))
    pump_until(lambda: isinstance(ws.error, blockws.ProtocolError))
    ws.close(1000, "done")
    frames = transport.wait_for(lambda fs: bool(closes(fs)))
    assert closes(frames) == [(1002, "")]
    transport.feed_eof()
    assert ws.join(5)
    ws.update()
    assert closes(transport.frames()) == [(1002, "")] and ws.close_code == 1002


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_without_a_close_timeout_close_waits_for_the_server(memory: MemoryOpener) -> None:
    events = Events()
    ws, transport = opened(memory, close_timeout=None, **events.callbacks())
    ws.close()
    transport.wait_for(lambda fs: closes(fs) == [(1000, "")])
    assert not ws.join(0.3)  # no close timer: the handshake is still waiting
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000)))
    transport.feed_eof()
    assert ws.join(5)
    ws.update()
    assert events.log[-1] == ("closed", 1000, "") and ws.error is None


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_abort_during_the_backoff_ends_the_socket_at_once(memory: MemoryOpener) -> None:
    events = Events()
    ws, transport = opened(memory, reconnect=Reconnect(min_delay=30, max_delay=30),
                           **events.callbacks())
    transport.feed_eof()
    events.pump(ws, lambda: events.count("reconnecting") == 1)
    ws.abort()
    assert ws.join(5)
    ws.update()
    assert events.log[-1] == ("closed", 1006, "") and ws.error is None
    assert len(memory.transports) == 1  # no second attempt


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_close_while_the_lost_link_s_writer_is_stuck_ends_without_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection is lost while its writer is stuck in a write that even the
    abort does not end (a shared connection whose peer stopped reading): the
    teardown waits for that writer a while before it announces the retry. close()
    in that while ends the socket: no on_reconnecting, no attempt. join() is False
    until the stuck writer has gone."""
    with use_memory(monkeypatch, block_writes=True, stuck_writes=True) as opener:
        events = Events()
        ws, transport = opened(opener, reconnect=Reconnect(min_delay=0.01, max_delay=0.01),
                               **events.callbacks())
        ws.send("stuck")
        assert transport.write_started.wait(5)
        transport.feed_eof()
        deadline = time.monotonic() + 5
        while "reconnecting" not in repr(ws):  # the teardown has begun
            assert time.monotonic() < deadline
            time.sleep(0.002)
        ws.close()
        assert not ws.join(0.2)  # ended, but its writer is still stuck (until unblocked)
        transport.unblock_writes()
        assert ws.join(5)
        ws.update()
    assert events.log == [("open",), ("closed", 1006, "")] and ws.error is None
    assert len(opener.transports) == 1


class LateFailure(MemoryTransport):
    """Its first write blocks until unblocked (abort does not end it), then fails."""

    def __init__(self) -> None:
        super().__init__(block_writes=True, stuck_writes=True)
        self.writer: threading.Thread | None = None

    def write(self, chunks: Any) -> None:
        self.writer = threading.current_thread()
        super().write(chunks)
        raise blockws.ConnectionLost("connection lost: Broken pipe")


@pytest.mark.unit
@pytest.mark.timeout(20)
def test_a_write_of_the_lost_link_failing_late_leaves_the_new_link_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[MemoryTransport] = []

    def factory() -> MemoryTransport:
        made.append(LateFailure() if not made else MemoryTransport())
        return made[-1]

    opener = MemoryOpener(factory)
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    # The teardown waits this long for the stuck writer before the retry: the
    # order of events is the same with a shorter wait, and the test is faster.
    monkeypatch.setattr(blockws.connection, "WRITER_JOIN", 0.1)
    events = Events()
    ws, first = opened(opener, reconnect=Reconnect(min_delay=0.01, max_delay=0.01, jitter=0),
                       **events.callbacks())
    assert isinstance(first, LateFailure)
    ws.send("stuck")
    assert first.write_started.wait(5)
    first.feed_eof()  # the connection is lost; its writer stays stuck
    events.pump(ws, lambda: events.count("open") == 2)
    first.unblock_writes()  # the old write ends now, with a failure
    assert first.writer is not None
    first.writer.join(5)
    assert not first.writer.is_alive()
    ws.update()
    assert ws.is_open and ws.error is None
    ws.send("after")
    second = made[1]
    frames = second.wait_for(lambda fs: len(fs) == 1)
    assert frames[0].payload == b"after" and not second.aborted
    ws.abort()
    assert ws.join(5)
