"""The connection engine: one per socket, under the :class:`~blockws.WebSocket` facade.

The engine owns everything that happens between ``open()`` and ``on_closed``:
the lifecycle, the protocol and its mutex, the send path
(:class:`~blockws.sender.Sender`), the keepalive, the reader thread, the
timeouts and the failure policy. The facade keeps the seed API, the options
and the blocking helpers; it hears from the engine through its
:class:`Listener` callbacks, which the engine posts to the socket's
dispatcher, so they run inside ``update()``.

Lifecycle
---------
One phase, guarded by the socket lock, answers every "is it open / closed?"
question (``is_open``, ``closed``, ``repr``, ``join``)::

    NEW ──open()──▶ CONNECTING ──handshake done──▶ OPEN ──close(), failure──▶ CLOSING
     │                  │                            │                          │
     └──close()──┐      └──close(), timeout──▶ CLOSING                          │
                 ▼                                   ▼                          ▼
               CLOSED ◀───────── teardown (_finish): transport ended ◀──────────┘

``CLOSED`` is entered once, by the teardown, which also queues ``on_closed``:
from then on ``closed`` is True, ``join()`` returns True and ``repr`` says so.

Threads and locks
-----------------
=====================  ==============================================  ==========================
thread                 runs                                            may take
=====================  ==============================================  ==========================
caller of ``send*``    ``enqueue``, a direct non-blocking write         ``lock``
caller of ``close``    ``close``: queues the close frame                ``proto_lock`` then ``lock``
``blockws-<id>-reader`` connects, then ``data_received`` per read      ``proto_lock`` then ``lock``
caller of ``receive``  the same, while it holds the right to read      ``proto_lock`` then ``lock``
``blockws-<id>-writer`` the send queue (:mod:`blockws.sender`)           ``lock``, never across I/O
``blockws-timer``      timeouts and pings: set a flag, queue a frame,  ``lock``; never blocks,
                       or abort the transport                          never joins
``update()`` caller    the listener's callbacks, joins the threads     none while calling out
=====================  ==============================================  ==========================

* ``lock`` guards the phase, the send queue and ``buffered_amount``, the
  error and the timer jobs. It is never held across I/O or user code.
* ``proto_lock`` serializes the calls that change the protocol's close state
  (parsing, ``encode_close``). Parsing holds only it, so senders and the
  writer keep going during a large incoming message. Lock order: ``proto_lock``
  before ``lock``.
* Methods named ``*_locked`` expect ``lock`` held and assert it.
* Backpressure (``max_queued_bytes``): the delivery's lock, around the
  queued-bytes counters, is innermost. Past the limit the reader thread waits
  for ``update()``/``receive()`` to drain the queue to half, holding no other
  lock (:meth:`Connection._pause_reading`); ``close()``, ``abort()`` and a
  failed write end that wait. An HTTP/2 stream withholds its credit instead:
  the shared connection's reader never waits.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Sized
from typing import Any, Callable, Protocol, cast

from . import dispatcher as _dispatcher
from .deadline import Deadline
from .delivery import Delivery, Handlers
from .dispatcher import Dispatcher
from .exceptions import (
    BlockwsError,
    CloseTimeout,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    InvalidState,
    OpenTimeout,
    PingTimeout,
)
from .extensions import Extension
from .frames import CLOSE_ABNORMAL, Opcode, pack_close
from .handshake import Request
from .keepalive import Keepalive
from .log import ContextAdapter
from .opening import Opened, open_transport
from .options import Options, check_fragment_size
from .protocol import BinaryMessage, CloseReceived, Failure, Pong, Role, State
from .protocol import Protocol as WSProtocol
from .readtoken import ReadToken
from .sender import Sender
from .timer import Job, timer
from .transport import Connector, Transport

__all__ = [
    "Connection",
    "Listener",
    "Phase",
    "TRANSITIONS",
    "WRITER_JOIN",
    "open_over_network",
    "queue_limit",
]


class Phase(enum.IntEnum):
    NEW = 0
    CONNECTING = 1
    OPEN = 2
    CLOSING = 3
    CLOSED = 4


#: The lifecycle's only legal moves (see the module docstring).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.CONNECTING, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.OPEN, Phase.CLOSING, Phase.CLOSED}),
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

_NEW, _CONNECTING, _OPEN, _CLOSING, _CLOSED = (
    Phase.NEW,
    Phase.CONNECTING,
    Phase.OPEN,
    Phase.CLOSING,
    Phase.CLOSED,
)
#: Longest wait for the writer thread in the teardown and before ``on_closed``:
#: an aborted TCP transport unblocks its writer at once, but a writer may be
#: stuck in the write of a shared HTTP/2 connection whose peer stopped reading
#: (it ends with that connection), and the teardown must not wait for it.
WRITER_JOIN = 1.0
#: Longest time a failing close waits for update() to deliver the messages
#: that preceded the protocol error (see Connection.data_received).
FAILURE_GRACE = 0.5
# What a compact Protocol reports a message as (see Protocol.compact_messages).
_MESSAGES = (bytes, str, BinaryMessage)
_PING = int(Opcode.PING)
_Sizes = list[Sized]  # the messages of one read: str, bytes, BinaryMessage
_STATE_OPEN, _STATE_CLOSE_SENT, _STATE_CLOSED = State.OPEN, State.CLOSE_SENT, State.CLOSED


def queue_limit(options: Options) -> int | None:
    """Undelivered bytes at which a socket stops reading: ``max_queued_bytes``, but
    at least one whole message of ``max_message_size``; ``None`` for no limit."""
    limit = options.max_queued_bytes
    if limit is None:
        return None
    return max(limit, options.max_message_size or 0)


def open_over_network(
    request: Request,
    options: Options,
    connector: Connector,
    register: Callable[[Transport], None],
    new_request: Callable[[], Request],
    log: ContextAdapter,
) -> Opened:
    """How an engine opens: over HTTP/2 or HTTP/1.1 (:mod:`blockws.opening`).

    The engine looks this name up when it opens, so a test can put a memory
    transport in its place.
    """
    return open_transport(
        request,
        deadline=Deadline(options.open_timeout),
        connector=connector,
        ssl_context=options.ssl_context,
        server_hostname=options.server_hostname,
        extensions=options.extensions,
        http2=options.http2,
        register=register,
        new_request=new_request,
        log=log,
    )


class Listener(Protocol):
    """What the engine tells its facade.

    ``opened`` and ``closed`` are posted to the dispatcher and run inside
    ``update()``; ``first_request`` and ``fallback_request`` run on the
    connecting thread, so that the user's request hook sees every request.
    """

    def first_request(self) -> Request:
        """The request to open with, after the user's hook has seen it."""

    def fallback_request(self) -> Request:
        """A fresh request for the HTTP/1.1 fallback, after the user's hook."""

    def opened(self, _: None) -> None:
        """The socket is open (inside ``update()``)."""

    def closed(self, code_reason: tuple[int, str]) -> None:
        """The socket has ended (inside ``update()``), once."""


