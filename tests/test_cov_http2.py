"""WebSocket over HTTP/2 (blockws/http2.py): the paths the peer tests do not take.

Two kinds of tests:

* over the network, against :class:`h2peers.MiniH2` (a hand-written h2c server, prior
  knowledge) driven through the public API: the server's handshake cut across reads or
  broken, SETTINGS and GOAWAY in the middle of a connection, resets, empty and padded DATA,
  backpressure on DATA that goes through ``h2``, a buffer pool that refuses memory, an abort
  during the close grace, a malformed ``:status``;
* on the engine (:class:`H2Connection` / :class:`H2Stream`, their transport and sink
  interfaces) over :class:`ServerEnd`, an in-memory transport whose far end is the ``h2``
  package's server state machine: what only a race reaches through a socket (a stream asked
  of a connection that died since, a CONNECT answer that never comes before the deadline,
  a transport whose write fails oddly).
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from faultserver import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, Recorder, frame_bytes
from h2peers import (
    ACK,
    CANCEL,
    DATA,
    END_HEADERS,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_CONNECT_PROTOCOL,
    STATUS_200,
    WINDOW_UPDATE,
    Frame,
    MiniConn,
    MiniH2,
    frame,
)

import blockws
import blockws.http2
from blockws.deadline import Deadline
from blockws.exceptions import ConnectionLost, HTTP2Unavailable, OpenTimeout, TransportError
from blockws.handshake import Request
from blockws.http2 import H2Connection, H2Stream, HTTP2Settings, RefusedOrigins, pool

H2C = HTTP2Settings(cleartext=True, fallback=False)
KiB = 1024
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4


def open_h2(url: str, rec: Recorder, **options: Any) -> blockws.WebSocket:
    options.setdefault("http2", H2C)
    ws = blockws.WebSocket(url, extensions=[], **rec.callbacks(), **options)
    ws.open()
    rec.wait_open(ws)
    assert ws.http_version == "2"
    return ws


def first_message(conn: MiniConn, stream_id: int) -> Frame:
    """Wait for the client's next message on ``stream_id``."""
    return conn.read_until(
        lambda f: f.type == DATA and f.stream_id == stream_id and bool(f.payload))


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack("!HI", k, v) for k, v in values.items()))


def pump(ws: blockws.WebSocket, rec: Recorder, count: int) -> None:
    rec.pump_until(ws, lambda: len(rec.messages) >= count or bool(rec.closes))


def finish(ws: blockws.WebSocket, rec: Recorder) -> None:
    ws.abort()
    rec.wait_closed(ws)


# == over the network: MiniH2 =================================================================

# -- the server's half of the handshake ---------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cuts", [(4,), (12,), (2, 5)], ids=["in-header", "in-payload", "dribbled"])
def test_frame_cut_behind_the_servers_settings_is_completed_by_the_reader(
        cuts: tuple[int, ...]) -> None:
    """The server's SETTINGS and the start of a PING come in one write (cut in the PING's
    9-byte header, or in its payload): the handshake takes the SETTINGS and hands the cut
    frame to the reader, which completes it from the next reads (``dribbled``: the header
    still incomplete after the second piece) and answers the PING; then the socket opens and
    works."""
    seen: dict[str, Frame] = {}

    def scenario(conn: MiniConn) -> None:
        ping = frame(PING, 0, 0, b"opaque!!")
        conn.send(settings_frame({SETTINGS_ENABLE_CONNECT_PROTOCOL: 1}) + ping[:cuts[0]])
        # The client's ACK of our SETTINGS: it has read that write.
        conn.read_until(lambda f: f.type == SETTINGS and bool(f.flags & ACK))
        for start, stop in zip(cuts, cuts[1:]):
            conn.send(ping[start:stop])
            time.sleep(0.05)  # most likely a read of its own (nothing to wait on)
        conn.send(ping[cuts[-1]:] + frame(SETTINGS, ACK, 0))
        seen["pong"] = conn.read_until(lambda f: f.type == PING)
        # The client sends its CONNECT right after its handshake: maybe before the PING's
        # answer, maybe after.
        requests = [f for f in conn.frames if f.type == HEADERS]
        sid = (requests[0] if requests else conn.read_until(lambda f: f.type == HEADERS)).stream_id
        conn.send(frame(HEADERS, END_HEADERS, sid, STATUS_200))
        seen["message"] = first_message(conn, sid)
        conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"welcome")))
        conn.read_until(lambda f: f.type == RST_STREAM)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        pump(ws, rec, 1)
        assert rec.messages == ["welcome"]
        finish(ws, rec)
        assert server.done.wait(10)
    assert (seen["pong"].flags, seen["pong"].payload) == (ACK, b"opaque!!")
    assert seen["message"].payload[0] == 0x80 | OP_TEXT  # the (masked) "hello"


