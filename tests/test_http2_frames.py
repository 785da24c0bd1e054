"""Incoming HTTP/2 frames the server must not send: oversized frames and DATA beyond the
flow-control windows we advertised (RFC 9113 4.2, 6.9.1), on blockws's fast path for DATA.

The server is :class:`h2peers.MiniH2`, a hand-written h2c server (prior knowledge), since the
``h2`` package refuses to break these rules. Each scenario answers the extended CONNECT, waits
for the client's first message (so that what follows arrives on an open, answered stream:
the fast path), then misbehaves and reads what the client answers.

The receive windows are 4 MiB per stream and 16 MiB for the connection, and credit goes back
after every read, so a server can only exceed them within one read: these tests shrink them
(``blockws.http2._STREAM_WINDOW`` / ``_CONNECTION_WINDOW``) so that one frame does.
"""

from __future__ import annotations

import time
from typing import Any

import h2.connection
import pytest
from faultserver import OP_BINARY, OP_TEXT, Recorder, frame_bytes
from h2peers import (
    DATA,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    PADDED,
    RST_STREAM,
    WINDOW_UPDATE,
    MiniConn,
    MiniH2,
    frame,
)

import blockws
import blockws.http2
from blockws.http2 import HTTP2Settings, pool

H2C = HTTP2Settings(cleartext=True, fallback=False)
KiB = 1024




def open_h2(url: str, rec: Recorder, **options: Any) -> blockws.WebSocket:
    ws = blockws.WebSocket(url, http2=H2C, extensions=[], **rec.callbacks(), **options)
    ws.open()
    rec.wait_open(ws)
    assert ws.http_version == "2"
    return ws


def first_message(conn: MiniConn, stream_id: int) -> None:
    """Wait for the client's first message on ``stream_id``."""
    conn.read_until(lambda f: f.type == DATA and f.stream_id == stream_id and bool(f.payload))


def check_lost(ws: blockws.WebSocket, rec: Recorder, words: str) -> None:
    assert rec.wait_closed(ws) == (1006, "")
    assert isinstance(ws.error, blockws.ConnectionLost), repr(ws.error)
    assert words in str(ws.error), str(ws.error)


# -- flow control ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_data_beyond_connection_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA beyond the connection window: GOAWAY(FLOW_CONTROL_ERROR), every stream 1006."""
    monkeypatch.setattr(blockws.http2, "_CONNECTION_WINDOW", 1)  # 65535 + 1 in all
    answers: list[Any] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        # One frame of 70000 bytes (our SETTINGS_MAX_FRAME_SIZE is 1 MiB): within the
        # stream window (4 MiB), beyond the connection's (65536).
        conn.send(frame(DATA, 0, sid, frame_bytes(OP_BINARY, bytes(69990))))
        answers.append(conn.read_until(lambda f: f.type in (GOAWAY, RST_STREAM)))

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        check_lost(ws, rec, "FLOW_CONTROL_ERROR")
        assert server.done.wait(10)
    assert rec.messages == []  # the offending frame was not delivered
    assert [(f.type, f.error_code) for f in answers] == [(GOAWAY, FLOW_CONTROL_ERROR)]
    assert pool.connections() == []


