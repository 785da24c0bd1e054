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
fallback to HTTP/1.1 (or a failure, if fallback is off). An origin that
refused (ALPN did not pick h2 although it was offered, SETTINGS without
``SETTINGS_ENABLE_CONNECT_PROTOCOL``, a CONNECT answered with a 4xx status or
reset with PROTOCOL_ERROR or HTTP_1_1_REQUIRED) is remembered in
:class:`RefusedOrigins` for :data:`REFUSAL_TTL` seconds; an attempt that
ended for a reason that may pass (a timeout, a GOAWAY, a reset, a lost
connection) is not.

Threads, locks and writing
--------------------------
One reader thread per connection (``blockws-h2-<n>``) parses HTTP/2 frames
and feeds each stream's data to its socket's protocol, then returns
flow-control credit (WINDOW_UPDATE) for what the socket consumed, one read
at a time (``H2Connection.data_received``; a connection made with
``reader_thread=False`` is driven that way by its caller, without threads,
as the fuzz target does). Sockets' writer threads send DATA, never more than
the peer's windows and maximum frame size allow. One peer that stops reading
must stall only the sockets on its own connection, never the process-wide
timer thread (whose jobs abort transports) nor other connections. So:

* ``H2Connection.lock`` -- the *state* lock -- guards the ``h2`` state
  machine, the streams, the windows and the queue of outgoing control
  frames (``_out``). It is held for bookkeeping only, never across socket
  I/O or a call into a socket (the sink).
* The *write turn* (``_writing``, guarded by the state lock) serializes the
  socket writes: only its holder writes, with no lock held. A writer waits
  for the turn (or for an open window) on ``window_open``, a condition on
  the state lock, which a stream's reset also notifies: an aborted stream's
  writer stops waiting at once.
* Frame order: every write takes the queued control frames (the ``h2``
  output, moved to ``_out`` after each ``h2`` call) under the state lock,
  and the turn holder writes them, before its own DATA, in that order. The
  holder gives the turn back only when ``_out`` is empty, so a frame queued
  by a thread that found the turn taken (an RST_STREAM, a WINDOW_UPDATE) is
  written by the holder. A thread that must not block (a timer job, or an
  ``abort()`` from anywhere) queues its frame and, if nobody holds the
  turn, starts a short-lived flusher thread (``blockws-h2-<n>-flush``).
  The idle timeout (a timer job) likewise hands the close to a closer
  thread (``blockws-h2-<n>-close``): GOAWAY, written within ``_LINGER``
  seconds or given up, then the socket is shut down; the reader thread,
  seeing the end, closes it. Nothing joins a thread on the timer thread.
* DATA goes out in pieces of at most ``_PIECE`` bytes per write. When a
  stream is aborted while a piece of its own is stuck in the socket for
  ``_STUCK_WRITE`` seconds (the peer stopped reading), the connection is
  aborted: a half-written frame cannot be taken back, and every stream on
  it is stuck behind that write anyway.

==========================  ============================================  ==================
thread                      does                                          takes, in order
==========================  ============================================  ==================
socket writer               ``send_data``: waits for turn and window,      turn, state lock
                            writes DATA and queued frames
connection reader           parses, delivers (no lock), returns credit,    turn, state lock
                            writes queued frames if the turn is free
connecting thread           HEADERS (``open_stream``), like the reader     turn, state lock
timer (grace, idle, abort)  queues frames, starts a flusher; never waits   state lock
flusher, closer (threads)   write queued frames; GOAWAY on idle close      turn, state lock
any (``abort``, close)      marks the stream ended, queues RST_STREAM      state lock
==========================  ============================================  ==================

The pool's lock is taken before a connection's state lock; a stream's
``_early_lock`` (early data before :meth:`H2Stream.run`) and the timer's
lock are innermost. "Turn, state lock" means the turn is held across
writes and the state lock is taken briefly between them; nobody waits for
the turn while holding the state lock (the wait releases it).

Receiving (RFC 9113 4.2, 6.9.1): DATA frames of open, answered streams
(no END_STREAM, no padding) go straight to their socket, skipping ``h2``'s
per-frame work; every other frame goes through ``h2``, in order. The
checks ``h2`` would make are made here for every frame: a frame longer than
our ``SETTINGS_MAX_FRAME_SIZE`` is a connection error FRAME_SIZE_ERROR;
DATA beyond the connection's receive window a connection error
FLOW_CONTROL_ERROR; DATA beyond a stream's window a stream error (that
stream is reset with FLOW_CONTROL_ERROR, its frame dropped, the connection
window still charged and credited). The receive windows are tracked here,
for all DATA: every WINDOW_UPDATE the connection sends is counted, so the
windows match what the server was told. Credit goes back after each read,
once the sockets have consumed the data: by hand-made WINDOW_UPDATE for
data ``h2`` never saw, through ``h2`` for data it did.

Backpressure: a socket whose undelivered messages reach its
``max_queued_bytes`` pauses its stream (:meth:`H2Stream.pause_reading`): the
stream's credit is then withheld -- the connection's is still returned, so
the other streams flow -- and the server stops within the stream's window.
When the socket's queue drains to half, :meth:`H2Stream.resume_reading`
(on the delivering thread) returns the withheld credit at once, written by a
flusher if nobody holds the write turn; the reader folds that credit into its
view of the stream's window (``_late``) before it checks the next DATA.

