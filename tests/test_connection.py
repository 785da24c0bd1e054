"""The connection engine over a memory transport: lifecycle, close, failure order,
keepalive, timeouts and the blocking helpers' rules, without sockets."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from memory import MEMORY_URL, MemoryOpener, opened, server_frame, use_memory

import blockws
from blockws.connection import TRANSITIONS, Phase
from blockws.frames import Opcode, pack_close

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

URL = MEMORY_URL
#: What the client writes when it echoes "hi" and then fails the connection.
ECHO_THEN_1002 = [(Opcode.TEXT, b"hi"), (Opcode.CLOSE, pack_close(1002, ""))]




def pump_until(ws: blockws.WebSocket, test: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, "condition not reached"
        ws.wait(0.05)
        ws.update()


# -- the lifecycle -----------------------------------------------------------------


def test_transition_table_reaches_closed_from_every_phase() -> None:
    for phase in Phase:
        seen = {phase}
        todo = [phase]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert Phase.CLOSED in seen
    assert TRANSITIONS[Phase.CLOSED] == frozenset()


def test_open_messages_and_clean_close(memory: MemoryOpener) -> None:
    events: list[Any] = []
    ws, transport = opened(
        memory,
        on_message=lambda ws, text: events.append(text),
        on_binary=lambda ws, seg: events.append(bytes(seg)),
        on_closed=lambda ws, code, reason: events.append((code, reason)),
    )
    assert ws.http_version == "1.1"
    transport.feed(server_frame(Opcode.TEXT, b"hello") + server_frame(Opcode.BINARY, b"\x00\x01"))
    pump_until(ws, lambda: len(events) == 2)
    assert events == ["hello", b"\x00\x01"]
    ws.close(1000, "bye")
    frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    assert frames[-1].payload == pack_close(1000, "bye")
    assert not ws.is_open and not ws.closed
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000, "ok")))
    transport.feed_eof()  # over TCP the server ends the connection
    assert ws.join(5)
    assert transport.finished_closing == 1  # told once that both closes are through
    assert ws.update() == 1
    assert events[-1] == (1000, "ok")
    assert ws.error is None


def test_closed_state_agrees_everywhere_after_join(memory: MemoryOpener) -> None:
    """Bug: after close(); join(5) returned True, ws.closed was still False."""
    closed_calls: list[int] = []
    ws, transport = opened(memory, on_closed=lambda ws, code, reason: closed_calls.append(code))
    ws.close()
    transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000)))
    transport.feed_eof()
    assert ws.join(5) is True
    assert ws.closed is True
    assert ws.is_open is False
    assert "closed" in repr(ws)
    assert ws.close_code == 1000
    assert closed_calls == []  # queued: it runs in update()
    ws.update()
    assert closed_calls == [1000]
    assert ws.closed and "closed" in repr(ws) and ws.join(0)


def test_close_before_open_is_closed_at_once() -> None:
    ws = blockws.WebSocket(URL)
    ws.close()
    assert ws.closed and ws.join(0) and "closed" in repr(ws)
    with pytest.raises(blockws.InvalidState):
        ws.open()


def test_eof_without_close_is_1006(memory: MemoryOpener) -> None:
    codes: list[int] = []
    ws, transport = opened(memory, on_closed=lambda ws, code, reason: codes.append(code))
    transport.feed_eof()
    assert ws.join(5)
    ws.update()
    assert codes == [1006]
    assert isinstance(ws.error, blockws.ConnectionLost)
    with pytest.raises(blockws.ConnectionClosedError):
        ws.send("late")


def test_server_close_is_answered_and_queued_messages_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with use_memory(monkeypatch, block_writes=True) as memory:
        ws, transport = opened(memory)
        ws.send("in flight")  # the writer takes it and blocks writing it
        assert transport.write_started.wait(5)
        ws.send("never sent")  # queued behind it
        transport.feed(server_frame(Opcode.CLOSE, pack_close(1001, "going")))
        pump_until(ws, lambda: not ws.is_open)
        transport.unblock_writes()
        frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.TEXT, b"in flight"),
        (Opcode.CLOSE, pack_close(1001)),
    ]
    assert transport.finished_closing == 1
    transport.feed_eof()
    assert ws.join(5)
    assert (ws.close_code, ws.close_reason, ws.error) == (1001, "going", None)


# -- the failure policy --------------------------------------------------------------


@pytest.mark.parametrize("block_writes", [False, True])
def test_reply_to_the_message_before_a_protocol_error_goes_out_first(
    monkeypatch: pytest.MonkeyPatch, block_writes: bool
) -> None:
    """Bug 8: a text message, then a reserved opcode (Autobahn 4.2.5). The echo
    sent from on_message must precede the failing close 1002, whether the
    writer is free (a direct write) or busy (the echo is queued)."""
    with use_memory(monkeypatch, block_writes=block_writes) as memory:
        ws, transport = opened(memory, on_message=lambda ws, text: ws.send(text))
        transport.feed(server_frame(Opcode.TEXT, b"hi") + server_frame(0xB, b""))
        pump_until(ws, lambda: not ws.is_open)
        transport.unblock_writes()
        frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    assert [(f.opcode, f.payload) for f in frames] == ECHO_THEN_1002
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1002)))
    transport.feed_eof()
    assert ws.join(5)
    assert ws.close_code == 1002
    assert isinstance(ws.error, blockws.ProtocolError)


@pytest.mark.parametrize("split", [False, True])
def test_reply_to_a_received_message_before_a_protocol_error_goes_out_first(
    memory: MemoryOpener, split: bool
) -> None:
    """Bug 8 with receive(): the app answers after receive() returns, so the
    failing close waits until it comes back for more (or for the grace).
    ``split``: the message came in an earlier read and waits in receive()'s
    inbox (where update() puts it, and the reader too while a thread is in
    receive()), and the bad frame comes in a read of its own; the close waits
    all the same (CI caught this over nghttpx, test_http2_closing)."""
    ws, transport = opened(memory)
    if split:
        transport.feed(server_frame(Opcode.TEXT, b"hi"))
        pump_until(ws, lambda: bool(ws._engine.delivery.inbox))  # update() put it there
        transport.feed(server_frame(0xB, b""))
        pump_until(ws, lambda: ws.error is not None)
        assert ws.is_open  # failing, but its close is held back
    else:
        transport.feed(server_frame(Opcode.TEXT, b"hi") + server_frame(0xB, b""))
    message = ws.receive(5)
    assert message == "hi"
    ws.send(message)  # still allowed: the close has not gone out yet
    with pytest.raises(TimeoutError):
        ws.receive(0.05)  # back for more: the close goes out now, behind the echo
    frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    assert [(f.opcode, f.payload) for f in frames] == ECHO_THEN_1002
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1002)))
    transport.feed_eof()
    with pytest.raises(blockws.ConnectionClosedError):
        ws.receive(5)
    assert isinstance(ws.error, blockws.ProtocolError)


def test_messages_queued_before_a_failure_are_sent_before_its_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message the app queued (writer busy) before a bad frame arrives is not dropped."""
    with use_memory(monkeypatch, block_writes=True) as memory:
        ws, transport = opened(memory)
        ws.send("queued")
        transport.feed(server_frame(0x3, b""))  # reserved data opcode: fails at once
        pump_until(ws, lambda: not ws.is_open)
        transport.unblock_writes()
        frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CLOSE]
    assert frames[0].payload == b"queued"


