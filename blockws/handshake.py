"""The HTTP/1.1 opening handshake (RFC 6455 section 4), sans-I/O.

:class:`Request` is what ``ws.internal_request`` shows and what
``on_internal_request_created`` receives: edit its ``headers`` before
``open()``. :func:`build_request` turns it into bytes, and
:class:`ResponseReader` consumes the server's answer (bounded in size) and
validates it with :func:`validate_response`, raising one
:class:`~blockws.exceptions.HandshakeError` subclass per kind of failure.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Union
from urllib.parse import unquote, urlsplit

from ._version import __version__
from .exceptions import (
    HeadersTooLarge,
    InvalidHeader,
    InvalidStatus,
    InvalidURL,
    NegotiationError,
)
from .extensions import Extension, parse_extension_header

__all__ = [
    "Headers",
    "Request",
    "Response",
    "WSURL",
    "parse_url",
    "build_request",
    "offer_headers",
    "ResponseReader",
    "validate_response",
    "accept_key",
    "negotiate",
    "MAX_RESPONSE_HEAD",
    "DEFAULT_USER_AGENT",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Bound on the response's status line plus headers, in bytes.
MAX_RESPONSE_HEAD = 64 * 1024
#: The ``User-Agent`` sent unless the ``user_agent`` option says otherwise.
DEFAULT_USER_AGENT = f"blockws/{__version__} Python/{sys.version_info[0]}.{sys.version_info[1]}"
#: Header names whose values never appear in logs or reprs.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

_NO_NAMES: frozenset[str] = frozenset()

HeadersLike = Union["Headers", Mapping[str, str], Iterable[tuple[str, str]]]


class Headers(MutableMapping[str, str]):
    """Case-insensitive, order-keeping HTTP headers; a name may repeat.

    ``h["X"]`` gets the first value (``KeyError`` if absent), ``h["X"] = v``
    replaces every ``X`` with one value, :meth:`add` appends another value,
    and :meth:`get_all` lists them. ``repr()`` hides credentials.

    Credentials: the values of :data:`SENSITIVE_HEADERS` and of any name given
    to :meth:`mark_sensitive` never appear in logs or reprs, and over HTTP/2
    they are sent as never-indexed fields (RFC 7541 section 7.1.3), which no
    proxy may add to a compression table.
    """

    def __init__(self, items: HeadersLike | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        # Immutable, so that copies share it, and unmarked ones share one
        # empty set (216 B each otherwise: an idle socket keeps two Headers).
        self._sensitive: frozenset[str] = _NO_NAMES
        if items is None:
            return
        # Lists first, and None before any test: isinstance against an ABC
        # (Mapping, and Headers, a MutableMapping) runs Python code under a C
        # call, which on a reader thread (a response's headers) took its
        # stack deeper than anything else (see transport.is_ip_literal).
        if isinstance(items, (list, tuple)):
            pairs: Iterable[tuple[str, str]] = items
        elif isinstance(items, Headers):
            # A Headers is a Mapping too, but its items() keep only the first
            # value of a repeated name: copy every pair instead.
            self._sensitive = items._sensitive
            pairs = items.raw_items()
        elif isinstance(items, Mapping):
            pairs = items.items()
        else:
            pairs = items
        for name, value in pairs:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        if not name or any(c in name for c in ":\r\n \t"):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} has a line break in its value")
        self._items.append((name, value))

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def raw_items(self) -> list[tuple[str, str]]:
        """Every ``(name, value)`` pair in order, names as given."""
        return list(self._items)

    def __getitem__(self, name: str) -> str:
        key = name.lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        raise KeyError(name)

    def __setitem__(self, name: str, value: str) -> None:
        del self[name]
        self.add(name, value)

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for n, _ in self._items:
            if n.lower() not in seen:
                seen.add(n.lower())
                yield n

    def __len__(self) -> int:
        return len({n.lower() for n, _ in self._items})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self._items)

    def mark_sensitive(self, *names: str) -> None:
        """Treat these headers as credentials too (``headers.mark_sensitive("X-Api-Key")``):
        their values are redacted in logs and reprs, and sent never-indexed over HTTP/2."""
        self._sensitive = self._sensitive.union(name.lower() for name in names)

    def is_sensitive(self, name: str) -> bool:
        """Whether ``name``'s values are credentials (built in, or marked)."""
        key = name.lower()
        return key in SENSITIVE_HEADERS or key in self._sensitive

    def redacted(self) -> list[tuple[str, str]]:
        """Pairs safe to log: credential values replaced by ``"<redacted>"``."""
        return [(n, "<redacted>" if self.is_sensitive(n) else v) for n, v in self._items]

    def __repr__(self) -> str:
        return f"Headers({self.redacted()!r})"


