"""The :class:`WebSocket`: the seed API, its options and the blocking helpers.

Data flow, from the network to your callback::

    socket ─▶ reader thread: Transport.run ─▶ Connection.data_received
          ─▶ Protocol.receive_data ─▶ Dispatcher.post ─▶ ws.update() on your thread
          ─▶ on_message(ws, text)

and back::

    ws.send() on any thread ─▶ send queue (lock-guarded; buffered_amount)
          ─▶ writer thread: Protocol.encode_data ─▶ Transport.write ─▶ socket

This class is a facade: everything between ``open()`` and ``on_closed`` --
the lifecycle, the threads, the protocol, the send path, keepalive and the
failure policy -- lives in its engine, :class:`~blockws.connection.Connection`,
whose module docstring has the table of threads and locks. The engine tells
this class what happened through a listener whose calls run inside
:meth:`WebSocket.update`.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections import deque
from collections.abc import Iterator, MutableMapping, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Generic, NoReturn, TypeVar, Union, overload

from . import dispatcher as _dispatcher
from . import multiwait as _multiwait
from .buffers import BufferPool, BufferSegment
from .connection import WRITER_JOIN, Connection, Phase
from .deadline import Deadline
from .dispatcher import Budget, check_not_in_callback
from .exceptions import ConnectionClosedOK, InvalidState, OpenTimeout
from .extensions import Extension
from .frames import Opcode
from .handshake import DEFAULT_USER_AGENT, Headers, HeadersLike, Request, redact_url
from .http2 import HTTP2Settings
from .log import ContextAdapter
from .options import DEFAULT_MAX_QUEUED_BYTES, ConnectOptions, Options
from .protocol import DEFAULT_MAX_FRAGMENT_SIZE, DEFAULT_MAX_MESSAGE_SIZE
from .proxy import Proxy
from .reconnect import Reconnect
from .redirects import DEFAULT_MAX_REDIRECTS, strip_credentials
from .sender import UNCOMPRESSED as _UNCOMPRESSED

if TYPE_CHECKING:  # pragma: no cover - typing only: Unpack is in typing from 3.11
    import ssl

    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

__all__ = ["WebSocket", "connect", "update_all", "wait", "set_on_pending"]

BytesLike = Union[bytes, bytearray, memoryview]
OnOpen = Callable[["WebSocket"], Any]
OnMessage = Callable[["WebSocket", str], Any]
OnBinary = Callable[["WebSocket", BufferSegment], Any]
OnClosed = Callable[["WebSocket", int, str], Any]
OnRequest = Callable[["WebSocket", Request], Any]
OnPending = Callable[["WebSocket"], Any]
OnReconnecting = Callable[["WebSocket", int, float], Any]

# Plain ints: an enum member look-up costs ten times a global's, and these
# are on the path of every message.
_TEXT, _BINARY = int(Opcode.TEXT), int(Opcode.BINARY)

_ids = itertools.count(1)
T = TypeVar("T")


class _Setting(Generic[T]):
    """An option that may be changed until ``open()``; after it, setting one
    raises :class:`InvalidState`."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, ws: None, owner: type) -> _Setting[T]: ...
    @overload
    def __get__(self, ws: WebSocket, owner: type) -> T: ...
    def __get__(self, ws: WebSocket | None, owner: type) -> T | _Setting[T]:
        if ws is None:
            return self
        value: T = getattr(ws._options, self.name)
        return value

    def __set__(self, ws: WebSocket, value: T) -> None:
        ws._set_option(self.name, value)


def _copy_request(request: Request) -> Request:
    """A request with the same fields, its mutable ones (headers, subprotocols) copied."""
    return dataclasses.replace(
        request, headers=Headers(request.headers), subprotocols=list(request.subprotocols)
    )


