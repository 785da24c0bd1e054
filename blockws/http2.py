"""WebSocket over HTTP/2 (RFC 8441): shared connections and one stream per socket.

For ``wss://`` (and ``ws://`` with cleartext h2c turned on), a socket first
asks :data:`pool` for a stream. The pool keeps HTTP/2 connections per origin
and TLS settings; sockets to one origin share a connection, one stream each,
up to the server's ``SETTINGS_MAX_CONCURRENT_STREAMS``, and a new connection
is opened beyond that. A connection closes ``idle_timeout`` seconds after its
last stream ends.

Opening a stream (RFC 8441 sections 3-4): TLS ALPN must pick ``h2``; the
client sends the connection preface and waits for the server's SETTINGS,
which must carry ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`` (the ``h2`` package
does not check it, so this module does); then an extended CONNECT
(``:method CONNECT``, ``:protocol websocket``) with
``sec-websocket-version: 13``, the subprotocol and extension offers and the
user's headers. A 2xx answer opens the socket. Any of these failing raises
:class:`~blockws.exceptions.HTTP2Unavailable`, which the socket turns into a
fallback to HTTP/1.1 (or a failure, if fallback is off). Origins that failed
are remembered for the life of the process.

Threads: one reader thread per connection (``blockws-h2-<n>``) parses HTTP/2
frames and feeds each stream's data to its socket's protocol, then returns
flow-control credit (WINDOW_UPDATE) once the socket has consumed the data.
Writers (each socket's writer thread) send DATA under the connection lock,
never more than the peer's window and maximum frame size allow, and wait on
a condition -- not spinning -- while the window is closed. When the
connection fails, every stream on it reports ``connection_lost`` and each
socket gets its own ``on_closed``.

Closing (RFC 8441 section 5 and peer quirks): once both close frames have
been exchanged, the socket resets its stream with CANCEL rather than sending
END_STREAM, since some servers (hypercorn) never end the stream and drop the
whole connection on a client END_STREAM. A server END_STREAM or RST_STREAM
ends the socket like EOF.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .exceptions import ConnectionLost, HTTP2Unavailable, InvalidStatus, OpenTimeout, TransportError
from .extensions import Extension
from .handshake import WSURL, Headers, Request, offer_headers
from .log import logger
from .timer import Job, timer
from .transport import Connector, Deadline, Sink, TCPTransport, Transport

__all__ = ["HTTP2Settings", "H2Stream", "H2Pool", "pool"]

BytesLike = Union[bytes, bytearray, memoryview]
_ENABLE_CONNECT = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
_conn_ids = itertools.count(1)
#: Receive windows: how much the server may send before we return credit.
_STREAM_WINDOW = 4 * 1024 * 1024
_CONNECTION_WINDOW = 16 * 1024 * 1024
#: The largest DATA frame we accept (the server still picks what it sends).
_MAX_FRAME = 1024 * 1024


def _whole_frames(buf: bytes) -> int:
    """How many leading bytes of ``buf`` are complete HTTP/2 frames."""
    pos = 0
    while len(buf) - pos >= 9:
        stop = pos + 9 + int.from_bytes(buf[pos : pos + 3], "big")
        if stop > len(buf):
            break
        pos = stop
    return pos


def _data_header(size: int, stream_id: int) -> bytes:
    """A DATA frame header (RFC 9113 6.1): no flags."""
    return size.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")


def _window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (RFC 9113 6.9)."""
    return b"\x00\x00\x04\x08\x00" + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


@dataclass(frozen=True)
class HTTP2Settings:
    """How a socket uses HTTP/2 (the seed's ``WebSocketOverHTTP2Settings``).

    >>> HTTP2Settings()                       # wss:// tries HTTP/2, falls back to 1.1
    >>> HTTP2Settings(enabled=False)          # always HTTP/1.1
    >>> HTTP2Settings(fallback=False)         # HTTP/2 or fail (cause in ws.error)
    >>> HTTP2Settings(cleartext=True)         # also h2c (prior knowledge) for ws://
    """

    #: Try HTTP/2 first for ``wss://``.
    enabled: bool = True
    #: When the HTTP/2 attempt fails, open over HTTP/1.1 with a new request.
    fallback: bool = True
    #: Also try HTTP/2 with prior knowledge (h2c) for ``ws://``. Off by default:
    #: a server without h2c sees garbage and the attempt costs a round trip.
    cleartext: bool = False
    #: Share one connection between sockets to the same origin.
    share: bool = True
    #: Seconds a shared connection stays open after its last stream ends.
    idle_timeout: float = 5.0