Closing (RFC 8441 section 5 and peer quirks): once both close frames have
been exchanged and ours is written (:meth:`H2Stream.finish_closing`), the
socket lets the server end the stream: a server END_STREAM or RST_STREAM
ends the socket like EOF (nghttpx sends END_STREAM, then RST_STREAM
NO_ERROR), and the client resets nothing. A server that does not end it
(hypercorn never does) gets RST_STREAM(CANCEL) ``_CLOSE_GRACE`` seconds
after our last write on the stream, never END_STREAM, on which hypercorn
drops the whole connection. The grace keeps the reset out of the write
that carried our close frame: nghttpx discards client data that arrives in
the same read as a RST_STREAM from the client, so a reset written right
behind a close reply loses the reply. ``on_closed`` follows the end of
the stream, as over TCP it follows the server's FIN.
"""

from __future__ import annotations

import contextlib
import itertools
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple

from .deadline import Deadline
from .exceptions import ConnectionLost, HTTP2Unavailable, InvalidStatus, OpenTimeout, TransportError
from .extensions import Extension
from .handshake import WSURL, Headers, Request, offer_headers
from .log import logger
from .readtoken import Ended
from .timer import Job, timer
from .tls import HTTP2_ALPN
from .transport import Connector, Sink, Transport

__all__ = ["HTTP2Settings", "H2Stream", "H2Pool", "RefusedOrigins", "Refusal", "pool"]

BytesLike = Union[bytes, bytearray, memoryview]
_ENABLE_CONNECT = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
_conn_ids = itertools.count(1)
#: Receive windows: how much the server may send before we return credit.
_STREAM_WINDOW = 4 * 1024 * 1024
_CONNECTION_WINDOW = 16 * 1024 * 1024
#: The initial connection window every HTTP/2 connection starts with (RFC 9113 6.9.2).
_DEFAULT_WINDOW = 65535
#: The largest frame we accept (the server still picks what it sends).
_MAX_FRAME = 1024 * 1024
#: Most DATA bytes written in one socket write (see "Threads, locks and writing").
_PIECE = 256 * 1024
#: Seconds a stream's write may stay stuck after the stream was aborted
#: before the whole connection is aborted.
_STUCK_WRITE = 2.0
#: Seconds after our last write on a closed stream before we reset it, if
#: the server has not ended it (see "Closing").
_CLOSE_GRACE = 0.1
#: Seconds a closing connection may spend writing its GOAWAY.
_LINGER = 1.0
_CANCEL = h2.errors.ErrorCodes.CANCEL
_FLOW_CONTROL_ERROR = h2.errors.ErrorCodes.FLOW_CONTROL_ERROR
_FRAME_SIZE_ERROR = h2.errors.ErrorCodes.FRAME_SIZE_ERROR
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
#: Resets of an extended CONNECT that mean "not here" rather than "not now".
_REFUSING_RESETS = frozenset(
    {h2.errors.ErrorCodes.PROTOCOL_ERROR, h2.errors.ErrorCodes.HTTP_1_1_REQUIRED}
)
#: Seconds an origin's refusal of WebSocket over HTTP/2 is remembered.
REFUSAL_TTL = 300.0


def _whole_frames(buf: bytes) -> int:
    """How many leading bytes of ``buf`` are complete HTTP/2 frames."""
    pos = 0
    while len(buf) - pos >= 9:
        stop = pos + 9 + int.from_bytes(buf[pos : pos + 3], "big")
        if stop > len(buf):
            break
        pos = stop
    return pos


#: An HTTP/2 frame header (RFC 9113 4.1): length << 8 | type, flags, stream id.
_HEADER = struct.Struct(">IBI").unpack_from


def _data_header(size: int, stream_id: int) -> bytes:
    """A DATA frame header (RFC 9113 6.1): no flags."""
    return size.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")


def _window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (RFC 9113 6.9)."""
    return b"\x00\x00\x04\x08\x00" + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