class _Events:
    """The engine's listener (see :class:`blockws.connection.Listener`)."""

    __slots__ = ("ws", "keep_credentials")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        #: False once a redirect left the first request's origin: the
        #: requests that follow carry no Authorization or Cookie from the options.
        self.keep_credentials = True

    def first_request(self) -> Request:
        self.keep_credentials = True
        return self._hooked(self.ws.internal_request)

    def _hooked(self, request: Request) -> Request:
        ws = self.ws
        hook = ws.on_internal_request_created
        if hook is not None:
            # On the connecting thread, as the API specifies, so that every
            # request the socket sends -- a fallback or a redirect one too --
            # gets the user's customizations in one place.
            hook(ws, request)
        return request

    def fallback_request(self) -> Request:
        ws = self.ws
        ws.internal_request = ws._new_request(ws.internal_request.url, self.keep_credentials)
        return self._hooked(ws.internal_request)

    def redirect_request(self, url: str, keep_credentials: bool) -> Request:
        ws = self.ws
        self.keep_credentials = keep_credentials
        ws.internal_request = ws._new_request(url, keep_credentials)
        ws.context["url"] = redact_url(url)
        return self._hooked(ws.internal_request)

    def retry_request(self) -> Request:
        # A copy of the request as it stood at open(), before the hook ran,
        # so that the hook (a token refresh) starts from the same place each time.
        ws = self.ws
        assert ws._request_at_open is not None
        ws.internal_request = _copy_request(ws._request_at_open)
        ws.context["url"] = redact_url(ws.internal_request.url)  # redirects start again
        return self.first_request()

    # The three events below are the dispatcher's held items (post_held): each
    # commits, by clearing ``held``, as the last thing before it enters the
    # user's callback, with no eval-breaker point in between; an interrupt
    # before that leaves the event queued, and what comes before it is safe to
    # do twice (see "Interrupts" in blockws.dispatcher).

    def opened(self, _: None) -> None:
        ws = self.ws
        ws._open_dispatched = True
        on_open = ws.on_open
        if on_open is not None:
            ws._dispatcher.held = None
            on_open(ws)

    def reconnecting(self, announced: tuple[int, float, BaseException | None]) -> None:
        ws = self.ws
        on_reconnecting = ws.on_reconnecting
        if on_reconnecting is not None:
            attempt, delay, error = announced
            # ws.error in the callback is the error this attempt follows, even
            # when update() runs late and a later attempt has failed meanwhile.
            ws._announced_error = (error,)
            try:
                ws._dispatcher.held = None
                on_reconnecting(ws, attempt, delay)
            finally:
                ws._announced_error = None

    def closed(self, code_reason: tuple[int, str]) -> None:
        ws = self.ws
        engine = ws._engine
        # Once on_closed runs, none of the socket's threads remain. The reader
        # always ends; a writer still stuck in a shared HTTP/2 connection's
        # write is waited for only so long (it ends with that connection).
        if not engine.join_threads(WRITER_JOIN):
            ws.log.warning("a thread of the socket is still running after %s s", WRITER_JOIN)
        on_closed = ws.on_closed
        try:
            if on_closed is not None:
                ws._dispatcher.held = None
                on_closed(ws, code_reason[0], code_reason[1])
        finally:
            # The socket leaves the live set (update_all(), live_count()) once
            # its on_closed has run: an interrupt before the commit leaves it
            # live, with on_closed queued for update_all() to run.
            try:
                engine.on_closed_ran()
            except BaseException:
                engine.on_closed_ran()  # an interrupt in it: once more (idempotent)
                raise


