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
                 ▲                                                              │
                 └─ close(), give up ── RECONNECTING ◀── (reconnect= policy) ───┘
                                             │
                                             └── backoff over ──▶ CONNECTING

``CLOSED`` is entered once, by the teardown, which also queues ``on_closed``:
from then on ``closed`` is True, ``join()`` returns True and ``repr`` says so.

With a reconnection policy (:mod:`blockws.reconnect`) the teardown of a
connection that should be retried enters ``RECONNECTING`` instead: it queues
``on_reconnecting`` and arms a job on the shared timer, which after the
backoff delay starts a new reader thread for the next attempt (a new
*link*: transport, protocol, send queue, read token). No thread of the
socket sleeps through the backoff, and ``close()`` ends it at once. Jobs of
the old link that were already running when it ended finish before that
job runs (one timer thread runs them in order), so none reaches the next link.

Threads and locks
-----------------
=====================  ==============================================  ==========================
thread                 runs                                            may take
=====================  ==============================================  ==========================
caller of ``send*``    ``queue.push``, a direct non-blocking write      ``lock``
caller of ``close``    ``close``: queues the close frame                ``proto_lock`` then ``lock``
``blockws-<id>-reader`` connects, then ``data_received`` per read      ``proto_lock`` then ``lock``
caller of ``receive``  the same, while it holds the right to read      ``proto_lock`` then ``lock``
``blockws-<id>-writer`` the send queue (:mod:`blockws.sender`)           ``lock``, never across I/O
``blockws-timer``      timeouts and pings: set a flag, queue a frame,  ``lock``; never blocks,
                       or abort the transport; start the reader of     never joins
                       a reconnection attempt
``update()`` caller    the listener's callbacks, joins the threads     none while calling out
=====================  ==============================================  ==========================

* ``lock`` guards the phase, the send queue and ``buffered_amount``, the
  error and the timer jobs. It is never held across I/O or user code.
* ``proto_lock`` serializes the calls that change the protocol's close state
  (parsing, ``encode_close``). Parsing holds only it, so senders and the
  writer keep going during a large incoming message. Lock order: ``proto_lock``
  before ``lock``.
* Methods named ``*_locked`` expect ``lock`` held and assert it.
* A ``wss://`` transport (:class:`~blockws.transport.TLSTransport`) has two
  locks of its own, taken by whoever reads or writes it with none of the
  above held: its send lock, then its TLS lock, under which no I/O happens.
* Backpressure (``max_queued_bytes``): the delivery's lock, around the
  queued-bytes counters, is innermost. Past the limit the reader thread waits
  for ``update()``/``receive()`` to drain the queue to half, holding no other
  lock (:meth:`Connection._pause_reading`); ``close()``, ``abort()`` and a
  failed write end that wait. An HTTP/2 stream withholds its credit instead:
  the shared connection's reader never waits.
* The reader threads' blocking reads (TCP, under TLS too, with the C speedup) wait for
  the GIL behind one process-wide gate once data has come
  (:mod:`blockws.transport`, ``gated_recv``): at most one reader waits for
  the GIL at a time. The gate is taken only without the GIL and let go just
  after the GIL is taken: gate before GIL, never the other way round.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from time import monotonic as _monotonic
from typing import Any, Callable, Protocol, cast

from . import dispatcher as _dispatcher
from . import trace as _trace
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
    InvalidStatus,
    OpenTimeout,
    PingTimeout,
)
from .extensions import Extension
from .frames import CLOSE_ABNORMAL, Opcode, pack_close, total_length
from .handshake import Request
from .http2 import H2Stream
from .keepalive import Keepalive
from .log import ContextAdapter
from .opening import Opened, default_context, open_transport
from .options import Options, check_fragment_size
from .protocol import BinaryMessage, CloseReceived, Failure, Pong, Role, State
from .protocol import Protocol as WSProtocol
from .readtoken import ReadToken
from .readtoken import read_here as _read_here
from .reconnect import Backoff
from .redirects import follow_redirects
from .sender import Sender
from .timer import Job, timer
from .transport import Connector, Transport
from .tunnel import tunnel_for

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
    RECONNECTING = 5  # a connection was lost; waiting out the backoff delay