@dataclass(frozen=True)
class WSURL:
    """A parsed ``ws://`` or ``wss://`` URL."""

    secure: bool
    host: str
    port: int
    resource: str  # path and query, at least "/"
    user: str | None = field(default=None, repr=False)  # may be a token: never shown
    password: str | None = field(default=None, repr=False)

    @property
    def authority(self) -> str:
        """``host[:port]`` for the Host header; the default port is left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin_key(self) -> tuple[str, str, int]:
        return ("wss" if self.secure else "ws", self.host.lower(), self.port)


def parse_url(url: str) -> WSURL:
    """Parse and check a WebSocket URL; raises :class:`InvalidURL` (a ``ValueError``)."""
    if not isinstance(url, str):
        raise InvalidURL(f"URL must be a str, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"invalid URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise InvalidURL(
            f"URL scheme must be ws or wss, not {parts.scheme!r}: {redact_url(url)!r}"
        )
    if parts.fragment or "#" in url:  # an empty fragment is still a fragment
        raise InvalidURL(f"a WebSocket URL cannot have a fragment: {redact_url(url)!r}")
    host = parts.hostname
    if not host:
        raise InvalidURL(f"URL has no host: {redact_url(url)!r}")
    secure = scheme == "wss"
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return WSURL(
        secure=secure,
        host=host,
        port=port if port is not None else (443 if secure else 80),
        resource=resource,
        user=parts.username,
        password=parts.password,
    )


@dataclass
class Request:
    """The opening handshake request (``ws.internal_request``).

    Edit ``headers`` (case-insensitive, mutable), ``subprotocols`` or
    ``origin`` before ``open()``; changes after ``open()`` have no effect on
    the request already sent. The ``Host``, ``Upgrade``, ``Connection``,
    ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version`` and
    ``Sec-WebSocket-Extensions`` headers are written by blockws and cannot be
    overridden here.
    """

    url: str
    headers: Headers = field(default_factory=Headers)
    subprotocols: list[str] = field(default_factory=list)
    origin: str | None = None
    #: Seconds for connecting plus the opening handshake.
    open_timeout: float | None = 10.0
    #: Seconds the closing handshake may take before the link is dropped.
    close_timeout: float | None = 5.0
    #: The HTTP version that carried this request: ``"2"`` once an RFC 8441
    #: stream opened with it, else ``"1.1"``.
    http_version: str = "1.1"
    #: Sent as ``User-Agent`` unless ``headers`` has one; ``None`` sends none.
    #: A socket's requests carry its ``user_agent`` option (by default
    #: :data:`DEFAULT_USER_AGENT`).
    user_agent: str | None = None
    _parsed: tuple[str, WSURL] | None = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # The URL's userinfo and the credential headers are secrets (issue 11).
        return (
            f"Request(url={redact_url(self.url)!r}, headers={self.headers!r}, "
            f"subprotocols={self.subprotocols!r}, origin={self.origin!r}, "
            f"open_timeout={self.open_timeout!r}, close_timeout={self.close_timeout!r}, "
            f"http_version={self.http_version!r})"
        )

    @property
    def parsed_url(self) -> WSURL:
        """``url`` parsed and checked (:func:`parse_url`), once per value of ``url``."""
        parsed = self._parsed
        if parsed is None or parsed[0] != self.url:
            parsed = self._parsed = (self.url, parse_url(self.url))
        return parsed[1]


_RESERVED_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "transfer-encoding",
    }
)


def new_key() -> str:
    """A fresh random ``Sec-WebSocket-Key`` (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for ``key`` (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1((key + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def offer_headers(request: Request, extensions: Sequence[Extension] = ()) -> list[tuple[str, str]]:
    """The headers both HTTP versions send besides their own framing ones.

    Subprotocols, extension offers, ``Origin``, ``User-Agent`` (unless the
    user's headers have one), ``Authorization`` from URL userinfo, then the
    user's headers (which may not override the ones
    blockws writes: ``ValueError``).
    """
    url = request.parsed_url
    headers: list[tuple[str, str]] = []
    if request.subprotocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(request.subprotocols)))
    if extensions:
        headers.append(("Sec-WebSocket-Extensions", ", ".join(e.offer() for e in extensions)))
    if request.origin is not None and "origin" not in request.headers:
        headers.append(("Origin", request.origin))
    if request.user_agent is not None and "user-agent" not in request.headers:
        headers.append(("User-Agent", request.user_agent))
    if url.user is not None and "authorization" not in request.headers:
        # Userinfo is percent-encoded in the URL (RFC 3986 3.2.1): "p%40ss" is "p@ss".
        creds = f"{unquote(url.user)}:{unquote(url.password or '')}".encode()
        headers.append(("Authorization", "Basic " + base64.b64encode(creds).decode("ascii")))
    for name, value in request.headers.raw_items():
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by blockws and cannot be overridden")
        headers.append((name, value))
    return headers


def build_request(request: Request, key: str, extensions: Sequence[Extension] = ()) -> bytes:
    """Serialize ``request`` as an HTTP/1.1 upgrade request with ``key``."""
    url = request.parsed_url
    lines = [
        f"GET {url.resource} HTTP/1.1",
        f"Host: {url.authority}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines.extend(f"{name}: {value}" for name, value in offer_headers(request, extensions))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Response:
    """The server's answer to the upgrade request."""

    status: int
    reason: str
    headers: Headers
    #: Whatever followed the header block in the same reads: WebSocket frames.
    extra: bytes = b""


class ResponseReader:
    """Accumulates the response head; :meth:`feed` returns it once complete.

    Raises :class:`HeadersTooLarge` past ``limit`` bytes without the blank
    line that ends the head, and :class:`InvalidHeader` for a malformed head.
    """

    def __init__(self, limit: int = MAX_RESPONSE_HEAD) -> None:
        self.limit = limit
        self._buf = b""

    def feed(self, data: bytes) -> Response | None:
        # Search only the new bytes (and 3 before them, for a split "\r\n\r\n"),
        # so a head trickled in byte by byte costs linear time.
        start = max(0, len(self._buf) - 3)
        self._buf += data
        end = self._buf.find(b"\r\n\r\n", start)
        if end < 0:
            # A head of up to ``limit`` bytes may still be followed by its
            # "\r\n\r\n", of which 3 bytes may be here already: the same head
            # must pass or fail however TCP cut it (found by benchmarks/fuzz).
            if len(self._buf) > self.limit + 3:
                raise HeadersTooLarge(f"response head exceeds {self.limit} bytes")
            return None
        if end > self.limit:
            raise HeadersTooLarge(f"response head exceeds {self.limit} bytes")
        head, extra = self._buf[:end], self._buf[end + 4 :]
        return parse_response_head(head, extra)


def parse_response_head(head: bytes, extra: bytes = b"") -> Response:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or len(status_text) != 3
        or not status_text.isascii()  # "¹01" passes isdigit() but not int() (fuzz)
        or not status_text.isdigit()
    ):
        raise InvalidHeader(f"malformed status line {lines[0][:100]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise InvalidHeader(f"malformed header line {line[:100]!r}")
        try:
            headers.add(name, value.strip())
        except ValueError as exc:
            raise InvalidHeader(str(exc)) from None
    return Response(int(status_text), reason, headers, extra)


def _tokens(headers: Headers, name: str) -> list[str]:
    return [t.strip().lower() for v in headers.get_all(name) for t in v.split(",") if t.strip()]


def validate_response(
    response: Response,
    key: str,
    subprotocols: Sequence[str],
    extensions: Sequence[Extension],
) -> tuple[str | None, list[Extension]]:
    """Check a response against the request (RFC 6455 section 4.1).

    Returns ``(subprotocol or None, accepted extensions in the server's
    order)``. Raises :class:`InvalidStatus` for a status other than 101,
    :class:`InvalidHeader` for a missing or wrong ``Upgrade``, ``Connection``
    or ``Sec-WebSocket-Accept``, and :class:`NegotiationError` for a
    subprotocol or extension that was not offered.
    """
    h = response.headers
    if response.status != 101:
        raise InvalidStatus(response.status, response.reason, h, response.extra[:1024])
    if "websocket" not in _tokens(h, "Upgrade"):
        raise InvalidHeader(f"Upgrade header is {h.get('Upgrade')!r}, not 'websocket'")
    if "upgrade" not in _tokens(h, "Connection"):
        raise InvalidHeader(f"Connection header is {h.get('Connection')!r}, not 'Upgrade'")
    accepts = h.get_all("Sec-WebSocket-Accept")
    if len(accepts) != 1:
        raise InvalidHeader(
            "Sec-WebSocket-Accept header missing"
            if not accepts
            else "Sec-WebSocket-Accept repeated"
        )
    if accepts[0].strip() != accept_key(key):
        raise InvalidHeader("Sec-WebSocket-Accept does not match the Sec-WebSocket-Key sent")
    return negotiate(h, subprotocols, extensions)


def negotiate(
    h: Headers, subprotocols: Sequence[str], extensions: Sequence[Extension]
) -> tuple[str | None, list[Extension]]:
    """Check the subprotocol and extensions a server chose (HTTP/1.1 or HTTP/2).

    Returns ``(subprotocol or None, accepted extensions in the server's
    order)``; raises :class:`NegotiationError` for anything not offered.
    """
    protocol: str | None = None
    chosen = [t.strip() for v in h.get_all("Sec-WebSocket-Protocol") for t in v.split(",")]
    chosen = [t for t in chosen if t]
    if len(chosen) > 1:
        raise NegotiationError(f"server selected several subprotocols: {chosen}")
    if chosen:
        if chosen[0] not in subprotocols:
            raise NegotiationError(
                f"server selected subprotocol {chosen[0]!r}, which was not offered"
            )
        protocol = chosen[0]

    accepted: list[Extension] = []
    offered = {e.name: e for e in extensions}
    for value in h.get_all("Sec-WebSocket-Extensions"):
        try:
            items = parse_extension_header(value)
        except ValueError as exc:
            raise NegotiationError(str(exc)) from None
        for name, params in items:
            ext = offered.pop(name, None)
            if ext is None:
                raise NegotiationError(
                    f"server accepted extension {name!r}, which was not offered (or accepted twice)"
                )
            ext.accept(params)
            accepted.append(ext)
    return protocol, accepted


#: A URL's userinfo: everything before the last "@" of its authority.
_USERINFO = re.compile(r"^(?:[^:/?#]*://)?([^/?#]*)@")


def redact_url(url: str) -> str:
    """``url`` safe to show: a password in its userinfo becomes ``<redacted>``,
    and so does a user part with no password (often a token, ``wss://TOKEN@host``).
    Works on any string, parseable or not."""
    if not isinstance(url, str):
        return repr(url)
    match = _USERINFO.match(url)
    if match is None:
        return url
    user, colon, _ = match.group(1).partition(":")
    safe = f"{user}:<redacted>" if colon else "<redacted>"
    return url[: match.start(1)] + safe + url[match.end(1) :]