@pytest.mark.timeout(30)
def test_server_breaking_http2_in_its_handshake_is_remembered_as_a_refusal() -> None:
    """A whole frame h2 refuses (WINDOW_UPDATE with an increment of 0) instead of SETTINGS:
    the server does not speak HTTP/2. With fallback off the socket fails with
    HTTP2Unavailable saying so, and the origin is remembered as a refusal."""
    def scenario(conn: MiniConn) -> None:
        conn.send(frame(WINDOW_UPDATE, 0, 0, bytes(4)))
        conn.read_until(lambda f: False)  # until the client leaves

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, http2=H2C, extensions=[], **rec.callbacks())
        ws.open()
        assert rec.wait_closed(ws) == (1006, "")
        assert isinstance(ws.error, HTTP2Unavailable), repr(ws.error)
        assert "does not speak HTTP/2" in str(ws.error)
        assert ws.error.refused
        assert server.done.wait(10)
    assert len(pool.failed_origins) == 1
    assert pool.connections() == []


# -- SETTINGS and GOAWAY in the middle of a connection --------------------------------------------


@pytest.mark.timeout(30)
def test_max_concurrent_streams_lowered_later_opens_a_new_connection() -> None:
    """SETTINGS after the handshake: one without MAX_CONCURRENT_STREAMS changes no limit;
    then MAX_CONCURRENT_STREAMS = 1 with a stream open sends the next socket to a new
    connection."""
    acked = threading.Event()

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        if len(server.conns) > 1:  # the second connection: serve one socket
            sid = conn.accept()
            conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"second")))
            conn.read_until(lambda f: f.type == RST_STREAM)
            return
        sid = conn.accept()
        first_message(conn, sid)
        conn.send(settings_frame({INITIAL_WINDOW_SIZE: 1 << 20}))
        conn.read_until(lambda f: f.type == SETTINGS and f.flags & ACK)
        conn.send(settings_frame({MAX_CONCURRENT_STREAMS: 1}))
        conn.read_until(lambda f: f.type == SETTINGS and f.flags & ACK)
        acked.set()
        conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"first")))
        conn.read_until(lambda f: f.type == RST_STREAM and f.stream_id == sid)

    with MiniH2(scenario) as server:
        rec1, rec2 = Recorder(), Recorder()
        ws1 = open_h2(server.url, rec1)
        ws1.send("hello")
        assert acked.wait(10)
        pump(ws1, rec1, 1)
        assert rec1.messages == ["first"]
        ws2 = open_h2(server.url, rec2)
        pump(ws2, rec2, 1)
        assert rec2.messages == ["second"]
        assert len(server.conns) == 2
        assert sorted(c.max_streams for c in pool.connections()) == [1, 100]
        finish(ws1, rec1)
        finish(ws2, rec2)