#: The lifecycle's only legal moves (see the module docstring).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.CONNECTING, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.OPEN, Phase.CLOSING, Phase.CLOSED, Phase.RECONNECTING}),
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.CLOSED, Phase.RECONNECTING}),
    Phase.CLOSING: frozenset({Phase.CLOSED, Phase.RECONNECTING}),
    Phase.RECONNECTING: frozenset({Phase.CONNECTING, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

_NEW, _CONNECTING, _OPEN, _CLOSING, _CLOSED, _RECONNECTING = (
    Phase.NEW,
    Phase.CONNECTING,
    Phase.OPEN,
    Phase.CLOSING,
    Phase.CLOSED,
    Phase.RECONNECTING,
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
_STATE_OPEN, _STATE_CLOSE_SENT, _STATE_CLOSED = State.OPEN, State.CLOSE_SENT, State.CLOSED

#: :meth:`Connection.data_received` for a read of whole small messages, in C
#: (``blockws._speedups.receive_whole``: the reads of a request/response
#: exchange); it returns False, having changed nothing the Python code would
#: not set again, for anything else. ``BLOCKWS_PURE_PYTHON=1`` goes without.
_receive_whole: Callable[[Any, Any, Callable[[], float]], bool] | None
try:
    from ._speedups import receive_whole as _receive_whole
except ImportError:  # pragma: no cover - depends on the install
    _receive_whole = None
if os.environ.get("BLOCKWS_PURE_PYTHON"):
    _receive_whole = None

# Guards each socket's ended flag and its join() Event, made lazily (a leaf
# lock: nothing else is taken while it is held).
_ended_lock = threading.Lock()


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
    redirect_request: Callable[[str, bool], Request] | None = None,
) -> Opened:
    """How an engine opens: over HTTP/2 or HTTP/1.1 (:mod:`blockws.opening`),
    through the proxy each request calls for (:mod:`blockws.proxy`), following
    redirects (:mod:`blockws.redirects`); ``open_timeout`` bounds it all.

    The engine looks this name up when it opens, so a test can put a memory
    transport in its place.
    """
    deadline = Deadline(options.open_timeout)

    def open_hop(hop: Request) -> Opened:
        url = hop.parsed_url
        connector.tunnel = tunnel_for(
            options.proxy, url, options.proxy_ssl_context,
            default_context=default_context,  # ALPN is set per connection (blockws.tls)
        )
        if connector.tunnel is not None:
            log.debug("reaching %s:%s through proxy %s", url.host, url.port,
                      connector.tunnel.proxy.redacted)
        made: list[Transport] = []

        def register_hop(transport: Transport) -> None:
            made.append(transport)
            register(transport)

        try:
            return open_transport(
                hop,
                deadline=deadline,
                connector=connector,
                ssl_context=options.ssl_context,
                server_hostname=options.server_hostname,
                extensions=options.extensions,
                http2=options.http2,
                register=register_hop,
                new_request=new_request,
                log=log,
            )
        except InvalidStatus:
            # A redirect (or a refusal) ends this hop's connection; an HTTP/2
            # stream was already given back to its shared connection.
            for transport in made:
                if not isinstance(transport, H2Stream):
                    transport.abort()
                    transport.close()
            raise

    return follow_redirects(
        request,
        max_redirects=options.max_redirects,
        open_hop=open_hop,
        next_request=redirect_request,
        log=log,
    )


class Listener(Protocol):
    """What the engine tells its facade.

    ``opened``, ``reconnecting`` and ``closed`` are posted to the dispatcher
    and run inside ``update()``; the ``*_request`` methods run on the
    connecting thread, so that the user's request hook sees every request.
    """

    def first_request(self) -> Request:
        """The request to open with, after the user's hook has seen it."""

    def fallback_request(self) -> Request:
        """A fresh request for the HTTP/1.1 fallback, after the user's hook."""

    def redirect_request(self, url: str, keep_credentials: bool) -> Request:
        """A fresh request to ``url`` for a redirect, after the user's hook
        (``Authorization`` and ``Cookie`` left out unless ``keep_credentials``)."""

    def retry_request(self) -> Request:
        """A fresh request for a reconnection attempt, after the user's hook."""

    def opened(self, _: None) -> None:
        """The socket is open (inside ``update()``), after each successful attempt."""

    def reconnecting(self, announced: tuple[int, float, BaseException | None]) -> None:
        """``(attempt, delay, error)``: a reconnection attempt starts after
        ``delay`` seconds; ``error`` ended the connection or the attempt
        before (inside ``update()``)."""

    def closed(self, code_reason: tuple[int, str]) -> None:
        """The socket has ended (inside ``update()``), once."""


class Connection:
    """One socket's engine (see the module docstring)."""

    # One per socket: no instance dict (W7, idle sockets' memory).
    __slots__ = (
        "_backoff",
        "_close_requested",
        "_closed_event",
        "_connector",
        "_deferred_close",
        "_deliver",
        "_ended",
        "_error_is_old",
        "_final_bytes",
        "_held",
        "_inflate_limit",
        "_jobs",
        "_lend_reading",
        "_max_fragment_size",
        "_nudge",
        "_phase",
        "_post",
        "_proto",
        "_read_bounded",
        "_wait_sock",
        "_reader",
        "_retired",
        "_stream_finished",
        "_to_inbox",
        "_token",
        "_transport",
        "_was_open",
        "close_code",
        "close_reason",
        "close_waits_for_inbox",
        "delivery",
        "dispatcher",
        "error",
        "extensions",
        "handlers",
        "http_version",
        "keepalive",
        "last_received",
        "listener",
        "lock",
        "log",
        "name",
        "options",
        "proto_lock",
        "queue",
        "sender",
        "subprotocol",
    )

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
        self.dispatcher.source = self  # blockws.wait() reads through watch() and read_now()
        self.delivery = Delivery(handlers, self.dispatcher, options.buffer_pool, log)
        self.delivery.on_drained = self._drained
        self._deliver = self.delivery.messages
        self._post = self.dispatcher.post_held  # held items: see "Interrupts" in blockws.dispatcher
        self._nudge = self.dispatcher.nudge
        self.sender = self._new_sender()
        #: The current link's send queue: ``queue.push()`` is ``send()``'s one
        #: call (queue a message, or write it now on the caller's thread
        #: without blocking, or raise why the socket refuses it: see
        #: :meth:`blockws.sendqueue.PySendQueue.push`).
        self.queue = self.sender.queue
        self.keepalive = Keepalive(
            self, options.send_pings, options.ping_frequency, options.close_after_no_message
        )
        self._max_fragment_size = options.max_fragment_size
        self._proto: WSProtocol | None = None
        self._transport: Transport | None = None
        self._final_bytes = (0, 0)  # the transport's counters, kept when it is let go
        self._connector: Connector | None = None
        self._reader: threading.Thread | None = None
        # Set once the socket has ended; the Event is made only when join()
        # has to wait for it (an idle socket should not carry one).
        self._ended = False
        self._closed_event: threading.Event | None = None
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
        self._read_bounded: Callable[[float | None], bytes | int | None] | None = None
        # The socket a thread waiting on many polls while it holds this one's
        # reading (see watch()); set and cleared with _read_bounded.
        self._wait_sock: Any = None
        self._held: list[bytes | int] | None = None  # what a caller read and has not parsed
        self._inflate_limit: int | None = None  # max_queued_bytes, when inflating
        self._token = ReadToken()
        #: A thread in receive() holds the read token: the messages it parses go
        #: straight to the inbox when nothing is queued before them (see
        #: data_received).
        self._to_inbox = False
        # Reconnection (blockws.reconnect): the attempts of the current outage,
        # set by open() when the options ask for it; whether any connection
        # opened (only a socket that was open reconnects); whether self.error
        # belongs to an earlier attempt (shown until this one has its own).
        self._backoff: Backoff | None = None
        self._was_open = False
        self._error_is_old = False
        self._retired: tuple[threading.Thread, ...] = ()  # threads of earlier links

    # -- the lifecycle ---------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    def _set_phase_locked(self, phase: Phase) -> None:
        assert self.lock.locked()
        assert phase in TRANSITIONS[self._phase], f"{self._phase.name} -> {phase.name}"
        if _trace.enabled:
            _trace.phase(self.log.context, self._phase.name, phase.name)
        self._phase = phase
        self.queue.open = phase is _OPEN  # (what push() checks)

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
            policy = self.options.reconnect
            self._backoff = Backoff(policy) if policy is not None else None
            self.delivery.limit = queue_limit(self.options)
            reader = self._start_link_locked()
        _dispatcher.register(self.dispatcher, True)
        reader.start()

    def _new_sender(self) -> Sender:
        """The send queue of a link. Once a reconnection has replaced it, what
        its last write reports (a failure, a close written) is about a link
        that is gone, and must not reach the new one (see :meth:`_sender_failed`)."""
        return Sender(
            f"{self.name}-writer",
            self.lock,
            self.log,
            self._sender_failed,
            self._sender_closed,
            self._state_error_locked,
        )

    def _sender_failed(self, sender: Sender, exc: BaseException) -> None:
        if self.sender is sender:
            self._write_failed(exc)

    def _sender_closed(self, sender: Sender) -> None:
        if self.sender is sender:
            self._close_written()

    def _start_link_locked(self) -> threading.Thread:
        """Enter CONNECTING with a fresh link; returns its reader thread, to start.

        A link is what one connection attempt owns: the connector, then the
        transport, protocol, send queue and read token. ``open()`` starts the
        first; :meth:`_retry` each later one.
        """
        assert self.lock.locked()
        if self._phase is _RECONNECTING:
            # What the ended link owned starts afresh; its threads, if still
            # ending, are joined with the socket's (join_threads).
            self._retired = tuple(
                t
                for t in (*self._retired, self._reader, self.sender.thread)
                if t is not None and t.is_alive()
            )
            self.sender = self._new_sender()
            self.queue = self.sender.queue
            self._token = ReadToken()
            self._transport = self._proto = None
            self._held = None
            self.delivery.resume()  # a pause belonged to the ended link's reader
            self._stream_finished = False
            self.close_waits_for_inbox = False
            self._error_is_old = self.error is not None
        self._set_phase_locked(_CONNECTING)
        self._connector = Connector()
        timeout = self.options.open_timeout
        if timeout is not None:
            self._jobs["open"] = timer.call_later(timeout, self._open_timed_out)
        self._reader = threading.Thread(
            target=self._reader_main, name=f"{self.name}-reader", daemon=True
        )
        return self._reader

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
        retrying = self._was_open
        request = self.listener.retry_request() if retrying else self.listener.first_request()
        assert self._connector is not None
        opened = open_over_network(
            request,
            options,
            self._connector,
            self._register_transport,
            self.listener.fallback_request,
            self.log,
            self.listener.redirect_request,
        )
        transport = opened.transport
        if _trace.enabled:  # this socket's bytes go through the trace (blockws.trace)
            tracer = _trace.Tracer(self.log.context)
            transport = cast(Transport, _trace.TracingTransport(transport, tracer))
            tracer.incoming(opened.extra)
        self.subprotocol = opened.subprotocol
        self.http_version = transport.http_version
        self.extensions = accepted = opened.extensions
        # The reading is lent to a waiting caller (blockws.readtoken) when the
        # transport has bounded reads (TCP, and TLS over it), compressed or not:
        # a game loop waiting in ws.wait() then reads, decrypts and inflates in
        # its own idle time, and the reader thread stays out of its frames
        # (wss:// with deflate: the reader thread decrypting and inflating during
        # the frames stole 1.63 ms per frame at p99 from a 256 KiB snapshot
        # stream, python -m benchmarks.gameloop). The
        # price: inflating 1 MiB messages on the reader thread overlapped with
        # the caller's work, about 5% faster for large compressed echoes
        # (python -m benchmarks.deflate, large).
        self._lend_reading = transport.can_read_bounded
        proto = WSProtocol(
            Role.CLIENT,
            max_message_size=options.max_message_size,
            max_fragment_size=self._max_fragment_size,
            extensions=accepted,
            allocate=options.buffer_pool.allocate,
            release=options.buffer_pool.give_back,
        )
        proto.compact_messages = True  # messages as str/bytes: see blockws.delivery
        # Compressed reads are parsed in installments (see data_received).
        self._inflate_limit = self.delivery.limit if accepted else None
        with self.lock:
            if self._phase is not _CONNECTING:
                raise ConnectionLost("connection aborted during the opening handshake")
            self._proto = proto
            proto.max_fragment_size = self._max_fragment_size  # a change made meanwhile
            self._set_phase_locked(_OPEN)
            self._was_open = True
            # The transport owns the socket now; abort() ends it through the
            # transport. (The connector closed it under the reader thread, whose
            # read then failed, at times, with "Bad file descriptor".)
            self._connector = None
            if retrying:
                self._backoff_opened_locked()
            if transport is opened.transport and transport.can_read_into:
                # (Not under the trace, which must see the bytes.)
                transport.read_target = self.payload_target
            if self._lend_reading:
                self._read_bounded = transport.read
                self._held = getattr(transport, "held", None)
                # (None for TLS inside TLS: only the single-socket wait lends it.)
                self._wait_sock = getattr(transport, "sock", None)
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

    def payload_target(self, scatter: bool = False) -> memoryview | list[memoryview] | None:
        """The transport's :attr:`~blockws.transport.Transport.read_target`: where
        the reading thread may read the next bytes straight into the message
        they belong to (:meth:`Protocol.payload_target
        <blockws.protocol.Protocol.payload_target>`), or ``None``; the count
        it read there then comes to :meth:`data_received` as an ``int``. With
        ``scatter``, a list of places one read may fill in order."""
        proto = self._proto
        if proto is None:
            return None
        proto.binary_as_bytes = self.handlers.on_binary is None
        with self.proto_lock:
            return proto.payload_target(scatter)

    def data_received(self, data: bytes | int) -> None:
        """Sink method: bytes from the transport, or the count of bytes it read
        into the :meth:`payload_target` it was given.

        A compressed read is parsed in installments of at most the room left
        under the queue limit, in inflated bytes (``Protocol.inflate_budget``;
        at least one message each), so that backpressure
        bounds what a read of a thousandfold-compressible flood inflates to:
        the call for the read parses the first, and calls this again with
        ``b""`` for each next one (once per read, as the read's own call).
        """
        if _receive_whole is not None:
            if _receive_whole(self, data, _monotonic):
                return  # all of the below, for a read of whole small messages
        elif type(data) is bytes and self._receive_one(data):
            return  # the same in Python, for a read of one small message
        self.last_received = _monotonic()
        self.queue.direct_ok = True  # a reply: the next send may skip the writer
        proto = self._proto
        if proto is None:
            return  # closed meanwhile (a caller's read racing the teardown)
        # Without on_binary, messages end up as bytes for receive(): have the
        # parser build them so, without a pooled buffer and a second copy.
        proto.binary_as_bytes = self.handlers.on_binary is None
        limit = self._inflate_limit
        if limit is not None:
            # This installment inflates at most what the queue has room for
            # (at least one message): a full limit per read let a read that
            # followed a small one queue up to twice the limit.
            proto.inflate_budget = max(limit - self.delivery.queued, 1)
        deferred = False
        # Parsing (and inflating) holds only the protocol lock, not the send
        # lock, so send() and the writer (compressing) keep going meanwhile.
        with self.proto_lock:
            before = proto.state
            events = (
                proto.payload_received(data) if isinstance(data, int) else proto.receive_data(data)
            )
            out = proto.data_to_send() if proto.has_data_to_send else None
            if out:
                with self.lock:
                    deferred = self._queue_replies_locked(out, events, before is _STATE_OPEN)
        # The messages of one read are dispatched as one batch: one wake-up of
        # a waiting thread and one dispatcher item, not one per message.
        mixed = proto.other_events > 0  # rare: a control frame or a failure
        for event in events if mixed else ():
            cls = type(event)
            if cls is bytes or cls is str or cls is BinaryMessage:
                continue
            if isinstance(event, Pong):
                self.keepalive.pong_received(event.payload)
            elif isinstance(event, CloseReceived):
                self.log.debug("close received: %s %r", event.code, event.reason)
            elif isinstance(event, Failure):
                self._set_error(event.error, closing=not deferred)
                self.log.info("failing the connection: %s", event.error)
        messages: list[Any] = [e for e in events if type(e) in _MESSAGES] if mixed else events
        # Backpressure: counted before they are posted (see blockws.delivery).
        if messages:
            size = len(messages[0]) if len(messages) == 1 else total_length(messages)
            full = self.delivery.received(size)
        else:
            full = False
        if deferred:
            items: list[_dispatcher.Item] = [(self._release_deferred_close, None)]
            if messages:
                items.insert(0, (self._deliver, messages))
            self.dispatcher.post_many(items)
        elif messages:
            self._post_messages(messages)
        if before is _STATE_CLOSE_SENT and proto.state is _STATE_CLOSED:
            self._finish_stream()  # the server answered our close, which was written
        if full:
            self._pause_reading()
        if data and proto.more:  # the next installments of this read (see above)
            while (proto := self._proto) is not None and proto.more:
                self.data_received(b"")

    def _post_messages(self, messages: list[Any]) -> None:
        """Post the messages of a read (counted as received) for delivery."""
        dispatcher = self.dispatcher
        handlers = self.handlers
        if (
            self._to_inbox
            and not dispatcher.pending
            and dispatcher.running_in is None
            and handlers.on_message is None
            and handlers.on_binary is None
            and BinaryMessage not in map(type, messages)
        ):
            # A thread is in receive() (reading here, or asking for the token
            # while the reader thread parsed this): nothing is queued or
            # running before these messages, so they go where
            # Delivery.messages would put them, without a dispatcher round
            # (W1: a third of receive()'s own work). Counted as received
            # above, taken by receive(); a thread waiting in receive() is
            # woken (its wait watches the inbox: see wait_for_message).
            self.delivery.new_inbox().extend(messages)
            self._nudge()
        else:
            self._post(self._deliver, messages)

    def _receive_one(self, data: bytes) -> bool:
        """:meth:`data_received` for a read of exactly one small whole message
        (a request/response exchange's every read), without the C speedups
        (``receive_whole`` is their twin, for any run of whole small
        messages). False, having changed nothing, when the protocol does not
        take the read whole (:meth:`WSProtocol.receive_one
        <blockws.protocol.Protocol.receive_one>`) or the socket inflates."""
        proto = self._proto
        if len(data) > 127 or proto is None or self._inflate_limit is not None:
            return False  # (more than one small frame, at least)
        with self.proto_lock:
            message = proto.receive_one(data)
        if message is None:
            return False
        self.last_received = _monotonic()
        self.queue.direct_ok = True  # a reply: the next send may skip the writer
        proto.binary_as_bytes = self.handlers.on_binary is None
        full = self.delivery.received(len(message))
        self._post_messages([message])
        if full:
            self._pause_reading()
        return True

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
            # The error is recorded before its close frame can be written: a
            # send() that sees the socket closing then also sees why.
            self._set_error_locked(proto.failure, closing=False)
            close = frames.pop()  # failing: the close frame comes last
            if (
                self.dispatcher.pending
                or self.delivery.inbox
                or any(type(e) in _MESSAGES for e in events)
            ):
                # Messages that came before the bad frame are still
                # undelivered: queued, or in receive()'s inbox (where an
                # earlier read put them straight, while a thread was in
                # receive()). Hold the failing close until the app has run
                # their callbacks or taken them, so what it sends in answer
                # goes out first, as with a single-threaded client; parsing
                # has stopped, so nothing after the bad frame is processed.
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
        # The token first: a new link (reconnection) replaces the token before
        # it has a bounded read, so a stale read never pairs with a new token.
        token, read, held = self._token, self._read_bounded, self._held
        if (
            read is None
            # Paused for backpressure: the reader thread holds off, and so does this one.
            or self.delivery.paused
            or not _read_here(token, read, self, timeout, self._nudge, held)
        ):
            self.dispatcher.wait(timeout)

    def wait_for_message(self, timeout: float | None) -> None:
        """:meth:`wait_for_data` for ``receive()``: the messages this thread parses
        while it holds the read token skip the dispatcher, straight to the inbox,
        when this socket keeps its messages for ``receive()`` and nothing is
        queued or running before them (see :meth:`data_received`). So may those
        the reader thread parses while this thread asks for the token: the
        wait that follows watches the inbox as well as the dispatcher."""
        token, read, held = self._token, self._read_bounded, self._held
        if read is not None:
            self._to_inbox = True
            try:
                if _read_here(token, read, self, timeout, self._nudge, held):
                    return
            finally:
                self._to_inbox = False
        # Woken by a post, or by the inbox filling: the reader thread may have
        # parsed straight to it while this thread asked for the token.
        self.dispatcher.wait(timeout, self.delivery.new_inbox())

    def watch(self, wake: Callable[[], None], until: float) -> Any:
        """For a thread waiting on many sockets (:mod:`blockws.multiwait`): the
        socket to poll, if this thread may read this one now (its reading is
        lent, and stays lent until ``until`` even without a read: see
        :meth:`ReadToken.watch <blockws.readtoken.ReadToken.watch>`); else
        ``None``, the reading being asked for (``wake()`` when granted).
        ``None`` too where the reading is never lent (HTTP/2) or there is no
        one socket to poll (TLS inside a TLS tunnel), and while reading is
        paused for backpressure."""
        token, sock = self._token, self._wait_sock
        if sock is None or self._read_bounded is None or self.delivery.paused:
            # (Paused: more than max_queued_bytes wait for update()/receive().
            # The reader thread holds off then; reading here would not.)
            return None
        return sock if token.watch(wake, until) else None

    def read_now(self) -> bool:
        """One read without waiting, parsed on this thread if it may read (see
        :meth:`watch`); True if anything was read or was held, so that more may
        be buffered (a TLS transport decrypts a bounded number of records a
        read) where a poll of the socket does not see it. Interrupts as
        :meth:`wait_for_data`."""
        token, read, held = self._token, self._read_bounded, self._held
        if read is None:
            return False
        came = [bool(held)]

        def once(timeout: float | None) -> bytes | int | None:
            data = read(0)
            came[0] = came[0] or data is not None
            return data

        _read_here(token, once, self, 0, self._nudge, held)
        return came[0]

    # -- sending (any thread) -------------------------------------------------------------

    def _state_error_locked(self) -> BlockwsError:
        phase = self._phase
        if phase is _RECONNECTING or (phase is _CONNECTING and self._was_open):
            return InvalidState(
                "the socket is reconnecting: send() is refused until on_open "
                f"(attempt {self._backoff.attempt if self._backoff else 0}; last error: "
                f"{self.error!r})"
            )
        if phase is _NEW or phase is _CONNECTING:
            return InvalidState("the socket is not open yet (wait for on_open)")
        if phase is _OPEN:
            # A send() that took the ended link's queue just before a
            # reconnection replaced it (see _start_link_locked), and pushed
            # after the new one opened: it is not queued on either.
            return InvalidState(
                "the socket reconnected while send() ran: the message was not sent"
            )
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
                self._mark_ended()
                return
            if self._requested_locked():
                return  # it was waiting to reconnect: ended now
            if phase is _CONNECTING:
                self._set_phase_locked(_CLOSING)
                connector, transport = self._connector, self._transport
            elif phase is _OPEN:
                assert self._proto is not None
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

    def abort(self, requested: bool = False) -> None:
        """Drop the connection at once, without a closing handshake (1006).

        Never blocks: it shuts the transport down, and the reader thread,
        seeing the end, tears the socket down. ``requested``: the application
        asked (``WebSocket.abort``), so, as after ``close()``, no reconnection
        follows.
        """
        with self.lock:
            if self._phase is _NEW:
                # Never opened: closed at once, without on_closed (as close() does).
                self._set_phase_locked(_CLOSED)
                self._mark_ended()
                return
            if requested and self._requested_locked():
                return
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
        """Record the first error that ends the socket (or this reconnection
        attempt); later ones are effects of it."""
        with self.lock:
            self._set_error_locked(exc, closing)

    def _set_error_locked(self, exc: BaseException, closing: bool) -> None:
        assert self.lock.locked()
        phase = self._phase
        if (self.error is None or self._error_is_old) and phase is not _CLOSED:
            if phase is not _RECONNECTING:  # a late effect of the link that ended
                self.error = exc
                self._error_is_old = False
        if closing and phase is _OPEN:
            self._set_phase_locked(_CLOSING)

    def _release_deferred_close(self, _: None) -> None:
        # Runs in update() after the callbacks of the messages that preceded
        # the protocol error, so whatever they sent is queued before the close.
        if self.delivery.inbox:
            # They went to receive()'s queue instead: the app answers them after
            # receive() returns, so wait until it comes back for more.
            self.close_waits_for_inbox = True
            return
        try:
            self._send_deferred_close()
        except BaseException:
            # An interrupt (Ctrl-C) cut it short, leaving the failing close
            # perhaps unqueued: drop the connection now rather than leave it
            # hanging (1006; ws.error keeps the protocol error). This item is
            # held (see blockws.dispatcher): update() runs it again, and then
            # it finds the socket closing.
            self.abort()
            raise

    def inbox_drained(self) -> None:
        """``receive()`` found its queue empty: the app has answered every message
        that preceded a protocol error, so the failing close may go out now
        (once: a second call finds no deferred close)."""
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
        # Armed with the deferred close (see _queue_replies_locked); both go together.
        self._jobs.pop("failure").cancel()
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
            if self._phase is _CLOSED or self._phase is _RECONNECTING:
                return
            writer = self.sender.stop_locked()
            self.keepalive.stop_locked()
            self._deferred_close = None
            transport = self._transport
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self.close_code, self.close_reason = self._closing_code()
            delay = self._retry_delay_locked()
            self._set_phase_locked(_CLOSED if delay is None else _RECONNECTING)
            self._read_bounded = None
            self._wait_sock = None
        for job in jobs:
            job.cancel()
        self._token.cancel()
        if transport is not None:
            transport.abort()  # unblocks a writer stuck on a full socket
        me = threading.current_thread()
        if writer is not None and self._reader is me and writer.is_alive():
            writer.join(WRITER_JOIN)  # not one whose start() an interrupt cut short
        if transport is not None:
            # (Not under a caller's direct write: see Sender.close_transport. A
            # caller reading in the reader's place is out of its read by now:
            # the read token's cancel() waits for that.)
            self.sender.close_transport(transport)
        self._let_go()  # what the ended link owned, before a backoff as after a close
        if delay is not None:
            self._await_retry(delay)
            return
        self.log.debug("closed: %s %r (error: %r)", self.close_code, self.close_reason, self.error)
        self._mark_ended()
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
                if transport.read_target is not None:
                    transport.read_target = None  # a reference back to this socket
            self._proto = None
            self._transport = None
            self._connector = None
            self._read_bounded = None
            self._wait_sock = None
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

    # -- reconnecting (blockws.reconnect) ------------------------------------------------

    def _retry_delay_locked(self) -> float | None:
        """The teardown asks: the backoff delay before the next attempt, or
        ``None`` when the socket ends here (see :meth:`Reconnect.retries_after`)."""
        assert self.lock.locked()
        backoff = self._backoff
        if backoff is None or self._close_requested or not self._was_open:
            return None  # only a socket that was open reconnects, never after close()
        proto = self._proto
        server_code = None
        if proto is not None and proto.close_received is not None:
            server_code = proto.close_received[0]
        if not backoff.policy.retries_after(server_code):
            return None
        delay = backoff.next_delay()
        if delay is None:
            self.log.info("giving up after %d reconnection attempt(s)", backoff.attempt)
        return delay

    def _await_retry(self, delay: float) -> None:
        """RECONNECTING: announce the attempt and arm it on the shared timer."""
        with self.lock:
            if self._phase is not _RECONNECTING:
                return  # close() came first; it queued on_closed
            assert self._backoff is not None
            attempt, error = self._backoff.attempt, self.error
            self._jobs["retry"] = timer.call_later(delay, self._retry)
        self.log.info(
            "connection lost (%s %r, error: %r): reconnection attempt %d in %.3g s",
            self.close_code, self.close_reason, error, attempt, delay,
        )
        self._post(self.listener.reconnecting, (attempt, delay, error))

    def _retry(self) -> None:
        # Timer thread: the backoff is over. Starting a thread is all it does.
        with self.lock:
            if self._phase is not _RECONNECTING:
                return
            self._jobs.pop("retry", None)
            reader = self._start_link_locked()
        reader.start()

    def _backoff_opened_locked(self) -> None:
        """A reconnection attempt opened: the earlier attempts' error goes, the
        count starts again, and the keepalive serves the new link."""
        assert self.lock.locked() and self._backoff is not None
        self._backoff.opened()
        if self._error_is_old:
            self.error = None
            self._error_is_old = False
        self.keepalive.resume_locked()

    def _requested_locked(self) -> bool:
        """The application closes or aborts: no reconnection follows, whatever
        the phase. Returns True if that ended a backoff (see below)."""
        assert self.lock.locked()
        if self._phase is _CLOSED:
            return False
        self._close_requested = True
        if self._error_is_old:
            self.error = None  # its close ends the socket, not an earlier attempt's error
        if self._phase is _RECONNECTING:
            self._end_backoff_locked()
            return True
        return False

    def _end_backoff_locked(self) -> None:
        """``close()`` while RECONNECTING: the socket ends now, without an
        error (the application ended it), and ``on_closed`` is queued."""
        assert self.lock.locked()
        self._set_phase_locked(_CLOSED)
        job = self._jobs.pop("retry", None)
        if job is not None:
            job.cancel()
        self.error = None
        self.close_code, self.close_reason = CLOSE_ABNORMAL, ""
        self.log.debug("closed while waiting to reconnect")
        self._mark_ended()
        self._post(self.listener.closed, (self.close_code, self.close_reason))

    def join(self, timeout: float | None) -> bool:
        """Wait until the socket has ended and its threads are gone; True if so."""
        deadline = Deadline(timeout)
        with _ended_lock:
            event = None
            if not self._ended:
                event = self._closed_event
                if event is None:
                    event = self._closed_event = threading.Event()
        if event is not None and not event.wait(timeout):
            return False
        return self.join_threads(deadline.left())

    def _mark_ended(self) -> None:
        """The socket has ended: wake the threads in :meth:`join` (any thread,
        with or without ``self.lock``: ``_ended_lock`` is taken inside it only)."""
        with _ended_lock:
            self._ended = True
            event = self._closed_event
        if event is not None:
            event.set()

    def join_threads(self, timeout: float | None = None) -> bool:
        """Join the socket's reader and writer threads (not the calling one)."""
        deadline = Deadline(timeout)
        me = threading.current_thread()
        for thread in (*self._retired, self._reader, self.sender.thread):
            if thread is not None and thread is not me and thread.is_alive():
                thread.join(deadline.left())
                if thread.is_alive():
                    return False
        return True

    def on_closed_ran(self) -> None:
        """The socket's ``on_closed`` has been dispatched: leave the live set."""
        _dispatcher.register(self.dispatcher, False)

