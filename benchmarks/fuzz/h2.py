"""The HTTP/2 fuzz target: a whole H2Connection whose server is the fuzzer.

The connection runs without threads (``reader_thread=False``): this module is its
reader, handing the fuzzer's bytes to :meth:`H2Connection.data_received` in the reads
the fuzzer chose, as the reader thread hands it what ``recv()`` returns. The fake
transport (:class:`_H2Peer`) answers the preface and the extended CONNECT by hand.
Everything after the read (parsing, the DATA fast path, h2, credit, the connection's
end) is the code the reader thread runs. See :func:`target_http2` for the rules.

Speed (``python -m benchmarks.fuzz --target http2``): each run takes a copy of one
connection opened once per process (:func:`_opened`), and the fuzzing processes keep
the timer thread asleep (:func:`hold_timer`). What is left is about half the copy
(a pickle round trip of h2's state, ~120 us) and half the reads themselves.
"""

from __future__ import annotations

import copyreg
import io
import logging
import pickle
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from blockws.deadline import Deadline
from blockws.exceptions import TransportError
from blockws.handshake import Request, parse_url
from blockws.http2 import H2Connection, H2Stream, HTTP2Settings
from blockws.timer import timer

from .inputs import Input, pieces, ws_frames

__all__ = ["target_http2", "http2_seeds", "hold_timer"]


def hold_timer() -> None:
    """Keep blockws's process-wide timer thread running, and asleep, until the process
    ends: for the fuzzing processes only (a test process expects the thread to end).

    Each connection here schedules and cancels two timer jobs: the idle close in
    ``release()``, 5 s away, and the GOAWAY linger in ``close()``, 1 s away. The thread
    ends when no job is left, so without a job that stays it starts and ends for each
    (most of an input's time); and a job that becomes the earliest wakes the thread,
    which then takes the GIL from the fuzzer. So a job that reschedules itself every
    0.1 s stays the earliest: the thread wakes ten times a second, not per connection.
    """
    def tick() -> None:
        timer.call_later(_TICK, tick)

    timer.call_later(_TICK, tick)


_TICK = 0.1


# The server's half of an RFC 8441 exchange, written by hand: SETTINGS with
# ENABLE_CONNECT_PROTOCOL = 1, the ACK of ours, and HEADERS (:status 200, HPACK's static
# index 8) answering stream 1.
_H2_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x08\x00\x00\x00\x01"
_H2_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
_H2_ANSWER = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88"


class _H2Peer:
    """The transport of one thread-free H2Connection: its server, answering by hand.

    ``recv`` serves the handshake (the only reads the connection makes itself);
    ``write`` answers the extended CONNECT at once, by handing the answer to the
    connection as its next read, as a reader thread could while the CONNECT is
    still being written.
    """

    alpn_protocol = "h2"

    def __init__(self) -> None:
        self.conn: H2Connection | None = None
        self.reads = [_H2_SETTINGS + _H2_ACK]
        self.answered = False
        self.ended = False

    def recv(self, timeout: float | None = None) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def write(self, chunks: Sequence[Any]) -> None:
        if self.answered:
            return
        answer = False
        for chunk in chunks:
            data = bytes(chunk)
            pos = 0
            while len(data) - pos >= 9:
                # The extended CONNECT: a HEADERS frame on stream 1.
                if data[pos + 3] == 1 and data[pos + 5 : pos + 9] == b"\x00\x00\x00\x01":
                    answer = True
                pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
        if answer and self.conn is not None and not self.ended:
            self.answered = True
            self.conn.data_received(_H2_ANSWER)

    def abort(self) -> None:
        self.ended = True

    def close(self) -> None:
        self.ended = True


class _StreamSink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[Any] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(type(exc) if exc is not None else None)


