"""An H2Connection driven by its caller, without threads (``reader_thread=False``), and the
receive windows given to its constructor: what the HTTP/2 fuzz target (``benchmarks/fuzz``)
relies on. The server is the ``h2`` package's server state machine, in memory; it answers
the extended CONNECT from inside the client's write, by handing the answer to
:meth:`H2Connection.data_received`, as a reader thread could while the request is written.
"""

from __future__ import annotations

import threading
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from h2peers import DATA, frame

from blockws.deadline import Deadline
from blockws.exceptions import ConnectionLost
from blockws.handshake import Request
from blockws.http2 import H2Connection, H2Stream, HTTP2Settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Server:
    """The transport of a thread-free connection; its far end is an ``h2`` server."""

    alpn_protocol = "h2"

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
        })
        self.h2.initiate_connection()
        self.reads = [self.h2.data_to_send()]  # what the handshake reads
        self.conn: H2Connection | None = None
        self.events: list[Any] = []
        self.writers: set[str] = set()  # the threads that wrote
        self.aborted = False

    def recv(self, timeout: float | None = None) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def write(self, chunks: Any) -> None:
        self.writers.add(threading.current_thread().name)
        events = self.h2.receive_data(b"".join(bytes(c) for c in chunks))
        self.events += events
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.h2.send_headers(event.stream_id, [(b":status", b"200")])
        self.send()

    def send(self, extra: bytes = b"") -> bool:
        """Hand what the server has to say (and ``extra``) to the client, as one read."""
        data = self.h2.data_to_send() + extra
        if data and self.conn is not None and self.conn.dead is None:
            return self.conn.data_received(data)
        return True

    def resets(self) -> list[tuple[int, int]]:
        return [(e.stream_id, e.error_code) for e in self.events
                if isinstance(e, h2.events.StreamReset)]

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[BaseException | None] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


def h2_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("blockws-h2-")]


def connect(**options: Any) -> tuple[Server, H2Connection, H2Stream, Sink]:
    server = Server()
    conn = H2Connection(server, ("driven",), HTTP2Settings(idle_timeout=100.0),  # type: ignore[arg-type]
                        reader_thread=False, **options)
    server.conn = conn
    conn.handshake(Deadline(5.0))
    request = Request("ws://example.com/")
    conn.reserved = 1
    stream = conn.open_stream(request.parsed_url, request, [], Deadline(5.0), lambda t: None)
    sink = Sink()
    stream.run(sink)
    return server, conn, stream, sink


def test_driven_connection_starts_no_thread() -> None:
    """Handshake, CONNECT, data, a reset and the close, all on the calling thread: no reader
    thread, no flusher (the reset is written before abort() returns)."""
    before = h2_threads()
    server, conn, stream, sink = connect()
    assert stream.status == 200
    server.h2.send_data(1, b"hello")
    assert server.send()
    assert bytes(sink.data) == b"hello"
    stream.abort()
    assert server.resets() == [(1, h2.errors.ErrorCodes.CANCEL)]
    assert sink.lost == [None]
    conn.close()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in server.events)  # GOAWAY
    assert conn.dead is None  # until the caller hands in the end
    assert conn.data_received(b"") is False
    assert isinstance(conn.dead, ConnectionLost)
    assert h2_threads() == before
    assert server.writers == {threading.current_thread().name}


def test_driven_connection_the_server_closes() -> None:
    """The end without close(): the connection dies with ConnectionLost, and so does the
    stream (what a reader thread reports when the server closes the connection)."""
    server, conn, stream, sink = connect()
    assert conn.data_received(b"") is False
    assert server.aborted
    assert isinstance(conn.dead, ConnectionLost)
    assert "closed" in str(conn.dead)
    assert len(sink.lost) == 1 and isinstance(sink.lost[0], ConnectionLost)


def test_driven_connection_protocol_error() -> None:
    """A frame h2 refuses ends the connection: data_received says so, GOAWAY goes out."""
    server, conn, stream, sink = connect()
    assert conn.data_received(frame(DATA, 0, 0, b"x")) is False  # DATA on stream 0
    assert isinstance(conn.dead, ConnectionLost)
    terminated = [e for e in server.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [e.error_code for e in terminated] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert len(sink.lost) == 1 and isinstance(sink.lost[0], ConnectionLost)


def test_windows_from_the_constructor() -> None:
    """stream_window and connection_window are what the server is told (SETTINGS and the
    connection's WINDOW_UPDATE), and what the reader enforces: DATA beyond the stream's
    window resets that stream with FLOW_CONTROL_ERROR."""
    server, conn, stream, sink = connect(stream_window=1000, connection_window=5000)
    assert server.h2.remote_settings.initial_window_size == 1000
    assert server.h2.outbound_flow_control_window == 65535 + 5000
    assert server.h2.local_flow_control_window(1) == 1000
    assert server.send(frame(DATA, 0, 1, bytes(1000)))  # the whole window: fine
    assert len(sink.data) == 1000 and not sink.lost
    assert server.send(frame(DATA, 0, 1, bytes(1001)))  # credit came back: 1000 again
    assert server.resets() == [(1, h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)]
    assert len(sink.data) == 1000
    assert len(sink.lost) == 1 and "window" in str(sink.lost[0])
    assert conn.dead is None  # a stream error, not a connection error


def test_default_windows() -> None:
    """Without the keywords, the module's windows: 4 MiB per stream, 16 MiB more for the
    connection."""
    server, conn, stream, sink = connect()
    assert server.h2.remote_settings.initial_window_size == 4 * 1024 * 1024
    assert server.h2.outbound_flow_control_window == 65535 + 16 * 1024 * 1024
