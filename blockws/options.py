"""A socket's options: checked once, frozen, and passed down as parameters.

:class:`Options` is built by the :class:`~blockws.WebSocket` constructor from
its keyword arguments. Every check runs there, before any I/O, and names the
option: a wrong type raises ``TypeError``, a value out of range ``ValueError``.
The engine (:mod:`blockws.connection`), the opening (:mod:`blockws.opening`)
and the protocol read their settings from it and nowhere else.

Only the keepalive settings and ``max_fragment_size`` may change once a socket
is open; they have setters on the engine. The others are fixed by ``open()``.

:class:`ConnectOptions` lists the same keywords for
:func:`blockws.connect`, so a type checker catches ``connect(url, timout=5)``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, TypedDict

from .buffers import BufferPool, BufferSegment
from .deflate import PerMessageDeflate
from .extensions import Extension
from .handshake import DEFAULT_USER_AGENT, Headers, HeadersLike
from .http2 import HTTP2Settings
from .protocol import DEFAULT_MAX_FRAGMENT_SIZE, DEFAULT_MAX_MESSAGE_SIZE
from .proxy import Proxy, check_proxy_option
from .reconnect import Reconnect, reconnect_option
from .redirects import DEFAULT_MAX_REDIRECTS

__all__ = [
    "Options",
    "ConnectOptions",
    "check_fragment_size",
    "check_ping_frequency",
    "DEFAULT_MAX_QUEUED_BYTES",
]

#: The shortest ``ping_frequency`` accepted, in seconds.
MIN_PING_FREQUENCY = 0.1
#: Default ``max_queued_bytes``: received bytes held undelivered before the
#: socket stops reading (16 MiB, one default ``max_message_size``).
DEFAULT_MAX_QUEUED_BYTES = 16 * 1024 * 1024


def _positive_or_none(name: str, value: object) -> float | None:
    if value is None:
        return None
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return number


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    return float(value)


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def check_fragment_size(value: object) -> int:
    """``max_fragment_size``: an int of at least 1."""
    size = _int("max_fragment_size", value)
    if size < 1:
        raise ValueError("max_fragment_size must be at least 1")
    return size


def check_ping_frequency(value: object) -> float:
    """``ping_frequency``: seconds, at least :data:`MIN_PING_FREQUENCY`."""
    seconds = _number("ping_frequency", value)
    if seconds < MIN_PING_FREQUENCY:
        raise ValueError(f"ping_frequency must be at least {MIN_PING_FREQUENCY} seconds")
    return seconds


def check_silence(value: object) -> float:
    """``close_after_no_message``: positive seconds."""
    seconds = _number("close_after_no_message", value)
    if seconds <= 0:
        raise ValueError("close_after_no_message must be a positive number of seconds")
    return seconds


def _items(name: str, value: object, kind: type, what: str) -> tuple[Any, ...]:
    """A list option whose items must all be ``kind`` (a lone str is refused)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of {what}, not {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{name} must hold {what}, not {type(item).__name__}")
    return items


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, Headers):
        pairs: Iterable[Any] = value.raw_items()  # repeated names kept
    elif isinstance(value, Mapping):
        pairs = value.items()
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"headers must be a mapping or a list of (name, value) pairs, "
            f"not {type(value).__name__}"
        )
    else:
        pairs = value
    out = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"headers must hold (name, value) pairs, not {pair!r}")
        name, val = pair
        if not isinstance(name, str) or not isinstance(val, str):
            raise TypeError(f"header names and values must be str: {pair!r}")
        out.append((name, val))
    return tuple(out)


# Shared by every socket that asks for the defaults (HTTP2Settings is frozen).
_HTTP2_DEFAULT = HTTP2Settings()
_HTTP2_OFF = HTTP2Settings(enabled=False)


