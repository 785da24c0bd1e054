"""The :class:`WebSocket`: the seed API on top of the sans-I/O core.

Data flow, from the network to your callback::

    socket ─▶ reader thread: Transport.run ─▶ Protocol.receive_data ─▶ events
          ─▶ Dispatcher.post ─▶ ws.update() on your thread ─▶ on_message(ws, text)

and back::

    ws.send() on any thread ─▶ send queue (lock-guarded; buffered_amount)
          ─▶ writer thread: Protocol.encode_data ─▶ Transport.write ─▶ socket

Threads, per socket: ``blockws-<id>-reader`` connects, performs the opening
handshake and then reads -- or, over plain TCP, lends the reading to a thread
waiting in :meth:`WebSocket.receive` or :meth:`WebSocket.wait`, which then
parses on its own thread (see :class:`~blockws.transport.TCPTransport`);
``blockws-<id>-writer`` drains the send queue. The
process-wide ``blockws-timer`` thread sends pings and enforces timeouts. The
reader thread, the last to finish, closes the transport, joins the writer,
and queues ``on_closed``; the thread that runs ``on_closed`` joins the reader
first, so once ``on_closed`` has run, none of the socket's threads remain.

``self._lock`` guards the send queue, ``buffered_amount`` and the lifecycle
phase. ``self._proto_lock`` serializes the calls into the protocol that can
change its close state (parsing on the reader, ``encode_close`` in
``close()``); it is taken first when both are needed. Parsing and inflating
hold only the protocol lock, so senders and the writer are never blocked by
a large incoming message.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import MutableMapping, Sequence
from typing import Any, Callable, Union

from . import dispatcher as _dispatcher
from .buffers import BufferPool, BufferSegment
from .deflate import PerMessageDeflate
from .delivery import Delivery
from .exceptions import (
    BlockwsError,
    CloseTimeout,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    InvalidState,
    OpenTimeout,
)
from .extensions import Extension
from .frames import CLOSE_ABNORMAL, Opcode
from .handshake import (
    Headers,
    HeadersLike,
    Request,
    parse_url,
    redact_url,
)
from .http2 import HTTP2Settings
from .keepalive import Keepalive
from .log import ContextAdapter
from .opening import open_transport
from .protocol import (
    DEFAULT_MAX_FRAGMENT_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    BinaryMessage,
    CloseReceived,
    Failure,
    Pong,
    Protocol,
    Role,
    State,
)
from .sender import UNCOMPRESSED as _UNCOMPRESSED
from .sender import Sender
from .timer import Job, timer
from .transport import Connector, Deadline, Transport

__all__ = ["WebSocket", "connect", "update_all", "wait"]

BytesLike = Union[bytes, bytearray, memoryview]
OnOpen = Callable[["WebSocket"], Any]
OnMessage = Callable[["WebSocket", str], Any]
OnBinary = Callable[["WebSocket", BufferSegment], Any]
OnClosed = Callable[["WebSocket", int, str], Any]
OnRequest = Callable[["WebSocket", Request], Any]

# Lifecycle phases (``_phase``).
_NEW, _CONNECTING, _OPEN, _CLOSING, _CLOSED = range(5)

#: Longest time a failing close waits for update() to deliver the messages
#: that preceded the protocol error (see WebSocket.data_received).
_FAILURE_GRACE = 0.5
# What a compact Protocol reports a message as (see Protocol.compact_messages).
_MESSAGES = (bytes, str, BinaryMessage)
# Plain ints and globals: an enum member look-up costs ten times a global's,
# and these are on the path of every message.
_TEXT, _BINARY = int(Opcode.TEXT), int(Opcode.BINARY)
_STATE_OPEN, _STATE_CLOSE_SENT, _STATE_CLOSED = State.OPEN, State.CLOSE_SENT, State.CLOSED


_ids = itertools.count(1)


class WebSocket:
    """A WebSocket client with background I/O and callbacks pumped by ``update()``.

    ``open()`` returns at once; a reader thread connects, and callbacks run
    when you call :meth:`update` (once per frame in a game), in the order the
    events happened. ``send*`` and ``close`` may be called from any thread and
    never block on the network.

    Options, keyword-only, by concern:

    * WebSocket: ``subprotocols``, ``extensions`` (default
      ``[PerMessageDeflate()]``; ``[]`` turns compression off), ``max_fragment_size``,
      ``max_message_size`` (default 16 MiB; a larger incoming message fails
      the connection with 1009).
    * HTTP: ``headers`` (added to the upgrade request), ``origin``.
    * TLS: ``ssl_context`` (default: certifi's CA bundle, hostname checked),
      ``server_hostname`` (SNI and certificate name, default the URL's host).
    * Timeouts (seconds): ``open_timeout`` (connect + handshake, default 10),
      ``close_timeout`` (closing handshake, default 5), ``send_pings``,
      ``ping_frequency`` (default 10, at least 0.1), ``close_after_no_message``
      (default 2).
    * Callbacks: ``on_open``, ``on_message``, ``on_binary``, ``on_closed``
      (run inside ``update()``), and ``on_internal_request_created(ws,
      request)``, which runs on the connecting thread just before each
      handshake request is sent; an exception there ends the socket
      (``on_closed`` with 1006, the exception in ``ws.error``).
    * Memory and logging: ``buffer_pool`` (default ``BufferPool.default``),
      ``context`` (extra fields for the logging context).

    Failures are reported in order. When the server breaks the protocol,
    parsing stops at the bad frame, but the messages that arrived before it
    are still delivered, and what your callbacks send in answer to them goes
    out before the failing close frame (as with a single-threaded client; if
    ``update()`` is not called within 0.5 s the close goes out anyway). Until
    that point ``is_open`` stays True.

    Raises :class:`~blockws.exceptions.InvalidURL` (a ``ValueError``) for a
    URL that is not ``ws://`` or ``wss://``, before any I/O.
    """

    def __init__(
        self,
        url: str,
        *,
        # WebSocket
        subprotocols: Sequence[str] | None = None,
        extensions: Sequence[Extension] | None = None,
        max_fragment_size: int = DEFAULT_MAX_FRAGMENT_SIZE,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        # HTTP
        headers: HeadersLike | None = None,
        origin: str | None = None,
        # TLS
        ssl_context: Any = None,
        server_hostname: str | None = None,
        # timeouts and keepalive
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 5.0,
        send_pings: bool = False,
        ping_frequency: float = 10.0,
        close_after_no_message: float = 2.0,
        # callbacks
        on_open: OnOpen | None = None,
        on_message: OnMessage | None = None,
        on_binary: OnBinary | None = None,
        on_closed: OnClosed | None = None,
        on_internal_request_created: OnRequest | None = None,
        # memory and logging
        buffer_pool: BufferPool | None = None,
        context: MutableMapping[str, Any] | None = None,
        # HTTP/2
        http2: HTTP2Settings | None = None,
    ) -> None:
        self._url = parse_url(url)
        self._check_fragment_size(max_fragment_size)
        if max_message_size is not None and max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 (or None)")
        self.id = next(_ids)
        self.context: MutableMapping[str, Any] = {"id": self.id, "url": redact_url(url)}
        if context:
            self.context.update(context)
        self.log = ContextAdapter(self.context)

        self.on_open = on_open
        self.on_message = on_message
        self.on_binary = on_binary
        self.on_closed = on_closed
        self.on_internal_request_created = on_internal_request_created

        self._max_fragment_size = max_fragment_size
        self.max_message_size = max_message_size
        #: Offered extensions; after open, the ones the server accepted.
        self.extensions: list[Extension] = (
            list(extensions) if extensions is not None else [PerMessageDeflate()]
        )
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.buffer_pool = buffer_pool or BufferPool.default
        #: How this socket uses HTTP/2 (RFC 8441); see :class:`HTTP2Settings`.
        self.http2 = http2 if http2 is not None else HTTP2Settings()
        self._check_ping_frequency(ping_frequency)
        self._ping_frequency = float(ping_frequency)
        self.close_after_no_message = float(close_after_no_message)
        self._send_pings = bool(send_pings)

        #: The exception that ended the socket, or ``None``.
        self.error: BaseException | None = None
        #: The subprotocol the server selected, or ``None``.
        self.protocol: str | None = None
        #: ``"1.1"`` or ``"2"``: the HTTP version that carried the handshake.
        self.http_version: str | None = None
        #: Round-trip time of the latest ping/pong pair, or ``None``.
        self.latency: float | None = None
        #: ``time.monotonic()`` of the latest frame received, or ``None``.
        self.last_message_received: float | None = None
        #: The close code and reason ``on_closed`` reported, once closed.
        self.close_code: int | None = None
        self.close_reason: str = ""

        # Lock order: _proto_lock (calls that change the protocol's close
        # state: parsing, encode_close) before _lock (queue, phase, counters).
        self._proto_lock = threading.Lock()
        self._lock = threading.Lock()
        self._phase = _NEW
        self._sender = Sender(
            f"blockws-{self.id}-writer", self._lock, self.log, self._write_failed, self._after_write
        )
        self._proto: Protocol | None = None
        self._transport: Transport | None = None
        self._connector: Connector | None = None
        self._reader: threading.Thread | None = None
        self._finished = False
        self._closed_event = threading.Event()
        self._close_requested: tuple[int, str] | None = None
        # The close frame of a protocol failure, held until the messages that
        # preceded the bad frame have been dispatched (see data_received).
        self._deferred_close: bytes | None = None
        self._jobs: dict[str, Job] = {}
        self._keepalive = Keepalive(self)
        self._dispatcher = _dispatcher.Dispatcher()
        self._nudge = self._dispatcher.nudge
        self._lend_reading = True  # see _connect
        self._delivery = Delivery(self, self._dispatcher)
        self._deliver = self._delivery.messages
        self._inbox: deque[str | bytes] = self._delivery.inbox

        self._opened = False  # on_open has run
        self._ended = False  # on_closed has run
        # What a fresh request is made of (the first one, and a fallback one).
        self._request_options: dict[str, Any] = {
            "subprotocols": list(subprotocols or []),
            "headers": list(Headers(headers).raw_items()),
            "origin": origin,
            "open_timeout": open_timeout,
            "close_timeout": close_timeout,
        }
        self.internal_request = self._new_request(url, **self._request_options)

    # -- properties --------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.internal_request.url

    @property
    def is_open(self) -> bool:
        """True from when ``on_open`` is queued until closing starts or the link fails."""
        return self._phase == _OPEN

    @property
    def closed(self) -> bool:
        """True once the socket has ended and ``on_closed`` has run (in ``update()``)."""
        return self._ended

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the connection so far (frames after compression)."""
        transport = self._transport
        return transport.bytes_written if transport is not None else 0

    @property
    def bytes_received(self) -> int:
        """Bytes read from the connection so far (frames before decompression)."""
        transport = self._transport
        return transport.bytes_read if transport is not None else 0

    @property
    def buffered_amount(self) -> int:
        """Bytes accepted by ``send*`` and not yet written to the transport.

        Counted as given to ``send*``: compression runs on the writer thread
        just before a message is written, so queued bytes are uncompressed.
        """
        return self._sender.buffered

    @property
    def max_fragment_size(self) -> int:
        """Payload bytes per outgoing frame; a change applies to messages written later."""
        return self._max_fragment_size

    @max_fragment_size.setter
    def max_fragment_size(self, value: int) -> None:
        self._check_fragment_size(value)
        with self._lock:
            self._max_fragment_size = value
            if self._proto is not None:
                self._proto.max_fragment_size = value

    @staticmethod
    def _check_fragment_size(value: int) -> None:
        if value < 1:
            raise ValueError("max_fragment_size must be at least 1")

    @property
    def send_pings(self) -> bool:
        return self._send_pings

    @send_pings.setter
    def send_pings(self, value: bool) -> None:
        self._send_pings = bool(value)
        with self._lock:
            if self._phase == _OPEN:
                self._keepalive.schedule_locked()

    @property
    def ping_frequency(self) -> float:
        return self._ping_frequency

    @ping_frequency.setter
    def ping_frequency(self, value: float) -> None:
        self._check_ping_frequency(value)
        self._ping_frequency = float(value)

    @staticmethod
    def _check_ping_frequency(value: float) -> None:
        if value < 0.1:
            raise ValueError("ping_frequency must be at least 0.1 seconds")

    @property
    def open_timeout(self) -> float | None:
        return self.internal_request.open_timeout

    @property
    def close_timeout(self) -> float | None:
        return self.internal_request.close_timeout

    def __repr__(self) -> str:
        phase = ("new", "connecting", "open", "closing", "closed")[self._phase]
        return f"<blockws.WebSocket #{self.id} {self.context['url']} {phase}>"

    # -- opening -----------------------------------------------------------------

    def _new_request(self, url: str, **fields: Any) -> Request:
        """Create a handshake request (``on_internal_request_created`` sees it when used)."""
        fields = dict(fields)
        fields["headers"] = Headers(fields["headers"])
        fields["subprotocols"] = list(fields["subprotocols"])
        return Request(url=url, **fields)

    def open(self) -> WebSocket:
        """Start connecting and return at once; ``on_open`` or ``on_closed`` follows.

        Raises :class:`~blockws.exceptions.InvalidState` when called twice.
        """
        with self._lock:
            if self._phase != _NEW:
                raise InvalidState("open() was already called")
            self._phase = _CONNECTING
            self._connector = Connector()
        _dispatcher.register(self._dispatcher, True)
        timeout = self.internal_request.open_timeout
        if timeout is not None:
            self._jobs["open"] = timer.call_later(timeout, self._open_timed_out)
        self._reader = threading.Thread(
            target=self._reader_main, name=f"blockws-{self.id}-reader", daemon=True
        )
        self._reader.start()
        return self

    def _open_timed_out(self) -> None:
        with self._lock:
            if self._phase != _CONNECTING:
                return
            connector, transport = self._connector, self._transport
        self._set_error(OpenTimeout(f"opening took longer than {self.open_timeout} s"))
        if connector is not None:
            connector.abort()
        if transport is not None:
            transport.abort()

    def _reader_main(self) -> None:
        try:
            transport = self._connect()
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            if self.error is None and self._close_requested is None:
                self._set_error(exc)
            self.log.debug("opening failed: %r", exc)
            self._finish()
            return
        transport.run(self)

    def _connect(self) -> Transport:
        """Connect and handshake (RFC 8441 or RFC 6455 4.1); returns the transport once open."""
        request = self.internal_request
        hook = self.on_internal_request_created
        if hook is not None:
            # Runs on this (connecting) thread, as API.md specifies, so that
            # every request the socket sends -- including a fallback one --
            # gets the user's customizations in one place.
            hook(self, request)
        assert self._connector is not None
        opened = open_transport(
            request,
            deadline=Deadline(request.open_timeout),
            connector=self._connector,
            ssl_context=self.ssl_context,
            server_hostname=self.server_hostname,
            extensions=self.extensions,
            http2=self.http2,
            register=self._register_transport,
            new_request=self._fallback_request,
            log=self.log,
        )
        transport = opened.transport
        self.protocol = opened.subprotocol
        self.http_version = transport.http_version
        self.extensions = accepted = opened.extensions
        # With compression in force, inflating on the reader thread overlaps
        # with the caller's work and the writer's compressing (zlib releases
        # the GIL): 1 MiB JSON echoes ran ~10% faster than when the waiting
        # caller inflated them itself. So such a socket keeps its reader.
        self._lend_reading = not accepted
        proto = Protocol(
            Role.CLIENT,
            max_message_size=self.max_message_size,
            max_fragment_size=self._max_fragment_size,
            extensions=accepted,
            allocate=self.buffer_pool.allocate,
        )
        proto.compact_messages = True  # messages as str/bytes: see blockws.delivery
        with self._lock:
            if self._phase != _CONNECTING:
                raise ConnectionLost("connection aborted during the opening handshake")
            self._proto = proto
            proto.max_fragment_size = self._max_fragment_size  # a change made meanwhile
            self._phase = _OPEN
            job = self._jobs.pop("open", None)
            if job is not None:
                job.cancel()
            self._sender.attach(proto, transport)
            if self._send_pings:
                self._keepalive.schedule_locked()
        self.log.debug("open (subprotocol %r)", self.protocol)
        self._dispatcher.post(self._dispatch_open, None)
        if opened.extra:
            self.data_received(opened.extra)
        return transport

    def _register_transport(self, transport: Transport) -> None:
        with self._lock:
            self._transport = transport
            if self._phase != _CONNECTING:
                transport.abort()

    def _fallback_request(self) -> Request:
        """A new request for the HTTP/1.1 fallback, with the user's hook applied."""
        request = self._new_request(self.internal_request.url, **self._request_options)
        self.internal_request = request
        if self.on_internal_request_created is not None:
            self.on_internal_request_created(self, request)
        return request

    # -- receiving (reader thread, or a shared connection's thread) --------------

    def data_received(self, data: bytes) -> None:
        """Sink method: bytes from the transport."""
        self.last_message_received = time.monotonic()
        self._sender.direct_ok = True  # a reply: the next send may skip the writer
        proto = self._proto
        assert proto is not None
        # Without on_binary, messages end up as bytes for receive(): have the
        # parser build them so, without a pooled buffer and a second copy.
        proto.binary_as_bytes = self.on_binary is None
        deferred = False
        # Parsing (and inflating) holds only the protocol lock, not the send
        # lock, so send() and the writer (compressing) keep going meanwhile.
        with self._proto_lock:
            before = proto.state
            was_open = before is _STATE_OPEN
            events = proto.receive_data(data)
            out = proto.data_to_send() if proto._outgoing else None
            if out:
                with self._lock:
                    if (
                        was_open
                        and type(events[-1]) is Failure
                        and (self._dispatcher.pending or any(type(e) in _MESSAGES for e in events))
                    ):
                        # Messages that came before the bad frame are still
                        # undelivered. Hold the failing close (the last frame
                        # queued) until the app has run their callbacks, so what
                        # it sends in answer goes out first, as with a
                        # single-threaded client; parsing has stopped already,
                        # so nothing after the bad frame is processed.
                        self._deferred_close = out.pop()
                        self._jobs["failure"] = timer.call_later(
                            _FAILURE_GRACE, self._send_deferred_close
                        )
                        deferred = True
                    if out:
                        self._queue_control_locked(out, events)
        # The messages of one read are dispatched as one batch: one wake-up of
        # a waiting thread and one dispatcher item, not one per message.
        mixed = False
        for event in events:
            cls = type(event)
            if cls is bytes or cls is str or cls is BinaryMessage:
                continue
            mixed = True  # rare: a control frame or a failure
            if isinstance(event, Pong):
                self._keepalive.pong_received(event.payload)
            elif isinstance(event, CloseReceived):
                self.log.debug("close received: %s %r", event.code, event.reason)
            elif isinstance(event, Failure):
                self._set_error(event.error, closing=not deferred)
                self.log.info("failing the connection: %s", event.error)
        messages = [e for e in events if type(e) in _MESSAGES] if mixed else events
        if deferred:
            items: list[_dispatcher.Item] = [(self._dispatch_failure, None)]
            if messages:
                items.insert(0, (self._deliver, messages))
            self._dispatcher.post_many(items)
        elif messages:
            self._dispatcher.post(self._deliver, messages)
        if before is _STATE_CLOSE_SENT and proto.state is _STATE_CLOSED:
            self._end_closed_stream()

    def _end_closed_stream(self) -> None:
        """Both close frames are through: end a stream whose server will not.

        Over TCP the server closes the connection (RFC 6455 7.1.1) and the
        reader sees EOF. An HTTP/2 stream is reset by the client instead
        (RFC 8441 section 5; see blockws.http2 for why not END_STREAM).
        """
        transport = self._transport
        if transport is not None and not transport.server_closes:
            transport.abort()

    def _queue_control_locked(self, frames: list[bytes], events: list[Any]) -> None:
        """Queue frames the protocol produced (pongs, close replies)."""
        proto = self._proto
        assert proto is not None
        if proto.state is State.CLOSED or (
            proto.failure is not None and self._deferred_close is None
        ):
            # We are replying to a close or failing: queued data can no longer
            # be sent (RFC 6455 5.5.1), so drop it now and close promptly.
            dropped = self._sender.drop_locked()
            if dropped:
                self.log.debug("dropped %d unsent message(s) at close", dropped)
            if self._phase == _OPEN:
                self._phase = _CLOSING
            self._arm_close_timeout_locked()
        self._sender.control_locked(frames)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Sink method: the transport ended (``exc`` is ``None`` for EOF)."""
        proto = self._proto
        if exc is not None:
            # A reset after the peer's close frame ends a closed connection: not an error.
            if proto is None or proto.close_received is None:
                self._set_error(exc)
        elif proto is None or proto.state is not State.CLOSED:
            if proto is None or proto.close_received is None:
                if proto is None or proto.failure is None:
                    self._set_error(ConnectionLost("connection closed without a close frame"))
        self._finish()

    # -- sending -----------------------------------------------------------------

    def send(
        self,
        data: str | BytesLike,
        offset: int = 0,
        count: int | None = None,
        *,
        compress: bool = True,
    ) -> None:
        """Queue a text (``str``) or binary (bytes-like) message; returns at once.

        ``offset`` and ``count`` select part of a binary message. Thread-safe;
        each thread's messages keep their order. The data is copied unless it
        is an immutable ``bytes``. ``compress=False`` sends this message
        uncompressed even when permessage-deflate is in force (for data that
        is already compressed). Raises :class:`InvalidState` before the socket
        is open and :class:`ConnectionClosed` once it is closing.
        """
        flag = 0 if compress else _UNCOMPRESSED
        if isinstance(data, str):
            if offset or count is not None:
                raise TypeError("offset and count apply to binary messages only")
            payload: bytes = data.encode("utf-8")
            self._enqueue(_TEXT | flag, payload, None, len(payload))
            return
        if offset or count is not None:
            view = memoryview(data).cast("B")
            end = len(view) if count is None else offset + count
            if offset < 0 or end > len(view) or end < offset:
                raise ValueError(f"offset/count outside a {len(view)}-byte buffer")
            payload = bytes(view[offset:end])
        elif type(data) is bytes:
            payload = data
        else:
            payload = bytes(data)
        self._enqueue(_BINARY | flag, payload, None, len(payload))

    def send_as_binary(self, segment: BufferSegment, *, compress: bool = True) -> None:
        """Queue ``segment`` as a binary message; blockws releases it once written.

        The segment must not be touched after the call. If the socket is not
        open, the segment is released and the exception raised.
        """
        self._enqueue_segment(Opcode.BINARY | (0 if compress else _UNCOMPRESSED), segment)

    def send_as_text(self, segment: BufferSegment, *, compress: bool = True) -> None:
        """Queue ``segment`` (UTF-8) as a text message; released once written.

        Raises ``ValueError`` (and releases the segment) if it is not UTF-8.
        """
        try:
            str(segment.view(), "utf-8")
        except UnicodeDecodeError as exc:
            segment.release()
            raise ValueError(f"segment is not valid UTF-8: {exc.reason}") from None
        self._enqueue_segment(Opcode.TEXT | (0 if compress else _UNCOMPRESSED), segment)

    def _enqueue_segment(self, opcode: int, segment: BufferSegment) -> None:
        try:
            self._enqueue(opcode, segment.view(), segment, segment.count)
        except BaseException:
            if not segment.released:
                segment.release()
            raise

    def _enqueue(self, opcode: int, payload: Any, segment: BufferSegment | None, size: int) -> None:
        with self._lock:
            if self._phase != _OPEN:
                raise self._state_error_locked()
            direct = self._sender.enqueue_locked(opcode, payload, segment, size)
        if direct:
            # Nothing queued or being written: write now, without blocking.
            self._sender.direct_write(opcode, payload, segment)

    def _state_error_locked(self) -> BlockwsError:
        if self._phase in (_NEW, _CONNECTING):
            return InvalidState("the socket is not open yet (wait for on_open)")
        if self._finished:
            return self._closed_exception()
        return (
            ConnectionClosedOK(None, "")
            if self.error is None
            else ConnectionClosedError(None, "", self.error)
        )

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping now (``payload`` at most 125 bytes); the pong is not awaited."""
        with self._lock:
            if self._phase != _OPEN or self._proto is None:
                raise self._state_error_locked()
            self._sender.control_locked([self._proto.encode_control(Opcode.PING, payload)])

    # -- the writer (blockws.sender) -----------------------------------------------

    def _write_failed(self, exc: BaseException) -> None:
        """A write failed: the socket ends (the reader sees the abort as EOF)."""
        proto = self._proto
        # Once the peer's close frame arrived, a failed write (e.g. of our close
        # reply to a peer that already hung up) is not what ended the socket.
        if proto is None or proto.close_received is None:
            self._set_error(exc)
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _after_write(self) -> None:
        proto = self._proto
        if proto is not None and proto.state is State.CLOSED:
            self._end_closed_stream()  # our reply to the server's close is out

    # -- closing -------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (RFC 6455 7.1.2) and return at once.

        Messages queued before the call are sent first. ``is_open`` is False
        from now on; ``on_closed`` follows once the server answers, or after
        ``close_timeout`` seconds if it does not (then ``ws.error`` is a
        ``CloseTimeout``). Raises ``ValueError`` for a code or reason RFC 6455
        forbids. A no-op when the socket is already closing or closed; a
        socket still connecting is abandoned (``on_closed`` with 1006).
        """
        from .frames import pack_close

        pack_close(code, reason)  # validate before changing any state
        with self._proto_lock, self._lock:
            phase = self._phase
            if phase == _NEW:
                self._phase = _CLOSED
                self._finished = True
                self._closed_event.set()
                return
            if phase == _CONNECTING:
                self._close_requested = (code, reason)
                self._phase = _CLOSING
                connector, transport = self._connector, self._transport
            elif phase == _OPEN:
                assert self._proto is not None
                self._close_requested = (code, reason)
                self._phase = _CLOSING
                if self._proto.state is State.OPEN:
                    self._sender.close_frame_locked(self._proto.encode_close(code, reason))
                self._queue_deferred_close_locked()
                self._arm_close_timeout_locked()
                return
            else:
                return
        if connector is not None:
            connector.abort()
        if transport is not None:
            transport.abort()

    def _arm_close_timeout_locked(self) -> None:
        timeout = self.internal_request.close_timeout
        if "close" not in self._jobs and timeout is not None:
            self._jobs["close"] = timer.call_later(timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        proto = self._proto
        if proto is None or proto.close_received is None:
            self._set_error(
                CloseTimeout(f"closing handshake took longer than {self.close_timeout} s")
            )
        self.log.debug("close timeout: dropping the connection")
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (1006)."""
        with self._lock:
            if self._phase in (_OPEN, _CONNECTING):
                self._phase = _CLOSING
            transport, connector = self._transport, self._connector
        if connector is not None:
            connector.abort()
        if transport is not None:
            transport.abort()

    def _set_error(self, exc: BaseException, closing: bool = True) -> None:
        """Record the first error that ends the socket; later ones are effects of it."""
        with self._lock:
            if self.error is None and not self._finished:
                self.error = exc
            if closing and self._phase == _OPEN:
                self._phase = _CLOSING

    def _dispatch_failure(self, _: None) -> None:
        # Runs in update() after the callbacks of the messages that preceded
        # the protocol error, so whatever they sent is queued before the close.
        self._send_deferred_close()

    def _send_deferred_close(self) -> None:
        with self._lock:
            self._queue_deferred_close_locked()

    def _queue_deferred_close_locked(self) -> None:
        frame = self._deferred_close
        if frame is None or self._finished:
            return
        self._deferred_close = None
        job = self._jobs.pop("failure", None)
        if job is not None:
            job.cancel()
        if self._phase == _OPEN:
            self._phase = _CLOSING
        self._sender.close_frame_locked(frame)
        self._arm_close_timeout_locked()

    def _finish(self) -> None:
        """Tear down (once): stop the writer, close the transport, queue on_closed."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._phase = _CLOSED
            writer = self._sender.stop_locked()
            self._deferred_close = None
            transport = self._transport
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancel()
        if transport is not None:
            transport.abort()  # unblocks a writer stuck on a full socket
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        if transport is not None:
            transport.close()
        code, reason = self._closing_code()
        self.close_code, self.close_reason = code, reason
        self.log.debug("closed: %s %r (error: %r)", code, reason, self.error)
        self._closed_event.set()
        self._dispatcher.post(self._dispatch_closed, (code, reason))

    def _closing_code(self) -> tuple[int, str]:
        proto = self._proto
        if proto is not None:
            if proto.close_received is not None:
                return proto.close_received
            if proto.failure is not None:
                return proto.failure.close_code, ""
        return CLOSE_ABNORMAL, ""

    # -- pings (blockws.keepalive) ---------------------------------------------------

    def _pinging_locked(self) -> bool:
        """Whether pings are due now: open, and ``send_pings`` on (lock held)."""
        return self._phase == _OPEN and self._send_pings

    # -- dispatching (the thread that calls update()) ------------------------------

    def update(self) -> int:
        """Run this socket's pending callbacks on the calling thread; returns how many.

        With nothing pending this costs about as much as testing an empty
        deque. An exception raised by a callback propagates; the events after
        it stay queued for the next call.
        """
        if not self._dispatcher.pending:
            return 0
        return self._dispatcher.run()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a callback is pending (True) or ``timeout`` passes (False).

        While it waits, the calling thread may read and parse the socket's
        incoming data itself instead of the reader thread (plain TCP; see
        :class:`~blockws.transport.TCPTransport`), which saves a thread
        hand-off per message; callbacks still run only in :meth:`update`.
        """
        if self._dispatcher.pending:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            self._wait_once(left)
            if self._dispatcher.pending:
                return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False

    def _wait_once(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for incoming data: read it here, or be woken when
        the reader thread has delivered it (or has let this thread read)."""
        transport = self._transport
        if (
            transport is None
            or not self._lend_reading
            or not transport.read_here(self, timeout, self._nudge)
        ):
            self._dispatcher.wait(timeout)

    def _dispatch_open(self, _: None) -> None:
        self._opened = True
        if self.on_open is not None:
            self.on_open(self)

    def _dispatch_closed(self, code_reason: tuple[int, str]) -> None:
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join()
        _dispatcher.register(self._dispatcher, False)
        self._ended = True
        if self.on_closed is not None:
            self.on_closed(self, code_reason[0], code_reason[1])

    # -- blocking helpers for scripts ---------------------------------------------

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Messages reach this queue only when no ``on_message``/``on_binary``
        handler takes them. Pumps this socket's callbacks on the calling
        thread while it waits. Raises ``TimeoutError`` after ``timeout``
        seconds (the socket stays open), and :class:`ConnectionClosed` once
        the socket has closed and every earlier message was received.
        """
        inbox = self._inbox
        if inbox:
            return inbox.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        waited = False
        while True:
            if inbox:
                return inbox.popleft()
            if self._dispatcher.pending:
                self.update()
                continue
            if self._ended:
                raise self._closed_exception()
            if self._phase == _NEW:
                raise InvalidState("receive() before open()")
            if waited and deadline is not None:
                left = deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no message within {timeout} s")
            self._wait_once(left)
            waited = True

    def _closed_exception(self) -> ConnectionClosed:
        code = self.close_code if self.close_code is not None else CLOSE_ABNORMAL
        if self.error is None:
            return ConnectionClosedOK(code, self.close_reason)
        return ConnectionClosedError(code, self.close_reason, self.error)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the socket has ended (``on_closed`` queued); True if it has."""
        return self._closed_event.wait(timeout)

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close, wait (up to ``close_timeout`` + 1 s) and run pending callbacks."""
        self.close()
        if self._phase == _NEW:
            return
        self.join((self.close_timeout or 5.0) + 1.0)
        self.update()


def connect(url: str, timeout: float | None = None, **options: Any) -> WebSocket:
    """Open a socket and wait until it is open; returns it, or raises why not.

    ``timeout`` bounds the wait (default: the socket's ``open_timeout``);
    ``options`` are :class:`WebSocket` keywords. On failure the socket is
    closed and its ``error`` (e.g. ``ConnectError``, ``InvalidStatus``,
    ``TLSError``, ``OpenTimeout``) is raised. Callbacks queued meanwhile
    (``on_open``) run on the calling thread before this returns.
    """
    if timeout is not None:
        options.setdefault("open_timeout", timeout)
    ws = WebSocket(url, **options)
    ws.open()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ws._opened:
        if ws.closed:
            raise ws.error or ws._closed_exception()
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            ws.abort()
            ws.join(1.0)
            ws.update()
            raise OpenTimeout(f"not open within {timeout} s")
        ws.wait(left if left is None else min(left, 0.5))
        ws.update()
    return ws


update_all = _dispatcher.update_all
wait = _dispatcher.wait_any
