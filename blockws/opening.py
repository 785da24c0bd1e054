"""How a socket opens: the HTTP/2 attempt, the fallback, the HTTP/1.1 handshake.

:func:`open_transport` runs on the socket's connecting thread and returns an
:class:`Opened` (a transport carrying a negotiated WebSocket), or raises why
it could not. The order, for ``wss://`` with HTTP/2 enabled (and ``ws://``
with cleartext h2c on):

1. ask the :mod:`blockws.http2` pool for a stream (RFC 8441), unless fallback
   is on and the origin refused HTTP/2 within the last few minutes
   (:class:`~blockws.http2.RefusedOrigins`; the log says so, and so does a
   note on the exception if HTTP/1.1 then fails). With fallback off, HTTP/2
   is always tried: it is the only way such a socket can open;
2. if that raises :class:`~blockws.exceptions.HTTP2Unavailable`, remember the
   origin when the server refused (``exc.refused``: never for a timeout,
   a reset or a GOAWAY); with fallback on, make a **new** request (the
   socket's ``on_internal_request_created`` hook sees it, as the seed
   specifies) and continue over HTTP/1.1 -- on the same TLS connection when
   ALPN chose ``http/1.1``, else on a new one offering ``http/1.1`` only;
3. the HTTP/1.1 upgrade (RFC 6455 section 4).

ALPN: the context used -- the caller's ``ssl_context`` or blockws's default
(:func:`blockws.tls.default_context`) -- gets ``h2, http/1.1`` for the HTTP/2
attempt and ``http/1.1`` for HTTP/1.1, set per connection under a lock
(:mod:`blockws.tls`), so a caller's context gets HTTP/2 and the fallback
exactly as the default does.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from . import trace as _trace
from .deadline import Deadline
from .exceptions import BlockwsError, ConnectionLost, HTTP2Unavailable, InvalidHeader, InvalidStatus
from .extensions import Extension
from .handshake import (
    Request,
    ResponseReader,
    build_request,
    negotiate,
    new_key,
    offer_headers,
    validate_response,
)
from .http2 import H2Stream, HTTP2Settings, pool
from .log import ContextAdapter
from .redirects import REDIRECT_STATUSES
from .tls import HTTP1_ALPN, default_context
from .transport import Connector, Transport

__all__ = ["Opened", "open_transport", "default_context"]


@dataclass
class Opened:
    transport: Transport
    subprotocol: str | None
    extensions: list[Extension]
    #: Bytes that followed the HTTP/1.1 response head: the first frames.
    extra: bytes = b""


def open_transport(
    request: Request,
    *,
    deadline: Deadline,
    connector: Connector,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    extensions: Sequence[Extension],
    http2: HTTP2Settings,
    register: Callable[[Transport], None],
    new_request: Callable[[], Request],
    log: ContextAdapter,
) -> Opened:
    """Open a WebSocket over HTTP/2 or HTTP/1.1 (see the module docstring).

    ``register`` is called with each transport as soon as it exists, so the
    socket can abort it from another thread; ``new_request`` makes the
    fallback request and runs the user's hook on it.
    """
    url = request.parsed_url
    reuse: Transport | None = None
    wants_h2 = http2.enabled and (url.secure or http2.cleartext)
    refused = pool.failed_origins
    remembered = refused.get(url.origin_key) if wants_h2 and http2.fallback else None
    skipped = ""
    if remembered is not None:
        skipped = (
            f"HTTP/2 not tried: this origin refused it {refused.age(remembered):.0f} s ago "
            f"({remembered.reason}); remembered for {refused.left(remembered):.0f} s more"
        )
        log.info("%s", skipped)
    if wants_h2 and remembered is None:
        offered = [e.fresh() for e in extensions]
        ctx = (ssl_context or default_context()) if url.secure else None
        try:
            attempt = pool.open(
                url, request, offered, deadline, http2, connector, ctx, server_hostname, register
            )
            if not isinstance(attempt, H2Stream):
                # A new TLS connection on which ALPN chose HTTP/1.1 although h2 was offered.
                reuse = attempt
                if not http2.fallback:
                    reuse.abort()
                    reuse.close()
                raise HTTP2Unavailable(
                    f"TLS ALPN chose {attempt.alpn_protocol or 'no protocol'}, not h2",
                    refused=True,
                )
        except HTTP2Unavailable as exc:
            if isinstance(exc.cause, InvalidStatus) and exc.cause.status in REDIRECT_STATUSES:
                # A redirect answers the request; it does not refuse HTTP/2 (blockws.redirects).
                raise exc.cause from None
            if exc.refused:
                refused.add(url.origin_key, str(exc))
            if _trace.enabled:
                _trace.event(log.context, f"HTTP/2 attempt failed: {exc}")
            if not http2.fallback:
                raise
            log.debug("HTTP/2 unavailable (%s): falling back to HTTP/1.1", exc)
            request = new_request()
            url = request.parsed_url
        else:
            stream = attempt
            request.http_version = "2"
            assert stream.response is not None
            if _trace.enabled:
                _trace.request_http2(log.context, request.url, offer_headers(request, offered))
                _trace.response(log.context, "2", stream.status, "", stream.response)
            try:
                subprotocol, accepted = negotiate(stream.response, request.subprotocols, offered)
            except BaseException:
                stream.close()
                raise
            return Opened(stream, subprotocol, accepted)
    if reuse is not None:
        transport = reuse
    else:
        ctx = (ssl_context or default_context()) if url.secure else None
        log.debug("connecting to %s:%s", url.host, url.port)
        try:
            transport = connector.connect(
                url.host, url.port, deadline, ctx, server_hostname, alpn=HTTP1_ALPN
            )
        except BlockwsError as exc:
            _note(exc, skipped)
            raise
    register(transport)
    try:
        return _upgrade_http1(transport, request, extensions, deadline, log)
    except BlockwsError as exc:
        _note(exc, skipped)
        raise


def _note(exc: BaseException, note: str) -> None:
    """Say on ``exc`` (Python 3.11+: a note shown in tracebacks) why HTTP/2 was skipped."""
    add_note = getattr(exc, "add_note", None)
    if note and add_note is not None:
        add_note(note)


def _ended_unanswered(
    transport: Transport, request: Request, reset: ConnectionLost | None
) -> InvalidHeader:
    """The error for a connection that closed (or, ``reset``, was reset) before
    the handshake response was complete, with advice when it was TLS that
    ended before any answer."""
    url = request.parsed_url
    hint = ""
    if url.secure and transport.bytes_read == 0:
        # TLS 1.3: a server refusing our (missing) client certificate often
        # just closes after the handshake, without an alert.
        hint = (
            ": the server ended the TLS connection without answering; if it requires "
            "a client certificate, pass ssl_context= a context that loaded it "
            "(ctx.load_cert_chain('client.pem', 'client.key'))"
        )
    return InvalidHeader(
        f"connection to {url.host}:{url.port} "
        f"{'reset' if reset else 'closed'} before the handshake response "
        f"was complete{hint}"
    )


def _upgrade_http1(
    transport: Transport,
    request: Request,
    extensions: Sequence[Extension],
    deadline: Deadline,
    log: ContextAdapter,
) -> Opened:
    """The HTTP/1.1 upgrade (RFC 6455 section 4.1) on a connected transport."""
    offered = [e.fresh() for e in extensions]
    key = new_key()
    raw = build_request(request, key, offered)
    try:
        transport.write([raw])
    except ConnectionLost as exc:
        if transport.aborted or not request.parsed_url.secure or transport.bytes_read:
            raise
        # A TLS server that refused us after its handshake may have reset the
        # connection before our request went out: as a reset on the read below.
        raise _ended_unanswered(transport, request, exc) from exc
    if _trace.enabled:
        _trace.request_http1(log.context, raw)
    log.debug("sent upgrade request, headers %s", request.headers.redacted())
    reader = ResponseReader()
    response = None
    while response is None:
        reset: ConnectionLost | None = None
        try:
            data = transport.recv(deadline.remaining())
        except ConnectionLost as exc:
            if transport.aborted or not request.parsed_url.secure or transport.bytes_read:
                raise
            # As a close (below): a TLS server that refused us after its
            # handshake and closed with our request unread sends a reset.
            data, reset = b"", exc
        if not data:
            if transport.aborted:
                raise ConnectionLost("connection aborted during the opening handshake")
            raise _ended_unanswered(transport, request, reset) from reset
        response = reader.feed(data)
    if _trace.enabled:
        _trace.response(log.context, "1.1", response.status, response.reason, response.headers)
    subprotocol, accepted = validate_response(response, key, request.subprotocols, offered)
    return Opened(transport, subprotocol, accepted, response.extra)