def _http2(value: object) -> HTTP2Settings:
    if value is None or value is True:
        return _HTTP2_DEFAULT
    if value is False:
        return _HTTP2_OFF
    if not isinstance(value, HTTP2Settings):
        raise TypeError(f"http2 must be an HTTP2Settings or a bool, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Options:
    """Every setting of one socket, checked (see the module docstring).

    >>> Options.build(open_timeout=5).open_timeout
    5.0
    >>> Options.build(headers="X: y")
    Traceback (most recent call last):
    TypeError: headers must be a mapping or a list of (name, value) pairs, not str
    """

    # WebSocket
    subprotocols: tuple[str, ...] = ()
    extensions: tuple[Extension, ...] = ()
    max_fragment_size: int = DEFAULT_MAX_FRAGMENT_SIZE
    max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE
    max_queued_bytes: int | None = DEFAULT_MAX_QUEUED_BYTES
    # HTTP
    headers: tuple[tuple[str, str], ...] = ()
    origin: str | None = None
    user_agent: str | None = DEFAULT_USER_AGENT
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    # networks: True reads the environment, None is no proxy
    proxy: Proxy | bool | None = True
    proxy_ssl_context: ssl.SSLContext | None = None
    # TLS
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    # timeouts and keepalive
    open_timeout: float | None = 10.0
    close_timeout: float | None = 5.0
    send_pings: bool = False
    ping_frequency: float = 10.0
    close_after_no_message: float = 2.0
    # memory
    buffer_pool: BufferPool = BufferPool.default
    # HTTP/2
    http2: HTTP2Settings = HTTP2Settings()
    # reconnection (None: off)
    reconnect: Reconnect | None = None

    @classmethod
    def build(cls, **values: Any) -> Options:
        """Check and normalize keyword values; unknown names raise ``TypeError``."""
        known = {f.name for f in fields(cls)}
        for name in values:
            if name not in known:
                raise TypeError(f"unknown option {name!r}")
        v = dict(values)
        out: dict[str, Any] = {}
        protocols = v.get("subprotocols")
        out["subprotocols"] = () if protocols is None else _items(
            "subprotocols", protocols, str, "str"
        )
        offered = v.get("extensions")
        out["extensions"] = (PerMessageDeflate(),) if offered is None else _items(
            "extensions", offered, Extension, "Extension objects"
        )
        out["max_fragment_size"] = check_fragment_size(
            v.get("max_fragment_size", DEFAULT_MAX_FRAGMENT_SIZE)
        )
        size = v.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
        if size is not None and _int("max_message_size", size) < 1:
            raise ValueError("max_message_size must be at least 1 (or None)")
        out["max_message_size"] = size
        queued = v.get("max_queued_bytes", DEFAULT_MAX_QUEUED_BYTES)
        if queued is not None and _int("max_queued_bytes", queued) < 1:
            raise ValueError("max_queued_bytes must be at least 1 (or None)")
        out["max_queued_bytes"] = queued
        out["headers"] = _headers(v.get("headers"))
        for name in ("origin", "server_hostname"):
            text = v.get(name)
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{name} must be a str or None, not {type(text).__name__}")
            out[name] = text
        agent = v.get("user_agent", DEFAULT_USER_AGENT)
        if agent is not None:
            if not isinstance(agent, str):
                raise TypeError(f"user_agent must be a str or None, not {type(agent).__name__}")
            if "\r" in agent or "\n" in agent:
                raise ValueError("user_agent must not contain a line break")
        out["user_agent"] = agent
        redirects = _int("max_redirects", v.get("max_redirects", DEFAULT_MAX_REDIRECTS))
        if redirects < 0:
            raise ValueError("max_redirects must be 0 (no redirects followed) or more")
        out["max_redirects"] = redirects
        out["proxy"] = check_proxy_option(v.get("proxy", True))
        for name in ("ssl_context", "proxy_ssl_context"):
            ctx = v.get(name)
            if ctx is not None and not isinstance(ctx, ssl.SSLContext):
                raise TypeError(f"{name} must be an ssl.SSLContext, not {type(ctx).__name__}")
            out[name] = ctx
        out["open_timeout"] = _positive_or_none("open_timeout", v.get("open_timeout", 10.0))
        out["close_timeout"] = _positive_or_none("close_timeout", v.get("close_timeout", 5.0))
        pings = v.get("send_pings", False)
        if not isinstance(pings, bool):
            raise TypeError(f"send_pings must be a bool, not {type(pings).__name__}")
        out["send_pings"] = pings
        out["ping_frequency"] = check_ping_frequency(v.get("ping_frequency", 10.0))
        out["close_after_no_message"] = check_silence(v.get("close_after_no_message", 2.0))
        pool = v.get("buffer_pool")
        if pool is not None and not isinstance(pool, BufferPool):
            raise TypeError(f"buffer_pool must be a BufferPool, not {type(pool).__name__}")
        out["buffer_pool"] = pool if pool is not None else BufferPool.default
        out["http2"] = _http2(v.get("http2"))
        out["reconnect"] = reconnect_option(v.get("reconnect"))
        return cls(**out)

    def with_values(self, **values: Any) -> Options:
        """A copy with some values changed, checked as :meth:`build` checks them."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(values)
        checked = Options.build(**current)
        return replace(self, **{name: getattr(checked, name) for name in values})


OnOpen = Callable[[Any], Any]
OnMessage = Callable[[Any, str], Any]
OnBinary = Callable[[Any, BufferSegment], Any]
OnClosed = Callable[[Any, int, str], Any]
OnRequest = Callable[[Any, Any], Any]
OnPending = Callable[[Any], Any]
OnReconnecting = Callable[[Any, int, float], Any]


class ConnectOptions(TypedDict, total=False):
    """The keyword options of :class:`~blockws.WebSocket` and :func:`~blockws.connect`."""

    subprotocols: Sequence[str] | None
    extensions: Sequence[Extension] | None
    max_fragment_size: int
    max_message_size: int | None
    max_queued_bytes: int | None
    headers: HeadersLike | None
    origin: str | None
    user_agent: str | None
    max_redirects: int
    proxy: str | Proxy | bool | None
    proxy_ssl_context: ssl.SSLContext | None
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None
    open_timeout: float | None
    close_timeout: float | None
    send_pings: bool
    ping_frequency: float
    close_after_no_message: float
    on_open: OnOpen | None
    on_message: OnMessage | None
    on_binary: OnBinary | None
    on_closed: OnClosed | None
    on_internal_request_created: OnRequest | None
    on_pending: OnPending | None
    buffer_pool: BufferPool | None
    context: MutableMapping[str, Any] | None
    http2: HTTP2Settings | bool | None
    reconnect: Reconnect | bool | None
    on_reconnecting: OnReconnecting | None
