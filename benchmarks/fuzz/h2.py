"""The HTTP/2 fuzz target: a whole H2Connection whose server is the fuzzer.

The connection runs without threads (``reader_thread=False``): this module is its
reader, handing the fuzzer's bytes to :meth:`H2Connection.data_received` in the reads
the fuzzer chose, as the reader thread hands it what ``recv()`` returns. The fake
transport (:class:`_H2Peer`) answers the preface and the extended CONNECT by hand.
Everything after the read (parsing, the DATA fast path, h2, credit, the connection's
end) is the code the reader thread runs. See :func:`target_http2` for the rules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from blockws.deadline import Deadline
from blockws.exceptions import TransportError
from blockws.handshake import Request, parse_url
from blockws.http2 import H2Connection, HTTP2Settings
from blockws.timer import timer

from .inputs import Input, pieces, ws_frames

__all__ = ["target_http2", "http2_seeds", "hold_timer"]


def hold_timer() -> None:
    """Keep blockws's process-wide timer thread running until the process ends.

    The thread ends when its last job is done or cancelled, and each connection
    here schedules and cancels two (the idle close in ``release``, the GOAWAY
    linger in ``close``): without a job that stays, a thread starts and ends for
    each, most of an input's time. For the fuzzing processes only: a test process
    expects the timer thread to end.
    """
    timer.call_later(1e6, lambda: None)


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


def _run_h2(
    pieces: Sequence[bytes], windows: tuple[int, int] | None = None, close: bool = True
) -> tuple[Any, ...]:
    """Open a stream on a thread-free connection and hand it ``pieces`` as its reads;
    then, if it is alive, end it: by ``close()`` (the stream's first, as a socket's
    close does), or else as a server that closes the connection does. Returns the data
    the stream got, the connection's death (if the reads killed it) and the stream's
    end (if the reads ended it), all taken before the ending."""
    watch = _ReaderFailed()  # the reader's catch-all logs "reader failed" at ERROR
    blockws_logger = logging.getLogger("blockws")
    blockws_logger.addHandler(watch)
    try:
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
        alive = True
        for piece in pieces:
            if not conn.data_received(piece):
                alive = False  # the connection ended: a reader thread would read no more
                break
        delivered = bytes(sink.data)
        dead = None if alive else conn.dead
        end = tuple(sink.lost[:1])
        if close:
            stream.close()
            conn.close()
            if alive:
                conn.data_received(b"")  # the end of the transport that close() aborted
        elif alive:
            conn.data_received(b"")  # the server closed the connection
            assert isinstance(conn.dead, TransportError), repr(conn.dead)
            stream.close()
    finally:
        blockws_logger.removeHandler(watch)
    assert not watch.records, watch.records[0].getMessage()
    assert dead is None or isinstance(dead, TransportError), repr(dead)
    return delivered, type(dead), end


_URL = parse_url("ws://fuzz/")
_REQUEST = Request("ws://fuzz/")  # open_stream only reads it


def target_http2(data: bytes) -> None:
    """H2Connection's reader: DATA frames of an open, answered stream take the fast path;
    every other frame goes through h2. The same bytes in one read and in several give
    the same data to the stream and the same end; nothing reaches the reader's catch-all.
    One input in eight runs with receive windows of 300 bytes (stream) and 65535 + 600
    (connection), so that DATA beyond a window is common; then the outcome may depend on
    the cuts (credit goes back between reads), and only the other rules hold."""
    inp = Input(data)
    first = inp.byte()
    raw = first >= 0xE0
    small = not raw and first & 7 == 7
    stream = inp.rest() if raw else _h2_frames(inp)
    if not stream:
        return
    cuts = Input(data[-8:]).cuts(len(stream))
    windows = (300, 600) if small else None
    whole = _run_h2([stream], windows)
    if not cuts:
        return  # the same reads again: nothing to compare
    # Ended as a server ends it (close() ended the whole run): both endings run.
    cut = _run_h2(list(pieces(stream, cuts)), windows, close=False)
    if not small:
        # The windows (4 MiB, 16 MiB) are far larger than any input: credit returned
        # between reads cannot change the outcome.
        assert whole == cut, (cuts, whole, cut)


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