class _ConnectionError(Exception):
    """A connection error found by this module's own checks (RFC 9113 5.4.1)."""

    def __init__(self, code: h2.errors.ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    :meth:`abort` and :meth:`finish_closing` never block.
    """

    http_version = "2"

    def __init__(self, conn: H2Connection, stream_id: int, window: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.response: Headers | None = None
        self.status = 0
        self.refused: BaseException | None = None
        self.aborted = False
        self._responded = threading.Event()
        self._sink: Sink | None = None
        # Data that came before run(), and the loss, handed over under this lock.
        self._early_lock = threading.Lock()
        self._early: list[bytes] = []
        self._lost = False
        self._lost_exc: BaseException | None = None
        # Guarded by the connection's state lock:
        self._ended = False  # no more frames from us: reset (by either side), or connection gone
        self._server_ended = False  # the server sent END_STREAM or RST_STREAM
        self._closing_job: Job | None = None  # the reset after the close grace
        self._released = False
        #: Our view of the stream's receive window (the reader thread's alone).
        self._recv_window = window
        # Backpressure (guarded by the state lock): credit is withheld while
        # paused, per path, and credit returned by resume_reading is added to
        # _recv_window by the reader (see "Backpressure" in the module docstring).
        self._paused = False
        self._withheld_hand = 0
        self._withheld_h2 = 0
        self._late = 0
        #: time.monotonic() when our last write on the stream ended (the writer's).
        self._written_at = 0.0

    # -- called by the connection's reader thread (no lock held) -------------------

    def _deliver(self, data: bytes) -> None:
        self.bytes_read += len(data)
        sink = self._sink
        if sink is None:
            with self._early_lock:
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
        """Report the end of the stream to the socket, once (any thread)."""
        with self._early_lock:
            if self._lost:
                return
            self._lost = True
            self._lost_exc = exc
            sink = self._sink
        self._responded.set()
        if sink is not None:
            sink.connection_lost(exc)

    # -- the Transport interface --------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes:  # pragma: no cover - not used
        raise TransportError("an HTTP/2 stream is read by its connection")

    def run(self, sink: Sink, before_read: Callable[[], Ended | None] | None = None) -> None:
        # The connection's reader delivers the data, so ``before_read`` (for
        # reads lent to a waiting caller) does not apply here. Hand over what
        # came before, in order: the reader appends to _early until _sink is
        # set, which happens once _early is empty.
        while True:
            with self._early_lock:
                early = self._early
                if not early:
                    self._sink = sink
                    lost, exc = self._lost, self._lost_exc
                    break
                self._early = []
            for data in early:
                try:
                    sink.data_received(data)
                except Exception as err:  # noqa: BLE001 - ends this stream
                    self.conn.reset_stream(self)
                    with self._early_lock:
                        self._sink = sink
                        self._early = []
                    self._lose(err)
                    return
        if lost:
            sink.connection_lost(exc)

    def write(self, chunks: Sequence[BytesLike]) -> None:
        # send_data returns once every byte is written, so one chunk needs no copy.
        data = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks)).cast("B")
        self.bytes_written += len(data)  # counted first: a reply may beat the return
        self.conn.send_data(self, data)

    def abort(self) -> None:
        """Reset the stream with CANCEL and report the end to the socket.

        Never blocks: the reset is queued and written by whoever writes next
        (see the module docstring).
        """
        self.aborted = True
        self.conn.reset_stream(self)
        self._lose(None)

    def pause_reading(self) -> bool:
        """Withhold this stream's credit until :meth:`resume_reading` (the
        connection's reader thread, from inside the socket's ``data_received``)."""
        with self.conn.lock:
            self._paused = True
        return True

    def resume_reading(self) -> None:
        """Return the withheld credit now; never blocks (a flusher writes it)."""
        self.conn.return_withheld(self)

    def finish_closing(self) -> None:
        """Both close frames are through and ours is written: let the server end
        the stream, or reset it after a grace (see "Closing" in the module
        docstring). Never blocks."""
        conn = self.conn
        delay = _CLOSE_GRACE - (time.monotonic() - self._written_at)
        with conn.lock:
            if self._closing_job is not None:
                return
            wait = delay > 0 and not (self._ended or self._server_ended or conn.dead)
            if wait:
                self._closing_job = timer.call_later(delay, self._grace_over)
        if not wait:
            self._grace_over()

    def _grace_over(self) -> None:
        conn = self.conn
        with conn.lock:
            self._closing_job = None
            server_ended = self._server_ended
        if not server_ended:
            conn.reset_stream(self)
        self._lose(None)

    def close(self) -> None:
        self.abort()
        self.conn.release(self)


class H2Connection:
    """One HTTP/2 connection: the ``h2`` state machine, its socket and reader thread.

    ``stream_window`` and ``connection_window`` set the receive windows that
    :meth:`handshake` announces (``None``: 4 MiB per stream, and 16 MiB on top
    of the connection's initial 65535).

    ``reader_thread=False`` is for driving a connection over an in-memory
    transport (the fuzz target in ``benchmarks/fuzz``). No reader thread and
    no flusher thread start: the caller is the reader, handing each read to
    :meth:`data_received` (``b""`` for the end, also after :meth:`close`), from
    one thread at a time; frames a flusher would write are written at once by
    the thread that queued them, so the transport's ``write`` must not block.
    :meth:`handshake` reads the transport itself, as always. :meth:`open_stream`
    waits for the answer, so the transport must hand it to
    :meth:`data_received` from within ``write`` (as a reader thread could
    while the request is being written), or the wait times out. The timer's
    jobs (the idle close, the close grace) work as with the thread.
    """

    def __init__(
        self,
        transport: Transport,
        key: tuple[Any, ...],
        settings: HTTP2Settings,
        *,
        reader_thread: bool = True,
        stream_window: int | None = None,
        connection_window: int | None = None,
    ) -> None:
        self.id = next(_conn_ids)
        self.transport = transport
        self.key = key
        self.settings = settings
        self._reader_thread = reader_thread
        self._windows = stream_window, connection_window
        #: The state lock (see the module docstring).
        self.lock = threading.Lock()
        #: Notified on WINDOW_UPDATE and SETTINGS, a stream's end, the write
        #: turn's release and the connection's death.
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
        # Writing (state lock): frames waiting to be written, in order; the write turn.
        self._out: list[BytesLike] = []
        self._writing = False
        self._writing_stream: H2Stream | None = None  # whose frames the turn holder writes
        self._write_seq = 0  # writes done, to tell a stuck write (see _check_stuck)
        self._waiting = 0  # threads in _wait_locked
        self._flushing = False  # a flusher thread is running
        self._abort_reason: BaseException | None = None
        # Reading (the reader thread's alone). Bytes of an incomplete frame:
        # h2 is only ever fed whole frames, so the reader can take DATA frames
        # out of the stream (see _receive).
        self._inbuf = b""  # the handshake's, then moved to _inparts
        self._inparts: list[BytesLike] = []  # views of the reads it came in
        self._inlen = 0  # bytes in _inparts
        self._stream_window = _STREAM_WINDOW  # what SETTINGS told the server
        self._recv_window = _DEFAULT_WINDOW  # our view of the connection's receive window
        # Credit to return after the current read (see _return_credit).
        self._credit_hand: dict[H2Stream, int] = {}  # DATA h2 never saw, per stream
        self._credit_h2: dict[H2Stream, int] = {}  # DATA that went through h2, per stream
        self._credit_conn_hand = 0  # connection credit for DATA h2 never saw
        self._credit_conn_h2 = 0  # connection credit for DATA h2 saw

    # -- setup --------------------------------------------------------------------

    def handshake(self, deadline: Deadline) -> None:
        """Preface, then wait for the server's SETTINGS; check extended CONNECT;
        then start the reader thread (unless ``reader_thread=False``)."""
        stream_window, connection_window = self._windows
        self._stream_window = _STREAM_WINDOW if stream_window is None else stream_window
        if connection_window is None:
            connection_window = _CONNECTION_WINDOW
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                # Large windows and frames: a 1 MiB message then crosses in a
                # few frames, without waiting for WINDOW_UPDATE round trips.
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        # h2 keeps its own inbound limit apart from the settings it announces.
        self.h2.max_inbound_frame_size = _MAX_FRAME
        self._recv_window = _DEFAULT_WINDOW
        if connection_window > 0:
            self.h2.increment_flow_control_window(connection_window)
            self._recv_window += connection_window
        # A reset before the server sent anything is taken as a close then: a
        # TLS 1.3 server that refused us after its handshake (a missing client
        # certificate) closes with our preface unread, and the peer's kernel
        # answers with a reset, which our write or read may meet first.
        got = 0
        try:
            self.transport.write([self.h2.data_to_send()])
        except ConnectionLost as exc:
            if self.transport.aborted:
                raise
            raise HTTP2Unavailable("connection reset before the server's HTTP/2 SETTINGS") from exc
        settings: dict[int, int] | None = None
        while settings is None:
            try:
                data = self.transport.recv(deadline.remaining())
            except ConnectionLost as exc:
                if self.transport.aborted or got:
                    raise
                raise HTTP2Unavailable(
                    "connection reset before the server's HTTP/2 SETTINGS"
                ) from exc
            if not data:
                raise HTTP2Unavailable("connection closed before the server's HTTP/2 SETTINGS")
            got += len(data)
            buf = self._inbuf + data
            whole = _whole_frames(buf)
            self._inbuf = buf[whole:]
            try:
                events = self.h2.receive_data(buf[:whole])
            except h2.exceptions.ProtocolError as exc:
                raise HTTP2Unavailable(
                    f"the server does not speak HTTP/2: {exc}", refused=True
                ) from None
            for event in events:
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {int(k): v.new_value for k, v in event.changed_settings.items()}
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise HTTP2Unavailable(f"the server sent GOAWAY ({event.error_code!r})")
            self.transport.write([self.h2.data_to_send()])
        if settings.get(int(_ENABLE_CONNECT)) != 1:
            raise HTTP2Unavailable(
                "the server chose h2 but its SETTINGS lack SETTINGS_ENABLE_CONNECT_PROTOCOL = 1: "
                "no WebSocket over HTTP/2 (RFC 8441) there",
                refused=True,
            )
        self.max_streams = settings.get(int(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS), 100)
        if self._inbuf:  # frames that came with the SETTINGS: the reader's now
            self._inparts = [self._inbuf]
            self._inlen = len(self._inbuf)
            self._inbuf = b""
        if not self._reader_thread:
            return
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
        """Send the extended CONNECT and wait for the answer (RFC 8441 section 4).

        Credential headers (``request.headers.is_sensitive``: Authorization,
        Cookie, Proxy-Authorization, Set-Cookie and the ones the user marked)
        go as never-indexed fields (RFC 7541 section 7.1.3): no HPACK table
        holds them, and hpack's own debug log shows them redacted.
        """
        marks = request.headers
        headers: list[tuple[bytes, bytes]] = [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https" if url.secure else b"http"),
            (b":path", url.resource.encode()),
            (b":authority", url.authority.encode()),
            (b"sec-websocket-version", b"13"),
        ]
        for name, value in offer_headers(request, extensions):
            field = (name.lower().encode("latin-1"), value.encode("latin-1"))
            headers.append(NeverIndexedHeaderTuple(*field) if marks.is_sensitive(name) else field)
        with self.lock:
            self.reserved -= 1  # the slot reserved by the pool becomes a stream, or is freed
            self._check_alive()
            stream_id = self.h2.get_next_available_stream_id()
            stream = H2Stream(self, stream_id, self._stream_window)
            self.streams[stream_id] = stream
            self.h2.send_headers(stream_id, headers)
            self._collect_locked()
        try:
            self._flush(owner=stream)
            # Registered before the answer comes, so close() or a timeout can
            # reset the stream while we wait.
            register(stream)
            answered = stream._responded.wait(deadline.remaining())
        except BaseException:
            self.reset_stream(stream)
            self.release(stream)
            raise
        if not answered:
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

    # -- writing ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise ConnectionLost(f"HTTP/2 connection lost: {self.dead}")

    def _collect_locked(self) -> None:
        """Move what h2 queued to ``_out``, behind what is there (state lock held)."""
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)

    def _release_turn_locked(self) -> None:
        self._writing = False
        self._writing_stream = None
        if self._waiting:
            self.window_open.notify_all()

    def _wait_locked(self, timeout: float | None = None) -> None:
        """Wait on ``window_open``, counted, so that releasing the turn notifies
        only when someone waits (state lock held)."""
        self._waiting += 1
        try:
            self.window_open.wait(timeout)
        finally:
            self._waiting -= 1

    def _write(self, out: list[BytesLike]) -> None:
        """Write ``out`` to the socket (write turn held, no lock)."""
        try:
            self.transport.write(out)
        except BaseException as exc:
            # A failed (maybe partial) write leaves the connection unusable.
            with contextlib.suppress(Exception):
                self.transport.abort()
            if isinstance(exc, TransportError) or not isinstance(exc, Exception):
                raise
            raise ConnectionLost(f"HTTP/2 write failed: {exc!r}") from exc
        self._write_seq += 1

    def _flush(self, owner: H2Stream | None = None, wait: float = 0.0) -> None:
        """Write the queued frames, unless another thread holds the write turn
        (it writes them before letting go); waits up to ``wait`` seconds for
        the turn. May block in the socket write: not for the timer thread."""
        lock = self.lock
        with lock:
            if wait > 0 and self._writing:
                deadline = time.monotonic() + wait
                while self._writing and self.dead is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wait_locked(left)
            if self._writing or not self._out or self.dead is not None:
                return
            out, self._out = self._out, []
            self._writing = True
            self._writing_stream = owner
        try:
            while True:
                self._write(out)
                with lock:
                    if not self._out:
                        self._release_turn_locked()
                        return
                    out, self._out = self._out, []
        except BaseException:
            with lock:
                self._release_turn_locked()
            raise

    def _kick(self) -> None:
        """Have the queued frames written without blocking the calling thread:
        if nobody holds the write turn, a flusher thread writes them."""
        if threading.current_thread() is self._thread:
            return  # the reader writes what is queued after each read
        if not self._reader_thread:  # no threads: write them now (see the class docstring)
            with contextlib.suppress(Exception):  # a broken connection: the reader reports it
                self._flush()
            return
        with self.lock:
            if self._flushing or self._writing or not self._out or self.dead is not None:
                return
            self._flushing = True
        try:
            threading.Thread(
                target=self._flusher, name=f"blockws-h2-{self.id}-flush", daemon=True
            ).start()
        except RuntimeError:  # interpreter shutdown
            with self.lock:
                self._flushing = False

    def _flusher(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a broken connection: the reader reports it
                self._flush()
            with self.lock:
                if self._writing or not self._out or self.dead is not None:
                    self._flushing = False
                    return

    def _stream_failure_locked(self, stream: H2Stream) -> BaseException | None:
        if self.dead is not None:
            return ConnectionLost(f"HTTP/2 connection lost: {self.dead}")
        if stream._ended:
            return ConnectionLost("the HTTP/2 stream was reset")
        return None

    def _send_window_locked(self, stream: H2Stream) -> int:
        """What ``stream`` may send now (h2's ``local_flow_control_window``, without
        its exception for a closed stream: the reader marks that one ended)."""
        h2s = self.h2.streams.get(stream.stream_id)
        if h2s is None or h2s.closed:
            return 0
        return min(self.h2.outbound_flow_control_window, h2s.outbound_flow_control_window)

    def _await_turn_locked(self, stream: H2Stream) -> int:
        """Wait for the write turn and an open window, and return the window;
        raises if the stream or the connection ends meanwhile (state lock held)."""
        while True:
            failure = self._stream_failure_locked(stream)
            if failure is not None:
                raise failure
            if not self._writing:
                window = self._send_window_locked(stream)
                if window > 0:
                    self._writing = True
                    self._writing_stream = stream
                    return window
            self._wait_locked()

    def send_data(self, stream: H2Stream, data: memoryview) -> None:
        """Send DATA within the flow-control windows; waits while they are closed."""
        if not data:
            return
        lock = self.lock
        failure: BaseException | None = None
        with lock:
            window = self._await_turn_locked(stream)  # fresh for the first piece
            try:
                while True:
                    out, self._out = self._out, []  # queued frames go first
                    if data and failure is None:
                        if window < 0:  # after a write: look again
                            failure = self._stream_failure_locked(stream)
                            window = 0 if failure else self._send_window_locked(stream)
                        if window > 0:
                            size = min(window, len(data), _PIECE)
                            self._frame_data_locked(out, stream.stream_id, data, size)
                            data = data[size:]
                        elif failure is None and not out:
                            # The window is closed: let others write meanwhile.
                            self._release_turn_locked()
                            window = self._await_turn_locked(stream)
                            continue
                        window = -1
                    if not out:
                        break  # nothing queued: the turn can go
                    lock.release()
                    try:
                        self._write(out)
                    finally:
                        lock.acquire()
            finally:
                if self._writing and self._writing_stream is stream:
                    self._release_turn_locked()
        stream._written_at = time.monotonic()
        if failure is not None:
            raise failure

    def _frame_data_locked(
        self, out: list[BytesLike], sid: int, data: memoryview, size: int
    ) -> None:
        """Append DATA frames carrying ``data[:size]`` to ``out`` and charge the
        windows (state lock held).

        DATA frames are framed here rather than by h2.send_data, whose
        per-frame state machine cost ~40 us a frame (benchmarks/http2.py): a
        DATA frame without END_STREAM changes no stream state, so only h2's
        outbound windows need the bookkeeping it would do. The payloads are
        views, written before send_data returns: no copy.
        """
        largest = self.h2.max_outbound_frame_size
        if size <= largest:
            out.append(_data_header(size, sid))
            out.append(data[:size])
        else:
            full = _data_header(largest, sid)  # the header of all but the last frame
            for start in range(0, size, largest):
                chunk = data[start : min(start + largest, size)]
                n = len(chunk)
                out.append(full if n == largest else _data_header(n, sid))
                out.append(chunk)
        self.h2.outbound_flow_control_window -= size
        self.h2.streams[sid].outbound_flow_control_window -= size

    def reset_stream(self, stream: H2Stream, code: h2.errors.ErrorCodes = _CANCEL) -> None:
        """End ``stream`` with RST_STREAM(``code``). Never blocks: the frame is
        queued, and written by the turn holder, the reader or a flusher."""
        with self.lock:
            job, stream._closing_job = stream._closing_job, None
            queued = False
            if not stream._ended:
                stream._ended = True
                if self.dead is None:
                    with contextlib.suppress(h2.exceptions.H2Error, KeyError):
                        self.h2.reset_stream(stream.stream_id, code)
                        queued = True
                    self._collect_locked()
                    if self._writing_stream is stream:
                        # Its write is in the socket right now: watch it.
                        seq = self._write_seq
                        timer.call_later(_STUCK_WRITE, lambda: self._check_stuck(stream, seq))
            self.window_open.notify_all()
        if job is not None:
            job.cancel()
        if queued:
            self._kick()

    def _check_stuck(self, stream: H2Stream, seq: int) -> None:
        """Timer: abort the connection if the aborted ``stream``'s write is still
        the one in the socket, ``_STUCK_WRITE`` seconds on."""
        with self.lock:
            stuck = self.dead is None and self._writing_stream is stream and self._write_seq == seq
            if stuck:
                self._abort_reason = ConnectionLost(
                    f"HTTP/2 connection stuck: a write made no progress for {_STUCK_WRITE} s"
                )
        if stuck:
            logger.warning("HTTP/2 connection %d: a write is stuck; aborting", self.id)
            self.transport.abort()

    def release(self, stream: H2Stream) -> None:
        """The socket is done with ``stream``; close the connection when idle."""
        with self.lock:
            if stream._released:
                return
            stream._released = True
            self.streams.pop(stream.stream_id, None)
            idle = not self.streams and not self.reserved
            if idle and self._idle_job is None and not self.closing and self.dead is None:
                self._idle_job = timer.call_later(self.settings.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Timer: close the connection if it is still idle (hands the close to
        a thread of its own; never waits)."""
        with self.lock:
            self._idle_job = None
            if self.streams or self.reserved or self.closing or self.dead is not None:
                return
            self._start_close_locked()
        pool.forget(self)
        try:
            threading.Thread(
                target=self._shutdown, name=f"blockws-h2-{self.id}-close", daemon=True
            ).start()
        except RuntimeError:  # interpreter shutdown
            self.transport.abort()

    def _start_close_locked(self) -> None:
        self.closing = True
        if self._idle_job is not None:
            self._idle_job.cancel()
            self._idle_job = None
        if self.dead is None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection()
            self._collect_locked()

    def _shutdown(self) -> None:
        """Write the queued GOAWAY (within ``_LINGER`` seconds), then abort the
        transport; the reader thread, seeing the end, closes the socket."""
        safety = timer.call_later(_LINGER, self.transport.abort)
        try:
            with contextlib.suppress(TransportError):
                self._flush(wait=_LINGER)
        finally:
            safety.cancel()
            self.transport.abort()

    def close(self) -> None:
        """GOAWAY, close the socket, and join the reader thread (blocks; not
        for the timer thread). Without a reader thread, the connection ends
        when the caller hands the end (``b""``) to :meth:`data_received`."""
        with self.lock:
            self._start_close_locked()
        pool.forget(self)
        self._shutdown()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.transport.close()

    # -- the reader thread ----------------------------------------------------------

    def _reader(self) -> None:
        recv = self.transport.recv
        while True:
            try:
                data = recv()
            except Exception as err:  # noqa: BLE001 - reported to every stream
                self._fail(err)
                return
            if not self.data_received(data):
                return

    def data_received(self, data: bytes) -> bool:
        """Handle one read from the transport (``b""``: it ended), on the reader
        thread, or on the caller's with ``reader_thread=False``: parse it,
        deliver its data, return the credit and write what is queued. Returns
        False once the connection has ended (its streams are told, the
        transport closed): nothing more may be handed in."""
        if not data:
            exc = self._abort_reason
            if exc is None and not self.closing:
                exc = ConnectionLost("the HTTP/2 connection was closed")
            self._die(exc)
            return False
        try:
            self._feed(data)
            self._return_credit()
            if self._out:  # what this thread queued is visible to it
                self._flush()
        except Exception as err:  # noqa: BLE001 - reported to every stream
            self._fail(err)
            return False
        return True

    def _fail(self, err: Exception) -> None:
        """End the connection for ``err``, raised by a read or its handling
        (called in the ``except`` block: the catch-all logs the traceback)."""
        exc: BaseException
        if isinstance(err, _ConnectionError):
            logger.info("HTTP/2 connection %d: connection error %r: %s", self.id, err.code, err)
            exc = ConnectionLost(f"HTTP/2 connection error ({err.code!r}): {err}")
            with self.lock:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.close_connection(error_code=err.code)
                self._collect_locked()
            self._goodbye()
        elif isinstance(err, h2.exceptions.ProtocolError):
            exc = ConnectionLost(f"HTTP/2 protocol error: {err}")
            with self.lock:
                self._collect_locked()  # h2's GOAWAY
            self._goodbye()
        elif isinstance(err, TransportError):
            exc = self._abort_reason or err
        else:
            logger.exception("HTTP/2 connection %d reader failed", self.id)
            exc = ConnectionLost(f"HTTP/2 reader failed: {err!r}")
        self._die(exc)

    def _goodbye(self) -> None:
        """Write the GOAWAY of a connection error, if the socket takes it."""
        with contextlib.suppress(Exception):
            self._flush(wait=_LINGER)

    def _feed(self, data: bytes) -> None:
        """Handle one read: first the frame left incomplete by the last read,
        completed from the front of ``data``, then the rest of ``data`` in place.

        The leftover is kept as views of the reads it came in (when they are
        ``bytes``, which never change; copied otherwise), and joined once,
        when its frame is whole; the payloads of DATA frames are sliced as
        views and copied once, when they are handed to their socket: one
        ``data_received`` per stream and read, the completed leftover included.
        """
        view = memoryview(data)
        # Views of ``data`` may outlive this call only if it cannot change.
        keep = type(data) is bytes
        held: dict[H2Stream, list[memoryview]] = {}  # data coalesced per stream, in order
        parts = self._inparts
        if parts:
            if self._inlen < 9:  # the frame header itself was cut: make it whole
                head = b"".join(parts) + bytes(view[: 9 - self._inlen])
                view = view[len(head) - self._inlen :]
                parts[:] = [head]
                self._inlen = len(head)
                if len(head) < 9:
                    return
            length = int.from_bytes(parts[0][:3], "big")
            if length > _MAX_FRAME:
                raise _ConnectionError(_FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            need = 9 + length - self._inlen
            if need > len(view):
                parts.append(view if keep else bytes(view))
                self._inlen += len(view)
                return
            parts.append(view[:need])
            view = view[need:]
            frame = memoryview(b"".join(parts))
            parts.clear()
            self._inlen = 0
            self._receive(frame, held)
        pos = self._receive(view, held)
        self._deliver_held(held)
        if pos < len(view):
            parts.append(view[pos:] if keep else bytes(view[pos:]))
            self._inlen = len(view) - pos

    def _receive(self, buf: memoryview, held: dict[H2Stream, list[memoryview]]) -> int:
        """Handle the whole frames in ``buf`` and return where the first
        incomplete one starts.

        DATA frames of open, answered streams (no END_STREAM, no padding) go
        to ``held``, delivered by the caller (or here, before a frame that
        goes through h2, to keep the order); every other frame goes through
        h2, in order. Every frame's length, and every DATA frame's flow
        control, is checked here (see "Receiving" in the module docstring).
        """
        streams = self.streams
        hand = self._credit_hand
        header = _HEADER
        pos = start = 0
        end = len(buf)
        window = self._recv_window
        conn_hand = conn_h2 = 0  # connection credit, added to the read's in the end
        try:
            while end - pos >= 9:
                kind, flags, sid = header(buf, pos)
                length = kind >> 8
                if length > _MAX_FRAME:
                    raise _ConnectionError(
                        _FRAME_SIZE_ERROR,
                        f"a frame of {length} bytes, over our SETTINGS_MAX_FRAME_SIZE "
                        f"({_MAX_FRAME})",
                    )
                stop = pos + 9 + length
                if stop > end:
                    break
                if kind & 0xFF:  # not DATA
                    pos = stop
                    continue
                window -= length  # every DATA frame counts (RFC 9113 6.9.1)
                if window < 0:
                    raise _ConnectionError(
                        _FLOW_CONTROL_ERROR, "DATA beyond the connection's receive window"
                    )
                stream = streams.get(sid & 0x7FFFFFFF)
                if stream is not None and not stream._ended and start < pos:
                    # The frames before it go through h2 first: they may answer
                    # its CONNECT (the fast path is open from the first DATA
                    # frame on), or reset its stream.
                    self._deliver_held(held)
                    # ``start`` moves first: a connection error raised inside
                    # (a bad GOAWAY) must not have the except below feed these
                    # frames to h2 a second time (found by fuzzing).
                    frames, start = bytes(buf[start:pos]), pos
                    self._through_h2(frames)
                if stream is None or stream._ended:
                    conn_h2 += length  # h2 handles DATA of closed streams
                    pos = stop
                    continue
                if stream._late:  # credit resume_reading returned meanwhile
                    with self.lock:
                        stream._recv_window += stream._late
                        stream._late = 0
                stream._recv_window -= length
                if stream._recv_window < 0:
                    # A stream error (RFC 9113 5.4.2): reset it, drop the frame.
                    self._deliver_held(held)
                    start = pos = stop
                    conn_hand += length
                    self._stream_flow_error(stream)
                    continue
                if stream.response is not None and not flags & 0x09:
                    # The fast path: no END_STREAM, no PADDED.
                    if length:
                        parts = held.get(stream)
                        if parts is None:
                            held[stream] = [buf[pos + 9 : stop]]
                        else:
                            parts.append(buf[pos + 9 : stop])
                        hand[stream] = hand.get(stream, 0) + length
                        conn_hand += length
                    start = stop
                else:
                    credit = self._credit_h2
                    credit[stream] = credit.get(stream, 0) + length
                    conn_h2 += length
                pos = stop
        except _ConnectionError:
            # The frames before the bad one were valid: they take effect first, as
            # they would have had they come in an earlier read (found by fuzzing).
            self._deliver_held(held)
            if start < pos:
                self._through_h2(bytes(buf[start:pos]))
            raise
        finally:
            self._recv_window = window
            self._credit_conn_hand += conn_hand
            self._credit_conn_h2 += conn_h2
        if start < pos:
            self._deliver_held(held)
            self._through_h2(bytes(buf[start:pos]))
        return pos

    @staticmethod
    def _deliver_held(held: dict[H2Stream, list[memoryview]]) -> None:
        """One data_received per stream for the DATA frames of one read (one copy)."""
        for stream, parts in held.items():
            stream._deliver(bytes(parts[0]) if len(parts) == 1 else b"".join(parts))
        held.clear()

    def _through_h2(self, frames: bytes) -> None:
        """Feed whole frames to h2 and handle its events, one frame at a time: h2
        raises on a bad frame and drops the events of the good frames before it in
        the same call (DATA a socket should have had before the connection failed;
        found by benchmarks/fuzz, target http2)."""
        pos = 0
        end = len(frames)
        while pos < end:
            stop = pos + 9 + int.from_bytes(frames[pos : pos + 3], "big")
            if frames[pos + 3] == 0x7:  # GOAWAY: ours to handle (see _goaway)
                self._goaway(frames[pos:stop])
                pos = stop
                continue
            with self.lock:
                events = self.h2.receive_data(frames[pos:stop] if pos or stop < end else frames)
                self._collect_locked()
            for event in events:
                self._handle(event)
            pos = stop

    def _goaway(self, frame: bytes) -> None:
        """A GOAWAY from the server (RFC 9113 6.8), kept from h2: h2's state machine
        closes on any GOAWAY and then refuses every frame in or out, while after a
        graceful one the streams already open must go on."""
        if int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF:
            raise _ConnectionError(_PROTOCOL_ERROR, "a GOAWAY on a stream")
        if len(frame) < 17:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "a GOAWAY shorter than 8 bytes")
        last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
        value = int.from_bytes(frame[13:17], "big")
        try:
            code: Any = h2.errors.ErrorCodes(value)
        except ValueError:
            code = value
        if value != h2.errors.ErrorCodes.NO_ERROR:
            raise ConnectionLost(f"the server sent GOAWAY ({code!r})")
        # No new streams here; the live ones may finish. A CONNECT above ``last``
        # was not processed: it may be tried again (not remembered as a refusal).
        with self.lock:
            self.closing = True
            unanswered = [s for sid, s in self.streams.items()
                          if sid > last and not s._responded.is_set()]
        pool.forget(self)
        for stream in unanswered:
            stream.refused = HTTP2Unavailable("the server sent GOAWAY before the CONNECT")
            self.reset_stream(stream)
            stream._lose(None)

    def _stream_flow_error(self, stream: H2Stream) -> None:
        logger.info(
            "HTTP/2 connection %d: DATA beyond stream %d's window", self.id, stream.stream_id
        )
        self.reset_stream(stream, _FLOW_CONTROL_ERROR)
        stream._lose(ConnectionLost("the server sent DATA beyond the HTTP/2 stream's window"))

    def _return_credit(self) -> None:
        """Return the credit of the read just handled, in one batch of frames:
        by hand for data h2 never saw, through h2 for data it did."""
        hand, through = self._credit_hand, self._credit_h2
        conn_hand, conn_h2 = self._credit_conn_hand, self._credit_conn_h2
        if not (hand or through or conn_hand or conn_h2):
            return
        frames: list[BytesLike] = []
        with self.lock:
            if self.dead is None:
                for stream, n in hand.items():
                    if stream._paused:
                        stream._withheld_hand += n  # backpressure: see resume_reading
                    elif not stream._ended:  # no credit for a stream we will not read
                        frames.append(_window_update(stream.stream_id, n))
                        stream._recv_window += n
                if conn_hand:
                    frames.append(_window_update(0, conn_hand))
                    self._recv_window += conn_hand
                for stream, n in through.items():
                    if stream._paused:
                        stream._withheld_h2 += n
                    # n is 0 for an empty DATA frame with END_STREAM, and h2 refuses an
                    # increment of 0 with a ValueError (found by benchmarks/fuzz).
                    elif n and not stream._ended:
                        with contextlib.suppress(h2.exceptions.H2Error, KeyError):
                            self.h2.increment_flow_control_window(n, stream.stream_id)
                            stream._recv_window += n
                if conn_h2:
                    with contextlib.suppress(h2.exceptions.H2Error, ValueError):
                        self.h2.increment_flow_control_window(conn_h2)
                        self._recv_window += conn_h2
                self._collect_locked()
                self._out.extend(frames)
        hand.clear()
        through.clear()
        self._credit_conn_hand = self._credit_conn_h2 = 0

    def return_withheld(self, stream: H2Stream) -> None:
        """Unpause ``stream`` and return the credit withheld meanwhile (any
        thread; never blocks: the frame is written by a flusher, the turn
        holder or the reader)."""
        with self.lock:
            stream._paused = False
            hand, through = stream._withheld_hand, stream._withheld_h2
            stream._withheld_hand = stream._withheld_h2 = 0
            if not (hand or through) or stream._ended or self.dead is not None:
                return
            if hand:
                self._out.append(_window_update(stream.stream_id, hand))
                stream._late += hand
            if through:
                with contextlib.suppress(h2.exceptions.H2Error, KeyError):
                    self.h2.increment_flow_control_window(through, stream.stream_id)
                    stream._late += through
                self._collect_locked()
        self._kick()

    def _die(self, exc: BaseException | None) -> None:
        with contextlib.suppress(OSError):
            self.transport.abort()  # first: a writer stuck in the socket returns
        with self.lock:
            if self.dead is None:
                self.dead = exc or ConnectionLost("the HTTP/2 connection ended")
            streams = list(self.streams.values())
            jobs = [s._closing_job for s in streams if s._closing_job is not None]
            for stream in streams:
                stream._ended = True
                stream._closing_job = None
            if self._idle_job is not None:
                jobs.append(self._idle_job)
                self._idle_job = None
            self._out = []
            self.window_open.notify_all()
        for job in jobs:
            job.cancel()
        pool.forget(self)
        for stream in streams:
            stream.refused = stream.refused or (
                HTTP2Unavailable(f"HTTP/2 connection lost: {self.dead}")
                if not stream._responded.is_set()
                else None
            )
            stream._lose(None if self.closing else ConnectionLost(f"{self.dead}"))
        self.transport.close()

    def _handle(self, event: h2.events.Event) -> None:
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
                    # Three ASCII digits (RFC 9110 15); h2 lets anything through, and a
                    # malformed one ends this stream only (RFC 9113 8.1.1): status 0.
                    status = int(v) if len(v) == 3 and v.isascii() and v.isdigit() else 0
                elif not n.startswith(":"):
                    headers.add(n, v)
            stream.status, stream.response = status, headers
            if not 200 <= status < 300:
                # RFC 8441: the server refused the extended CONNECT.
                stream.refused = HTTP2Unavailable(
                    f"the server refused the HTTP/2 WebSocket (status {status})",
                    InvalidStatus(status, "", headers),
                    # A 5xx, a timeout or "too many" may pass; the rest is the server's answer.
                    refused=400 <= status < 500 and status not in (408, 425, 429),
                )
                self.reset_stream(stream)
            stream._responded.set()
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream._ended and event.data:
                stream._deliver(event.data)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            code = event.error_code if isinstance(event, h2.events.StreamReset) else None
            with self.lock:
                stream._server_ended = True
                job, stream._closing_job = stream._closing_job, None
                if code is not None:
                    stream._ended = True
                    self.window_open.notify_all()
            if job is not None:
                job.cancel()
            if not stream._responded.is_set():
                stream.refused = HTTP2Unavailable(
                    "the server ended the stream at once"
                    if code is None
                    else f"the server reset the CONNECT stream ({code!r})",
                    refused=code in _REFUSING_RESETS,
                )
            error = None
            if code is not None and code not in (
                h2.errors.ErrorCodes.NO_ERROR,
                h2.errors.ErrorCodes.CANCEL,
            ):
                error = ConnectionLost(f"the server reset the stream ({code!r})")
            stream._lose(error)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            with self.lock:
                self.window_open.notify_all()
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    if changed is not None:
                        self.max_streams = changed.new_value
        # (A GOAWAY never reaches h2 here: _through_h2 hands it to _goaway.)


@dataclass(frozen=True)
class Refusal:
    """Why an origin refused WebSocket over HTTP/2, and when (``time.monotonic()``)."""

    reason: str
    at: float


class RefusedOrigins:
    """Origins that refused WebSocket over HTTP/2, each remembered for ``ttl`` seconds.

    Thread-safe. An entry expires ``ttl`` seconds after the refusal it
    records (a server may be upgraded, or a load balancer may send the next
    connection elsewhere); a new refusal starts the time again.

    >>> refused = RefusedOrigins(ttl=60.0, clock=lambda: 0.0)
    >>> refused.add(("wss", "example.com", 443), "no SETTINGS_ENABLE_CONNECT_PROTOCOL")
    >>> ("wss", "example.com", 443) in refused
    True
    """

    def __init__(
        self, ttl: float = REFUSAL_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._refusals: dict[tuple[str, str, int], Refusal] = {}

    def add(self, origin: tuple[str, str, int], reason: str) -> None:
        with self._lock:
            self._refusals[origin] = Refusal(reason, self._clock())

    def get(self, origin: tuple[str, str, int]) -> Refusal | None:
        """The origin's refusal if it has not expired (an expired one is dropped)."""
        with self._lock:
            refusal = self._refusals.get(origin)
            if refusal is not None and self._clock() - refusal.at >= self.ttl:
                del self._refusals[origin]
                refusal = None
            return refusal

    def __contains__(self, origin: object) -> bool:
        return isinstance(origin, tuple) and self.get(origin) is not None

    def __len__(self) -> int:
        """How many origins are remembered (expired ones are not counted)."""
        with self._lock:
            now = self._clock()
            return sum(1 for r in self._refusals.values() if now - r.at < self.ttl)

    def left(self, refusal: Refusal) -> float:
        """Seconds until ``refusal`` expires."""
        return max(0.0, refusal.at + self.ttl - self._clock())

    def age(self, refusal: Refusal) -> float:
        return max(0.0, self._clock() - refusal.at)

    def clear(self) -> None:
        with self._lock:
            self._refusals.clear()


class H2Pool:
    """HTTP/2 connections by origin and TLS settings, shared between sockets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[tuple[Any, ...], list[H2Connection]] = {}
        self._creating: dict[tuple[Any, ...], threading.Lock] = {}
        #: Origins that refused WebSocket over HTTP/2, for a while: later
        #: sockets with fallback on go straight to HTTP/1.1.
        self.failed_origins = RefusedOrigins()

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
    ) -> H2Stream | Transport:
        """A stream for ``request``: on a shared connection, or a new one.

        Returns a plain :class:`Transport` instead when a new TLS connection's
        ALPN chose HTTP/1.1: the caller may go on with HTTP/1.1 on it.
        Raises :class:`HTTP2Unavailable` when HTTP/2 or RFC 8441 is not on offer.
        """
        # Sockets through different proxies (or none) never share a connection.
        key = (url.secure, url.host.lower(), url.port, id(ssl_context), server_hostname,
               connector.route_key)
        conn = self._reserve(key) if settings.share else None
        if conn is None:
            with self._lock:
                create_lock = self._creating.setdefault(key, threading.Lock())
            with create_lock:  # one new connection per origin at a time
                conn = self._reserve(key) if settings.share else None
                if conn is None:
                    made = self._connect(
                        key, url, deadline, settings, connector, ssl_context, server_hostname
                    )
                    if not isinstance(made, H2Connection):
                        return made  # ALPN chose HTTP/1.1
                    conn = made
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
    ) -> H2Connection | Transport:
        """A new connection with its HTTP/2 handshake done, or the plain
        transport when TLS ALPN did not choose h2."""
        transport = connector.connect(
            url.host, url.port, deadline, ssl_context, server_hostname, alpn=HTTP2_ALPN
        )
        if url.secure and transport.alpn_protocol != "h2":
            return transport
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
