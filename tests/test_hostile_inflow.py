"""Hostile probes of issue 11 ("nothing lost, nothing unbounded"): what comes in.

Pongs (item 3), fragments (item 4), backpressure (item 2) and Ctrl-C (item 1), one test
per probe; each names the probe it answers in its docstring. The servers are raw-socket
fault servers (tests/faultserver.py) and a hand-written h2c server (tests/h2peers.py)
that flood, stall or lie on purpose. Memory is measured as the process's resident set
(``/proc/self/status``): a flood that blockws does not bound grows it by hundreds of MiB
within a second or two, far above the bounds asserted here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import ssl
import sys
import threading
import time
import traceback
from typing import Any, Callable

import pytest
from faultserver import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_PONG,
    Peer,
    Recorder,
    fault_server,
    frame_bytes,
)
from h2peers import DATA, WINDOW_UPDATE, MiniConn, MiniH2

import blockws
import blockws.http2
from blockws.http2 import HTTP2Settings

H2C = HTTP2Settings(cleartext=True, fallback=False)

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(60)]

MiB = 1024 * 1024


def rss() -> int:
    """The process's resident set size, in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def first_message(conn: MiniConn, stream_id: int) -> None:
    """Wait for the client's first message on ``stream_id`` (the stream is then open)."""
    conn.read_until(lambda f: f.type == DATA and f.stream_id == stream_id and bool(f.payload))


def flood(peer: Peer, chunk: bytes, stop: threading.Event, seconds: float) -> int:
    """Send ``chunk`` again and again until ``stop`` is set or ``seconds`` pass; never read.
    Returns how many chunks went out."""
    sent = 0
    deadline = time.monotonic() + seconds
    peer.sock.settimeout(0.2)
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            peer.send(chunk)
        except TimeoutError:
            continue  # the client pushes back: keep trying until told to stop
        sent += 1
    return sent


# -- item 3: pongs ---------------------------------------------------------------------


def test_ping_flood_from_a_server_that_never_reads_keeps_one_pending_pong() -> None:
    """Probe "pong queue without bound" (issue 11, item 3): a server floods empty pings
    and never reads. Old code queued one pong per ping (2.6 M pongs, 483 MB in 6 s)
    while buffered_amount stayed 0. Now at most one pong waits while the writer is
    stuck, memory stays flat, and the pending pong counts in buffered_amount."""
    stop = threading.Event()
    pings = frame_bytes(OP_PING) * 32768  # 64 KiB of empty pings per send
    counts: list[int] = []

    def handler(peer: Peer) -> None:
        peer.handshake()
        counts.append(flood(peer, pings, stop, 25.0))
        stop.wait(25)

    with fault_server(handler, rcvbuf=4096) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, close_timeout=0.3, extensions=[], **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        gc.collect()
        before = rss()
        peak_buffered = 0
        # At least 2 s, and until pongs are seen waiting: pongs are written at once,
        # on the reader's thread, while the kernel's send buffer (megabytes) has
        # room; only then does one wait, counted in buffered_amount.
        start = time.monotonic()
        while time.monotonic() - start < 2.0 or (peak_buffered == 0
                                                 and time.monotonic() - start < 15.0):
            time.sleep(0.01)
            peak_buffered = max(peak_buffered, ws.buffered_amount)
        grown = rss() - before
        assert ws.is_open
        stop.set()
        ws.close()
        rec.wait_closed(ws)
    assert counts and counts[0] > 20, counts  # > 655 k pings reached the client
    assert grown < 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
    assert 0 < peak_buffered < 2 * MiB, peak_buffered  # pongs counted, and bounded