@pytest.mark.timeout(30)
def test_graceful_goaway_sends_new_sockets_to_another_connection() -> None:
    """GOAWAY(NO_ERROR): the pool forgets the connection, so the next socket opens another,
    while the socket already on it goes on exchanging messages (DATA only, here: see the
    next test for the other frames)."""
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        if len(server.conns) > 1:
            conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"new connection")))
            conn.read_until(lambda f: f.type == RST_STREAM)
            return
        first_message(conn, sid)
        goaway = frame(GOAWAY, 0, 0, sid.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big"))
        # The message behind the GOAWAY tells the client's test thread it was handled.
        conn.send(goaway + conn.data(sid, frame_bytes(OP_TEXT, b"goaway sent")))
        assert first_message(conn, sid).payload  # the live socket still sends...
        conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"still served")))  # ...and receives
        first_message(conn, sid)

    with MiniH2(scenario) as server:
        rec1, rec2 = Recorder(), Recorder()
        ws1 = open_h2(server.url, rec1)
        ws1.send("hello")
        pump(ws1, rec1, 1)
        assert rec1.messages == ["goaway sent"]
        assert pool.connections() == []  # forgotten: closing
        ws2 = open_h2(server.url, rec2)
        pump(ws2, rec2, 1)
        assert rec2.messages == ["new connection"]
        ws1.send("after the GOAWAY")
        pump(ws1, rec1, 2)
        assert rec1.messages == ["goaway sent", "still served"] and not rec1.closes
        ws1.send("bye")
        assert server.done.wait(10)
        finish(ws1, rec1)
        finish(ws2, rec2)
    assert len(server.conns) == 2


