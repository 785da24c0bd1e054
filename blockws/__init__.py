"""blockws: a WebSocket client for threads, scripts and game loops.

Background threads do the I/O; your callbacks run when you call
``ws.update()`` (once per frame in a game), or you use the blocking helpers::

    import blockws

    with blockws.connect("wss://example.com/ws") as ws:
        ws.send("hello")
        print(ws.receive(timeout=5))

See :class:`WebSocket` for options, :func:`enable_trace` to see every frame, and
the documentation in ``docs/`` (``docs/design.rst`` for the design).
"""

from __future__ import annotations

from ._version import __version__
from .buffers import BufferPool, BufferSegment
from .deflate import PerMessageDeflate
from .exceptions import (
    BlockwsError,
    CloseTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    ConnectionRefused,
    HandshakeError,
    HeadersTooLarge,
    HTTP2Unavailable,
    InvalidHeader,
    InvalidPayload,
    InvalidState,
    InvalidStatus,
    InvalidURL,
    MessageTooBig,
    NegotiationError,
    OpenTimeout,
    PingTimeout,
    ProtocolError,
    ProxyError,
    SegmentReleasedTwice,
    TLSError,
    TransportError,
)
from .extensions import Extension
from .handshake import Headers, Request
from .http2 import HTTP2Settings
from .protocol import DEFAULT_MAX_FRAGMENT_SIZE, DEFAULT_MAX_MESSAGE_SIZE
from .proxy import Proxy
from .reconnect import Reconnect
from .tls import create_default_context
from .trace import enable_trace
from .websocket import WebSocket, connect, set_on_pending, update_all, wait

__all__ = [
    "__version__",
    "WebSocket",
    "connect",
    "create_default_context",
    "update_all",
    "wait",
    "set_on_pending",
    "enable_trace",
    "BufferPool",
    "BufferSegment",
    "Extension",
    "PerMessageDeflate",
    "Headers",
    "HTTP2Settings",
    "Proxy",
    "Reconnect",
    "Request",
    "DEFAULT_MAX_FRAGMENT_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "BlockwsError",
    "CloseTimeout",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ConnectionLost",
    "ConnectionRefused",
    "HandshakeError",
    "HeadersTooLarge",
    "HTTP2Unavailable",
    "InvalidHeader",
    "InvalidPayload",
    "InvalidState",
    "InvalidStatus",
    "InvalidURL",
    "MessageTooBig",
    "NegotiationError",
    "OpenTimeout",
    "PingTimeout",
    "ProtocolError",
    "ProxyError",
    "SegmentReleasedTwice",
    "TLSError",
    "TransportError",
]
