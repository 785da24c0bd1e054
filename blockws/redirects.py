"""Redirects of the opening handshake: which to follow, where to, with what.

RFC 6455 section 4.1 lets a client follow a redirect of the upgrade request.
:func:`follow_redirects` runs the opening once per hop: when the server
answers 301, 302, 303, 307 or 308 with a ``Location``, the next hop is a
**new** request to that URL (made by the socket, so its
``on_internal_request_created`` hook sees it), over a new connection
(through the proxy the new host calls for). The method stays ``GET`` for
every status, so the five are alike here.

* ``Location`` may be relative, or absolute with ``ws``, ``wss``, ``http``
  or ``https`` (``http`` counts as ``ws``, ``https`` as ``wss``); a
  fragment is dropped.
* ``wss`` to ``ws`` is refused: a redirect never takes TLS away.
* Credentials (``Authorization`` and ``Cookie`` headers, and URL userinfo)
  go on only to the same origin, or from ``ws`` on port 80 to ``wss`` on
  port 443 of the same host (as requests does); once dropped they stay
  dropped for the rest of the chain. On the same origin, userinfo of the
  previous URL is carried to a ``Location`` without any.
* More than ``max_redirects`` hops, or a URL seen before in the chain,
  raises :class:`~blockws.exceptions.InvalidStatus` with the chain in its
  message (and in ``chain``).

Runs on the socket's connecting thread; the socket's ``open_timeout``
bounds the whole chain, and ``close()`` ends it (the connector is aborted).
"""

from __future__ import annotations

from typing import Callable, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

from .exceptions import HTTP2Unavailable, InvalidStatus
from .handshake import WSURL, Headers, Request, parse_url, redact_url
from .log import ContextAdapter

__all__ = [
    "REDIRECT_STATUSES",
    "DEFAULT_MAX_REDIRECTS",
    "follow_redirects",
    "resolve_location",
    "keeps_credentials",
    "strip_credentials",
]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_MAX_REDIRECTS = 10
#: Headers that carry credentials for one origin.
CREDENTIAL_HEADERS = ("Authorization", "Cookie")

T = TypeVar("T")

_TO_HTTP = {"ws": "http", "wss": "https"}
_TO_WS = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def _status_error(exc: BaseException) -> InvalidStatus | None:
    """The redirect response behind ``exc``, if it is one (HTTP/1.1 or HTTP/2)."""
    if isinstance(exc, HTTP2Unavailable):
        exc = exc.cause  # type: ignore[assignment]
    if isinstance(exc, InvalidStatus) and exc.status in REDIRECT_STATUSES:
        return exc
    return None


def _location(error: InvalidStatus) -> str | None:
    headers = error.headers
    if isinstance(headers, Headers):
        value = headers.get("Location")
        if value and value.strip():
            return value.strip()
    return None


def _describe(error: InvalidStatus) -> str:
    return f"HTTP {error.status} {error.reason}".rstrip()


def resolve_location(current: str, location: str) -> str:
    """The URL ``location`` points to from ``current``, as a ``ws``/``wss`` URL.

    Raises :class:`~blockws.exceptions.InvalidURL` for a scheme other than
    ``ws``, ``wss``, ``http``, ``https`` or a URL that does not parse.

    >>> resolve_location("ws://a.example/x/y", "../z?q=1")
    'ws://a.example/z?q=1'
    >>> resolve_location("ws://a.example/", "https://b.example:8443/ws#frag")
    'wss://b.example:8443/ws'
    """
    parts = urlsplit(current)
    base = urlunsplit((_TO_HTTP[parts.scheme.lower()], *parts[1:]))
    joined = urlsplit(urljoin(base, location))
    scheme = _TO_WS.get(joined.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported scheme {joined.scheme!r}")
    url = urlunsplit((scheme, joined.netloc, joined.path or "/", joined.query, ""))
    parse_url(url)  # InvalidURL (a ValueError) when unusable
    return url


def keeps_credentials(old: WSURL, new: WSURL) -> bool:
    """Whether credentials meant for ``old`` may go to ``new`` (see the module docstring)."""
    if old.origin_key == new.origin_key:
        return True
    return (
        old.host.lower() == new.host.lower()
        and not old.secure
        and old.port == 80
        and new.secure
        and new.port == 443
    )


def _with_userinfo(url: str, userinfo: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _userinfo(url: str) -> str | None:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[0] if "@" in netloc else None


def strip_credentials(request: Request) -> None:
    """Remove ``Authorization`` and ``Cookie`` from ``request``'s headers."""
    for name in CREDENTIAL_HEADERS:
        del request.headers[name]


def follow_redirects(
    request: Request,
    *,
    max_redirects: int,
    open_hop: Callable[[Request], T],
    next_request: Callable[[str, bool], Request] | None,
    log: ContextAdapter,
) -> T:
    """Open ``request`` with ``open_hop``, following redirects (module docstring).

    ``next_request(url, keep_credentials)`` makes each hop's request (and
    runs the socket's hook on it); ``keep_credentials`` is False once the
    chain has left the first request's origin. Returns what ``open_hop``
    returns; raises what it raises, or :class:`InvalidStatus` for a redirect
    that is not followed.
    """
    chain = [request.url]
    seen = {_hop_key(request.parsed_url)}
    keep = True
    while True:
        try:
            return open_hop(request)
        except (InvalidStatus, HTTP2Unavailable) as exc:
            error = _status_error(exc)
            location = _location(error) if error is not None else None
            if error is None or location is None or max_redirects == 0 or next_request is None:
                raise
        shown = " -> ".join(redact_url(u) for u in chain)
        try:
            target = resolve_location(request.url, location)
        except ValueError as exc:
            why = f"cannot follow the redirect to {redact_url(location)!r} ({exc})"
            raise _refusal(error, chain, why) from None
        old, new = request.parsed_url, parse_url(target)
        if old.secure and not new.secure:
            raise _refusal(
                error, chain, f"refused a redirect from wss to ws ({redact_url(target)}): "
                "it would drop TLS",
            )
        if _hop_key(new) in seen:
            raise _refusal(
                error, [*chain, target], f"redirect loop: {shown} -> {redact_url(target)}"
            )
        if len(chain) > max_redirects:
            raise _refusal(
                error, [*chain, target],
                f"too many redirects (max_redirects={max_redirects}): "
                f"{shown} -> {redact_url(target)}",
            )
        keep = keep and keeps_credentials(old, new)
        userinfo = _userinfo(request.url)
        if keep and userinfo is not None and new.user is None:
            target = _with_userinfo(target, userinfo)
        elif not keep and new.user is not None and "@" not in urlsplit(location).netloc:
            target = _without_userinfo(target)  # inherited by a relative Location
        log.info("following %s to %s", _describe(error), redact_url(target))
        request = next_request(target, keep)
        chain.append(request.url)
        seen.add(_hop_key(request.parsed_url))


def _hop_key(url: WSURL) -> tuple[bool, str, int, str]:
    return (url.secure, url.host.lower(), url.port, url.resource)


def _refusal(error: InvalidStatus, chain: list[str], why: str) -> InvalidStatus:
    urls = tuple(redact_url(u) for u in chain)
    return InvalidStatus(
        error.status,
        error.reason,
        error.headers,
        error.body,
        message=f"server redirected the WebSocket upgrade ({_describe(error)}), {why}",
        chain=urls,
    )
