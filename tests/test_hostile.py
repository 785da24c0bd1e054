"""Hostile probes of issue 11 ("nothing lost, nothing unbounded"), one test per probe.

Each test names the probe it answers in its docstring. The servers are raw-socket fault
servers (tests/faultserver.py) that flood, stall or lie on purpose, and real peers
(tests/conftest.py). Memory is measured as the process's resident set
(``/proc/self/status``): a flood that blockws does not bound grows it by hundreds of
MiB within a second or two, far above the bounds asserted here.
"""

from __future__ import annotations

import gc
import threading
import time

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
from h2peers import DATA, MiniConn, MiniH2

import blockws
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
        counts.append(flood(peer, pings, stop, 20.0))
        stop.wait(20)

    with fault_server(handler, rcvbuf=4096) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, close_timeout=0.3, extensions=[], **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        gc.collect()
        before = rss()
        peak_buffered = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
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