class _ReaderFailed(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_H2_TYPES = (0, 0, 0, 1, 2, 3, 4, 6, 7, 8, 9)  # DATA mostly; then every other type


def _h2_frames(inp: Input) -> bytes:
    """Frames built from the fuzzer's choices: DATA on the open stream mostly."""
    out = bytearray()
    while inp.pos < len(inp.data):
        kind = inp.byte()
        ftype = _H2_TYPES[kind % len(_H2_TYPES)] if kind < 0xF0 else kind & 0x0F
        flags = (0, 0, 0x01, 0x08, 0x09, 0x04)[inp.int(6)] if inp.bool() else inp.byte()
        sid = (1, 1, 1, 0, 3, 2)[inp.int(6)]
        n = inp.int(300)
        payload = inp.bytes(n)
        if ftype == 0 and flags & 0x08 and payload:
            payload = bytes([min(payload[0], len(payload) - 1)]) + payload[1:]  # pad length
        length = len(payload) if inp.byte() < 250 else inp.int(1 << 16)
        out += length.to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big")
        out += payload
    return bytes(out)


_Opened = tuple[H2Connection, H2Stream, _StreamSink, _H2Peer]


def _open(windows: tuple[int, int] | None) -> _Opened:
    """Open a thread-free connection and its stream for real; returns them, the stream's
    sink and the connection's transport."""
    peer = _H2Peer()
    stream_window, connection_window = windows or (None, None)
    conn = H2Connection(
        peer,  # type: ignore[arg-type]
        ("fuzz", id(peer)),
        HTTP2Settings(),
        reader_thread=False,
        stream_window=stream_window,
        connection_window=connection_window,
    )
    peer.conn = conn
    conn.handshake(Deadline(5.0))
    conn.reserved = 1  # as the pool does for the stream about to open
    stream = conn.open_stream(_URL, _REQUEST, [], Deadline(5.0), lambda t: None)
    sink = _StreamSink()
    stream.run(sink)
    return conn, stream, sink, peer


#: Pickled _open() results, per windows (see _opened).
_OPENED: dict[tuple[int, int] | None, bytes] = {}
#: Lock types, and how a pickle makes a new one.
_LOCKS = {
    type(threading.Lock()): (threading.Lock, ()),
    type(threading.RLock()): (threading.RLock, ()),
}


def _opened(windows: tuple[int, int] | None) -> _Opened:
    """What :func:`_open` returns, as a copy of one opened once per process and windows.

    Opening costs three times what the copy does (h2's connection setup, HPACK, the
    answer: ~400 against ~120 us), most of a run's time; and nothing in an opened
    connection depends on the input (only its id and its key differ from one to the
    next). The copy is a pickle round trip of the whole graph (connection, h2's state,
    stream, sink, peer); the locks, which do not pickle, come back new and unlocked
    (none is held between reads).
    """
    blob = _OPENED.get(windows)
    if blob is None:
        out = io.BytesIO()
        pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = dict(copyreg.dispatch_table)
        for kind, new in _LOCKS.items():
            pickler.dispatch_table[kind] = lambda lock, new=new: new
        pickler.dump(_open(windows))
        blob = _OPENED[windows] = out.getvalue()
    opened: _Opened = pickle.loads(blob)
    return opened


def _run_h2(
    pieces: Sequence[bytes],
    windows: tuple[int, int] | None = None,
    ending: str = "close",
    copy: bool = True,
) -> tuple[Any, ...]:
    """Open a stream on a thread-free connection (a copy of one opened for real, unless
    not ``copy``) and hand it ``pieces`` as its reads; then end what is left:

    * ``"close"``: ``close()`` the connection, then the stream (a pool shutting down);
    * ``"stream"``: the stream's ``close()`` first, as a socket's close does, then the
      connection's: the connection, idle, schedules its idle close, a timer job that
      keeps it alive for 5 s (cancelled, it waits in the timer's heap), so
      :func:`target_http2` takes this ending for one input in eight;
    * ``"server"``: the server closes the connection (``b""`` without ``close()``).

    Returns the data the stream got, the connection's death (if the reads killed it)
    and the stream's end (if the reads ended it), all taken before the ending."""
    watch = _ReaderFailed()  # the reader's catch-all logs "reader failed" at ERROR
    blockws_logger = logging.getLogger("blockws")
    blockws_logger.addHandler(watch)
    try:
        conn, stream, sink, peer = _opened(windows) if copy else _open(windows)
        alive = True
        for piece in pieces:
            if not conn.data_received(piece):
                alive = False  # the connection ended: a reader thread would read no more
                break
        delivered = bytes(sink.data)
        dead = None if alive else conn.dead
        end = tuple(sink.lost[:1])
        if ending == "stream":
            stream.close()
        if ending != "server":
            conn.close()
        if alive:
            conn.data_received(b"")  # the end of the transport (which close() aborted)
            assert ending != "server" or isinstance(conn.dead, TransportError), repr(conn.dead)
        stream.close()
        peer.conn = None  # close()'s timer job holds the peer for a second, not the rest
    finally:
        blockws_logger.removeHandler(watch)
    assert not watch.records, watch.records[0].getMessage()
    assert dead is None or isinstance(dead, TransportError), repr(dead)
    return delivered, type(dead), end


_URL = parse_url("ws://fuzz/")
_REQUEST = Request("ws://fuzz/")  # open_stream only reads it


class _Plan(NamedTuple):
    """What :func:`target_http2` does with an input."""

    stream: bytes  # the server's bytes
    cuts: list[int]  # where the second run's reads end
    windows: tuple[int, int] | None  # small receive windows, or the defaults
    ending: str  # how the first run ends (the second: "server"); see _run_h2


def _plan(data: bytes) -> _Plan | None:
    inp = Input(data)
    first = inp.byte()
    raw = first >= 0xE0
    small = not raw and first & 7 == 7
    stream = inp.rest() if raw else _h2_frames(inp)
    if not stream:
        return None
    cuts = Input(data[-8:]).cuts(len(stream))
    return _Plan(stream, cuts, (300, 600) if small else None,
                 "stream" if first & 0x38 == 0x38 else "close")


def target_http2(data: bytes) -> None:
    """H2Connection's reader: DATA frames of an open, answered stream take the fast path;
    every other frame goes through h2. The same bytes in one read and in several give
    the same data to the stream and the same end; nothing reaches the reader's catch-all.
    One input in eight runs with receive windows of 300 bytes (stream) and 65535 + 600
    (connection), so that DATA beyond a window is common; then the outcome may depend on
    the cuts (credit goes back between reads), and only the other rules hold."""
    plan = _plan(data)
    if plan is None:
        return
    whole = _run_h2([plan.stream], plan.windows, plan.ending)
    if not plan.cuts:
        return  # the same reads again: nothing to compare
    cut = _run_h2(list(pieces(plan.stream, plan.cuts)), plan.windows, "server")
    if plan.windows is None:
        # The windows (4 MiB, 16 MiB) are far larger than any input: credit returned
        # between reads cannot change the outcome.
        assert whole == cut, (plan.cuts, whole, cut)


def http2_seeds() -> list[bytes]:
    """Valid inputs for :func:`target_http2`."""
    def data(payload: bytes, flags: int = 0) -> bytes:
        # _h2_frames' choices: DATA, flags from the short list, stream 1, length, payload.
        n = len(payload)
        return bytes([0, 1, flags, 0, n >> 8, n & 255]) + payload + b"\x00"

    ws = ws_frames(False)
    return [
        b"\x00" + data(ws[0]) + data(ws[1][:100]) + data(ws[1][100:]),
        b"\x00" + data(ws[2]) + data(ws[5], 2),
        b"\x00" + data(ws[0], 3) + data(ws[0]),
        # Small windows (first byte & 7 == 7): the second frame is beyond the stream's.
        b"\x07" + data(bytes(200)) + data(bytes(200)) + data(ws[0]),
        b"\xff" + _H2_SETTINGS + b"\x00\x00\x05\x00\x00\x00\x00\x00\x01" + ws[0][:5],
    ]