class WebSocket:
    """A WebSocket client with background I/O and callbacks pumped by ``update()``.

    ``open()`` returns at once; a reader thread connects, and callbacks run
    when you call :meth:`update` (once per frame in a game), in the order the
    events happened. ``send*`` and ``close`` may be called from any thread and
    never block on the network.

    Options, keyword-only, by concern (checked here, before any I/O: a wrong
    type raises ``TypeError`` and a value out of range ``ValueError``, naming
    the option):

    * WebSocket: ``subprotocols``, ``extensions`` (default
      ``[PerMessageDeflate()]``; ``[]`` turns compression off), ``max_fragment_size``,
      ``max_message_size`` (default 16 MiB; a larger incoming message fails
      the connection with 1009).
    * Limits: ``max_queued_bytes`` (default 16 MiB, and at least
      ``max_message_size``; ``None``: no limit): once this many received bytes
      wait undelivered (``queued_amount``: no ``update()`` or ``receive()``
      came for them), the socket stops reading -- over TCP the kernel's
      buffers then push back on the server, over HTTP/2 the stream's
      WINDOW_UPDATE is withheld while other streams flow -- and reads again
      once they drain to half. Nothing is dropped, and order is kept. Pings
      from this side pause meanwhile, so a paused socket is not closed as
      silent.
    * HTTP: ``headers`` (a mapping or (name, value) pairs, added to the
      upgrade request), ``origin``, ``user_agent`` (default
      ``blockws/<version> Python/<x.y>``; ``None`` sends no ``User-Agent``;
      a ``User-Agent`` in ``headers`` wins; like ``origin`` it is copied into
      ``internal_request``, where ``internal_request.user_agent`` may be
      edited until ``open()``), ``max_redirects`` (default 10; 0 follows
      none): 301, 302, 303, 307 and 308 answers are followed with a new
      request (the hook below sees it), ``wss`` never down to ``ws``, and
      ``Authorization``, ``Cookie`` and URL credentials only within the
      origin; a loop or one hop too many raises
      :class:`~blockws.exceptions.InvalidStatus` naming the chain
      (:mod:`blockws.redirects`).
    * Proxies: ``proxy`` -- ``True`` (default) takes it from the
      environment when the socket opens (``wss_proxy``/``ws_proxy``, then
      ``https_proxy``/``http_proxy``, then ``all_proxy``, either case,
      honouring ``no_proxy``); a URL ``http://[user:pass@]host:port``,
      ``https://...``, ``socks5://``, ``socks5h://``, ``socks4://`` (SOCKS
      needs ``pip install 'blockws[socks]'``); ``None`` for none.
      ``proxy_ssl_context`` verifies an ``https://`` proxy (default:
      blockws's default context). A proxy's refusal raises
      :class:`~blockws.exceptions.ProxyError` (``on_closed`` gets 1006);
      credentials never show in logs, messages or ``repr``
      (:mod:`blockws.proxy`).
    * TLS: ``ssl_context`` (an ``ssl.SSLContext``; default: see "Networks"
      below), ``server_hostname`` (SNI and certificate name, default the
      URL's host).
    * HTTP/2: ``http2`` (an :class:`~blockws.HTTP2Settings`; ``True`` for the
      default, ``False`` for HTTP/1.1 only).
    * Timeouts (seconds): ``open_timeout`` (connect + handshake, default 10),
      ``close_timeout`` (closing handshake, default 5), ``send_pings``,
      ``ping_frequency`` (default 10, at least 0.1), ``close_after_no_message``
      (default 2).
    * Callbacks, plain attributes you may also set later: ``on_open(ws)``,
      ``on_message(ws, text)``, ``on_binary(ws, segment)``, ``on_closed(ws,
      code, reason)`` (run inside ``update()``; a socket with either
      ``on_message`` or ``on_binary`` delivers through callbacks only, and
      drops a message whose handler is missing, with one WARNING; one with
      neither keeps every message for :meth:`receive`), and
      ``on_internal_request_created(ws, request)``, which runs on the
      connecting thread just before each handshake request is sent; an
      exception there ends the socket (``on_closed`` with 1006, the exception
      in ``ws.error``).
    * Waking a loop that sleeps: ``on_pending(ws)`` runs on a background
      thread when the socket's pending callbacks go from none to some (see
      :attr:`on_pending`); :func:`blockws.set_on_pending` sets one for every
      socket without its own.
    * Memory and logging: ``buffer_pool`` (default ``BufferPool.default``),
      ``context`` (extra fields for the logging context).
    * Reconnection: ``reconnect`` (``False``, the default; ``True``; or a
      :class:`~blockws.Reconnect` policy) and ``on_reconnecting(ws, attempt,
      delay)``; see "Reconnection" below.

    The keepalive settings and ``max_fragment_size`` may be changed at any
    time; the other options until ``open()``, after which setting one raises
    :class:`~blockws.exceptions.InvalidState`.

    Networks -- trust. Without ``ssl_context``, ``wss://`` verifies the
    server's certificate and name against certifi's bundle, the operating
    system's store, and ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (so
    ``SSL_CERT_FILE=ca.pem python app.py`` reaches a server with a private
    CA); ``SSLKEYLOGFILE`` names a file TLS secrets are written to, for
    Wireshark. That context is built once per process, by the first
    ``wss://`` socket's connecting thread (60-80 ms of CPU; see
    :mod:`blockws.tls`). :func:`blockws.create_default_context` returns a
    new context with that trust, to add to (a client certificate for mutual
    TLS: ``ctx.load_cert_chain(...)``). A context you pass is used for trust
    and client certificates as you set it up, except ALPN: blockws sets its ALPN list on each
    connection attempt (``h2, http/1.1`` for HTTP/2, ``http/1.1`` for
    HTTP/1.1 and the fallback), under a lock that keeps blockws's own
    concurrent connects apart, so HTTP/2 and the fallback work with your
    context as with the default. The context keeps the last list set; do not
    use it for other connections at the same moment if their ALPN matters. A
    TLS failure (:class:`~blockws.exceptions.TLSError`) names the host and
    port and what to do: the issuer that is not trusted, the date the
    certificate expired, or the names it holds.

    Networks -- HTTP/2. Over ``wss://`` HTTP/2 is tried first (RFC 8441). A
    server that refuses it (no h2 by ALPN, SETTINGS without
    ``SETTINGS_ENABLE_CONNECT_PROTOCOL``, the extended CONNECT refused) is
    remembered per origin for 5 minutes, and sockets with fallback on go
    straight to HTTP/1.1 meanwhile (logged; on Python 3.11+ also a note on
    ``ws.error`` if HTTP/1.1 then fails). Timeouts, resets and GOAWAYs are
    never remembered. With ``HTTP2Settings(fallback=False)`` HTTP/2 is always
    tried.

    Networks -- errors. A connection that cannot be made raises
    :class:`~blockws.exceptions.ConnectError`, an ``OSError`` with the
    ``errno`` kept and the host and port in its message; a refused one is a
    :class:`~blockws.exceptions.ConnectionRefused`, also a
    ``ConnectionRefusedError``.

    Failures are reported in order. When the server breaks the protocol,
    parsing stops at the bad frame, but the messages that arrived before it
    are still delivered, and what your callbacks send in answer to them goes
    out before the failing close frame, over every transport (as with a
    single-threaded client; if ``update()`` is not called within 0.5 s the
    close goes out anyway). Until that point ``is_open`` stays True.

    Iterating over a socket (``for message in ws``) receives messages until
    it closes; see :meth:`__iter__`.

    Reconnection. With ``reconnect`` on, a socket whose connection had opened
    and then ends by anything other than your own :meth:`close` -- a network
    failure, a timeout, a protocol error, a close frame from the server
    (except a clean one: 1000, 1001 or no code, unless the policy's
    ``on_clean_close`` is True) -- opens a new connection after a backoff
    delay, again after each failed attempt, until one opens or the policy's
    ``max_attempts`` run out. A first ``open()`` that fails is not retried.
    Meanwhile:

    * ``on_reconnecting(ws, attempt, delay)`` runs in ``update()`` before each
      attempt (``attempt`` counts from 1 in each outage; ``delay`` is the wait
      in seconds); ``ws.error`` there is what ended the connection or the
      previous attempt (``None`` after a close frame from the server), and
      ``ws.close_code``/``ws.close_reason`` how the latest one ended;
    * each attempt sends a new handshake request, a copy of
      ``internal_request`` as it was at ``open()``, and
      ``on_internal_request_created`` runs for it (refresh a token there);
    * ``on_open`` runs again on each success; ``on_closed`` runs once only,
      when the socket gives up or you close it (during the backoff,
      :meth:`close` ends it at once: ``on_closed`` with 1006, ``error`` None);
    * ``is_open`` is False, and ``send*`` raise :class:`InvalidState` (see
      :meth:`send` for why nothing is queued); :meth:`receive` and iteration
      keep waiting, and the messages received before the loss stay queued.

    The backoff runs on the shared timer thread: no thread of the socket
    waits through it.

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
        # limits
        max_queued_bytes: int | None = DEFAULT_MAX_QUEUED_BYTES,
        # HTTP
        headers: HeadersLike | None = None,
        origin: str | None = None,
        user_agent: str | None = DEFAULT_USER_AGENT,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        # proxies
        proxy: str | Proxy | bool | None = True,
        proxy_ssl_context: ssl.SSLContext | None = None,
        # TLS
        ssl_context: ssl.SSLContext | None = None,
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
        on_pending: OnPending | None = None,
        # memory and logging
        buffer_pool: BufferPool | None = None,
        context: MutableMapping[str, Any] | None = None,
        # HTTP/2
        http2: HTTP2Settings | bool | None = None,
        # reconnection
        reconnect: Reconnect | bool | None = False,
        on_reconnecting: OnReconnecting | None = None,
    ) -> None:
        _ = Request(url).parsed_url  # InvalidURL before anything else
        self._options = Options.build(
            subprotocols=subprotocols,
            extensions=extensions,
            max_fragment_size=max_fragment_size,
            max_message_size=max_message_size,
            max_queued_bytes=max_queued_bytes,
            headers=headers,
            origin=origin,
            user_agent=user_agent,
            max_redirects=max_redirects,
            proxy=proxy,
            proxy_ssl_context=proxy_ssl_context,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            send_pings=send_pings,
            ping_frequency=ping_frequency,
            close_after_no_message=close_after_no_message,
            buffer_pool=buffer_pool,
            http2=http2,
            reconnect=reconnect,
        )
        for name, callback in (
            ("on_open", on_open),
            ("on_message", on_message),
            ("on_binary", on_binary),
            ("on_closed", on_closed),
            ("on_internal_request_created", on_internal_request_created),
            ("on_pending", on_pending),
            ("on_reconnecting", on_reconnecting),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable, not {type(callback).__name__}")
        if context is not None and not isinstance(context, MutableMapping):
            raise TypeError(f"context must be a mapping, not {type(context).__name__}")
        self._id = next(_ids)
        #: The logging context: at least ``id`` and ``url``; add your own fields.
        self.context: MutableMapping[str, Any] = {"id": self._id, "url": redact_url(url)}
        if context:
            self.context.update(context)
        self.log = ContextAdapter(self.context)

        self.on_open = on_open
        self.on_message = on_message
        self.on_binary = on_binary
        self.on_closed = on_closed
        self.on_internal_request_created = on_internal_request_created
        self.on_reconnecting = on_reconnecting

        self._url = url
        self._open_dispatched = False  # on_open has run (connect() waits for it)
        self._engine = engine = Connection(
            self._options, _Events(self), self, self.log, f"blockws-{self._id}"
        )
        self._dispatcher = engine.dispatcher
        self._dispatcher.owner = self  # what on_pending is called with
        self._dispatcher.on_pending = on_pending
        # The hot paths, bound once.
        self._pending = engine.dispatcher.pending
        self._run = engine.dispatcher.run
        # receive()'s queue, once it has one (see Delivery.new_inbox).
        self._inbox: deque[str | bytes] | None = None
        self._delivery = engine.delivery
        self._take = engine.delivery.take
        #: The handshake request; edit it before ``open()``.
        self.internal_request = self._new_request()
        self._request_at_open: Request | None = None  # what reconnections copy
        # ws.error inside on_reconnecting (see _Events.reconnecting).
        self._announced_error: tuple[BaseException | None] | None = None

    def _new_request(self, url: str | None = None, credentials: bool = True) -> Request:
        """A fresh handshake request from the options: the first one, and those
        made for a fallback or a redirect (to ``url``; without the
        ``Authorization`` and ``Cookie`` headers unless ``credentials``)."""
        options = self._options
        request = Request(
            url=self._url if url is None else url,
            headers=Headers(list(options.headers)),
            subprotocols=list(options.subprotocols),
            origin=options.origin,
            user_agent=options.user_agent,
            open_timeout=options.open_timeout,
            close_timeout=options.close_timeout,
        )
        if not credentials:
            strip_credentials(request)
        return request

    def _set_option(self, name: str, value: Any) -> None:
        if self._engine.phase is not Phase.NEW:
            raise InvalidState(f"{name} cannot be changed after open()")
        self._options = self._options.with_values(**{name: value})
        self._engine.configure(self._options)

    # -- options ------------------------------------------------------------------------

    max_message_size: _Setting[int | None] = _Setting(
        "Largest incoming message in bytes (``None``: no limit); a larger one fails with 1009."
    )
    max_queued_bytes: _Setting[int | None] = _Setting(
        "Received bytes held undelivered before the socket stops reading (default "
        "16 MiB, at least ``max_message_size``; ``None``: no limit); see ``queued_amount``."
    )
    ssl_context: _Setting[ssl.SSLContext | None] = _Setting(
        "The ``ssl.SSLContext`` for ``wss://`` (``None``: blockws's default: certifi, the "
        "system store, ``SSL_CERT_FILE``/``SSL_CERT_DIR``). blockws sets its ALPN list on it "
        "for each connection attempt (``h2, http/1.1``, or ``http/1.1`` for HTTP/1.1), under "
        "a lock that keeps blockws's concurrent connects apart; the context keeps the last "
        "list set. Trust, client certificates and the rest are used as you set them."
    )
    server_hostname: _Setting[str | None] = _Setting(
        "SNI and certificate name (``None``: the URL's host)."
    )
    buffer_pool: _Setting[BufferPool] = _Setting("The pool ``on_binary`` segments come from.")
    http2: _Setting[HTTP2Settings] = _Setting(
        "How this socket uses HTTP/2 (RFC 8441); see :class:`~blockws.HTTP2Settings`."
    )
    proxy: _Setting[Proxy | bool | None] = _Setting(
        "The proxy: ``True`` (from the environment), ``None``, or a :class:`~blockws.Proxy` "
        "(set it with a URL); its ``repr`` hides credentials."
    )
    proxy_ssl_context: _Setting[ssl.SSLContext | None] = _Setting(
        "The ``ssl.SSLContext`` that verifies an ``https://`` proxy (``None``: the default)."
    )
    max_redirects: _Setting[int] = _Setting(
        "Redirects of the upgrade request followed (0: none); default 10."
    )
    reconnect: _Setting[Reconnect | None] = _Setting(
        "The reconnection policy (a :class:`~blockws.Reconnect`), or ``None`` when off."
    )

    @property
    def extensions(self) -> list[Extension]:
        """The extensions offered; once open, the ones the server accepted.

        May be set until ``open()``.
        """
        accepted = self._engine.extensions
        return list(accepted if accepted is not None else self._options.extensions)

    @extensions.setter
    def extensions(self, value: Sequence[Extension]) -> None:
        self._set_option("extensions", value)

    @property
    def max_fragment_size(self) -> int:
        """Payload bytes per outgoing frame; a change applies to messages written later."""
        return self._engine.max_fragment_size

    @max_fragment_size.setter
    def max_fragment_size(self, value: int) -> None:
        self._engine.set_max_fragment_size(value)

    @property
    def send_pings(self) -> bool:
        """When True, a ping goes out every ``ping_frequency`` seconds; may change any time."""
        return self._engine.keepalive.enabled

    @send_pings.setter
    def send_pings(self, value: bool) -> None:
        self._engine.set_send_pings(value)

    @property
    def ping_frequency(self) -> float:
        """Seconds between pings (at least 0.1); a change applies from the next ping."""
        return self._engine.keepalive.frequency

    @ping_frequency.setter
    def ping_frequency(self, value: float) -> None:
        self._engine.keepalive.set_frequency(value)

    @property
    def close_after_no_message(self) -> float:
        """Seconds after a ping within which some frame must arrive, or the socket
        closes with 1006 (a :class:`~blockws.exceptions.PingTimeout` in ``error``)."""
        return self._engine.keepalive.silence

    @close_after_no_message.setter
    def close_after_no_message(self, value: float) -> None:
        self._engine.keepalive.set_silence(value)

    @property
    def open_timeout(self) -> float | None:
        """Seconds for connecting plus the opening handshake (from ``internal_request``)."""
        return self.internal_request.open_timeout

    @property
    def close_timeout(self) -> float | None:
        """Seconds the closing handshake may take (from ``internal_request``)."""
        return self.internal_request.close_timeout

    # -- state --------------------------------------------------------------------------

    @property
    def id(self) -> int:
        """A number unique to this socket in the process (also ``context["id"]``)."""
        return self._id

    @property
    def url(self) -> str:
        """The URL of the current handshake request."""
        return self.internal_request.url

    @property
    def is_open(self) -> bool:
        """True from when ``on_open`` is queued until closing starts or the link fails."""
        return self._engine.is_open

    @property
    def closed(self) -> bool:
        """True once the socket has ended: ``join()`` returns True and ``on_closed``
        is queued (it runs in the next ``update()``)."""
        return self._engine.closed

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the socket, or ``None`` (a clean close, or not ended).

        While the socket reconnects: the one that ended the connection or the
        latest attempt (inside ``on_reconnecting``: the one before that attempt).
        """
        announced = self._announced_error
        if announced is not None:
            return announced[0]
        return self._engine.error

    @property
    def protocol(self) -> str | None:
        """The subprotocol the server selected, or ``None``."""
        return self._engine.subprotocol

    @property
    def http_version(self) -> str | None:
        """``"1.1"`` or ``"2"``: which protocol carries the socket (set when it opens)."""
        return self._engine.http_version

    @property
    def latency(self) -> float | None:
        """Round-trip seconds of the latest ping/pong pair (ours or ``ping()``'s), or ``None``."""
        return self._engine.latency

    @property
    def last_message_received(self) -> float | None:
        """``time.monotonic()`` of the latest frame received, or ``None`` before any."""
        return self._engine.last_received

    @property
    def close_code(self) -> int | None:
        """The code ``on_closed`` reports, once the socket is closed (while
        reconnecting: the code the lost connection ended with)."""
        return self._engine.close_code

    @property
    def close_reason(self) -> str:
        """The reason ``on_closed`` reports, once the socket is closed (while
        reconnecting: the lost connection's)."""
        return self._engine.close_reason

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the connection so far (frames after compression)."""
        return self._engine.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes read from the connection so far (frames before decompression)."""
        return self._engine.bytes_received

    @property
    def buffered_amount(self) -> int:
        """Bytes accepted by ``send*`` and not yet written to the transport,
        plus queued control frames (pongs, pings, a close reply).

        Messages count as given to ``send*``: compression runs on the writer
        thread just before a message is written, so queued bytes are
        uncompressed. Control frames count as their bytes on the wire. Pongs
        are bounded: while the transport is busy, a new pong replaces the one
        still waiting (RFC 6455 5.5.3), so a server that floods pings and never
        reads grows this by one pong, not one per ping.
        """
        return self._engine.buffered

    @property
    def queued_amount(self) -> int:
        """Bytes received and not yet delivered: messages waiting for ``update()``
        (their callback) or for ``receive()``, binary counted in bytes and text in
        characters. Reading stops while this is at least ``max_queued_bytes``,
        and resumes once it falls to half (see the class docstring)."""
        return self._engine.delivery.queued

    def __repr__(self) -> str:
        phase = self._engine.phase.name.lower()
        return f"<blockws.WebSocket #{self._id} {self.context['url']} {phase}>"

    # -- opening and closing ------------------------------------------------------------

    def open(self) -> WebSocket:
        """Start connecting and return at once; ``on_open`` or ``on_closed`` follows.

        The timeouts of ``internal_request`` (as edited until now) apply.
        Raises :class:`~blockws.exceptions.InvalidState` when called twice.
        """
        request = self.internal_request
        engine = self._engine
        if engine.phase is Phase.NEW:
            self._options = self._options.with_values(
                open_timeout=request.open_timeout, close_timeout=request.close_timeout
            )
            engine.configure(self._options)
            if self._options.reconnect is not None:  # only reconnections copy it
                self._request_at_open = _copy_request(request)
        engine.open()
        return self

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (RFC 6455 7.1.2) and return at once.

        Messages queued before the call are sent first. ``is_open`` is False
        from now on; ``on_closed`` follows once the server answers, or after
        ``close_timeout`` seconds if it does not (then ``ws.error`` is a
        ``CloseTimeout``). Raises ``ValueError`` for a code or reason RFC 6455
        forbids. A no-op when the socket is already closing or closed
        (except that a socket with ``reconnect`` will not reconnect); a
        socket still connecting is abandoned (``on_closed`` with 1006); a
        socket never opened is closed at once, without ``on_closed``. A socket
        waiting to reconnect is closed at once (``on_closed`` with 1006 and
        ``error`` None), and one in a reconnection attempt abandons it.
        """
        self._engine.close(code, reason)

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (1006).

        Never blocks; any thread. As after :meth:`close`, no reconnection
        follows, and a socket never opened is closed at once, without
        ``on_closed``.
        """
        self._engine.abort(requested=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the socket has ended and its threads are gone; True if so.

        Once it returns True, ``closed`` is True and ``on_closed`` is queued.
        """
        return self._engine.join(timeout)

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """Close, wait (up to ``close_timeout`` + 1 s) and run pending callbacks.

        When the block is left by an exception, that exception wins: one
        raised by a callback meanwhile (``on_closed``, say) is logged, not
        raised in its place.
        """
        self.close()
        if self._engine.phase is Phase.CLOSED and not self._pending:
            return
        self.join((self.close_timeout or 5.0) + 1.0)
        if exc_type is None:
            self.update()
            return
        try:
            self.update()
        except Exception:  # noqa: BLE001 - logged: the block's own exception propagates
            self.log.exception("a callback raised while the with block was unwinding")

    # -- sending ------------------------------------------------------------------------

    def send(
        self,
        data: str | BytesLike,
        offset: int = 0,
        count: int | None = None,
        *,
        compress: bool = True,
    ) -> None:
        """Queue a text (``str``) or binary (bytes-like) message; returns at once.

        It never waits for the network. When nothing is queued or being
        written, a message of up to 1 MiB is written on the calling thread
        without blocking (what the kernel does not take at once goes to the
        writer thread): that thread then pays for masking the frames and for
        the kernel's copy of what it takes.

        ``offset`` and ``count`` select part of a binary message. Thread-safe;
        each thread's messages keep their order. The data is copied unless it
        is an immutable ``bytes``. ``compress=False`` sends this message
        uncompressed even when permessage-deflate is in force (for data that
        is already compressed). Raises ``TypeError`` for anything else than
        ``str`` or a bytes-like object, :class:`InvalidState` before the
        socket is open and :class:`ConnectionClosed` once it is closing.

        While the socket reconnects (``reconnect=``), from the end of one
        connection until ``on_open`` is queued for the next, ``send`` raises
        :class:`InvalidState` and nothing is queued; what was queued and not
        yet written when the connection ended is dropped. Refusing is the
        rule because the new connection is a new session for the server: your
        ``on_open`` must run first (to log in, subscribe, resend the state of
        the game), and messages held through an outage of unknown length
        would go out stale, ahead of it, and grow without bound.
        """
        if type(data) is bytes and not offset and count is None:  # the commonest: first
            self._engine.queue.push(
                _BINARY if compress else _BINARY | _UNCOMPRESSED, data, None, len(data)
            )
            return
        flag = 0 if compress else _UNCOMPRESSED
        if isinstance(data, str):
            if offset or count is not None:
                raise TypeError("offset and count apply to binary messages only")
            payload: bytes = data.encode("utf-8")
            self._engine.queue.push(_TEXT | flag, payload, None, len(payload))
            return
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(
                f"send() takes a str or a bytes-like object, not {type(data).__name__}"
            ) from None
        if offset or count is not None:
            end = len(view) if count is None else offset + count
            if offset < 0 or end > len(view) or end < offset:
                raise ValueError(f"offset/count outside a {len(view)}-byte buffer")
            view = view[offset:end]
        payload = bytes(view)
        self._engine.queue.push(_BINARY | flag, payload, None, len(payload))

    def send_as_binary(self, segment: BufferSegment, *, compress: bool = True) -> None:
        """Queue ``segment`` as a binary message; blockws releases it once written.

        The segment must not be touched after the call. If the socket is not
        open, the segment is released and the exception raised.
        """
        self._enqueue_segment(_BINARY | (0 if compress else _UNCOMPRESSED), segment)

    def send_as_text(self, segment: BufferSegment, *, compress: bool = True) -> None:
        """Queue ``segment`` (UTF-8) as a text message; released once written.

        Raises ``ValueError`` (and releases the segment) if it is not UTF-8.
        """
        try:
            str(segment.view(), "utf-8")
        except UnicodeDecodeError as exc:
            segment.release()
            raise ValueError(f"segment is not valid UTF-8: {exc.reason}") from None
        self._enqueue_segment(_TEXT | (0 if compress else _UNCOMPRESSED), segment)

    def _enqueue_segment(self, opcode: int, segment: BufferSegment) -> None:
        if not isinstance(segment, BufferSegment):
            raise TypeError(f"expected a BufferSegment, not {type(segment).__name__}")
        try:
            self._engine.queue.push(opcode, segment.view(), segment, segment.count)
        except BaseException:
            if not segment.released:
                segment.release()
            raise

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping now (``payload`` at most 125 bytes); returns at once.

        Its pong, when it comes, sets :attr:`latency`. Raises ``ValueError``
        for a payload over 125 bytes, :class:`InvalidState` before the socket
        is open and :class:`ConnectionClosed` once it is closing.
        """
        self._engine.ping(payload)

    # -- dispatching (the thread that calls update()) -----------------------------------

    @property
    def on_pending(self) -> OnPending | None:
        """``fn(ws)``, called when this socket's pending callbacks go from none to some.

        It wakes a loop that sleeps instead of polling: ``pygame.event.post``,
        ``os.write`` to a pipe, ``loop.call_soon_threadsafe``, Panda3D's
        ``messenger``. It runs on the thread that queued the callback (the
        reader thread, or a thread reading in :meth:`wait`), once per
        transition, not once per message, and must be quick and thread-safe.
        When :meth:`update` returns with callbacks still pending (a budget ran
        out, a callback raised), it runs again, on the thread of
        :meth:`update`, so the loop comes back for the rest. An exception it
        raises is logged to the ``blockws`` logger, not propagated. ``None``
        (default): the hook set by :func:`blockws.set_on_pending`, if any.
        May be set at any time; setting it while callbacks are pending calls
        it at once, on the setting thread.
        """
        return self._dispatcher.on_pending

    @on_pending.setter
    def on_pending(self, hook: OnPending | None) -> None:
        self._dispatcher.set_on_pending(hook)

    def update(self, max_callbacks: int | None = None, max_time: float | None = None) -> int:
        """Run this socket's pending callbacks on the calling thread; returns how many.

        With nothing pending this costs about as much as testing an empty
        deque. A budget bounds the call: it stops once ``max_callbacks``
        callbacks have run or ``max_time`` seconds have passed (checked after
        each callback, so one slow callback can overrun it, and at least one
        runs), and what is left stays pending, in order, for the next call;
        each message counts as one callback. An exception raised by a callback
        propagates; the events after it stay queued for the next call. Called
        from inside one of this socket's callbacks it does nothing and returns
        0. Raises ``TypeError``/``ValueError`` for a wrong budget (when
        something is pending).

        Ctrl-C (``KeyboardInterrupt``, or any exception a signal handler
        raises) may land anywhere in this call; it propagates, and nothing is
        lost or run twice: a callback it interrupted, or whose first line it
        hit, has had its event (as when a callback raises), and every event
        after it -- messages, ``on_open``, ``on_closed`` -- stays queued, in
        order, for the next ``update()``. ``on_closed`` still fires exactly
        once. So a loop that catches the interrupt and carries on, or calls
        ``update()`` once more before it exits, sees every message.
        """
        if not self._pending:
            return 0
        if max_callbacks is None and max_time is None:
            return self._run()
        return self._run(Budget.of(max_callbacks, max_time))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a callback is pending (True) or ``timeout`` passes (False).

        While it waits, the calling thread may read and parse the socket's
        incoming data itself instead of the reader thread (``ws://`` and
        ``wss://``, not HTTP/2; see :class:`~blockws.transport.TCPTransport`), which saves a thread
        hand-off per message; callbacks still run only in :meth:`update`.
        Raises :class:`InvalidState` when called from a callback.
        """
        if self._pending:
            return True
        check_not_in_callback("wait()")
        wait_for_data = self._engine.wait_for_data
        # One wait usually does; a large message takes one a read (a Deadline's
        # two calls a read, inline).
        start = monotonic()
        wait_for_data(timeout)
        if self._pending:
            return True
        end = None if timeout is None else start + timeout
        while True:
            if end is None:
                left = None
            else:
                left = end - monotonic()
                if left <= 0:
                    return False
            wait_for_data(left)
            if self._pending:
                return True

    # -- blocking helpers for scripts ---------------------------------------------------

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Messages reach this queue only on a socket with neither ``on_message``
        nor ``on_binary``; a socket with either one delivers through its
        callbacks and drops a message whose handler is missing (one WARNING
        per socket). Pumps this socket's callbacks on the calling
        thread while it waits. Raises ``TimeoutError`` after ``timeout``
        seconds (the socket stays open), :class:`ConnectionClosed` once the
        socket has closed and every earlier message was received, and
        :class:`InvalidState` before ``open()`` or when called from a callback.
        While the socket reconnects (``reconnect=``) it keeps waiting, for
        the messages of the next connection; ``on_reconnecting`` and
        ``on_open`` run meanwhile, on this thread.
        """
        inbox = self._inbox
        if inbox is None:  # the first receive(): messages may be waiting already
            inbox = self._inbox = self._delivery.new_inbox()
        if inbox:
            # Delivery.take, inline: this runs once per message. Unlike take(),
            # it keeps one eval-breaker point, right after popleft() returns,
            # where a Ctrl-C loses this message: peeking first (inbox[0]) to
            # close it costs about 300 instructions per message, several per
            # cent of a receive() flood (W2, W4): left to decide (issue 11).
            message = inbox.popleft()
            delivery = self._delivery
            delivery.taken += len(message)
            if delivery.paused:
                delivery.check_drained()
            return message
        check_not_in_callback("receive()")
        engine = self._engine
        if engine.close_waits_for_inbox:
            engine.inbox_drained()
        # The first wait usually does; a large message takes one a read (what
        # is left of the timeout, inline: a Deadline's call a read).
        end = None if timeout is None else monotonic() + timeout
        left = timeout
        waited = False
        while True:
            if inbox:
                return self._take()
            if self._pending:
                self._run()  # update(), inline
                continue
            phase = engine.phase
            if phase is Phase.CLOSED:
                raise engine.closed_exception()
            if phase is Phase.NEW:
                raise InvalidState("receive() before open()")
            if waited and end is not None:
                left = end - monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message within {timeout} s")
            engine.wait_for_message(left)
            waited = True

    def __iter__(self) -> Iterator[str | bytes]:
        """Messages, as :meth:`receive` returns them, until the socket closes.

        The loop ends when the socket closes cleanly; a close by an error
        raises :class:`~blockws.exceptions.ConnectionClosedError`.
        """
        while True:
            try:
                yield self.receive()
            except ConnectionClosedOK:
                return


def connect(url: str, timeout: float | None = None, **options: Unpack[ConnectOptions]) -> WebSocket:
    """Open a socket and wait until it is open; returns it, or raises why not.

    ``timeout`` bounds the wait (default: the socket's ``open_timeout``);
    ``options`` are :class:`WebSocket` keywords. On failure the socket is
    closed and its ``error`` (e.g. ``ConnectError``, ``InvalidStatus``,
    ``TLSError``, ``OpenTimeout``) is raised; if the wait is interrupted
    (``KeyboardInterrupt``, an exception from ``on_open``), the socket is
    closed before the exception propagates. Callbacks queued meanwhile
    (``on_open``) run on the calling thread before this returns. Raises
    :class:`InvalidState` when called from a callback.
    """
    check_not_in_callback("connect()")
    if timeout is not None:
        options.setdefault("open_timeout", timeout)
    ws = WebSocket(url, **options)
    deadline = Deadline(timeout)
    try:
        # Inside the try: open() waits for the reader thread to start, and by
        # then that thread may have connected and sent the request, so an
        # interrupt in that wait must end the socket as one in the loop does.
        ws.open()
        while not ws._open_dispatched:
            if ws.closed and not ws._pending:
                _raise_cause(ws.error or ws._engine.closed_exception())
            if deadline.expired:
                raise OpenTimeout(f"not open within {timeout} s")
            left = deadline.left()
            ws.wait(0.5 if left is None else min(left, 0.5))
            ws.update()
    except BaseException:
        ws.abort()
        ws.join(1.0)
        try:
            ws.update()  # on_closed: the caller's exception must win over its
        except Exception:  # noqa: BLE001 - logged, the first exception propagates
            ws.log.exception("a callback raised while connect() was failing")
        raise
    return ws


def _raise_cause(error: BaseException) -> NoReturn:
    """Raise ``error`` here, without the reader thread's frames it was raised among.

    The error was raised (and caught) on the connecting thread; raising the
    same object again would append this thread's frames to those. Its own
    cause (say, the ``ConnectionRefusedError`` behind a ``ConnectError``)
    stays chained, with its short traceback.
    """
    raise error.with_traceback(None) from error.__cause__


update_all = _dispatcher.update_all
wait = _multiwait.wait_any
set_on_pending = _dispatcher.set_on_pending