@pytest.mark.timeout(30)
def test_graceful_goaway_lets_live_sockets_finish() -> None:
    """RFC 9113 6.8: after GOAWAY(NO_ERROR) the streams already open go on: the server may
    still PING and return credit, and the live socket still talks and, closing, resets its
    stream."""
    seen: dict[str, Frame] = {}

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        conn.send(frame(GOAWAY, 0, 0, sid.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big"))
                  + frame(PING, 0, 0, b"still up")
                  + frame(WINDOW_UPDATE, 0, sid, (1000).to_bytes(4, "big"))
                  + conn.data(sid, frame_bytes(OP_TEXT, b"after the GOAWAY")))
        seen["pong"] = conn.read_until(lambda f: f.type == PING)
        seen["reset"] = conn.read_until(lambda f: f.type in (RST_STREAM, GOAWAY))

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        pump(ws, rec, 1)
        assert rec.messages == ["after the GOAWAY"] and not rec.closes, rec.summary()
        finish(ws, rec)
        assert server.done.wait(10)
    assert seen["pong"].flags & ACK
    assert (seen["reset"].type, seen["reset"].error_code) == (RST_STREAM, CANCEL)


@pytest.mark.timeout(30)
def test_goaway_with_an_error_loses_every_socket_on_the_connection() -> None:
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        one = conn.accept()
        two = conn.accept()
        talked: set[int] = set()
        while talked != {one, two}:  # both sockets' messages, in either order
            talked.add(conn.read_until(lambda f: f.type == DATA and bool(f.payload)).stream_id)
        conn.send(frame(GOAWAY, 0, 0, two.to_bytes(4, "big") + PROTOCOL_ERROR.to_bytes(4, "big")))
        conn.read_until(lambda f: False)

    with MiniH2(scenario) as server:
        recs = [Recorder(), Recorder()]
        sockets = [open_h2(server.url, rec) for rec in recs]
        for ws in sockets:
            ws.send("hello")
        for ws, rec in zip(sockets, recs):
            assert rec.wait_closed(ws) == (1006, "")
            assert isinstance(ws.error, ConnectionLost), repr(ws.error)
            assert "GOAWAY" in str(ws.error) and "PROTOCOL_ERROR" in str(ws.error)
        assert server.done.wait(10)
    assert pool.connections() == []


@pytest.mark.timeout(30)
def test_tcp_reset_by_the_server_loses_the_socket() -> None:
    """The server resets the TCP connection (SO_LINGER 0): the reader's recv fails, and the
    socket ends with 1006 and a ConnectionLost."""
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        assert rec.wait_closed(ws) == (1006, "")
        assert isinstance(ws.error, TransportError), repr(ws.error)
        assert server.done.wait(10)
    assert pool.connections() == []


# -- DATA frames -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_empty_data_frames_are_ignored_and_earn_no_credit() -> None:
    """Empty DATA frames (no flags) on an open stream deliver nothing and return no credit
    (a WINDOW_UPDATE of 0 is a protocol error, RFC 9113 6.9)."""
    seen: list[Frame] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        mark = len(conn.frames)
        conn.send(frame(DATA, 0, sid) * 3 + conn.data(sid, frame_bytes(OP_TEXT, b"after")))
        first_message(conn, sid)
        seen.extend(conn.frames[mark:])

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        pump(ws, rec, 1)
        assert rec.messages == ["after"]
        ws.send("got it")
        assert server.done.wait(10)
        finish(ws, rec)
    updates = [f for f in seen if f.type == WINDOW_UPDATE]
    assert all(f.increment > 0 for f in updates), updates


@pytest.mark.timeout(30)
def test_padded_data_before_an_oversized_frame_is_delivered_first() -> None:
    """A padded DATA frame (through h2) and, in the same write, a frame over our
    SETTINGS_MAX_FRAME_SIZE: the message is delivered, then the connection fails with
    GOAWAY(FRAME_SIZE_ERROR)."""
    answers: list[Frame] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        good = frame(DATA, PADDED, sid, bytes([2]) + frame_bytes(OP_TEXT, b"padded") + bytes(2))
        bad = frame(DATA, 0, sid, length=blockws.http2._MAX_FRAME + 1)
        conn.send(good + bad)
        answers.append(conn.read_until(lambda f: f.type == GOAWAY))

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        assert rec.wait_closed(ws) == (1006, "")
        assert "FRAME_SIZE_ERROR" in str(ws.error)
        assert server.done.wait(10)
    assert rec.messages == ["padded"]
    assert answers[0].error_code == FRAME_SIZE_ERROR


@pytest.mark.timeout(30)
def test_backpressure_withholds_the_credit_of_padded_data_until_drained() -> None:
    """Padded DATA goes through h2. With more undelivered than ``max_queued_bytes``, the
    connection's credit comes back at once but the stream's is withheld until the app has
    taken the messages (``update()``), then returned through h2 in one WINDOW_UPDATE."""
    sent: dict[str, Any] = {}
    credited = threading.Event()

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        mark = len(conn.frames)
        burst = b""
        for i in range(4):
            payload = bytes([1]) + frame_bytes(OP_BINARY, bytes([i]) * 3000) + bytes(1)
            burst += frame(DATA, PADDED, sid, payload)
        sent["bytes"] = total = len(burst) - 4 * 9
        conn.send(burst)
        while sum(f.increment for f in conn.frames[mark:]
                  if f.type == WINDOW_UPDATE and f.stream_id == 0) < total:
            conn.read_frame()
        sent["early"] = [f for f in conn.frames[mark:]
                         if f.type == WINDOW_UPDATE and f.stream_id == sid]
        credited.set()
        sent["late"] = conn.read_until(lambda f: f.type == WINDOW_UPDATE and f.stream_id == sid)
        first_message(conn, sid)

    with MiniH2(scenario) as server:
        rec = Recorder()
        # The queue limit is at least max_message_size: 3000 here, so that every read
        # with a message in it pauses the stream, however TCP cuts the burst.
        ws = open_h2(server.url, rec, max_queued_bytes=KiB, max_message_size=3000)
        ws.send("hello")
        assert credited.wait(10)
        assert ws.queued_amount == 4 * 3000  # nothing taken yet
        pump(ws, rec, 4)
        assert rec.messages == [bytes([i]) * 3000 for i in range(4)]
        ws.send("drained")
        assert server.done.wait(10)
        finish(ws, rec)
    assert sent["early"] == []  # withheld while the socket held too much
    assert sent["late"].increment == sent["bytes"]


@pytest.mark.timeout(30)
def test_socket_paused_by_data_that_came_with_the_answer_resumes() -> None:
    """More than ``max_queued_bytes`` in the same write as the CONNECT answer (most likely
    handed to the socket when it takes over the stream, their credit already returned): the
    socket pauses, and once the app has taken the messages the stream flows again."""
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        burst = b"".join(conn.data(1, frame_bytes(OP_BINARY, bytes([i]) * 3000))
                         for i in range(3))
        sid = conn.accept(then=burst)
        first_message(conn, sid)
        conn.send(conn.data(sid, frame_bytes(OP_TEXT, b"more")))
        first_message(conn, sid)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec, max_queued_bytes=4 * KiB, max_message_size=4 * KiB)
        pump(ws, rec, 3)
        assert rec.messages == [bytes([i]) * 3000 for i in range(3)]
        ws.send("took them")
        pump(ws, rec, 4)
        assert rec.messages[3:] == ["more"] and not rec.closes
        ws.send("bye")
        assert server.done.wait(10)
        finish(ws, rec)


