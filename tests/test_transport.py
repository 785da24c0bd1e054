"""blockws.transport: the TCP transport over a socketpair, no server needed."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from blockws.exceptions import ConnectionLost
from blockws.readtoken import ReadToken
from blockws.transport import TCPTransport, TLSTransport


class RecordingSink:
    def __init__(self, fail_on: bytes | None = None) -> None:
        self.data: list[bytes] = []
        self.lost: list[BaseException | None] = []
        self.fail_on = fail_on
        self.done = threading.Event()

    def data_received(self, data: bytes) -> None:
        if self.fail_on is not None and self.fail_on in data:
            raise MemoryError("sink failed")
        self.data.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.done.set()


def run_in_thread(transport: TCPTransport, sink: RecordingSink) -> threading.Thread:
    thread = threading.Thread(target=transport.run, args=(sink,))
    thread.start()
    return thread


def test_run_delivers_data_then_a_clean_eof() -> None:
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink()
    thread = run_in_thread(transport, sink)
    b.sendall(b"hello")
    b.close()
    assert sink.done.wait(5)
    thread.join(5)
    assert b"".join(sink.data) == b"hello" and sink.lost == [None]
    assert transport.bytes_read == 5
    transport.close()


def test_an_exception_in_the_sink_ends_the_stream_through_connection_lost() -> None:
    # Whatever the sink raises, the reader reports it rather than dying silently.
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink(fail_on=b"boom")
    thread = run_in_thread(transport, sink)
    b.sendall(b"boom")
    assert sink.done.wait(5)
    thread.join(5)
    assert len(sink.lost) == 1 and isinstance(sink.lost[0], MemoryError)
    transport.close()
    b.close()
    a, b = socket.socketpair()
    tls = TLSTransport(TCPTransport(a), ssl.create_default_context(), "localhost")
    assert tls.gathers is False  # one record buffer, written as one chunk
    tls.close()
    b.close()


def test_abort_from_another_thread_wakes_the_reader_as_eof() -> None:
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink()
    thread = run_in_thread(transport, sink)
    transport.abort()
    assert sink.done.wait(5)
    thread.join(5)
    assert sink.lost == [None] and transport.aborted
    transport.close()
    b.close()
    a, b = socket.socketpair()
    tls = TLSTransport(TCPTransport(a), ssl.create_default_context(), "localhost")
    assert tls.gathers is False  # one record buffer, written as one chunk
    tls.close()
    b.close()


def test_write_counts_bytes_and_a_reset_peer_raises_connection_lost() -> None:
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    transport.write([b"ab", b"cd"])
    assert b.recv(10) == b"abcd" and transport.bytes_written == 4
    b.close()
    with pytest.raises(ConnectionLost):
        for _ in range(100):  # the first writes may still land in the buffer
            transport.write([b"x" * 65536])
    with pytest.raises(ConnectionLost):
        transport.write([b"x" * 65536, b"y" * 65536])  # the gathering write's path too
    transport.close()


# -- reading on the caller's thread (TCPTransport.read_here) ---------------------------------


@pytest.fixture(autouse=True)
def loaded_machine_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease long enough for a test to read after the grant on a loaded machine
    (5 ms can lapse before the test's next line runs); the tests of the lapse set
    their own."""
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 1.0)


class ThreadSink(RecordingSink):
    """Records which thread each delivery ran on; ``got`` is set on every delivery."""

    def __init__(self, raise_on: bytes | None = None, exc: BaseException | None = None) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.lost_on: list[str] = []
        self.got = threading.Event()
        self.raise_on, self.exc = raise_on, exc

    def data_received(self, data: bytes) -> None:
        if self.raise_on is not None and self.raise_on in data:
            assert self.exc is not None
            raise self.exc
        self.threads.append(threading.current_thread().name)
        self.data.append(data)
        self.got.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_on.append(threading.current_thread().name)
        super().connection_lost(exc)