@pytest.mark.timeout(30)
def test_data_beyond_stream_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA beyond a stream's window is a stream error: RST_STREAM(FLOW_CONTROL_ERROR) on that
    stream, its socket 1006; the frame still counts for the connection window (credited), and
    the connection goes on serving the next socket."""
    monkeypatch.setattr(blockws.http2, "_STREAM_WINDOW", 16 * KiB)
    seen: dict[str, Any] = {}

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        seen["length"] = len(payload := frame_bytes(OP_BINARY, bytes(20000)))
        conn.send(frame(DATA, 0, sid, payload))
        seen["answer"] = conn.read_until(lambda f: f.type in (GOAWAY, RST_STREAM))
        # The connection window is credited for the dropped frame, stream 0.
        seen["credit"] = conn.read_until(lambda f: f.type == WINDOW_UPDATE and f.stream_id == 0)
        second = conn.accept()  # the next socket on the same connection
        conn.send(conn.data(second, frame_bytes(OP_TEXT, b"still here")))
        first_message(conn, second)

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        check_lost(ws, rec, "window")
        rec2 = Recorder()
        ws2 = open_h2(server.url, rec2)
        rec2.pump_until(ws2, lambda: bool(rec2.messages) or bool(rec2.closes))
        assert rec2.messages == ["still here"]
        ws2.send("bye")
        assert server.done.wait(10)
        ws2.abort()
        rec2.wait_closed(ws2)
    answer = seen["answer"]
    assert (answer.type, answer.stream_id, answer.error_code) == (RST_STREAM, 1, FLOW_CONTROL_ERROR)
    assert seen["credit"].increment == seen["length"]  # the dropped frame's whole payload
    assert len(server.conns) == 1  # both sockets on one connection


# -- frame size ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("split", [False, True], ids=["whole-header", "split-header"])
def test_frame_over_max_frame_size(split: bool) -> None:
    """A frame longer than our SETTINGS_MAX_FRAME_SIZE (1 MiB): GOAWAY(FRAME_SIZE_ERROR) as
    soon as its header arrives, without waiting for (or buffering) its payload."""
    answers: list[Any] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        header = frame(DATA, 0, sid, length=blockws.http2._MAX_FRAME + 1)
        if split:
            conn.send(header[:5])
            time.sleep(0.05)  # most likely a read of its own: the header completes later
            conn.send(header[5:])
        else:
            conn.send(header)
        answers.append(conn.read_until(lambda f: f.type in (GOAWAY, RST_STREAM)))

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        check_lost(ws, rec, "FRAME_SIZE_ERROR")
        assert server.done.wait(10)
    assert [(f.type, f.error_code) for f in answers] == [(GOAWAY, FRAME_SIZE_ERROR)]


# -- what came before a connection error -------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["fast", "h2"])
def test_data_before_a_connection_error_is_delivered(path: str) -> None:
    """Found by benchmarks/fuzz (target http2): messages in DATA frames that came in the same
    read as a frame that fails the connection were dropped, and delivered when TCP happened
    to cut the stream between them. Valid frames before the bad one now take effect first:
    on the fast path (DATA, then a frame over SETTINGS_MAX_FRAME_SIZE), and through h2
    (padded DATA, then an RST_STREAM of the wrong length, which h2 refuses with
    FRAME_SIZE_ERROR)."""
    answers: list[Any] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = conn.accept()
        first_message(conn, sid)
        if path == "fast":
            good = conn.data(sid, frame_bytes(OP_TEXT, b"before"))
            bad = frame(DATA, 0, sid, length=blockws.http2._MAX_FRAME + 1)
        else:
            good = frame(DATA, PADDED, sid, bytes([2]) + frame_bytes(OP_TEXT, b"before") + bytes(2))
            bad = frame(RST_STREAM, 0, sid, bytes(5))
        conn.send(good + bad)  # one write: one read, most likely
        answers.append(conn.read_until(lambda f: f.type == GOAWAY))

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        ws.send("hello")
        assert rec.wait_closed(ws)[0] == 1006
        assert isinstance(ws.error, blockws.ConnectionLost), repr(ws.error)
        assert server.done.wait(10)
    assert rec.messages == ["before"]
    assert answers[0].error_code == FRAME_SIZE_ERROR  # h2 says so too, for the RST_STREAM


@pytest.mark.timeout(30)
def test_empty_data_with_end_stream_keeps_the_connection() -> None:
    """Found by benchmarks/fuzz (target http2): an empty DATA frame with END_STREAM (how many
    servers end a stream) on a stream not yet handed to its socket made the reader return a
    credit of 0 through h2, which raises ValueError: the reader died, and with it every
    socket on the connection. Here the server answers the CONNECT and ends the stream in
    one write; that socket ends (1006), and the next one on the connection works."""
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        conn.accept(then=frame(DATA, END_STREAM, 1))  # the answer, then an empty DATA
        second = conn.accept()
        first_message(conn, second)
        conn.send(conn.data(second, frame_bytes(OP_TEXT, b"still here")))
        conn.read_until(lambda f: f.type == DATA and f.stream_id == second and bool(f.payload))

    with MiniH2(scenario) as server:
        rec1, rec2 = Recorder(), Recorder()
        ws1 = blockws.WebSocket(server.url, http2=H2C, extensions=[], **rec1.callbacks())
        ws1.open()
        assert rec1.wait_closed(ws1)[0] == 1006
        ws2 = open_h2(server.url, rec2)
        ws2.send("two")
        rec2.pump_until(ws2, lambda: bool(rec2.messages) or bool(rec2.closes))
        assert rec2.messages == ["still here"] and not rec2.closes
        ws2.send("bye")
        assert server.done.wait(10)
        ws2.abort()
        rec2.wait_closed(ws2)
    assert len(server.conns) == 1


# -- the fast path is taken -------------------------------------------------------------------


class DataSpy:
    """Counts the DATA frames that reach ``h2``'s ``receive_data`` (whole frames only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_frames = 0
        real = h2.connection.H2Connection.receive_data
        spy = self

        def receive_data(conn: h2.connection.H2Connection, data: Any) -> Any:
            buf, pos = bytes(data), 0
            while len(buf) - pos >= 9:
                if buf[pos + 3] == DATA:
                    spy.data_frames += 1
                pos += 9 + int.from_bytes(buf[pos:pos + 3], "big")
            return real(conn, data)

        monkeypatch.setattr(h2.connection.H2Connection, "receive_data", receive_data)


