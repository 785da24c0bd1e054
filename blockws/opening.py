"""How a socket opens: the HTTP/2 attempt, the fallback, the HTTP/1.1 handshake.

:func:`open_transport` runs on the socket's connecting thread and returns an
:class:`Opened` (a transport carrying a negotiated WebSocket), or raises why
it could not. The order, for ``wss://`` with HTTP/2 enabled (and ``ws://``
with cleartext h2c on):

1. unless the origin already failed HTTP/2 in this process, ask the
   :mod:`blockws.http2` pool for a stream (RFC 8441);
2. if that raises :class:`~blockws.exceptions.HTTP2Unavailable` and fallback
   is on, remember the origin, make a **new** request (the socket's
   ``on_internal_request_created`` hook sees it, as the seed specifies) and
   continue over HTTP/1.1 -- on the same TLS connection when ALPN simply
   chose ``http/1.1``;
3. the HTTP/1.1 upgrade (RFC 6455 section 4).

ALPN: blockws's default TLS contexts offer ``h2, http/1.1`` for the HTTP/2
attempt and ``http/1.1`` alone for HTTP/1.1. A context you pass is used as it
is: call ``ctx.set_alpn_protocols(["h2", "http/1.1"])`` on it to allow
HTTP/2.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import certifi

from .deadline import Deadline
from .exceptions import ConnectionLost, HTTP2Unavailable, InvalidHeader, InvalidStatus
from .extensions import Extension
from .handshake import Request, ResponseReader, build_request, negotiate, new_key, validate_response
from .http2 import H2Stream, HTTP2Settings, pool
from .log import ContextAdapter
from .redirects import REDIRECT_STATUSES
from .transport import Connector, Transport

__all__ = ["Opened", "open_transport", "default_context"]


@dataclass
class Opened:
    transport: Transport
    subprotocol: str | None
    extensions: list[Extension]
    #: Bytes that followed the HTTP/1.1 response head: the first frames.
    extra: bytes = b""


_contexts: dict[bool, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def default_context(http2: bool) -> ssl.SSLContext:
    """The shared client context: certifi's CA bundle, hostname checks, ALPN.

    Created once per process and ALPN list (loading the bundle costs a few ms).
    """
    with _contexts_lock:
        ctx = _contexts.get(http2)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=certifi.where())
            ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
            _contexts[http2] = ctx
        return ctx


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
    if wants_h2 and url.origin_key in pool.failed_origins and not http2.fallback:
        raise HTTP2Unavailable("HTTP/2 failed earlier for this origin, and fallback is off")
    if wants_h2 and url.origin_key not in pool.failed_origins:
        offered = [e.fresh() for e in extensions]
        ctx = (ssl_context or default_context(True)) if url.secure else None
        try:
            attempt = pool.open(
                url, request, offered, deadline, http2, connector, ctx, server_hostname, register
            )
            if not isinstance(attempt, H2Stream):
                # A new TLS connection on which ALPN chose HTTP/1.1.
                reuse = attempt
                if not http2.fallback:
                    reuse.abort()
                    reuse.close()
                raise HTTP2Unavailable(
                    f"TLS ALPN chose {attempt.alpn_protocol or 'no protocol'}, not h2"
                )
        except HTTP2Unavailable as exc:
            if isinstance(exc.cause, InvalidStatus) and exc.cause.status in REDIRECT_STATUSES:
                # A redirect answers the request; it does not refuse HTTP/2 (blockws.redirects).
                raise exc.cause from None
            pool.failed_origins.add(url.origin_key)
            if not http2.fallback:
                raise
            log.info("HTTP/2 unavailable (%s): falling back to HTTP/1.1", exc)
            request = new_request()
            url = request.parsed_url
        else:
            stream = attempt
            request.http_version = "2"
            assert stream.response is not None
            try:
                subprotocol, accepted = negotiate(stream.response, request.subprotocols, offered)
            except BaseException:
                stream.close()
                raise
            return Opened(stream, subprotocol, accepted)
    if reuse is not None:
        transport = reuse
    else:
        ctx = (ssl_context or default_context(False)) if url.secure else None
        log.debug("connecting to %s:%s", url.host, url.port)
        transport = connector.connect(url.host, url.port, deadline, ctx, server_hostname)
    register(transport)
    if transport.alpn_protocol == "h2":
        # Python cannot change ALPN per connection, and HTTP/1.1 cannot be
        # spoken once the server picked h2: say so instead of failing obscurely.
        transport.abort()
        transport.close()
        raise HTTP2Unavailable(
            "the server chose h2 by ALPN but does not accept WebSocket over HTTP/2, so "
            "HTTP/1.1 is needed: pass an ssl_context whose ALPN protocols leave out 'h2' "
            "(ctx.set_alpn_protocols(['http/1.1'])) or none at all"
        )
    return _upgrade_http1(transport, request, extensions, deadline, log)


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
    transport.write([build_request(request, key, offered)])
    log.debug("sent upgrade request, headers %s", request.headers.redacted())
    reader = ResponseReader()
    response = None
    while response is None:
        data = transport.recv(deadline.remaining())
        if not data:
            if transport.aborted:
                raise ConnectionLost("connection aborted during the opening handshake")
            raise InvalidHeader("connection closed before the handshake response was complete")
        response = reader.feed(data)
    subprotocol, accepted = validate_response(response, key, request.subprotocols, offered)
    return Opened(transport, subprotocol, accepted, response.extra)
