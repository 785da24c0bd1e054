"""The HTTP/2 fuzz target: a whole H2Connection whose server is the fuzzer.

The connection runs as in a socket, its reader thread and all: a fake transport
(:class:`_H2Peer`) answers the preface and the extended CONNECT by hand, then hands the
fuzzer's bytes to the reader in the reads the fuzzer chose, and waits until the reader
is back in ``recv()``. See :func:`target_http2` for the rules.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from blockws import http2 as http2_mod
from blockws.deadline import Deadline
from blockws.exceptions import TransportError
from blockws.handshake import Request, parse_url
from blockws.http2 import H2Connection, HTTP2Settings

from .inputs import Input, pieces, ws_frames

__all__ = ["target_http2", "http2_seeds"]


# The server's half of an RFC 8441 exchange, written by hand: SETTINGS with
# ENABLE_CONNECT_PROTOCOL = 1, the ACK of ours, and HEADERS (:status 200, HPACK's static
# index 8) answering stream 1.
_H2_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x08\x00\x00\x00\x01"
_H2_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
_H2_ANSWER = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88"


class _H2Peer:
    """A transport whose reads are the test's bytes: the server of one H2Connection."""

    alpn_protocol = "h2"

    def __init__(self) -> None:
        self.incoming: queue.Queue[bytes] = queue.Queue()
        self.cond = threading.Condition()
        self.blocked = False  # the reader waits on an empty queue
        self.idle_reads = 0  # reads that found the queue empty
        self.ended = False

    def recv(self, timeout: float | None = None) -> bytes:
        with self.cond:
            if self.incoming.empty():
                self.blocked = True
                self.idle_reads += 1
                self.cond.notify_all()
        data = self.incoming.get()
        with self.cond:
            self.blocked = False
        return data

    def write(self, chunks: Sequence[Any]) -> None:
        for chunk in chunks:
            data = bytes(chunk)
            pos = 0
            while len(data) - pos >= 9:
                # Answer the extended CONNECT (a HEADERS frame on stream 1).
                if data[pos + 3] == 1 and data[pos + 5 : pos + 9] == b"\x00\x00\x00\x01":
                    self.incoming.put(_H2_ANSWER)
                pos += 9 + int.from_bytes(data[pos : pos + 3], "big")

    def feed(self, pieces: Sequence[bytes]) -> None:
        """Queue ``pieces`` and wait until the reader has handled them all."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.blocked or self.ended, 10.0)
            before = self.idle_reads
            for piece in pieces:
                self.incoming.put(piece)
            assert self.cond.wait_for(lambda: self.idle_reads > before or self.ended, 10.0)

    def abort(self) -> None:
        with self.cond:
            if not self.ended:
                self.ended = True
                self.incoming.put(b"")
                self.cond.notify_all()

    def close(self) -> None:
        self.abort()


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


def _run_h2(pieces: list[bytes]) -> tuple[Any, ...]:
    watch = _ReaderFailed()  # the reader's catch-all logs "reader failed" at ERROR
    blockws_logger = logging.getLogger("blockws")
    blockws_logger.addHandler(watch)
    try:
        peer = _H2Peer()
        peer.incoming.put(_H2_SETTINGS + _H2_ACK)
        conn = H2Connection(peer, ("fuzz", id(peer)), HTTP2Settings())  # type: ignore[arg-type]
        conn.handshake(Deadline(5.0))
        conn.reserved = 1  # as the pool does for the stream about to open
        stream = conn.open_stream(_URL, Request("ws://fuzz/"), [], Deadline(5.0),
                                  lambda t: None)
        sink = _StreamSink()
        stream.run(sink)
        peer.feed(pieces)
        alive = not peer.ended  # the reader is back in recv(): nothing changes until we act
        delivered = bytes(sink.data)
        stream.close()
        conn.close()  # joins the reader thread
    finally:
        blockws_logger.removeHandler(watch)
    dead = None if alive else conn.dead
    assert not watch.records, watch.records[0].getMessage()
    assert dead is None or isinstance(dead, TransportError), repr(dead)
    return delivered, type(dead), tuple(sink.lost[:1])


_URL = parse_url("ws://fuzz/")


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
    windows = http2_mod._STREAM_WINDOW, http2_mod._CONNECTION_WINDOW
    if small:
        http2_mod._STREAM_WINDOW, http2_mod._CONNECTION_WINDOW = 300, 600
    try:
        whole = _run_h2([stream])
        cut = _run_h2(list(pieces(stream, cuts)))
    finally:
        http2_mod._STREAM_WINDOW, http2_mod._CONNECTION_WINDOW = windows
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
