"""Proxies: which one a socket goes through (the tunnel itself is :mod:`blockws.tunnel`).

The ``proxy=`` option is read when each request is sent, so a redirect to
another host is judged again:

* ``True`` (the default): the environment. For a ``wss://`` URL the first
  of ``wss_proxy``, ``https_proxy``, ``all_proxy`` that is set and not
  empty; for ``ws://``, ``ws_proxy``, ``http_proxy``, ``all_proxy``. The
  lower-case name wins over the upper-case one (``HTTPS_PROXY``), as in
  curl and urllib; ``HTTP_PROXY`` is ignored when ``REQUEST_METHOD`` is set
  (a CGI script, where a client's ``Proxy:`` header lands there: "httpoxy").
  A value without a scheme is an ``http://`` proxy. ``no_proxy`` (or
  ``NO_PROXY``) lists hosts reached directly; see :func:`bypasses_proxy`.
  Loopback addresses are not exempt unless listed (as curl and requests).
* a URL (or a :class:`Proxy`): always that proxy, ``no_proxy`` aside:
  ``http://``, ``https://``, ``socks5://``, ``socks5h://`` or ``socks4://``,
  with ``user:password@`` (percent-encoded) when the proxy wants them.
* ``None`` or ``False``: no proxy.

Credentials never appear in a message, ``repr`` or log record: they are
printed as ``<credentials>``. Nothing here does I/O; a :class:`Proxy` is
immutable in use and safe to share between threads.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Union
from urllib.parse import unquote, urlsplit

from .exceptions import InvalidURL
from .handshake import WSURL

__all__ = [
    "Proxy",
    "bypasses_proxy",
    "check_proxy_option",
    "choose_proxy",
    "proxy_from_environment",
]

#: Default port per proxy scheme (as urllib3: the scheme's own, 1080 for SOCKS).
DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "socks5": 1080,
    "socks5h": 1080,
    "socks4": 1080,
}

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Proxy:
    """A proxy URL, parsed and checked; ``repr`` and ``str`` hide its credentials.

    >>> p = Proxy.from_url("http://alice:s3cret@proxy.example:3128")
    >>> p
    Proxy('http://<credentials>@proxy.example:3128')
    >>> p.scheme, p.host, p.port, p.username
    ('http', 'proxy.example', 3128, 'alice')
    >>> Proxy.from_url("ftp://proxy.example")
    Traceback (most recent call last):
    blockws.exceptions.InvalidURL: proxy URL scheme must be http, https, socks5, socks5h \
or socks4, not 'ftp': 'ftp://proxy.example'
    """

    __slots__ = ("scheme", "host", "port", "username", "password")

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.username = username
        self.password = password

    @classmethod
    def from_url(cls, url: str, *, default_scheme: str | None = None) -> Proxy:
        """Parse ``url``; :class:`~blockws.exceptions.InvalidURL` (a ``ValueError``)
        when it is not a usable proxy URL (the message leaves out credentials).

        ``default_scheme`` is assumed when ``url`` has none (``host:port`` in
        an environment variable).
        """
        if not isinstance(url, str):
            raise TypeError(f"proxy must be a URL str, True or None, not {type(url).__name__}")
        text = url.strip()
        if default_scheme is not None and "://" not in text:
            text = f"{default_scheme}://{text}"
        shown = _redact_url_text(text)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidURL(f"invalid proxy URL {shown!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            *first, last = DEFAULT_PORTS
            names = f"{', '.join(first)} or {last}"
            raise InvalidURL(
                f"proxy URL scheme must be {names}, not {parts.scheme!r}: {shown!r}"
            )
        if not parts.hostname:
            raise InvalidURL(f"proxy URL has no host: {shown!r}")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme],
            username, password,
        )

    @property
    def has_credentials(self) -> bool:
        return self.username is not None or self.password is not None

    @property
    def redacted(self) -> str:
        """The URL with ``<credentials>`` in place of any user name and password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        creds = "<credentials>@" if self.has_credentials else ""
        return f"{self.scheme}://{creds}{host}:{self.port}"

    def _key(self) -> tuple[str, str, int, str | None, str | None]:
        return (self.scheme, self.host.lower(), self.port, self.username, self.password)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Proxy) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Proxy({self.redacted!r})"

    def __str__(self) -> str:
        return self.redacted