@pytest.mark.timeout(30)
def test_fast_path_from_the_first_data_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA that follows the CONNECT answer in the same read already takes the fast path;
    DATA with padding or END_STREAM goes through h2 (and is still delivered and credited)."""
    spy = DataSpy(monkeypatch)
    sizes = [0, 1, 125, 16 * KiB, 100 * KiB, 1024 * KiB]
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    seen: dict[str, Any] = {}

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        sid = 1
        burst = b"".join(conn.data(sid, frame_bytes(OP_BINARY, p)) for p in payloads)
        conn.accept(then=burst)  # the answer and every message in one write
        mark = len(conn.frames)  # the client's initial connection WINDOW_UPDATE is before
        first_message(conn, sid)
        seen["fast"] = spy.data_frames
        # A padded DATA frame: pad length 3, a message, 3 bytes of padding.
        padded = bytes([3]) + frame_bytes(OP_TEXT, b"padded") + bytes(3)
        conn.send(frame(DATA, PADDED, sid, padded))
        first_message(conn, sid)
        sent = sum(len(frame_bytes(OP_BINARY, p)) for p in payloads) + len(padded)
        seen["sent"] = sent
        # Credit for all of it comes back on the connection (padding included).
        while (credit := sum(f.increment for f in conn.frames[mark:]
                             if f.type == WINDOW_UPDATE and f.stream_id == 0)) < sent:
            conn.read_frame()
        seen["credit"] = credit

    with MiniH2(scenario) as server:
        rec = Recorder()
        ws = open_h2(server.url, rec)
        rec.pump_until(ws, lambda: len(rec.messages) == len(payloads) or bool(rec.closes))
        assert rec.messages == payloads
        ws.send("got them")
        rec.pump_until(ws, lambda: len(rec.messages) == len(payloads) + 1 or bool(rec.closes))
        assert rec.messages[-1] == "padded"
        ws.send("got it")
        assert server.done.wait(10)
        ws.abort()
        rec.wait_closed(ws)
    assert seen["fast"] == 0, f"{seen['fast']} DATA frame(s) went through h2"
    assert spy.data_frames == 1  # the padded one
    assert seen["credit"] == seen["sent"]


@pytest.mark.timeout(60)
def test_fast_path_with_hypercorn(hypercorn_h2_server: Any, monkeypatch: pytest.MonkeyPatch,
                                  ) -> None:
    """Echoes of many sizes over a real server: no DATA frame reaches h2."""
    spy = DataSpy(monkeypatch)
    rec = Recorder()
    ws = open_h2(hypercorn_h2_server.ws, rec)
    for n in [0, 1, 125, 65536, 300 * KiB, 5 * 1024 * KiB]:  # 5 MiB: beyond the stream window
        data = bytes([n % 256]) * n
        ws.send(data)
        rec.pump_until(ws, lambda n=n: bool(rec.closes) or (
            bool(rec.messages) and len(rec.messages[-1]) == n), timeout=30)
        assert rec.messages[-1] == data
    assert spy.data_frames == 0
    ws.close()
    assert rec.wait_closed(ws) == (1000, "")


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_frames_cut_across_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATA frames cut anywhere (in the 9-byte header, in the payload, over three reads)
    reach the socket whole and in order, one data_received per read that completes data:
    the completed leftover frame goes with the rest of its read, not on its own."""
    from benchmarks.fuzz import h2 as harness

    calls: list[int] = []
    real = harness._StreamSink.data_received

    def counting(self: Any, data: bytes) -> None:
        calls.append(len(data))
        real(self, data)

    monkeypatch.setattr(harness._StreamSink, "data_received", counting)

    def data(payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + payload

    payloads = [bytes([i]) * n for i, n in enumerate([100, 5000, 1, 300])]
    wire = b"".join(data(p) for p in payloads)
    expected = b"".join(payloads)
    first = 9 + 100
    for cut in (3, 9, 50, first + 4, first + 2000):
        for second in (None, cut + 7, cut + 3000):
            cuts = [0, cut] + ([second] if second is not None and second < len(wire) else [])
            pieces = [wire[a:b] for a, b in zip(cuts, cuts[1:] + [len(wire)])]
            calls.clear()
            delivered, dead, _ = harness._run_h2(pieces)
            assert (delivered, dead) == (expected, type(None)), (cut, second)
            # Every read here completes some data, and none is delivered in two calls.
            assert len(calls) <= len(pieces), (cut, second, calls, [len(p) for p in pieces])