class Connection:
    """One socket's engine (see the module docstring)."""

    def __init__(
        self,
        options: Options,
        listener: Listener,
        handlers: Handlers,
        log: ContextAdapter,
        name: str,
    ) -> None:
        self.options = options
        self.listener = listener
        self.handlers = handlers
        self.log = log
        self.name = name
        #: Guards the phase, the send queue, the error and the jobs.
        self.lock = threading.Lock()
        #: Serializes calls that change the protocol's close state.
        self.proto_lock = threading.Lock()
        self._phase = _NEW
        self.error: BaseException | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol: str | None = None
        self.http_version: str | None = None
        self.extensions: list[Extension] | None = None  # accepted ones, once open
        self.last_received: float | None = None
        self.dispatcher = Dispatcher()
        self.delivery = Delivery(handlers, self.dispatcher, options.buffer_pool, log)
        self.delivery.on_drained = self._drained
        self.inbox: deque[str | bytes] = self.delivery.inbox
        self._deliver = self.delivery.messages
        self._post = self.dispatcher.post
        self._nudge = self.dispatcher.nudge
        self.sender = Sender(
            f"{name}-writer", self.lock, log, self._write_failed, self._close_written
        )
        self.keepalive = Keepalive(
            self, options.send_pings, options.ping_frequency, options.close_after_no_message
        )
        self._max_fragment_size = options.max_fragment_size
        self._proto: WSProtocol | None = None
        self._transport: Transport | None = None
        self._final_bytes = (0, 0)  # the transport's counters, kept when it is let go
        self._connector: Connector | None = None
        self._reader: threading.Thread | None = None
        self._closed_event = threading.Event()
        self._close_requested = False
        self._stream_finished = False  # Transport.finish_closing was called
        # The close frame of a protocol failure, held until the messages that
        # preceded the bad frame have been dispatched (see data_received).
        self._deferred_close: bytes | None = None
        #: The deferred close waits for receive() to come back for more.
        self.close_waits_for_inbox = False
        self._jobs: dict[str, Job] = {}
        self._lend_reading = False  # see _connect
        #: The transport's bounded read, when its reading may be lent.
        self._read_bounded: Callable[[float | None], bytes | None] | None = None
        self._held: deque[bytes] | None = None  # what a caller read and has not parsed
        self._token = ReadToken()

    # -- the lifecycle ---------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    def _set_phase_locked(self, phase: Phase) -> None:
        assert self.lock.locked()
        assert phase in TRANSITIONS[self._phase], f"{self._phase.name} -> {phase.name}"
        self._phase = phase

    def _closing_locked(self) -> None:
        """OPEN or CONNECTING becomes CLOSING; later phases stay."""
        if self._phase is _OPEN or self._phase is _CONNECTING:
            self._set_phase_locked(_CLOSING)

    @property
    def is_open(self) -> bool:
        return self._phase is _OPEN

    @property
    def closed(self) -> bool:
        return self._phase is _CLOSED

    @property
    def buffered(self) -> int:
        return self.sender.buffered

    @property
    def latency(self) -> float | None:
        return self.keepalive.latency

    @property
    def bytes_sent(self) -> int:
        transport = self._transport
        return transport.bytes_written if transport is not None else self._final_bytes[0]

    @property
    def bytes_received(self) -> int:
        transport = self._transport
        return transport.bytes_read if transport is not None else self._final_bytes[1]

    # -- settings --------------------------------------------------------------------------

    def configure(self, options: Options) -> None:
        """New options, before ``open()`` (the facade's setters and ``open()``).

        The keepalive settings and ``max_fragment_size`` are left alone: they
        have setters of their own, which apply at any time.
        """
        with self.lock:
            if self._phase is not _NEW:
                raise InvalidState("options cannot be changed after open()")
            self.options = options
            self.delivery.pool = options.buffer_pool

    @property
    def max_fragment_size(self) -> int:
        return self._max_fragment_size

    def set_max_fragment_size(self, value: int) -> None:
        """Payload bytes per outgoing frame; applies to messages written later."""
        value = check_fragment_size(value)
        with self.lock:
            self._max_fragment_size = value
            if self._proto is not None:
                self._proto.max_fragment_size = value

    def set_send_pings(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"send_pings must be a bool, not {type(enabled).__name__}")
        with self.lock:
            self.keepalive.enabled = enabled
            if self._phase is _OPEN:
                self.keepalive.set_enabled_locked(enabled)

    # -- opening (the reader thread) -----------------------------------------------------

    def open(self) -> None:
        """NEW to CONNECTING: start the reader thread, which connects.

        Raises :class:`InvalidState` unless the socket is new.
        """
        with self.lock:
            if self._phase is not _NEW:
                raise InvalidState("open() was already called")
            self._set_phase_locked(_CONNECTING)
            self._connector = Connector()
            self.delivery.limit = queue_limit(self.options)
            timeout = self.options.open_timeout
            if timeout is not None:
                self._jobs["open"] = timer.call_later(timeout, self._open_timed_out)
        _dispatcher.register(self.dispatcher, True)
        self._reader = threading.Thread(
            target=self._reader_main, name=f"{self.name}-reader", daemon=True
        )
        self._reader.start()

    def _open_timed_out(self) -> None:
        # Timer thread: record why, and abort (never blocks).
        with self.lock:
            if self._phase is not _CONNECTING:
                return
        self._set_error(OpenTimeout(f"opening took longer than {self.options.open_timeout} s"))
        self.abort()

    def _reader_main(self) -> None:
        try:
            transport = self._connect()
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            if not self._close_requested:
                self._set_error(exc)
            self.log.debug("opening failed: %r", exc)
            self._finish()
            return
        transport.run(self, self._token.before_read if self._lend_reading else None)

    def _connect(self) -> Transport:
        """Connect and handshake (RFC 8441 or RFC 6455 4.1); returns the transport once open."""
        options = self.options
        request = self.listener.first_request()
        assert self._connector is not None
        opened = open_over_network(
            request,
            options,
            self._connector,
            self._register_transport,
            self.listener.fallback_request,
            self.log,
        )
        transport = opened.transport
        self.subprotocol = opened.subprotocol
        self.http_version = transport.http_version
        self.extensions = accepted = opened.extensions
        # The reading is lent to a waiting caller (blockws.readtoken) when the
        # transport has bounded reads (plain TCP). With compression in force,
        # inflating on the reader thread overlaps with the caller's work and
        # the writer's compressing (zlib releases the GIL): 1 MiB JSON echoes
        # ran ~10% faster than when the waiting caller inflated them itself.
        # So such a socket keeps its reader.
        self._lend_reading = transport.can_read_bounded and not accepted
        proto = WSProtocol(
            Role.CLIENT,
            max_message_size=options.max_message_size,
            max_fragment_size=self._max_fragment_size,
            extensions=accepted,
            allocate=options.buffer_pool.allocate,
            release=options.buffer_pool.give_back,
        )
        proto.compact_messages = True  # messages as str/bytes: see blockws.delivery
        proto.inflate_budget = self.delivery.limit  # see data_received
        with self.lock:
            if self._phase is not _CONNECTING:
                raise ConnectionLost("connection aborted during the opening handshake")
            self._proto = proto
            proto.max_fragment_size = self._max_fragment_size  # a change made meanwhile
            self._set_phase_locked(_OPEN)
            if self._lend_reading:
                self._read_bounded = transport.read
                self._held = getattr(transport, "held", None)
            job = self._jobs.pop("open", None)
            if job is not None:
                job.cancel()
            self.sender.attach(proto, transport)
            self.keepalive.start_locked()
        self.log.debug("open (subprotocol %r)", self.subprotocol)
        self._post(self.listener.opened, None)
        if opened.extra:
            self.data_received(opened.extra)
        return transport

    def _register_transport(self, transport: Transport) -> None:
        with self.lock:
            self._transport = transport
            if self._phase is not _CONNECTING:
                transport.abort()

    # -- receiving (the reader thread, or a caller holding the right to read) ---------------

    def data_received(self, data: bytes) -> None:
        """Sink method: bytes from the transport.

        A compressed read is parsed in installments of at most the queue limit
        of inflated bytes (``Protocol.inflate_budget``), so that backpressure
        bounds what a read of a thousandfold-compressible flood inflates to.
        """
        self._receive(data)
        proto = self._proto
        while proto is not None and proto.more:
            self._receive(b"")

    def _receive(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        self.sender.direct_ok = True  # a reply: the next send may skip the writer
        proto = self._proto
        if proto is None:
            return  # closed meanwhile (a caller's read racing the teardown)
        # Without on_binary, messages end up as bytes for receive(): have the
        # parser build them so, without a pooled buffer and a second copy.
        proto.binary_as_bytes = self.handlers.on_binary is None
        deferred = False
        # Parsing (and inflating) holds only the protocol lock, not the send
        # lock, so send() and the writer (compressing) keep going meanwhile.
        with self.proto_lock:
            before = proto.state
            events = proto.receive_data(data)
            out = proto.data_to_send() if proto.has_data_to_send else None
            if out:
                with self.lock:
                    deferred = self._queue_replies_locked(out, events, before is _STATE_OPEN)
        # The messages of one read are dispatched as one batch: one wake-up of
        # a waiting thread and one dispatcher item, not one per message.
        mixed = False
        for event in events:
            cls = type(event)
            if cls is bytes or cls is str or cls is BinaryMessage:
                continue
            mixed = True  # rare: a control frame or a failure
            if isinstance(event, Pong):
                self.keepalive.pong_received(event.payload)
            elif isinstance(event, CloseReceived):
                self.log.debug("close received: %s %r", event.code, event.reason)
            elif isinstance(event, Failure):
                self._set_error(event.error, closing=not deferred)
                self.log.info("failing the connection: %s", event.error)
        messages = [e for e in events if type(e) in _MESSAGES] if mixed else events
        # Backpressure: counted before they are posted (see blockws.delivery).
        full = self.delivery.received(sum(map(len, cast(_Sizes, messages)))) if messages else False
        if deferred:
            items: list[_dispatcher.Item] = [(self._release_deferred_close, None)]
            if messages:
                items.insert(0, (self._deliver, messages))
            self.dispatcher.post_many(items)
        elif messages:
            self._post(self._deliver, messages)
        if before is _STATE_CLOSE_SENT and proto.state is _STATE_CLOSED:
            self._finish_stream()  # the server answered our close, which was written
        if full:
            self._pause_reading()

    def _pause_reading(self) -> None:
        """More than ``max_queued_bytes`` wait for ``update()``/``receive()``: stop
        reading until they drain to half (probe "no backpressure on receiving").

        Over HTTP/2 the stream withholds its credit (the shared connection's
        reader must go on for the other streams); over TCP the socket's reader
        thread waits here, and the kernel's buffers then push back on the
        server. A caller reading in the reader's place (``receive()``,
        ``wait()``) does not wait: it delivers next. Closing or aborting the
        socket ends the wait, so the closing handshake is read.
        """
        transport = self._transport
        if transport is not None and transport.pause_reading():
            return
        if threading.current_thread() is not self._reader:
            return
        with self.lock:
            if self._phase is not _OPEN:
                self.delivery.resume()
                return
        self.log.debug("%d bytes undelivered: reading paused", self.delivery.queued)
        self.delivery.wait_resumed()

    def _drained(self) -> None:
        """The paused socket's queue is down to half (the delivering thread)."""
        transport = self._transport
        if transport is not None:
            transport.resume_reading()

    def _queue_replies_locked(self, frames: list[bytes], events: list[Any], was_open: bool) -> bool:
        """Queue what the protocol produced while parsing: pongs, a close reply,
        or the close frame that fails the connection. Returns True when that
        failing close is held back (see below)."""
        assert self.lock.locked()
        proto = self._proto
        assert proto is not None
        sender = self.sender
        if proto.failure is not None and was_open:
            close = frames.pop()  # failing: the close frame comes last
            if self.dispatcher.pending or any(type(e) in _MESSAGES for e in events):
                # Messages that came before the bad frame are still
                # undelivered. Hold the failing close until the app has run
                # their callbacks, so what it sends in answer goes out first,
                # as with a single-threaded client; parsing has stopped, so
                # nothing after the bad frame is processed.
                self._deferred_close = close
                self._jobs["failure"] = timer.call_later(FAILURE_GRACE, self._send_deferred_close)
                if frames:
                    sender.control_locked(frames)
                return True
            if frames:
                sender.control_locked(frames)
            # Behind what the app queued before the failure, on every
            # transport (RFC 6455 7.1.7: fail once the messages before are out).
            self._queue_close_locked(close)
            return False
        if proto.state is State.CLOSED:
            # Replying to the server's close: queued data can no longer be sent
            # (RFC 6455 5.5.1), so drop it and close promptly.
            dropped = sender.drop_locked()
            if dropped:
                self.log.debug("dropped %d unsent message(s) at close", dropped)
            self._closing_locked()
            self._arm_close_timeout_locked()
        sender.control_locked(frames)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        """Sink method: the transport ended (``exc`` is ``None`` for EOF)."""
        proto = self._proto
        if exc is not None:
            # A reset after the peer's close frame ends a closed connection: not an error.
            if proto is None or proto.close_received is None:
                self._set_error(exc)
        elif proto is None or proto.state is not State.CLOSED:
            if proto is None or (proto.close_received is None and proto.failure is None):
                self._set_error(ConnectionLost("connection closed without a close frame"))
        self._finish()

    def wait_for_data(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for incoming data: read it on this thread while
        holding the read token, or else be woken when the reader thread has
        delivered it (or has granted this thread the token)."""
        read = self._read_bounded
        if read is None or not self._token.read_here(
            read, self, timeout, self._nudge, self._held
        ):
            self.dispatcher.wait(timeout)

    # -- sending (any thread) -------------------------------------------------------------

    def enqueue(self, opcode: int, payload: Any, segment: Any, size: int) -> None:
        """Queue a message (or write it now without blocking); see :mod:`blockws.sender`."""
        with self.lock:
            if self._phase is not _OPEN:
                raise self._state_error_locked()
            direct = self.sender.enqueue_locked(opcode, payload, segment, size)
        if direct:
            # Nothing queued or being written: write now, without blocking.
            self.sender.direct_write(opcode, payload, segment)

    def _state_error_locked(self) -> BlockwsError:
        phase = self._phase
        if phase is _NEW or phase is _CONNECTING:
            return InvalidState("the socket is not open yet (wait for on_open)")
        if phase is _CLOSED:
            return self.closed_exception()
        if self.error is None:
            return ConnectionClosedOK(None, "")
        return ConnectionClosedError(None, "", self.error)

    def closed_exception(self) -> ConnectionClosed:
        """What a blocking helper raises once the socket is closed."""
        code = self.close_code if self.close_code is not None else CLOSE_ABNORMAL
        if self.error is None:
            return ConnectionClosedOK(code, self.close_reason)
        return ConnectionClosedError(code, self.close_reason, self.error)

    def ping(self, payload: bytes) -> None:
        """Send a ping now; its pong, when it comes, updates the latency."""
        with self.lock:
            if self._phase is not _OPEN or self._proto is None:
                raise self._state_error_locked()
            frame = self._proto.encode_control(_PING, payload)  # checks the length
            self.keepalive.sent_locked(bytes(payload), time.monotonic())
            self.sender.control_locked([frame])

    # -- the keepalive's host (blockws.keepalive.Host) ---------------------------------------

    def pinging_locked(self) -> bool:
        # Not while reading is paused by backpressure: a pong would wait unread.
        assert self.lock.locked()
        return (
            self._phase is _OPEN
            and self._proto is not None
            and self._deferred_close is None
            and not self.delivery.paused
        )

    def send_ping_locked(self, payload: bytes) -> None:
        assert self.lock.locked() and self._proto is not None
        self.sender.control_locked([self._proto.encode_control(_PING, payload)])

    def last_frame_at(self) -> float | None:
        return self.last_received

    def ping_timed_out(self, error: PingTimeout) -> None:
        self._set_error(error)
        self.log.info("no message after a ping: closing")
        self.abort()

    # -- the writer (blockws.sender) -----------------------------------------------------

    def _write_failed(self, exc: BaseException) -> None:
        """A write failed: the socket ends (the reader sees the abort as EOF)."""
        proto = self._proto
        # Once the peer's close frame arrived, a failed write (e.g. of our close
        # reply to a peer that already hung up) is not what ended the socket.
        if proto is None or proto.close_received is None:
            self._set_error(exc)
        self.delivery.resume()
        self._token.cancel()
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _close_written(self) -> None:
        """The writer wrote a batch with a close frame in it."""
        proto = self._proto
        if proto is not None and proto.state is State.CLOSED:
            self._finish_stream()  # our reply to the server's close is out

    def _finish_stream(self) -> None:
        """Both close frames are through and ours is written: once, let the
        transport end a stream whose server will not (HTTP/2)."""
        with self.lock:
            if self._stream_finished:
                return
            self._stream_finished = True
            transport = self._transport
        if transport is not None:
            transport.finish_closing()

    # -- closing ----------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; see :meth:`blockws.WebSocket.close`."""
        pack_close(code, reason)  # validate before changing any state
        resumed = False
        with self.proto_lock, self.lock:
            phase = self._phase
            if phase is _NEW:
                self._set_phase_locked(_CLOSED)
                self._closed_event.set()
                return
            if phase is _CONNECTING:
                self._close_requested = True
                self._set_phase_locked(_CLOSING)
                connector, transport = self._connector, self._transport
            elif phase is _OPEN:
                assert self._proto is not None
                self._close_requested = True
                self._set_phase_locked(_CLOSING)
                resumed = self.delivery.resume()  # the server's close must be read
                if self._proto.state is State.OPEN:
                    self.sender.close_frame_locked(self._proto.encode_close(code, reason))
                self._queue_deferred_close_locked()
                self._arm_close_timeout_locked()
                connector = transport = None
            else:
                return
        if resumed:
            self._drained()  # over HTTP/2: the withheld credit, for the close reply
        if connector is not None:
            connector.abort()
        if transport is not None:
            transport.abort()

    def _arm_close_timeout_locked(self) -> None:
        assert self.lock.locked()
        timeout = self.options.close_timeout
        if "close" not in self._jobs and timeout is not None and self._phase is not _CLOSED:
            self._jobs["close"] = timer.call_later(timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        proto = self._proto
        if proto is None or proto.close_received is None:
            self._set_error(
                CloseTimeout(f"closing handshake took longer than {self.options.close_timeout} s")
            )
        self.log.debug("close timeout: dropping the connection")
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (1006).

        Never blocks: it shuts the transport down, and the reader thread,
        seeing the end, tears the socket down.
        """
        with self.lock:
            self._closing_locked()
            transport, connector = self._transport, self._connector
        if self.delivery.resume():
            self._drained()
        self._token.cancel()
        if connector is not None:
            connector.abort()
        if transport is not None:
            transport.abort()

    def _set_error(self, exc: BaseException, closing: bool = True) -> None:
        """Record the first error that ends the socket; later ones are effects of it."""
        with self.lock:
            if self.error is None and self._phase is not _CLOSED:
                self.error = exc
            if closing and self._phase is _OPEN:
                self._set_phase_locked(_CLOSING)

    def _release_deferred_close(self, _: None) -> None:
        # Runs in update() after the callbacks of the messages that preceded
        # the protocol error, so whatever they sent is queued before the close.
        if self.inbox:
            # They went to receive()'s queue instead: the app answers them after
            # receive() returns, so wait until it comes back for more.
            self.close_waits_for_inbox = True
            return
        self._send_deferred_close()

    def inbox_drained(self) -> None:
        """``receive()`` found its queue empty: the app has answered every message
        that preceded a protocol error, so the failing close may go out now."""
        if self.close_waits_for_inbox:
            self.close_waits_for_inbox = False
            self._send_deferred_close()

    def _send_deferred_close(self) -> None:
        with self.lock:
            self._queue_deferred_close_locked()

    def _queue_deferred_close_locked(self) -> None:
        assert self.lock.locked()
        frame = self._deferred_close
        if frame is None or self._phase is _CLOSED:
            return
        self._deferred_close = None
        job = self._jobs.pop("failure", None)
        if job is not None:
            job.cancel()
        self._queue_close_locked(frame)

    def _queue_close_locked(self, frame: bytes) -> None:
        """Queue a failing close frame behind the queued messages; start closing."""
        self._closing_locked()
        self.sender.close_frame_locked(frame)
        self._arm_close_timeout_locked()

    def _finish(self) -> None:
        """Tear down (once): stop the writer, end the transport, queue ``on_closed``.

        Runs on the thread that saw the end: the socket's reader thread, or
        the shared HTTP/2 connection's reader. Only the socket's own reader
        joins the writer here (an HTTP/2 writer may wait on the shared
        connection); otherwise :meth:`join_threads` does, from ``join()`` or
        before ``on_closed`` runs.
        """
        with self.lock:
            if self._phase is _CLOSED:
                return
            writer = self.sender.stop_locked()
            self.keepalive.stop_locked()
            self._deferred_close = None
            transport = self._transport
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self.close_code, self.close_reason = self._closing_code()
            self._set_phase_locked(_CLOSED)
        for job in jobs:
            job.cancel()
        self._token.cancel()
        if transport is not None:
            transport.abort()  # unblocks a writer stuck on a full socket
        me = threading.current_thread()
        if writer is not None and self._reader is me:
            writer.join(WRITER_JOIN)
        if transport is not None:
            transport.close()
        self._let_go()
        self.log.debug("closed: %s %r (error: %r)", self.close_code, self.close_reason, self.error)
        self._closed_event.set()
        self._post(self.listener.closed, (self.close_code, self.close_reason))

    def _let_go(self) -> None:
        """Release what a closed socket no longer needs -- the protocol (parser
        buffers, mask keys), the extensions' compressors, the transport (and its
        TLS buffers), the send buffers -- keeping only what its pending callbacks
        and properties read (probe "leaks": 500 closed sockets never pumped kept
        42 MiB). A closed socket then costs a few hundred bytes until its
        ``on_closed`` runs and it leaves the live set."""
        with self.lock:
            proto, transport = self._proto, self._transport
            if transport is not None:
                self._final_bytes = (transport.bytes_written, transport.bytes_read)
            self._proto = None
            self._transport = None
            self._connector = None
            self._read_bounded = None
            self._held = None
            self.sender.release_locked()
        self.delivery.release()
        if proto is not None:
            for ext in proto.extensions:
                ext.close()

    def _closing_code(self) -> tuple[int, str]:
        proto = self._proto
        if proto is not None:
            if proto.close_received is not None:
                return proto.close_received
            if proto.failure is not None:
                return proto.failure.close_code, ""
        return CLOSE_ABNORMAL, ""

    def join(self, timeout: float | None) -> bool:
        """Wait until the socket has ended and its threads are gone; True if so."""
        deadline = Deadline(timeout)
        if not self._closed_event.wait(timeout):
            return False
        return self.join_threads(deadline.left())

    def join_threads(self, timeout: float | None = None) -> bool:
        """Join the socket's reader and writer threads (not the calling one)."""
        deadline = Deadline(timeout)
        me = threading.current_thread()
        for thread in (self._reader, self.sender.thread):
            if thread is not None and thread is not me:
                thread.join(deadline.left())
                if thread.is_alive():
                    return False
        return True

    def on_closed_ran(self) -> None:
        """The socket's ``on_closed`` has been dispatched: leave the live set."""
        _dispatcher.register(self.dispatcher, False)