class Lent:
    """A TCP transport with its read token, its reader thread (named "reader")
    and the peer's socket: what a socket's engine puts together."""

    def __init__(self, transport: TCPTransport, sink: ThreadSink, peer: socket.socket) -> None:
        self.transport, self.sink, self.peer = transport, sink, peer
        self.token = ReadToken()
        self.reader = threading.Thread(
            target=transport.run, args=(sink, self.token.before_read), name="reader"
        )
        self.reader.start()

    def read(
        self, timeout: float = 5.0, sink: ThreadSink | None = None, wake: Any = None
    ) -> bool:
        """What a thread waiting in receive() does: read here if it may."""
        return self.token.read_here(
            self.transport.read, sink or self.sink, timeout, wake or (lambda: None)
        )

    def abort(self) -> None:
        self.token.cancel()
        self.transport.abort()

    def take_reading(self) -> None:
        """Ask for the right to read, and have it granted: the reader grants it after
        its current read, so the peer sends one message ("first") to complete that read."""
        granted = threading.Event()
        assert self.read(5.0, wake=granted.set) is False  # the reader thread reads now
        self.peer.sendall(b"first")
        assert granted.wait(5), "the reader thread did not hand over"
        assert self.sink.data == [b"first"] and self.sink.threads == ["reader"]

    def ended(self) -> None:
        """The stream has ended: reported once, and the reader thread is gone."""
        assert self.sink.done.wait(5)
        self.reader.join(5)
        assert not self.reader.is_alive() and len(self.sink.lost) == 1


@contextlib.contextmanager
def lent(
    sink: ThreadSink | None = None, take: bool = True, pair: tuple[socket.socket, ...] = ()
) -> Iterator[Lent]:
    """A transport whose reading this thread holds (``take``); torn down on exit."""
    a, b = pair or socket.socketpair()
    t = Lent(TCPTransport(a), sink or ThreadSink(), b)
    try:
        if take:
            t.take_reading()
        yield t
    finally:
        t.abort()
        t.ended()
        t.transport.close()
        b.close()


def test_a_waiting_caller_is_granted_the_reading_and_reads_on_its_own_thread() -> None:
    with lent() as t:
        me = threading.current_thread().name
        for word in (b"two", b"three"):
            t.peer.sendall(word)
            assert t.read() is True
            assert t.sink.data[-1] == word and t.sink.threads[-1] == me
        # Nothing there: read_here returns after its timeout, having read nothing;
        # a long timeout is served in bounded slices (the caller's loop goes on).
        assert t.read(0.01) is True and t.read(0) is True
        started = time.monotonic()
        assert t.read(30.0) is True
        assert time.monotonic() - started < 5.0
        assert len(t.sink.data) == 3 and t.transport.bytes_read == len(b"firsttwothree")
        t.peer.close()
        # The caller meets the EOF and hands it to the reader thread, which reports it once.
        assert t.read() is True
        t.ended()
        assert t.sink.lost == [None] and t.sink.lost_on == ["reader"]
        # Reading has ended for good: nobody is granted it again.
        assert t.read(0.01) is False


def test_the_right_to_read_lapses_back_to_the_reader_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 0.02)
    with lent() as t:
        t.sink.got.clear()
        t.peer.sendall(b"later")  # the caller never reads again: the reader thread must
        assert t.sink.got.wait(5)
        assert t.sink.data == [b"first", b"later"] and t.sink.threads == ["reader", "reader"]
    assert t.sink.lost == [None]


def test_abort_takes_the_reading_back_without_waiting_for_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 60.0)
    with lent() as t:
        t.abort()  # the caller holds the right but is not reading
        assert t.sink.done.wait(5), "abort waited for the lease"
    assert t.sink.lost == [None] and t.sink.lost_on == ["reader"]


def test_abort_wakes_a_caller_blocked_in_a_read() -> None:
    with lent() as t:
        returned = threading.Event()

        def caller() -> None:
            t.read(30.0)
            returned.set()

        thread = threading.Thread(target=caller)
        thread.start()
        # the caller is inside its read (blocked): nothing else can take the token
        while t.token.lent and not t.token.busy:
            assert thread.is_alive()
            threading.Event().wait(0.001)
        threading.Event().wait(0.01)
        t.abort()
        assert returned.wait(5), "a caller blocked in a read outlived abort()"
        thread.join(5)
    assert t.sink.lost == [None] and t.sink.lost_on == ["reader"]