def test_every_ping_of_one_read_is_answered_when_the_writer_is_idle() -> None:
    """Probe "pong queue without bound" (issue 11, item 3), the other side: bounding
    pongs must not drop answers to a burst of pings from a server that does read
    (Autobahn case 2.10 expects a pong for each)."""
    payloads = [b"payload-%d" % i for i in range(10)]
    got: list[bytes] = []
    answered = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send(b"".join(frame_bytes(OP_PING, p) for p in payloads))
        while len(got) < len(payloads):
            _, opcode, payload = peer.read_frame()
            if opcode == OP_PONG:
                got.append(payload)
        answered.set()
        peer.read_until_close()
        peer.send_frame(0x8, b"\x03\xe8")

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, extensions=[], **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        assert answered.wait(5.0), got
        ws.close()
        assert rec.wait_closed(ws)[0] == 1000
    assert got == payloads


# -- item 4: fragments -----------------------------------------------------------------------


def test_endless_empty_continuation_frames_over_http2_fail_with_1009() -> None:
    """Probe "fragment bookkeeping" (issue 11, item 4) over HTTP/2: endless empty
    continuation frames in DATA frames kept a message in progress for ever; each frame
    now counts as a byte of the message, so max_message_size ends it with 1009, and
    the frames before cost nothing."""
    closes: list[bytes] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        conn.send(conn.data(sid, frame_bytes(OP_BINARY, b"x", fin=False)))
        empties = frame_bytes(OP_CONT, fin=False) * 8000  # 16 KB: one DATA frame
        for _ in range(20):
            conn.send(conn.data(sid, empties))
        got = conn.read_until(
            lambda f: f.type == DATA and f.stream_id == sid and len(f.payload) >= 8
        )
        closes.append(got.payload)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, http2=H2C, extensions=[], max_message_size=100_000,
                               close_timeout=0.5, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        ws.send("hello")
        code, _ = rec.wait_closed(ws)
        assert server.done.wait(10)
    assert code == 1009
    assert isinstance(ws.error, blockws.MessageTooBig), repr(ws.error)
    assert closes and closes[0][0] == 0x88  # the client's close frame, 1009 inside


# -- item 2: backpressure on receiving ---------------------------------------------------


def wait_until_paused(ws: blockws.WebSocket, limit: int) -> None:
    """Wait until the reading has stopped on a full queue: ``queued_amount`` above half
    the limit and still for 0.2 s. (The reader stops at the limit and resumes at half;
    the pumping that saw ``on_open`` may have delivered a few messages after the stop,
    so the queue can rest anywhere between the two: a full CI run once caught it at
    60,672 of 65,536 bytes.)"""
    deadline = time.monotonic() + 20
    last, since = -1, time.monotonic()
    while True:
        queued = ws.queued_amount
        now = time.monotonic()
        if queued != last:
            last, since = queued, now
        elif queued > limit // 2 and now - since >= 0.2:
            return
        assert now < deadline, (queued, reader_stacks(ws))
        time.sleep(0.01)


def reader_stacks(ws: blockws.WebSocket) -> str:
    """Where this socket's threads are now (for a failure message)."""
    frames = sys._current_frames()
    return "\n".join(
        f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
        for t in threading.enumerate()
        if t.name.startswith(f"blockws-{ws.id}-") and t.ident in frames
    )


def numbered(count: int, size: int = 64) -> bytes:
    """``count`` binary messages of ``size`` bytes from a server, each starting with its
    number (4 bytes, big-endian)."""
    pad = bytes(size - 4)
    header = bytes((0x82, size))
    return b"".join(header + i.to_bytes(4, "big") + pad for i in range(count))


