"""Every exception blockws raises derives from :class:`BlockwsError`.

The tree keeps *local misuse* (you called something wrong) apart from *remote
misbehaviour* (the server or the network did something wrong), and subclasses
a builtin wherever one fits, so ``except ValueError`` or ``except
TimeoutError`` also work::

    BlockwsError
    ├── InvalidURL                    (also ValueError)   bad ws:// or wss:// URL
    ├── InvalidState                  (also RuntimeError) e.g. send() before open
    ├── SegmentReleasedTwice          (also ValueError)   a segment released twice
    ├── ConnectionClosed                                  the socket is closed
    │   ├── ConnectionClosedOK                            ... by a clean handshake
    │   └── ConnectionClosedError                         ... by an error
    ├── TransportError                (also OSError)      network-level failures
    │   ├── ConnectError                                  refused, unreachable, DNS
    │   │   └── ConnectionRefused   (also ConnectionRefusedError) nobody listens there
    │   ├── TLSError                                      certificate, handshake
    │   ├── ProxyError                                    the proxy refused the tunnel
    │   └── ConnectionLost                                reset or EOF mid-stream
    ├── OpenTimeout                   (also TimeoutError) connect + handshake too slow
    ├── PingTimeout                   (also TimeoutError) close_after_no_message fired
    ├── CloseTimeout                  (also TimeoutError) the closing handshake stalled
    ├── HandshakeError                                    the HTTP upgrade failed
    │   ├── InvalidStatus                                 status other than 101 (and
    │   │                                                 redirects that cannot be followed)
    │   ├── InvalidHeader                                 Upgrade/Connection/Accept
    │   │   └── HeadersTooLarge                           response headers over bound
    │   ├── NegotiationError                              subprotocol/extension not offered
    │   └── HTTP2Unavailable                              no RFC 8441 here (falls back)
    └── ProtocolError                                     the peer broke RFC 6455 (1002)
        ├── InvalidPayload                                bad UTF-8 in text/close (1007)
        └── MessageTooBig                                 over max_message_size (1009)

``ProtocolError`` and its subclasses carry :attr:`ProtocolError.close_code`:
the code blockws sends when it fails the connection because of them.
"""

from __future__ import annotations

__all__ = [
    "BlockwsError",
    "InvalidURL",
    "InvalidState",
    "SegmentReleasedTwice",
    "ConnectionClosed",
    "ConnectionClosedOK",
    "ConnectionClosedError",
    "TransportError",
    "ConnectError",
    "ConnectionRefused",
    "TLSError",
    "ProxyError",
    "ConnectionLost",
    "OpenTimeout",
    "PingTimeout",
    "CloseTimeout",
    "HandshakeError",
    "InvalidStatus",
    "InvalidHeader",
    "HeadersTooLarge",
    "NegotiationError",
    "HTTP2Unavailable",
    "ProtocolError",
    "InvalidPayload",
    "MessageTooBig",
]


class BlockwsError(Exception):
    """Root of every exception raised by blockws."""


# -- local misuse -------------------------------------------------------------


class InvalidURL(BlockwsError, ValueError):
    """The URL is not a usable ``ws://`` or ``wss://`` URL."""


class InvalidState(BlockwsError, RuntimeError):
    """The call does not fit the socket's state (e.g. ``send`` before open)."""


class SegmentReleasedTwice(BlockwsError, ValueError):
    """A :class:`~blockws.BufferSegment` was released to its pool twice."""


# -- the socket is closed -----------------------------------------------------


class ConnectionClosed(BlockwsError):
    """Raised by ``send``/``receive`` once the socket is closed or closing.

    ``code`` and ``reason`` are what ``on_closed`` reports (``code`` is
    ``None`` while the closing handshake is still under way).
    """

    def __init__(self, code: int | None, reason: str, cause: BaseException | None = None):
        self.code = code
        self.reason = reason
        self.cause = cause
        if code is None:
            msg = "the socket is closing"
        else:
            msg = f"the socket is closed (code {code}{', ' + repr(reason) if reason else ''})"
        if cause is not None:
            msg += f": {cause}"
        super().__init__(msg)


class ConnectionClosedOK(ConnectionClosed):
    """The socket ended with a closing handshake and no error on this side.

    The close code may still be one the server uses to report a problem
    (1002, 1011, 4xxx): look at ``code``.
    """


class ConnectionClosedError(ConnectionClosed):
    """The socket ended because of an error; ``cause`` holds it."""