class H2Stream(Transport):
    """One WebSocket's stream on a shared HTTP/2 connection.

    Data is pushed to the sink by the connection's reader thread, so
    :meth:`run` returns at once. :meth:`write` respects HTTP/2 flow control.
    """

    http_version = "2"
    server_closes = False

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.response: Headers | None = None
        self.status = 0
        self.refused: BaseException | None = None
        self._responded = threading.Event()
        self._sink: Sink | None = None
        self._early: list[bytes] = []  # data that came before run()
        self._lost = False
        self._ended = False  # no more frames either way: reset, ended, or aborted
        self._released = False

    # -- called by the connection's reader thread (conn lock NOT held) ----------

    def _deliver(self, data: bytes) -> None:
        self.bytes_read += len(data)
        sink = self._sink
        if sink is None:
            self._early.append(data)
            return
        try:
            sink.data_received(data)
        except Exception as exc:  # noqa: BLE001 - ends this stream, not the connection
            self.conn.reset_stream(self)
            self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._responded.set()
        sink = self._sink
        if sink is not None:
            sink.connection_lost(exc)

    # -- the Transport interface --------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes:  # pragma: no cover - not used
        raise TransportError("an HTTP/2 stream is read by its connection")

    def run(self, sink: Sink) -> None:
        with self.conn.lock:
            self._sink = sink
            early, self._early = self._early, []
            lost = self._lost
        for data in early:
            sink.data_received(data)
        if lost:
            sink.connection_lost(None)

    def write(self, chunks: Sequence[BytesLike]) -> None:
        # send_data returns once every byte is written, so one chunk needs no copy.
        data = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks)).cast("B")
        self.bytes_written += len(data)  # counted first: a reply may beat the return
        self.conn.send_data(self, data)

    def abort(self) -> None:
        """Reset the stream with CANCEL and report the end to the socket."""
        self.conn.reset_stream(self)
        self._lose(None)

    def close(self) -> None:
        self.abort()
        self.conn.release(self)