@pytest.mark.parametrize("mode", ["callbacks", "receive"])
def test_flood_without_a_pump_stops_reading_and_loses_nothing(mode: str) -> None:
    """Probe "no backpressure on receiving" (issue 11, item 2): with no update() or
    receive() (a loading screen), the reader kept reading: a 64 B flood reached 1.8 GB
    in 8 s. Now the reader stops at max_queued_bytes (TCP pushes back: the server's
    send blocks), memory stays flat, and once the pump resumes every message arrives,
    in order."""
    count = 200_000  # 12.8 MB of payload: far more than the limit and the kernel buffers
    flood_bytes = numbered(count)
    sent_all = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.sock.settimeout(30)
        peer.send(flood_bytes)
        sent_all.set()
        peer.read_until_close()
        peer.send_frame(0x8, b"\x03\xe8")

    got: list[int] = []

    def on_binary(ws: blockws.WebSocket, segment: blockws.BufferSegment) -> None:
        got.append(int.from_bytes(segment.view()[:4], "big"))

    limit = 1 * MiB
    callbacks: dict[str, object] = {"on_binary": on_binary} if mode == "callbacks" else {}
    with fault_server(handler) as server:
        ws = blockws.connect(server.url, extensions=[], max_message_size=64 * 1024,
                             max_queued_bytes=limit, **callbacks)  # type: ignore[arg-type]
        gc.collect()
        before = rss()
        # No pump: the queue fills to the limit (well under a second alone; a loaded
        # CI machine once took over 2 s), then the flood must stall instead of growing.
        wait_until_paused(ws, limit)
        middle = rss()
        assert not sent_all.wait(1.0)
        after = rss()
        queued = ws.queued_amount
        assert limit // 2 < queued < limit + 256 * 1024, queued
        assert ws.is_open
        # The pump resumes: everything arrives, in order.
        deadline = time.monotonic() + 30
        while len(got) < count:
            assert time.monotonic() < deadline, len(got)
            if mode == "callbacks":
                ws.wait(1.0)
                ws.update()
            else:
                message = ws.receive(timeout=10)
                assert isinstance(message, bytes) and len(message) == 64
                got.append(int.from_bytes(message[:4], "big"))
        assert sent_all.wait(10)
        assert ws.queued_amount == 0
        ws.close()
        ws.join(5)
        ws.update()
    assert got == list(range(count))
    assert after - before < 16 * MiB, f"RSS grew by {(after - before) / MiB:.1f} MiB"
    assert after - middle < 4 * MiB, f"RSS still growing: {(after - middle) / MiB:.1f} MiB"


def test_paused_socket_still_closes_promptly() -> None:
    """Probe "no backpressure on receiving" (issue 11, item 2): a socket whose reading
    is paused by a full queue must still read the server's close reply when the
    application closes it (the pause ends on close())."""
    flood_bytes = numbered(50_000)

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.sock.settimeout(30)
        with contextlib.suppress(OSError):
            peer.send(flood_bytes)
        peer.read_until_close()
        peer.send_frame(0x8, b"\x03\xe8")

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, extensions=[], max_message_size=4096,
                               max_queued_bytes=64 * 1024, close_timeout=5, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        # Filling takes well under a second alone; a full CI run under coverage on a
        # busy machine once took more than 5 s.
        wait_until_paused(ws, 64 * 1024)
        start = time.monotonic()
        ws.close()
        assert ws.join(4.0), "the paused reader never read the close reply"
        elapsed = time.monotonic() - start
        code, _ = rec.wait_closed(ws)
    assert code == 1000 and ws.error is None
    assert elapsed < 3.0
    assert len(rec.messages) > 1000  # what was queued before the close was still delivered