# -- transport ----------------------------------------------------------------


class TransportError(BlockwsError, OSError):
    """A network-level failure, translated from ``OSError`` at the I/O boundary.

    ``errno`` and ``strerror`` are those of the ``OSError`` it was translated
    from (``None`` when there was none), so ``except OSError`` handlers that
    look at ``errno`` keep working; the message is blockws's own.
    """

    def __init__(self, message: str, *, errno: int | None = None, strerror: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.strerror = strerror

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConnectError(TransportError):
    """The TCP connection could not be made (refused, unreachable, DNS).

    The message names the host and port; ``errno`` is kept (for DNS
    failures, the ``socket.EAI_*`` code of the ``gaierror``).
    """


class ConnectionRefused(ConnectError, ConnectionRefusedError):
    """Nobody accepts connections at that host and port (``ECONNREFUSED``).

    Also a builtin ``ConnectionRefusedError``.
    """


class TLSError(TransportError):
    """The TLS handshake failed (e.g. the certificate did not verify)."""


class ProxyError(TransportError):
    """The proxy did not open a tunnel to the server.

    ``status`` is what the proxy answered: the HTTP status of its reply to
    ``CONNECT`` (407 when it wants credentials, 403 when it forbids the
    destination, 502 when it could not reach it), or the SOCKS reply code;
    ``None`` when it broke the protocol or ended the connection. ``proxy``
    is the proxy's URL without its credentials, which never appear in the
    message, the ``repr`` or a log record.
    """

    def __init__(
        self, message: str, *, status: int | None = None, reason: str = "", proxy: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.proxy = proxy


class ConnectionLost(TransportError):
    """The connection was reset or ended while the socket was open."""


class OpenTimeout(BlockwsError, TimeoutError):
    """Connecting and the opening handshake took longer than ``open_timeout``."""


class PingTimeout(BlockwsError, TimeoutError):
    """No frame arrived within ``close_after_no_message`` of a ping."""


class CloseTimeout(BlockwsError, TimeoutError):
    """The closing handshake did not finish within ``close_timeout``."""


# -- opening handshake (RFC 6455 section 4) -----------------------------------


class HandshakeError(BlockwsError):
    """The server's answer to the upgrade request was not acceptable."""


class InvalidStatus(HandshakeError):
    """The server answered with a status other than 101.

    ``status``, ``reason``, ``headers`` and ``body`` (possibly truncated)
    describe the response. When the response was a redirect that was not
    followed (a loop, more than ``max_redirects`` hops, ``wss`` to ``ws``),
    ``message`` says why and ``chain`` lists the URLs visited, first to last
    (passwords redacted).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        headers: object = None,
        body: bytes = b"",
        *,
        message: str | None = None,
        chain: tuple[str, ...] = (),
    ):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.chain = chain
        if message is None:
            message = f"server rejected the WebSocket upgrade: HTTP {status} {reason}".rstrip()
        super().__init__(message)


class InvalidHeader(HandshakeError):
    """A response header was missing or had a wrong value."""


class HeadersTooLarge(InvalidHeader):
    """The response's header block exceeded the configured bound."""


class NegotiationError(HandshakeError):
    """The server chose a subprotocol or extension the client never offered."""


class HTTP2Unavailable(HandshakeError):
    """WebSocket over HTTP/2 (RFC 8441) is not available from this server.

    Raised when ALPN does not pick ``h2`` (and fallback is off), the server's SETTINGS lack
    ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1``, or the extended CONNECT is
    refused. With fallback on, the socket then opens over HTTP/1.1; with it
    off, this is ``ws.error``. ``cause`` holds the underlying error if any.

    ``refused`` is True when the server itself said no (the cases above), and
    False when the attempt ended for a reason that may pass (a GOAWAY, a
    reset, a connection lost before the answer): only a refusal is
    remembered for the origin.
    """

    def __init__(
        self, message: str, cause: BaseException | None = None, *, refused: bool = False
    ):
        super().__init__(message)
        self.cause = cause
        self.refused = refused


# -- protocol (RFC 6455 section 5-7) ------------------------------------------


class ProtocolError(BlockwsError):
    """The peer broke RFC 6455; blockws fails the connection with ``close_code``."""

    close_code = 1002


class InvalidPayload(ProtocolError):
    """A text message or close reason was not valid UTF-8 (RFC 6455 8.1)."""

    close_code = 1007


class MessageTooBig(ProtocolError):
    """An incoming message exceeded ``max_message_size``."""

    close_code = 1009