class H2Connection:
    """One HTTP/2 connection: the ``h2`` state machine, its socket and reader thread."""

    def __init__(
        self, transport: TCPTransport, key: tuple[Any, ...], settings: HTTP2Settings
    ) -> None:
        self.id = next(_conn_ids)
        self.transport = transport
        self.key = key
        self.settings = settings
        self.lock = threading.Lock()
        self.window_open = threading.Condition(self.lock)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, H2Stream] = {}
        self.reserved = 0  # streams being opened
        self.max_streams = 100
        self.dead: BaseException | None = None
        self.closing = False
        self._idle_job: Job | None = None
        self._thread: threading.Thread | None = None
        # Bytes of an incomplete frame: h2 is only ever fed whole frames, so
        # the reader can take DATA frames out of the stream (see _reader).
        self._inbuf = b""

    # -- setup --------------------------------------------------------------------

    def handshake(self, deadline: Deadline) -> None:
        """Preface, then wait for the server's SETTINGS; check extended CONNECT."""
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                # Large windows and frames: a 1 MiB message then crosses in a
                # few frames, without waiting for WINDOW_UPDATE round trips.
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        # h2 keeps its own inbound limit apart from the settings it announces.
        self.h2.max_inbound_frame_size = _MAX_FRAME
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW)
        self.transport.write([self.h2.data_to_send()])
        settings: dict[int, int] | None = None
        while settings is None:
            data = self.transport.recv(deadline.remaining())
            if not data:
                raise HTTP2Unavailable("connection closed before the server's HTTP/2 SETTINGS")
            buf = self._inbuf + data
            whole = _whole_frames(buf)
            self._inbuf = buf[whole:]
            try:
                events = self.h2.receive_data(buf[:whole])
            except h2.exceptions.ProtocolError as exc:
                raise HTTP2Unavailable(f"the server does not speak HTTP/2: {exc}") from None
            for event in events:
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {int(k): v.new_value for k, v in event.changed_settings.items()}
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise HTTP2Unavailable(f"the server sent GOAWAY ({event.error_code!r})")
            self.transport.write([self.h2.data_to_send()])
        if settings.get(int(_ENABLE_CONNECT)) != 1:
            raise HTTP2Unavailable(
                "the server's SETTINGS lack SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (RFC 8441)"
            )
        self.max_streams = settings.get(int(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS), 100)
        self._thread = threading.Thread(
            target=self._reader, name=f"blockws-h2-{self.id}", daemon=True
        )
        self._thread.start()

    def open_stream(
        self,
        url: WSURL,
        request: Request,
        extensions: Sequence[Extension],
        deadline: Deadline,
        register: Callable[[Transport], None],
    ) -> H2Stream:
        """Send the extended CONNECT and wait for the answer (RFC 8441 section 4)."""
        headers: list[tuple[bytes, bytes]] = [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https" if url.secure else b"http"),
            (b":path", url.resource.encode()),
            (b":authority", url.authority.encode()),
            (b"sec-websocket-version", b"13"),
        ]
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in offer_headers(request, extensions)
        )
        with self.lock:
            self.reserved -= 1  # the slot reserved by the pool becomes a stream, or is freed
            self._check_alive()
            stream_id = self.h2.get_next_available_stream_id()
            stream = H2Stream(self, stream_id)
            self.streams[stream_id] = stream
            self.h2.send_headers(stream_id, headers)
            self._flush_locked()
        # Registered before the answer comes, so close() or a timeout can reset
        # the stream while we wait.
        register(stream)
        if not stream._responded.wait(deadline.remaining()):
            self.reset_stream(stream)
            self.release(stream)
            raise OpenTimeout("timed out waiting for the HTTP/2 CONNECT response")
        if stream.refused is not None:
            self.release(stream)
            raise stream.refused
        if stream.response is None:  # aborted while waiting
            self.release(stream)
            raise ConnectionLost("the HTTP/2 CONNECT was abandoned")
        return stream

    # -- writing (any thread) ---------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise ConnectionLost(f"HTTP/2 connection lost: {self.dead}")

    def _flush_locked(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.transport.write([data])

    def send_data(self, stream: H2Stream, data: memoryview) -> None:
        """Send DATA within the flow-control windows; waits while they are closed."""
        sid = stream.stream_id
        with self.lock:
            while data:
                self._check_alive()
                if stream._ended:
                    raise ConnectionLost("the HTTP/2 stream was reset")
                size = min(
                    self.h2.local_flow_control_window(sid),
                    self.h2.max_outbound_frame_size,
                    len(data),
                )
                if size <= 0:
                    self.window_open.wait()  # notified on WINDOW_UPDATE, reset or death
                    continue
                # DATA frames are framed here rather than by h2.send_data, whose
                # per-frame state machine cost ~40 us a frame (benchmarks/http2.py):
                # a DATA frame without END_STREAM changes no stream state, so only
                # h2's outbound windows need the same bookkeeping it would do.
                avail = min(self.h2.local_flow_control_window(sid), len(data))
                largest = self.h2.max_outbound_frame_size
                frames: list[BytesLike] = []
                for start in range(0, avail, largest):
                    chunk = data[start : min(start + largest, avail)]
                    frames.append(_data_header(len(chunk), sid))
                    frames.append(chunk)  # written before send_data returns: no copy
                self.h2.outbound_flow_control_window -= avail
                self.h2.streams[sid].outbound_flow_control_window -= avail
                data = data[avail:]
                self._flush_locked()  # whatever h2 queued goes first
                self.transport.write(frames)

    def reset_stream(self, stream: H2Stream) -> None:
        with self.lock:
            if stream._ended or self.dead is not None:
                stream._ended = True
                self.window_open.notify_all()
                return
            stream._ended = True
            with contextlib.suppress(h2.exceptions.H2Error, TransportError):
                self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                self._flush_locked()
            self.window_open.notify_all()

    def release(self, stream: H2Stream) -> None:
        """The socket is done with ``stream``; close the connection when idle."""
        with self.lock:
            if stream._released:
                return
            stream._released = True
            self.streams.pop(stream.stream_id, None)
            idle = not self.streams and not self.reserved
            if idle and self._idle_job is None and not self.closing:
                self._idle_job = timer.call_later(self.settings.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        with self.lock:
            self._idle_job = None
            if self.streams or self.reserved or self.closing:
                return
            self.closing = True
        pool.forget(self)
        self.close()

    def close(self) -> None:
        """GOAWAY, close the socket, and join the reader thread."""
        with self.lock:
            self.closing = True
            if self._idle_job is not None:
                self._idle_job.cancel()
                self._idle_job = None
            if self.dead is None:
                with contextlib.suppress(h2.exceptions.H2Error, TransportError):
                    self.h2.close_connection()
                    self._flush_locked()
        self.transport.abort()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.transport.close()

    # -- the reader thread ----------------------------------------------------------

    def _reader(self) -> None:
        exc: BaseException | None = None
        try:
            while True:
                data = self.transport.recv()
                if not data:
                    exc = ConnectionLost("the HTTP/2 connection was closed")
                    break
                credit: dict[int, int] = {}
                direct = self._feed(data, credit)
                if direct:
                    self._window_update(direct)
                if credit:
                    # Return credit for everything the sockets consumed, in one write.
                    with self.lock:
                        for stream_id, size in credit.items():
                            with contextlib.suppress(h2.exceptions.H2Error):
                                self.h2.acknowledge_received_data(size, stream_id)
                        self._flush_locked()
        except h2.exceptions.ProtocolError as err:
            exc = ConnectionLost(f"HTTP/2 protocol error: {err}")
        except TransportError as err:
            exc = err
        except Exception as err:  # noqa: BLE001 - reported to every stream
            logger.exception("HTTP/2 connection %d reader failed", self.id)
            exc = ConnectionLost(f"HTTP/2 reader failed: {err!r}")
        self._die(exc)

    def _feed(self, data: bytes, credit: dict[int, int]) -> dict[int, int]:
        """Handle one read: first the frame left incomplete by the last read,
        completed from the front of ``data``, then the rest of ``data`` in place.

        Joining the leftover to the whole read would copy every byte once more;
        the payloads of DATA frames are sliced as views and copied once, when
        they are handed to their socket.
        """
        view = memoryview(data)
        inbuf = self._inbuf
        direct: dict[int, int] = {}
        if inbuf:
            if len(inbuf) < 9:  # the frame header itself was cut
                take = 9 - len(inbuf)
                inbuf += bytes(view[:take])
                view = view[take:]
                if len(inbuf) < 9:
                    self._inbuf = inbuf
                    return direct
            size = 9 + int.from_bytes(inbuf[:3], "big")
            frame = inbuf + bytes(view[: size - len(inbuf)])
            view = view[size - len(inbuf) :]
            if len(frame) < size:
                self._inbuf = frame
                return direct
            self._inbuf = b""
            direct = self._receive(memoryview(frame), credit)
        for sid, n in self._receive(view, credit).items():
            direct[sid] = direct.get(sid, 0) + n
        return direct

    def _receive(self, buf: memoryview, credit: dict[int, int]) -> dict[int, int]:
        """Handle the whole frames in ``buf``; keep the rest for the next read.

        DATA frames of open, answered streams (no END_STREAM, no padding) go
        straight to their socket, skipping h2's per-frame work; every other
        frame goes through h2, in order. Returns the bytes delivered directly
        per stream, for which this connection returns credit itself.
        """
        direct: dict[int, int] = {}
        held: dict[H2Stream, list[memoryview]] = {}  # data coalesced per stream, in order
        pos = start = 0
        end = len(buf)
        while end - pos >= 9:
            stop = pos + 9 + int.from_bytes(buf[pos : pos + 3], "big")
            if stop > end:
                break
            if buf[pos + 3] == 0 and not buf[pos + 4] & 0x09:  # DATA, no END_STREAM/PADDED
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                stream = self.streams.get(sid)
                if stream is not None and stream.response is not None and not stream._ended:
                    if start < pos:
                        self._deliver_held(held)
                        self._through_h2(bytes(buf[start:pos]), credit)
                    if stop > pos + 9:
                        held.setdefault(stream, []).append(buf[pos + 9 : stop])
                        direct[sid] = direct.get(sid, 0) + stop - pos - 9
                    start = stop
            pos = stop
        if start < pos:
            self._deliver_held(held)
            self._through_h2(bytes(buf[start:pos]), credit)
        self._deliver_held(held)
        self._inbuf = bytes(buf[pos:])
        return direct

    @staticmethod
    def _deliver_held(held: dict[H2Stream, list[memoryview]]) -> None:
        """One data_received per stream for the DATA frames of one read (one copy)."""
        for stream, parts in held.items():
            stream._deliver(bytes(parts[0]) if len(parts) == 1 else b"".join(parts))
        held.clear()

    def _through_h2(self, frames: bytes, credit: dict[int, int]) -> None:
        with self.lock:
            events = self.h2.receive_data(frames)
            self._flush_locked()
        for event in events:
            self._handle(event, credit)

    def _window_update(self, direct: dict[int, int]) -> None:
        """Return credit for DATA that bypassed h2 (h2's own windows never saw it)."""
        frames = [_window_update(sid, size) for sid, size in direct.items()]
        frames.append(_window_update(0, sum(direct.values())))
        with self.lock:
            if self.dead is None:
                self._flush_locked()
                self.transport.write(frames)

    def _die(self, exc: BaseException | None) -> None:
        with self.lock:
            if self.dead is None:
                self.dead = exc or ConnectionLost("the HTTP/2 connection ended")
            streams = list(self.streams.values())
            self.window_open.notify_all()
        pool.forget(self)
        for stream in streams:
            stream.refused = stream.refused or (
                HTTP2Unavailable(f"HTTP/2 connection lost: {self.dead}")
                if not stream._responded.is_set()
                else None
            )
            stream._ended = True
            stream._lose(None if self.closing else ConnectionLost(f"{self.dead}"))
        with contextlib.suppress(OSError):
            self.transport.abort()

    def _handle(self, event: h2.events.Event, credit: dict[int, int]) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            headers = Headers()
            status = 0
            for name, value in event.headers or []:
                n = name.decode("latin-1") if isinstance(name, bytes) else name
                v = value.decode("latin-1") if isinstance(value, bytes) else value
                if n == ":status":
                    status = int(v)
                elif not n.startswith(":"):
                    headers.add(n, v)
            stream.status, stream.response = status, headers
            if not 200 <= status < 300:
                # RFC 8441: the server refused the extended CONNECT.
                stream.refused = HTTP2Unavailable(
                    f"the server refused the HTTP/2 WebSocket (status {status})",
                    InvalidStatus(status, "", headers),
                )
                self.reset_stream(stream)
            stream._responded.set()
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream._ended and event.data:
                stream._deliver(event.data)
            # Credit comes back once the socket has consumed (parsed) the data.
            sid = event.stream_id
            credit[sid] = credit.get(sid, 0) + event.flow_controlled_length
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if not stream._responded.is_set():
                    stream.refused = HTTP2Unavailable("the server ended the stream at once")
                stream._lose(None)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                with self.lock:
                    stream._ended = True
                    self.window_open.notify_all()
                if not stream._responded.is_set():
                    stream.refused = HTTP2Unavailable(
                        f"the server reset the CONNECT stream ({event.error_code!r})"
                    )
                    stream._responded.set()
                stream._lose(
                    None
                    if event.error_code
                    in (h2.errors.ErrorCodes.NO_ERROR, h2.errors.ErrorCodes.CANCEL)
                    else ConnectionLost(f"the server reset the stream ({event.error_code!r})")
                )
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            with self.lock:
                self.window_open.notify_all()
            if isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                )
                if changed is not None:
                    self.max_streams = changed.new_value
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code == h2.errors.ErrorCodes.NO_ERROR:
                # A graceful GOAWAY: no new streams here, live ones may finish.
                with self.lock:
                    self.closing = True
                pool.forget(self)
                return
            self.dead = ConnectionLost(f"the server sent GOAWAY ({event.error_code!r})")
            with contextlib.suppress(OSError):
                self.transport.abort()


class H2Pool:
    """HTTP/2 connections by origin and TLS settings, shared between sockets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[tuple[Any, ...], list[H2Connection]] = {}
        self._creating: dict[tuple[Any, ...], threading.Lock] = {}
        #: Origins where HTTP/2 failed: later sockets go straight to HTTP/1.1.
        self.failed_origins: set[tuple[str, str, int]] = set()

    def forget(self, conn: H2Connection) -> None:
        with self._lock:
            conns = self._conns.get(conn.key)
            if conns and conn in conns:
                conns.remove(conn)

    def _reserve(self, key: tuple[Any, ...]) -> H2Connection | None:
        with self._lock:
            for conn in self._conns.get(key, []):
                with conn.lock:
                    busy = len(conn.streams) + conn.reserved
                    usable = conn.dead is None and not conn.closing and conn.settings.share
                    if usable and busy < conn.max_streams:
                        conn.reserved += 1
                        if conn._idle_job is not None:
                            conn._idle_job.cancel()
                            conn._idle_job = None
                        return conn
        return None

    def open(
        self,
        url: WSURL,
        request: Request,
        extensions: Sequence[Extension],
        deadline: Deadline,
        settings: HTTP2Settings,
        connector: Connector,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        register: Callable[[Transport], None],
    ) -> H2Stream:
        """A stream for ``request``: on a shared connection, or a new one.

        Raises :class:`HTTP2Unavailable` when HTTP/2 or RFC 8441 is not on offer;
        its ``transport`` attribute then holds a TLS connection on which ALPN
        chose HTTP/1.1, ready for the fallback handshake.
        """
        key = (url.secure, url.host.lower(), url.port, id(ssl_context), server_hostname)
        conn = self._reserve(key) if settings.share else None
        if conn is None:
            with self._lock:
                create_lock = self._creating.setdefault(key, threading.Lock())
            with create_lock:  # one new connection per origin at a time
                conn = self._reserve(key) if settings.share else None
                if conn is None:
                    conn = self._connect(
                        key, url, deadline, settings, connector, ssl_context, server_hostname
                    )
        return conn.open_stream(url, request, extensions, deadline, register)

    def _connect(
        self,
        key: tuple[Any, ...],
        url: WSURL,
        deadline: Deadline,
        settings: HTTP2Settings,
        connector: Connector,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> H2Connection:
        transport = connector.connect(url.host, url.port, deadline, ssl_context, server_hostname)
        if url.secure:
            sock = transport.sock
            alpn = sock.selected_alpn_protocol() if isinstance(sock, ssl.SSLSocket) else None
            if alpn != "h2":
                raise HTTP2Unavailable(
                    f"TLS ALPN chose {alpn or 'no protocol'}, not h2", transport=transport
                )
        conn = H2Connection(transport, key, settings)
        try:
            conn.handshake(deadline)
        except BaseException:
            transport.abort()
            transport.close()
            raise
        # The connection is shared from now on: one socket's abort() must not
        # reach it through the connector that opened it.
        connector.detach()
        with self._lock:
            conn.reserved = 1
            self._conns.setdefault(key, []).append(conn)
        logger.debug("HTTP/2 connection %d to %s:%s open", conn.id, url.host, url.port)
        return conn

    def connections(self) -> list[H2Connection]:
        with self._lock:
            return [c for conns in self._conns.values() for c in conns]


#: The process-wide pool.
pool = H2Pool()