def test_http2_paused_stream_withholds_its_window_while_others_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe "no backpressure on receiving" over HTTP/2 (issue 11, item 2): WINDOW_UPDATE
    credit went back as soon as bytes were parsed, so a flood on one stream grew without
    bound (1.9 GB in 8 s). Now a socket past max_queued_bytes withholds its stream's
    credit -- the connection's still goes back, and another stream on the same
    connection keeps flowing -- and returns it once update() drains the queue."""
    monkeypatch.setattr(blockws.http2, "_STREAM_WINDOW", 256 * 1024)
    window = 256 * 1024
    messages = b"".join(
        frame_bytes(OP_BINARY, i.to_bytes(4, "big") + bytes(1016)) for i in range(256)
    )  # 1024 bytes each on the wire: exactly the stream's window
    seen: dict[str, int] = {}
    paused_checked = threading.Event()

    def credit(conn: MiniConn, sid: int) -> int:
        return sum(
            f.increment for f in conn.frames if f.type == WINDOW_UPDATE and f.stream_id == sid
        )

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid1 = conn.accept()
        first_message(conn, sid1)
        conn.send(conn.data(sid1, messages))
        sid2 = conn.accept()  # the second socket opens meanwhile, on this connection
        conn.send(conn.data(sid2, frame_bytes(0x1, b"other stream flows")))
        first_message(conn, sid2)
        seen["stream_before"] = credit(conn, sid1)
        seen["connection_before"] = credit(conn, 0)
        paused_checked.set()
        conn.read_until(lambda f: f.type == WINDOW_UPDATE and f.stream_id == sid1
                        and credit(conn, sid1) >= window)
        seen["stream_after"] = credit(conn, sid1)
        first_message(conn, sid1)  # "bye" (masked)

    got: list[int] = []

    def on_binary(ws: blockws.WebSocket, segment: blockws.BufferSegment) -> None:
        got.append(int.from_bytes(segment.view()[:4], "big"))

    with MiniH2(scenario) as server:
        ws = blockws.WebSocket(server.url, http2=H2C, extensions=[], max_message_size=4096,
                               max_queued_bytes=64 * 1024, on_binary=on_binary)
        ws.open()
        deadline = time.monotonic() + 10
        while not ws.is_open:
            assert time.monotonic() < deadline
            ws.wait(0.1)
        ws.update()
        ws.send("hello")  # stream 1's first message: the server floods it
        while ws.queued_amount < 64 * 1024:
            assert time.monotonic() < deadline, ws.queued_amount
            time.sleep(0.01)
        # A second socket on the same connection still receives while the first is paused.
        rec2 = Recorder()
        ws2 = blockws.WebSocket(server.url, http2=H2C, extensions=[], **rec2.callbacks())
        ws2.open()
        rec2.pump_until(ws2, lambda: bool(rec2.messages) or bool(rec2.closes))
        assert rec2.messages == ["other stream flows"]
        ws2.send("hi")
        assert paused_checked.wait(10)
        assert ws.queued_amount >= 64 * 1024 and got == []
        # The pump resumes: the withheld credit goes back and everything arrives.
        while len(got) < 256:
            assert time.monotonic() < deadline + 10, len(got)
            ws.wait(0.5)
            ws.update()
        ws.send("bye")
        assert server.done.wait(10)
        ws.abort()
        ws2.abort()
        ws.join(5)
        ws2.join(5)
        ws.update()
        ws2.update()
    assert got == list(range(256))
    assert seen["connection_before"] >= window  # the connection's credit went back
    assert seen["stream_before"] <= window - 128 * 1024  # the stream's was withheld
    assert seen["stream_after"] >= window


def test_http2_close_of_a_paused_stream_returns_its_credit_for_the_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe "no backpressure on receiving" over HTTP/2 (issue 11, item 2): a stream whose
    credit is withheld must get it back when the application closes the socket, or the
    server has no window left for its close reply (the close would time out)."""
    monkeypatch.setattr(blockws.http2, "_STREAM_WINDOW", 128 * 1024)
    window = 128 * 1024
    messages = b"".join(frame_bytes(OP_BINARY, bytes(1020)) for _ in range(128))
    seen: dict[str, int] = {}

    def credit(conn: MiniConn, sid: int) -> int:
        return sum(
            f.increment for f in conn.frames if f.type == WINDOW_UPDATE and f.stream_id == sid
        )

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        conn.send(conn.data(sid, messages))  # the whole window
        # The client's close frame (masked: 0x88 then the mask bit and length).
        conn.read_until(
            lambda f: f.type == DATA and f.stream_id == sid and f.payload[:1] == b"\x88"
        )
        seen["credit"] = credit(conn, sid)
        conn.send(conn.data(sid, frame_bytes(0x8, b"\x03\xe8")))  # within the credit returned
        with contextlib.suppress(OSError, EOFError):
            conn.read_until(lambda f: False)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, http2=H2C, extensions=[], max_message_size=4096,
                               max_queued_bytes=32 * 1024, close_timeout=3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        ws.send("hello")
        deadline = time.monotonic() + 10
        while ws.queued_amount < 32 * 1024:
            assert time.monotonic() < deadline, ws.queued_amount
            time.sleep(0.01)
        ws.close()
        code, _ = rec.wait_closed(ws)
        ws.abort()
    assert seen["credit"] >= window - 32 * 1024  # most of the window came back at close()
    assert code == 1000 and ws.error is None, repr(ws.error)