def test_failing_close_goes_out_without_update_after_the_grace(
    memory: MemoryOpener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockws.connection, "FAILURE_GRACE", 0.05)
    ws, transport = opened(memory)
    transport.feed(server_frame(Opcode.TEXT, b"a") + server_frame(0xB, b""))
    frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs), 3)
    assert frames[-1].payload == pack_close(1002, "")


# -- keepalive ------------------------------------------------------------------------


def test_manual_ping_sets_latency(memory: MemoryOpener) -> None:
    """Bug 6: ws.ping() never set latency."""
    ws, transport = opened(memory)
    assert ws.latency is None
    ws.ping(b"abc")
    transport.wait_for(lambda fs: any(f.opcode == Opcode.PING for f in fs))
    transport.feed(server_frame(Opcode.PONG, b"abc"))
    pump_until(ws, lambda: ws.latency is not None)
    assert 0 <= ws.latency < 5  # type: ignore[operator]
    ws.ping()  # an empty payload matches its empty pong too
    transport.wait_for(lambda fs: sum(f.opcode == Opcode.PING for f in fs) == 2)
    first = ws.latency
    transport.feed(server_frame(Opcode.PONG, b""))
    pump_until(ws, lambda: ws.latency != first)


def test_pings_and_silence_close_with_1006(memory: MemoryOpener) -> None:
    codes: list[int] = []
    ws, transport = opened(
        memory,
        send_pings=True,
        ping_frequency=0.1,
        close_after_no_message=0.1,
        on_closed=lambda ws, code, reason: codes.append(code),
    )
    frames = transport.wait_for(lambda fs: any(f.opcode == Opcode.PING for f in fs), 2)
    transport.feed(server_frame(Opcode.PONG, frames[0].payload))
    pump_until(ws, lambda: ws.latency is not None)
    assert ws.join(5)  # then silence: no frame after the next ping
    ws.update()
    assert codes == [1006]
    assert isinstance(ws.error, blockws.PingTimeout)