@pytest.mark.timeout(30)
def test_withheld_credit_is_not_returned_for_a_stream_the_server_reset() -> None:
    """A paused stream that the server resets: its messages are still delivered, and
    draining them returns no credit for the dead stream."""
    done = threading.Event()
    after: list[Frame] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        burst = b"".join(frame(DATA, PADDED, sid, bytes([1]) + frame_bytes(
            OP_BINARY, bytes(3000)) + bytes(1)) for _ in range(3))
        conn.send(burst + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))
        mark = len(conn.frames)
        conn.send(frame(PING, 0, 0, b"barrier!"))
        conn.read_until(lambda f: f.type == PING and f.flags & ACK)
        done.set()
        conn.send(frame(PING, 0, 0, b"barrier2"))  # after the app drained (below)
        conn.read_until(lambda f: f.type == PING and f.flags & ACK and f.payload == b"barrier2")
        after.extend(conn.frames[mark:])

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec, max_queued_bytes=4 * KiB,
                     max_message_size=4 * KiB)
        ws.send("hello")
        assert done.wait(10)
        assert rec.wait_closed(ws) == (1006, "")  # the messages first, then the end
        assert rec.messages == [bytes(3000)] * 3
        assert server.done.wait(10)
    assert [f for f in after if f.type == WINDOW_UPDATE and f.stream_id == 1] == []


# -- a socket that fails while its data is delivered ---------------------------------------------


class RefusingPool(blockws.BufferPool):
    """A buffer pool that refuses large buffers (as a pool with a memory cap might); the
    parser takes its memory from the pool on the reading thread."""

    def allocate(self, size: int) -> bytearray:
        if size > 1000:
            raise MemoryError(f"no buffer of {size} bytes for you")
        return super().allocate(size)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("when", ["live", "with-the-answer"])
def test_a_socket_failing_in_delivery_ends_its_stream_only(when: str) -> None:
    """The socket's buffer pool raises while a binary message is delivered (on a live stream,
    or on data that came with the CONNECT answer, before the socket took over): that socket
    ends with the error in ``ws.error``, its stream is reset with CANCEL, and the next socket
    on the connection is served."""
    seen: dict[str, Frame] = {}
    # A fragmented binary message: the parser assembles it in memory from the pool.
    big = frame_bytes(OP_BINARY, bytes(3000), fin=False) + frame_bytes(OP_CONT, bytes(3000))

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        if when == "live":
            sid = conn.accept()
            first_message(conn, sid)
            conn.send(conn.data(sid, big))
        else:
            sid = conn.accept(then=conn.data(1, big))
        seen["reset"] = conn.read_until(lambda f: f.type == RST_STREAM)
        second = conn.accept()
        conn.send(conn.data(second, frame_bytes(OP_TEXT, b"next one")))
        first_message(conn, second)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, http2=H2C, extensions=[], buffer_pool=RefusingPool(),
                               **rec.callbacks())
        ws.open()
        if when == "live":
            rec.wait_open(ws)
            ws.send("hello")
        assert rec.wait_closed(ws)[0] == 1006
        assert "no buffer of" in repr(ws.error), repr(ws.error)
        rec2 = Recorder()
        ws2 = open_h2(server.url, rec2)
        pump(ws2, rec2, 1)
        assert rec2.messages == ["next one"]
        ws2.send("thanks")
        assert server.done.wait(10)
        finish(ws2, rec2)
    assert (seen["reset"].stream_id, seen["reset"].error_code) == (1, CANCEL)
    assert len(server.conns) == 1