# -- item 1: Ctrl-C --------------------------------------------------------------------------


_BLOCKWS_DIR = os.path.dirname(blockws.__file__)


class Interrupter:
    """Sends SIGINT to the main thread every 0.5-3 ms from a timer thread, while on.

    Meanwhile SIGINT's handler raises KeyboardInterrupt only while :attr:`armed` and
    only inside blockws's own code (in receive() or wait(), where the probe lands), so
    that no interrupt escapes the test's loop into pytest."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.sent = 0
        self.armed = False
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, name="test-interrupter", daemon=True)
        self._old: Any = None

    def _run(self) -> None:
        rng = random.Random(11)
        while not self.stop.wait(rng.uniform(0.0005, 0.003)):
            assert self.main is not None
            signal.pthread_kill(self.main, signal.SIGINT)
            self.sent += 1

    def _handler(self, signum: int, frame: Any) -> None:
        if self.armed and frame is not None and _BLOCKWS_DIR in frame.f_code.co_filename:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupter:
        self._old = signal.signal(signal.SIGINT, self._handler)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        self.stop.set()
        self.thread.join(5)
        signal.signal(signal.SIGINT, self._old)


def streaming_server(
    count: int, size: int, tls: ssl.SSLContext | None = None
) -> Callable[[Peer], None]:
    """Sends ``count`` numbered binary messages of ``size`` bytes in small bursts (so that
    they arrive in many reads), then closes with 1000; over TLS with ``tls``."""

    def handler(peer: Peer) -> None:
        if tls is not None:
            peer.sock = tls.wrap_socket(peer.sock, server_side=True)
        peer.handshake()
        peer.sock.settimeout(30)
        pad = bytes(size - 4)
        for i in range(count):
            peer.send(frame_bytes(OP_BINARY, i.to_bytes(4, "big") + pad))
            time.sleep(0.0005)
        peer.send_frame(0x8, b"\x03\xe8")
        with contextlib.suppress(OSError, EOFError):
            peer.read_until_close()

    return handler


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="SIGINT reaches the main thread only")
@pytest.mark.parametrize(
    ("how", "size"),
    [("receive", 100), ("receive", 70_000), ("wait", 100), ("receive-tls", 100),
     ("receive-tls", 70_000), ("wait-tls", 100), ("blockws.wait", 100),
     ("blockws.wait-tls", 100)],
)
def test_ctrl_c_during_a_stream_loses_nothing(how: str, size: int, tls_certs: Any) -> None:
    """Probe "data loss on Ctrl-C" (issue 11, item 1): with repeated SIGINTs while the main
    thread waits in receive() or wait() -- and reads the socket itself -- 12-20 of 3000
    messages vanished with is_open True, and 200 KB messages fell out of step (1002).
    Now every message arrives, in order; or, if an interrupt landed inside the parser,
    the socket fails loudly (1006, ConnectionLost caused by the KeyboardInterrupt) and
    what arrived before is an unbroken prefix. Over wss:// too, whose reads the waiting
    thread now does as well (TLS in memory: transport.TLSTransport); and in
    blockws.wait(), which polls and reads every socket (blockws.multiwait)."""
    count = 3000 if size < 1000 else 300
    tls = how.endswith("-tls")
    how = how.removesuffix("-tls")
    server_ctx: ssl.SSLContext | None = None
    client: dict[str, Any] = {}
    if tls:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
        client["ssl_context"] = tls_certs.client_context()
    got: list[int] = []
    interrupts = 0

    def on_binary(ws: blockws.WebSocket, segment: blockws.BufferSegment) -> None:
        got.append(int.from_bytes(segment.view()[:4], "big"))

    with fault_server(streaming_server(count, size, server_ctx)) as server:
        options: dict[str, Any] = {"on_binary": on_binary} if how != "receive" else {}
        url = server.url.replace("ws://127.0.0.1", "wss://localhost") if tls else server.url
        ws = blockws.connect(url, extensions=[], http2=False, **client, **options)
        with Interrupter() as interrupter:
            deadline = time.monotonic() + 30
            done = False
            while not done:
                try:
                    interrupter.armed = True
                    while time.monotonic() < deadline:
                        if how == "receive":
                            message = ws.receive(timeout=5)
                            assert isinstance(message, bytes) and len(message) == size
                            got.append(int.from_bytes(message[:4], "big"))
                        elif how == "wait":
                            if ws.closed and not ws.update():
                                break
                            ws.wait(0.5)
                            ws.update()
                        else:
                            if ws.closed and not blockws.update_all():
                                break
                            blockws.wait(0.5)
                            blockws.update_all()
                    done = True
                    interrupter.armed = False
                except KeyboardInterrupt:
                    interrupts += 1
                except blockws.ConnectionClosed:
                    done = True
                    interrupter.armed = False
        ws.join(5)
        ws.update()
    assert interrupter.sent > 50 and interrupts > 10, (interrupter.sent, interrupts)
    assert got == list(range(len(got))), "a message was lost or reordered"
    if ws.error is None:
        assert got == list(range(count))
        assert ws.close_code == 1000
    else:
        assert ws.close_code == 1006
        assert isinstance(ws.error, blockws.ConnectionLost), repr(ws.error)
        assert isinstance(ws.error.__cause__, KeyboardInterrupt), repr(ws.error.__cause__)


def test_compressed_flood_without_a_pump_is_bounded_in_inflated_bytes() -> None:
    """Probe "no backpressure on receiving" (issue 11, item 2), compressed: one read of a
    thousandfold-compressible flood inflates to ~80 MB, so stopping after each read
    would not bound memory. A compressed read is parsed in installments of at most
    max_queued_bytes inflated, with the pause between them: memory stays near the limit
    and every message still arrives, in order."""
    import zlib

    count, size = 5000, 64 * 1024
    flood_bytes = bytearray()
    for i in range(count):
        comp = zlib.compressobj(wbits=-15)
        data = comp.compress(i.to_bytes(4, "big") + bytes(size - 4)) + comp.flush(zlib.Z_SYNC_FLUSH)
        flood_bytes += frame_bytes(OP_BINARY, data[:-4], rsv=0x40)  # RSV1: compressed
    sent_all = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake(extra=["Sec-WebSocket-Extensions: permessage-deflate"])
        peer.sock.settimeout(30)
        peer.send(bytes(flood_bytes))
        sent_all.set()
        peer.read_until_close()
        peer.send_frame(0x8, b"\x03\xe8")

    got: list[int] = []

    def on_binary(ws: blockws.WebSocket, segment: blockws.BufferSegment) -> None:
        assert len(segment) == size
        got.append(int.from_bytes(segment.view()[:4], "big"))

    limit = 1 * MiB
    with fault_server(handler) as server:
        gc.collect()
        before = rss()
        ws = blockws.connect(server.url, max_message_size=size, max_queued_bytes=limit,
                             on_binary=on_binary)
        assert ws.extensions, "permessage-deflate was not negotiated"
        deadline = time.monotonic() + 10
        while ws.queued_amount < limit:
            assert time.monotonic() < deadline, ws.queued_amount
            time.sleep(0.01)
        time.sleep(0.5)  # no pump: nothing more is inflated meanwhile
        grown = rss() - before
        assert limit <= ws.queued_amount <= limit + size, ws.queued_amount
        deadline = time.monotonic() + 60
        while len(got) < count:
            assert time.monotonic() < deadline, len(got)
            ws.wait(1.0)
            ws.update()
        ws.close()
        ws.join(5)
        ws.update()
    assert got == list(range(count))
    assert grown < 24 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