def _redact_url_text(text: str) -> str:
    """``text`` with its userinfo hidden, for messages about a URL that did not parse."""
    return re.sub(r"(://)[^/@]*@", r"\1<credentials>@", text)


def check_proxy_option(value: object) -> Proxy | bool | None:
    """The ``proxy=`` option: ``True`` (environment), ``None``/``False`` (none),
    a URL str or a :class:`Proxy`. Raises ``TypeError`` or ``InvalidURL``."""
    if value is None or value is False:
        return None
    if value is True or isinstance(value, Proxy):
        return value
    if isinstance(value, str):
        return Proxy.from_url(value)
    raise TypeError(f"proxy must be a URL str, True or None, not {type(value).__name__}")


# -- the environment -------------------------------------------------------------------


def _getenv(environ: Mapping[str, str], name: str) -> str:
    """``name`` (lower case first, then upper case), stripped; "" when unset."""
    value = environ.get(name, "").strip()
    if value:
        return value
    upper = name.upper()
    if upper == "HTTP_PROXY" and "REQUEST_METHOD" in environ:
        return ""  # CGI: HTTP_PROXY may come from a client's "Proxy:" header (httpoxy)
    return environ.get(upper, "").strip()


def proxy_from_environment(
    url: WSURL, environ: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy the environment names for ``url``, or ``None`` (see the module docstring).

    >>> from blockws.handshake import parse_url
    >>> env = {"https_proxy": "proxy:3128", "no_proxy": ".internal"}
    >>> proxy_from_environment(parse_url("wss://example.com/"), env)
    Proxy('http://proxy:3128')
    >>> proxy_from_environment(parse_url("wss://db.internal/"), env) is None
    True
    """
    env = os.environ if environ is None else environ
    names = ("wss_proxy", "https_proxy") if url.secure else ("ws_proxy", "http_proxy")
    for name in (*names, "all_proxy"):
        value = _getenv(env, name)
        if value:
            break
    else:
        return None
    if bypasses_proxy(url.host, url.port, _getenv(env, "no_proxy")):
        return None
    try:
        return Proxy.from_url(value, default_scheme="http")
    except InvalidURL as exc:
        raise InvalidURL(f"{exc} (from the {name} environment variable)") from None


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma- or space-separated) sends ``host:port`` direct.

    Each entry, case-insensitive:

    * ``*`` matches every host;
    * a name matches itself and its subdomains (``example.com``,
      ``.example.com`` and ``*.example.com`` all match ``example.com`` and
      ``a.example.com``, not ``badexample.com``);
    * an IP address matches that address (``::1`` and ``[::1]`` alike);
    * a CIDR block (``10.0.0.0/8``, ``fd00::/8``) matches the addresses in it.
      Names are not resolved to be compared with addresses (as curl);
    * any of them with ``:port`` matches that port only.

    >>> bypasses_proxy("api.example.com", 443, "localhost, .example.com")
    True
    >>> bypasses_proxy("10.1.2.3", 80, "10.0.0.0/8")
    True
    >>> bypasses_proxy("example.org", 443, "example.com:443,10.0.0.0/8")
    False
    """
    host = host.lower().strip("[]").rstrip(".")
    address = _ip(host)
    for raw in re.split(r"[\s,]+", no_proxy.lower()):
        if not raw:
            continue
        if raw == "*":
            return True
        entry, entry_port = _split_port(raw)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        entry_address = _ip(entry)
        if entry_address is not None:
            if address is not None and address == entry_address:
                return True
            continue
        name = entry.lstrip("*").lstrip(".").rstrip(".")
        if name and address is None and (host == name or host.endswith("." + name)):
            return True
    return False


def choose_proxy(
    setting: Proxy | bool | None, url: WSURL, environ: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy for a request to ``url`` under the ``proxy=`` ``setting``, or ``None``."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return proxy_from_environment(url, environ)
    return setting