# -- closing -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_abort_during_the_close_grace_resets_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server closed, the client replied, and the server does not end the stream: the
    client would reset it after the close grace (5 s here). ``abort()`` meanwhile resets it at
    once, and ``on_closed`` still reports the server's close code."""
    monkeypatch.setattr(blockws.http2, "_CLOSE_GRACE", 5.0)
    replied = threading.Event()
    seen: dict[str, Any] = {}

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        conn.send(conn.data(sid, frame_bytes(OP_CLOSE, struct.pack("!H", 4001) + b"done")))
        seen["reply"] = first_message(conn, sid)
        replied.set()
        seen["reset"] = conn.read_until(lambda f: f.type == RST_STREAM)
        seen["reset_at"] = time.monotonic()

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        assert replied.wait(10)
        # The writer starts the grace right after its write returns; nothing marks it.
        time.sleep(0.05)
        aborted_at = time.monotonic()
        ws.abort()
        assert rec.wait_closed(ws)[0] == 4001
        assert server.done.wait(10)
    assert seen["reply"].payload[0] == 0x80 | OP_CLOSE
    assert seen["reset"].error_code == CANCEL
    assert seen["reset_at"] - aborted_at < 2.0  # not after the 5 s grace


# -- a malformed answer ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_malformed_status_fails_only_its_own_stream() -> None:
    """``:status: abc`` (h2 lets it through): the CONNECT is refused as malformed (a stream
    error, RFC 9113 8.1.1), and the other socket on the connection is not touched."""
    got_first = threading.Event()

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        one = conn.accept()
        first_message(conn, one)
        got_first.set()
        request = conn.read_until(lambda f: f.type == HEADERS)
        # ":status" with a literal value, never indexed (RFC 7541 6.2.3): name index 8.
        block = b"\x18\x03abc"
        conn.send(frame(HEADERS, END_HEADERS, request.stream_id, block))
        conn.send(conn.data(one, frame_bytes(OP_TEXT, b"still here")))
        first_message(conn, one)

    with MiniH2(scenario) as server:
        rec1, rec2 = Recorder(), Recorder()
        ws1 = open_h2(server.url, rec1)
        ws1.send("hello")
        assert got_first.wait(10)
        ws2 = blockws.WebSocket(server.url, http2=H2C, extensions=[], **rec2.callbacks())
        ws2.open()
        assert rec2.wait_closed(ws2)[0] == 1006
        assert isinstance(ws2.error, HTTP2Unavailable), repr(ws2.error)
        pump(ws1, rec1, 1)
        assert rec1.messages == ["still here"] and not rec1.closes
        ws1.send("ok")
        assert server.done.wait(10)
        finish(ws1, rec1)


# == the engine: ServerEnd ====================================================================


class ServerEnd:
    """An in-memory transport; its far end is an ``h2`` server that answers every extended
    CONNECT with 200 (unless ``answer`` is False) and records the client's frames' events."""

    can_try_write = False
    sock = None
    alpn_protocol = "h2"

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.server = h2.connection.H2Connection(config)
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        self.server.initiate_connection()
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.inbox.put(self.server.data_to_send())
        self.cond = threading.Condition()
        self.answer = True
        self.write_error: BaseException | None = None
        self.aborted = False
        self.closed = False
        self.writes = 0
        self.events: list[h2.events.Event] = []

    def write(self, chunks: Any) -> None:
        if self.write_error is not None:
            raise self.write_error
        data = b"".join(bytes(c) for c in chunks)
        with self.cond:
            if self.aborted:
                raise ConnectionLost("aborted")
            self.writes += 1
            for event in self.server.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.RequestReceived) and self.answer:
                    self.server.send_headers(event.stream_id, [(b":status", b"200")])
            out = self.server.data_to_send()
            if out:
                self.inbox.put(out)
            self.cond.notify_all()

    def send(self, fn: Callable[[h2.connection.H2Connection], Any]) -> None:
        """Have the server state machine do ``fn`` and send what it produces."""
        with self.cond:
            fn(self.server)
            self.inbox.put(self.server.data_to_send())

    def recv(self, timeout: float | None = None) -> bytes:
        return self.inbox.get(timeout=timeout)

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        self.inbox.put(b"")

    def close(self) -> None:
        self.closed = True

    def resets(self) -> dict[int, int]:
        with self.cond:
            return {e.stream_id: e.error_code for e in self.events
                    if isinstance(e, h2.events.StreamReset)}

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(condition, timeout)


class Sink:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.data: list[bytes] = []
        self.fail = fail
        self.lost = threading.Event()
        self.losses: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.data.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.losses.append(exc)
        self.lost.set()


@pytest.fixture
def end() -> Iterator[ServerEnd]:
    transport = ServerEnd()
    yield transport
    transport.abort()