def test_a_reset_met_by_the_caller_is_reported_by_the_reader_thread() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    with lent(pair=(a, b)) as t:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # RST
        assert t.read() is True
        t.ended()
    assert isinstance(t.sink.lost[0], ConnectionLost) and t.sink.lost_on == ["reader"]


@pytest.mark.parametrize(
    "exc", [ValueError("bad"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_a_sink_failing_on_the_caller_ends_the_stream_once(exc: BaseException) -> None:
    # An Exception from parsing ends the socket (reported by the reader thread);
    # a KeyboardInterrupt also reaches the caller, who pressed Ctrl-C.
    with lent(ThreadSink(raise_on=b"boom", exc=exc)) as t:
        t.peer.sendall(b"boom")
        if isinstance(exc, Exception):
            assert t.read() is True
        else:
            with pytest.raises(KeyboardInterrupt):
                t.read()
        t.ended()
    assert t.sink.lost_on == ["reader"] and len(t.sink.lost) == 1
    if isinstance(exc, Exception):
        assert t.sink.lost == [exc]
    else:  # interrupted mid-parse: the socket fails loudly, the interrupt as the cause
        assert isinstance(t.sink.lost[0], ConnectionLost)
        assert t.sink.lost[0].__cause__ is exc


def test_a_second_caller_is_refused_while_the_first_reads() -> None:
    inside = threading.Event()
    release = threading.Event()

    class SlowSink(ThreadSink):
        def data_received(self, data: bytes) -> None:
            inside.set()
            assert release.wait(5)
            super().data_received(data)

    with lent() as t:
        slow = SlowSink()
        t.peer.sendall(b"x")
        thread = threading.Thread(target=t.read, args=(5.0, slow))
        thread.start()
        assert inside.wait(5)
        assert t.read(1.0) is False  # busy: wait for the delivery instead
        release.set()
        thread.join(5)
        assert slow.data == [b"x"]


def test_no_reading_on_the_caller_when_the_transport_cannot() -> None:
    a, b = socket.socketpair()
    tls_like = TCPTransport(a)
    assert tls_like.can_read_bounded  # plain TCP on POSIX
    tls_like.can_read_bounded = False  # as for TLS, or without MSG_DONTWAIT
    sink = ThreadSink()
    # The engine lends no reading on such a transport: its reader reads alone.
    reader = threading.Thread(target=tls_like.run, args=(sink, None), name="reader")
    reader.start()
    for word in (b"one", b"two"):
        sink.got.clear()
        b.sendall(word)
        assert sink.got.wait(5)
    tls_like.abort()
    reader.join(5)
    assert sink.threads == ["reader", "reader"] and sink.lost == [None]
    tls_like.close()
    b.close()


def test_a_short_wait_on_the_caller_is_precise() -> None:
    # SO_RCVTIMEO is rounded up to the kernel's tick (4 ms and one more here):
    # short waits must not use it, or a 2 ms wait takes 8 ms.
    with lent() as t:
        took = []
        for _ in range(11):
            started = time.perf_counter()
            assert t.read(0.002) is True
            took.append(time.perf_counter() - started)
        took.sort()
        assert 0.0015 <= took[5] < 0.005, took
        assert t.sink.data == [b"first"]  # nothing else came


# -- gathering writes (issue 14) ------------------------------------------------------------


def test_plain_tcp_writes_large_chunks_in_order_with_one_gathering_call() -> None:
    """Plain TCP says it ``gathers``: a writer hands it a large message's frames as
    they are, and a batch larger than the socket's buffer (sendmsg takes part of
    it) arrives whole and in order; a TLS socket does not say so (no sendmsg)."""
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    assert transport.gathers is True
    chunks: list[Any] = [
        bytes(range(256)) * 1600,
        memoryview(bytes(range(255, -1, -1)) * 1600)[7:],
        b"\x01\x02",
        bytearray(b"\x5a" * 300_001),
    ]
    expected = b"".join(bytes(c) for c in chunks)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expected):
            data = b.recv(65536)
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    transport.write(chunks)
    reader.join(10)
    assert not reader.is_alive()
    assert bytes(got) == expected and transport.bytes_written == len(expected)
    transport.close()
    b.close()
    a, b = socket.socketpair()
    tls = TLSTransport(TCPTransport(a), ssl.create_default_context(), "localhost")
    assert tls.gathers is False  # one record buffer, written as one chunk
    tls.close()
    b.close()


class CountingSocket(socket.socket):
    """A socket that counts which read call the transport makes."""

    calls: list[str]

    def recv(self, *args: Any) -> bytes:
        peek = len(args) > 1 and args[1] & socket.MSG_PEEK
        self.calls.append("peek" if peek else "recv")
        return super().recv(*args)

    def recv_into(self, *args: Any) -> int:  # type: ignore[override]
        self.calls.append("recv_into")
        return super().recv_into(*args)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("gated", [False, True], ids=["socket.recv", "C gate"])
def test_small_reads_share_one_buffer_and_large_ones_read_whole(gated: bool) -> None:
    """Probe "soak: RSS growth": ``recv(n)`` allocates n bytes and shrinks them to
    what came, and with many reader threads those shrunk blocks fragmented the
    allocator's arenas (RSS +84 % in two minutes of a 100-socket soak). Reads
    below RECV_SCRATCH go into one reusable buffer, copied out exactly (no
    alias: an earlier read keeps its bytes); a read that fills it switches to
    plain ``recv`` for the stream that follows, and small reads switch back.
    A new (quiet) socket's first read asks for RECV_QUIET bytes only, after
    waiting in a 1-byte peek (without the C gate: see _PEEK). The same
    bytes come through the C speedup's gated reads (which the counting socket
    cannot see) as through socket.recv."""
    from blockws import transport as transport_module
    from blockws.transport import RECV_QUIET, RECV_SCRATCH, RECV_SMALL

    if gated and transport_module._gated_recv is None:
        pytest.skip("the C speedup's gated reads are not built here (or BLOCKWS_PURE_PYTHON)")
    a, b = socket.socketpair()
    sock = CountingSocket(fileno=a.detach())
    sock.calls = []
    transport = TCPTransport(sock)
    if not gated:
        transport._gated_recv = transport._gated_recv_into = None
    try:
        b.sendall(b"x" * (RECV_QUIET + 100))
        first = transport.recv()
        assert first == b"x" * RECV_QUIET  # quiet: a small read first, then the rest
        assert transport.recv() == b"x" * 100
        b.sendall(b"y" * 50)
        second = transport.recv()
        assert second == b"y" * 50
        if not gated:
            assert sock.calls == ["peek", "recv", "recv_into", "recv_into"]
        b.sendall(bytes(range(256)) * (RECV_SCRATCH // 128))  # two buffers' worth
        stream = transport.recv()
        assert len(stream) == RECV_SCRATCH  # filled: the stream goes on with recv()
        stream += transport.recv()
        assert stream == bytes(range(256)) * (RECV_SCRATCH // 128)
        if not gated:
            assert sock.calls[4:] == ["recv_into", "recv"]
        b.sendall(b"z" * 10)
        assert transport.recv() == b"z" * 10
        if not gated:
            assert sock.calls[6] == "recv"  # after a RECV_SCRATCH read: RECV_SMALL at once
        b.sendall(b"w" * 10)
        assert transport.recv() == b"w" * 10
        if not gated:
            assert sock.calls[7:] == ["recv_into"]  # small again: back to the buffer
        else:
            assert sock.calls == []  # every read went through the gate
        assert first == b"x" * RECV_QUIET  # never overwritten
        assert RECV_SMALL > RECV_SCRATCH > RECV_QUIET
    finally:
        transport.close()
        b.close()


@pytest.mark.timeout(10)
def test_after_abort_nothing_more_is_read() -> None:
    """Probe "pong queue without bound", its ending: after shutdown() Linux still
    hands out every byte queued for the socket, so an aborted socket under a ping
    flood went on parsing megabytes before it ended (a CI run saw on_closed come
    more than 10 s after a 0.3 s close timeout). Now a read after abort() ends at
    once, for the reader thread and for a caller's bounded read alike."""
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    try:
        b.sendall(b"q" * 100_000)  # queued, unread
        transport.abort()
        assert transport.recv() == b""
        assert transport.read(None) == b""
        assert transport.recv() == b""
    finally:
        transport.close()
        b.close()