def test_ping_settings_change_while_open(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    ws.ping_frequency = 0.1
    ws.send_pings = True
    transport.wait_for(lambda fs: any(f.opcode == Opcode.PING for f in fs), 2)
    with pytest.raises(ValueError, match="ping_frequency"):
        ws.ping_frequency = 0.01
    ws.send_pings = False
    ws.abort()
    assert ws.join(5)


# -- timeouts ---------------------------------------------------------------------------


def test_close_timeout(memory: MemoryOpener) -> None:
    ws, transport = opened(memory, close_timeout=0.1)
    started = time.monotonic()
    ws.close()
    assert ws.join(5)
    assert time.monotonic() - started < 2
    assert isinstance(ws.error, blockws.CloseTimeout)
    assert ws.close_code == 1006


def test_open_timeout(memory: MemoryOpener) -> None:
    memory.gate = threading.Event()  # the handshake never completes
    ws = blockws.WebSocket(URL, open_timeout=0.1)
    ws.open()
    assert ws.join(5)
    assert isinstance(ws.error, blockws.OpenTimeout)
    ws.update()
    assert ws.closed


def test_close_while_connecting(memory: MemoryOpener) -> None:
    memory.gate = threading.Event()
    codes: list[int] = []
    ws = blockws.WebSocket(URL, on_closed=lambda ws, code, reason: codes.append(code))
    ws.open()
    while not memory.transports:
        time.sleep(0.001)
    ws.close()
    assert ws.join(5)
    ws.update()
    assert codes == [1006]
    assert ws.error is None  # the app's own close is not an error


# -- the blocking helpers --------------------------------------------------------------


@pytest.mark.parametrize("helper", ["receive", "wait", "connect", "blockws.wait"])
def test_blocking_helpers_refuse_to_run_inside_a_callback(
    memory: MemoryOpener, helper: str
) -> None:
    """Bug 1: ws.receive(timeout=1.0) in on_open spun at 100% CPU forever."""
    raised: list[BaseException] = []

    def on_open(ws: blockws.WebSocket) -> None:
        started = time.monotonic()
        try:
            if helper == "receive":
                ws.receive(timeout=1.0)
            elif helper == "wait":
                ws.wait(1.0)
            elif helper == "connect":
                blockws.connect(URL, timeout=1.0)
            else:
                blockws.wait(1.0)
        except blockws.InvalidState as exc:
            raised.append(exc)
        assert time.monotonic() - started < 0.5

    ws = blockws.WebSocket(URL, extensions=[], on_open=on_open)
    ws.open()
    assert ws.wait(5)
    ws.update()
    assert len(raised) == 1
    assert "callback" in str(raised[0])
    assert ws.update() == 0  # a re-entrant update() stays a no-op; outside, nothing pending
    ws.abort()
    assert ws.join(5)


def test_reentrant_update_is_a_noop(memory: MemoryOpener) -> None:
    inner: list[int] = []
    ws, transport = opened(memory, on_message=lambda ws, text: inner.append(ws.update()))
    transport.feed(server_frame(Opcode.TEXT, b"x"))
    pump_until(ws, lambda: inner)
    assert inner == [0]
    ws.abort()


def test_receive_and_iteration(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    transport.feed(server_frame(Opcode.TEXT, b"one") + server_frame(Opcode.BINARY, b"two"))
    assert ws.receive(5) == "one"
    assert ws.receive(5) == b"two"
    with pytest.raises(TimeoutError):
        ws.receive(0.05)
    transport.feed(server_frame(Opcode.TEXT, b"three"))
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1000)))
    transport.feed_eof()
    assert list(ws) == ["three"]  # ends quietly at a clean close
    with pytest.raises(blockws.ConnectionClosedOK):
        ws.receive(0)