@pytest.fixture
def conn(end: ServerEnd) -> Iterator[H2Connection]:
    connection = H2Connection(end, ("cov",), HTTP2Settings(idle_timeout=100.0))  # type: ignore[arg-type]
    connection.handshake(Deadline(5.0))
    yield connection
    connection.close()


class ResetBeforeSettings(ServerEnd):
    """A server that reset the connection before sending anything: at the
    client's first write (``at_write``), or at its first read."""

    def __init__(self, at_write: bool) -> None:
        super().__init__()
        self.at_write = at_write
        self.inbox = queue.Queue()  # no SETTINGS: nothing was sent

    def write(self, chunks: Any) -> None:
        if self.at_write:
            raise ConnectionLost("connection lost: Connection reset by peer")

    def recv(self, timeout: float | None = None) -> bytes:
        raise ConnectionLost("connection lost: Connection reset by peer")


@pytest.mark.parametrize("at_write", [True, False], ids=["at the write", "at the read"])
def test_a_reset_before_the_servers_settings_is_a_close(at_write: bool) -> None:
    """As a close before SETTINGS: HTTP/2 unavailable (not refused), so the
    opening falls back to HTTP/1.1, which says what the refusal may mean
    (a TLS 1.3 server refusing a missing client certificate resets so)."""
    end = ResetBeforeSettings(at_write)
    connection = H2Connection(end, ("cov",), HTTP2Settings())  # type: ignore[arg-type]
    with pytest.raises(HTTP2Unavailable, match="reset before the server's HTTP/2 SETTINGS") as info:
        connection.handshake(Deadline(5.0))
    assert not info.value.refused
    assert isinstance(info.value.__cause__, ConnectionLost)
    end.aborted = True  # our own abort: the ConnectionLost as it is
    with pytest.raises(ConnectionLost):
        H2Connection(end, ("cov",), HTTP2Settings()).handshake(Deadline(5.0))  # type: ignore[arg-type]


def open_stream(conn: H2Connection, deadline: float = 5.0) -> H2Stream:
    request = Request("ws://example.com/")
    conn.reserved += 1  # what the pool does before open_stream
    return conn.open_stream(request.parsed_url, request, [], Deadline(deadline), lambda t: None)