def test_iteration_raises_on_an_unclean_close(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    transport.feed(server_frame(Opcode.TEXT, b"a"))
    transport.feed_eof()
    got = []
    with pytest.raises(blockws.ConnectionClosedError):
        for message in ws:
            got.append(message)
    assert got == ["a"]


def test_connect_closes_what_it_made_when_on_open_raises(memory: MemoryOpener) -> None:
    def on_open(ws: blockws.WebSocket) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        blockws.connect(URL, timeout=5, extensions=[], on_open=on_open)
    transport = memory.transports[-1]
    assert transport.aborted and transport.closed


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"ssl_context": "nope"}, TypeError, "ssl_context"),
        ({"headers": "X: y"}, TypeError, "headers"),
        ({"headers": [("X", 1)]}, TypeError, "header"),
        ({"subprotocols": "chat"}, TypeError, "subprotocols"),
        ({"open_timeout": "5"}, TypeError, "open_timeout"),
        ({"open_timeout": -1}, ValueError, "open_timeout"),
        ({"max_message_size": 0}, ValueError, "max_message_size"),
        ({"max_fragment_size": 0}, ValueError, "max_fragment_size"),
        ({"ping_frequency": 0.01}, ValueError, "ping_frequency"),
        ({"send_pings": "yes"}, TypeError, "send_pings"),
        ({"http2": "h2"}, TypeError, "http2"),
        ({"extensions": ["permessage-deflate"]}, TypeError, "extensions"),
        ({"on_message": "print"}, TypeError, "on_message"),
        ({"buffer_pool": 5}, TypeError, "buffer_pool"),
    ],
)
def test_wrong_options_fail_at_construction_naming_the_option(
    options: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        blockws.WebSocket("wss://example.invalid/", **options)


def test_http2_accepts_a_bool() -> None:
    assert blockws.WebSocket("wss://x.invalid/", http2=True).http2 == blockws.HTTP2Settings()
    off = blockws.WebSocket("wss://x.invalid/", http2=False).http2
    assert off == blockws.HTTP2Settings(enabled=False)


def test_options_fixed_after_open(memory: MemoryOpener) -> None:
    ws = blockws.WebSocket(URL, extensions=[])
    ws.max_message_size = 1024
    assert ws.max_message_size == 1024
    with pytest.raises(ValueError, match="max_message_size"):
        ws.max_message_size = -1
    ws.open()
    with pytest.raises(blockws.InvalidState, match="max_message_size"):
        ws.max_message_size = 2048
    ws.max_fragment_size = 100  # allowed while open
    assert ws.max_fragment_size == 100
    ws.abort()
    assert ws.join(5)


def test_send_rejects_what_is_not_text_or_bytes(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    for bad in ({"a": 1}, 5, None, 1.5):
        with pytest.raises(TypeError, match="str or a bytes-like"):
            ws.send(bad)  # type: ignore[arg-type]
    ws.send(bytearray(b"ab"))
    ws.send(memoryview(b"abcdef"), 2, 2)
    frames = transport.wait_for(lambda fs: len(fs) == 2)
    assert [f.payload for f in frames] == [b"ab", b"cd"]
    ws.abort()


def test_public_state_is_documented_properties() -> None:
    for name in (
        "error",
        "protocol",
        "latency",
        "close_code",
        "close_reason",
        "http_version",
        "id",
        "last_message_received",
        "buffered_amount",
        "is_open",
        "closed",
        "max_message_size",
        "extensions",
    ):
        attribute = getattr(blockws.WebSocket, name)
        assert attribute.__doc__, name
    for internal in ("data_received", "connection_lost"):
        assert not hasattr(blockws.WebSocket, internal)


# -- the threading rules (see blockws/connection.py) ------------------------------------


def test_a_stuck_writer_blocks_neither_the_timer_nor_other_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timer jobs only set a flag and abort; nothing joins a stuck writer for long.

    Socket A's writer is stuck in a write that even abort() cannot end (a peer
    that stopped reading a shared connection). A's close timeout must still
    end it on time, update() must not hang on the writer, and socket B's pings
    and its close-after-silence must keep their schedule meanwhile.
    """
    with use_memory(monkeypatch, block_writes=True, stuck_writes=True) as memory:
        a, a_transport = opened(memory, close_timeout=0.15)
    with use_memory(monkeypatch) as memory:
        b, b_transport = opened(
            memory, send_pings=True, ping_frequency=0.1, close_after_no_message=0.15
        )
    try:
        a.send("stuck")  # the writer takes it and never comes back
        assert a_transport.write_started.wait(5)
        started = time.monotonic()
        a.close()
        pings = b_transport.wait_for(lambda fs: sum(f.opcode == Opcode.PING for f in fs) >= 1)
        b_transport.feed(server_frame(Opcode.PONG, pings[0].payload))
        while not a.closed:  # the teardown does not wait for the stuck writer
            assert time.monotonic() - started < 3
            time.sleep(0.01)
        took = time.monotonic() - started
        assert 0.12 <= took < 0.8, took  # close_timeout 0.15 s, on time
        assert isinstance(a.error, blockws.CloseTimeout)
        pumped = time.monotonic()
        a.update()  # on_closed: joins A's threads only briefly
        assert time.monotonic() - pumped < 1.5
        assert a.join(0.2) is False  # join() says the writer has not ended
        # B kept its schedule: silence after its pong closes it 0.15 s after a ping.
        assert b.join(5)
        assert isinstance(b.error, blockws.PingTimeout)
    finally:
        a_transport.unblock_writes()
        b.abort()
        a.join(5)


def test_a_compressed_read_after_a_small_one_inflates_only_the_room_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backpressure with compression: each installment of a compressed read
    inflates at most the room left under max_queued_bytes (at least one
    message). It had the whole limit per read, so a large read that followed
    a small one (whose messages were still queued) queued up to twice the
    limit: seen once a quiet socket's first read became a small one."""
    import zlib

    from blockws.deflate import PerMessageDeflate
    from blockws.opening import Opened

    size, limit = 40 * 1024, 64 * 1024

    def compressed(i: int) -> bytes:
        comp = zlib.compressobj(wbits=-15)
        data = comp.compress(i.to_bytes(4, "big") + bytes(size - 4))
        data += comp.flush(zlib.Z_SYNC_FLUSH)
        return server_frame(Opcode.BINARY, data[:-4], rsv=0x40)  # RSV1: compressed

    class DeflateOpener(MemoryOpener):
        def __call__(self, *args: Any, **kwargs: Any) -> Opened:
            opened_ = super().__call__(*args, **kwargs)
            deflate = PerMessageDeflate()
            deflate.accept([])
            return Opened(opened_.transport, None, [deflate])

    got: list[int] = []
    with use_memory(monkeypatch) as plain:
        opener = DeflateOpener(plain.factory)
        monkeypatch.setattr(blockws.connection, "open_over_network", opener)
        ws, transport = opened(
            opener,
            max_queued_bytes=limit,
            max_message_size=size,  # else the limit is at least one such message
            on_binary=lambda ws, seg: got.append(int.from_bytes(seg.view()[:4], "big")),
        )
        delivery = ws._engine.delivery
        transport.feed(compressed(0))  # a small read: 40 KiB queued, room for 24
        deadline = time.monotonic() + 5
        while ws.queued_amount < size:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        transport.feed(b"".join(compressed(i) for i in range(1, 101)))  # one large read
        while not delivery.paused:  # the reader stops once the queue is full
            assert time.monotonic() < deadline, (ws.queued_amount, ws.error, got)
            time.sleep(0.001)
        assert limit <= ws.queued_amount <= limit + size, ws.queued_amount
        deadline = time.monotonic() + 10
        while len(got) < 101:
            assert time.monotonic() < deadline, len(got)
            ws.wait(0.05)
            ws.update()
        assert got == list(range(101))
        ws.close()
        transport.feed(server_frame(Opcode.CLOSE, pack_close(1000, "")))
        transport.feed_eof()
        assert ws.join(5)