def barrier(end: ServerEnd, conn: H2Connection) -> None:
    """Wait until the reader handled everything the server sent so far (a PING's ACK)."""
    with end.cond:
        before = sum(isinstance(e, h2.events.PingAckReceived) for e in end.events)
    end.send(lambda s: s.ping(b"barrier!"))
    assert end.wait_for(lambda: sum(
        isinstance(e, h2.events.PingAckReceived) for e in end.events) > before)


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_stream_on_a_connection_that_died_since_its_reservation(
        end: ServerEnd, conn: H2Connection) -> None:
    """The pool reserved a slot, then the connection died before the CONNECT went out:
    open_stream raises ConnectionLost and frees the slot."""
    stream = open_stream(conn)
    sink = Sink()
    stream.run(sink)  # type: ignore[arg-type]
    end.inbox.put(b"")  # the server closes the connection
    assert sink.lost.wait(5)
    assert isinstance(sink.losses[0], ConnectionLost)
    with pytest.raises(ConnectionLost, match="HTTP/2 connection lost"):
        open_stream(conn)
    assert conn.reserved == 0


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_connect_answer_not_in_time(end: ServerEnd, conn: H2Connection) -> None:
    """No answer to the extended CONNECT before the deadline: OpenTimeout, the stream is
    reset (CANCEL) and given back, and the connection stays usable."""
    end.answer = False
    with pytest.raises(OpenTimeout, match="CONNECT response"):
        open_stream(conn, deadline=0.2)
    assert end.wait_for(lambda: end.resets().get(1) == CANCEL)
    assert conn.streams == {} and conn.reserved == 0
    end.answer = True
    stream = open_stream(conn)
    assert stream.stream_id == 3 and stream.status == 200


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_connect_that_cannot_be_written(end: ServerEnd, conn: H2Connection) -> None:
    """The CONNECT's HEADERS cannot be written (the socket broke): open_stream raises the
    transport's error, and the stream and its slot are given back."""
    end.write_error = ConnectionLost("broken pipe")
    with pytest.raises(ConnectionLost, match="broken pipe"):
        open_stream(conn)
    assert conn.streams == {} and conn.reserved == 0
    assert end.aborted  # a failed write leaves the connection unusable: aborted


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_write_failing_with_a_foreign_exception(end: ServerEnd, conn: H2Connection) -> None:
    """A transport write that raises something other than a TransportError: the connection
    is aborted and the writer gets ConnectionLost, chained to the cause."""
    stream = open_stream(conn)
    stream.run(Sink())  # type: ignore[arg-type]
    end.write_error = ValueError("odd failure")
    with pytest.raises(ConnectionLost, match="HTTP/2 write failed") as info:
        stream.write([b"data"])
    assert isinstance(info.value.__cause__, ValueError)
    assert end.aborted


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_empty_write_sends_nothing(end: ServerEnd, conn: H2Connection) -> None:
    stream = open_stream(conn)
    stream.run(Sink())  # type: ignore[arg-type]
    barrier(end, conn)
    with end.cond:
        writes = end.writes
    stream.write([b""])
    stream.write([b"", b""])
    assert stream.bytes_written == 0
    with end.cond:
        assert end.writes == writes
        assert not any(isinstance(e, h2.events.DataReceived) for e in end.events)


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_finish_closing_twice_schedules_one_reset(end: ServerEnd,
                                                           conn: H2Connection) -> None:
    stream = open_stream(conn)
    sink = Sink()
    stream.run(sink)  # type: ignore[arg-type]
    stream.write([b"our close frame"])
    stream.finish_closing()
    stream.finish_closing()  # the grace is already running
    assert sink.lost.wait(2)
    assert end.wait_for(lambda: end.resets().get(stream.stream_id) == CANCEL)
    assert sink.losses == [None]  # reported once


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_finish_closing_after_the_server_ended_the_stream(end: ServerEnd,
                                                                 conn: H2Connection) -> None:
    """The server ended the stream (END_STREAM) before our close was written: finish_closing
    resets nothing (a later write on another stream flushes whatever was queued)."""
    one, two = open_stream(conn), open_stream(conn)
    sink = Sink()
    one.run(sink)  # type: ignore[arg-type]
    two.run(Sink())  # type: ignore[arg-type]
    one.write([b"our close reply"])
    end.send(lambda s: s.end_stream(one.stream_id))
    assert sink.lost.wait(2) and sink.losses == [None]
    one.finish_closing()
    two.write([b"flush"])
    assert end.wait_for(lambda: any(isinstance(e, h2.events.DataReceived)
                                    and e.stream_id == two.stream_id for e in end.events))
    assert one.stream_id not in end.resets()
    assert sink.losses == [None]


@pytest.mark.unit
@pytest.mark.timeout(10)
def test_engine_close_of_a_dead_connection_writes_nothing(end: ServerEnd) -> None:
    connection = H2Connection(end, ("cov",), HTTP2Settings())  # type: ignore[arg-type]
    connection.handshake(Deadline(5.0))
    stream = open_stream(connection)
    sink = Sink()
    stream.run(sink)  # type: ignore[arg-type]
    end.inbox.put(b"")
    assert sink.lost.wait(5)
    with end.cond:
        writes = end.writes
    connection.close()
    assert end.writes == writes  # no GOAWAY on a dead connection
    assert end.closed


# == RefusedOrigins ===========================================================================


@pytest.mark.unit
def test_refused_origins_count_only_live_refusals() -> None:
    now = [0.0]
    refused = RefusedOrigins(ttl=10.0, clock=lambda: now[0])
    refused.add(("wss", "a.example", 443), "no RFC 8441")
    now[0] = 6.0
    refused.add(("wss", "b.example", 443), "ALPN chose http/1.1")
    assert len(refused) == 2
    now[0] = 10.0  # a's refusal expires (ttl reached)
    assert len(refused) == 1
    assert ("wss", "a.example", 443) not in refused
    assert ("wss", "b.example", 443) in refused
    assert "not a tuple" not in refused
    now[0] = 16.0
    assert len(refused) == 0
