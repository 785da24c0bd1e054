"""Proxies: which one a socket goes through, and the tunnel it opens there.

Which proxy (the ``proxy=`` option, read when each request is sent, so a
redirect to another host is judged again):

* ``True`` (the default): the environment. For a ``wss://`` URL the first
  of ``wss_proxy``, ``https_proxy``, ``all_proxy`` that is set and not
  empty; for ``ws://``, ``ws_proxy``, ``http_proxy``, ``all_proxy``. The
  lower-case name wins over the upper-case one (``HTTPS_PROXY``), as in
  curl and urllib; ``HTTP_PROXY`` is ignored when ``REQUEST_METHOD`` is set
  (a CGI script, where a client's ``Proxy:`` header lands there: "httpoxy").
  A value without a scheme is an ``http://`` proxy. ``no_proxy`` (or
  ``NO_PROXY``) lists hosts reached directly; see :func:`bypasses_proxy`.
* a URL (or a :class:`Proxy`): always that proxy, ``no_proxy`` aside.
* ``None`` or ``False``: no proxy.

How (:class:`ProxyTunnel`, the :class:`~blockws.transport.Tunnel` the
opening hands its :class:`~blockws.transport.Connector`):

* ``http://[user:pass@]host[:port]``: HTTP ``CONNECT host:port`` (RFC 9110
  section 9.3.6), with ``Proxy-Authorization: Basic`` when the URL has
  credentials. A ``wss://`` server's TLS (and its ALPN, so HTTP/2 too)
  runs inside the tunnel, end to end; a ``ws://`` server's bytes go through
  as they are.
* ``https://...``: the same, over TLS to the proxy (verified with the
  ``proxy_ssl_context`` option, default blockws's own trust). A ``wss://``
  server's TLS then runs inside that TLS (:class:`TLSInTLSTransport`).
* ``socks5://`` (names resolved here), ``socks5h://`` (resolved by the
  proxy), ``socks4://`` (resolved here, IPv4 only): through the optional
  `python-socks <https://pypi.org/project/python-socks/>`_ package
  (``pip install 'blockws[socks]'``); without it, opening raises
  :class:`~blockws.exceptions.ProxyError` saying so.

A proxy that refuses raises :class:`~blockws.exceptions.ProxyError`
(``status`` holds its HTTP status or SOCKS reply code), and the socket ends
with ``on_closed`` 1006. Credentials never appear in a message, ``repr``
or log record: they are printed as ``<credentials>``.

Threads: everything here runs on the socket's connecting thread. A
``close()`` meanwhile aborts the connector, which ends a wait for the proxy
at once; ``open_timeout`` bounds the whole of it.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Union
from urllib.parse import unquote, urlsplit

from .deadline import Deadline
from .exceptions import (
    BlockwsError,
    ConnectionLost,
    InvalidHeader,
    InvalidURL,
    OpenTimeout,
    ProxyError,
)
from .handshake import WSURL, ResponseReader
from .transport import (
    RECV_SMALL,
    BytesLike,
    Connector,
    TCPTransport,
    Transport,
    map_os_errors,
    os_error,
)

__all__ = [
    "Proxy",
    "ProxyTunnel",
    "TLSInTLSTransport",
    "bypasses_proxy",
    "check_proxy_option",
    "proxy_from_environment",
    "tunnel_for",
]

#: Default port per proxy scheme (as urllib3: the scheme's own, 1080 for SOCKS).
DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "socks5": 1080,
    "socks5h": 1080,
    "socks4": 1080,
}
#: Bound on the proxy's answer to CONNECT (status line and headers).
MAX_CONNECT_RESPONSE = 16 * 1024

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
            names = ", ".join(DEFAULT_PORTS)
            names = names.rsplit(", ", 1)[0] + " or " + names.rsplit(", ", 1)[1]
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


def tunnel_for(
    setting: Proxy | bool | None,
    url: WSURL,
    proxy_ssl_context: ssl.SSLContext | None,
    environ: Mapping[str, str] | None = None,
) -> ProxyTunnel | None:
    """The route for a request to ``url`` under the ``proxy=`` ``setting``."""
    if setting is None or setting is False:
        return None
    proxy = proxy_from_environment(url, environ) if setting is True else setting
    if proxy is None or isinstance(proxy, bool):
        return None
    return ProxyTunnel(proxy, proxy_ssl_context)


# -- the tunnel ------------------------------------------------------------------------


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProxyTunnel:
    """Reaches hosts through one proxy (a :class:`~blockws.transport.Tunnel`).

    ``proxy_ssl_context`` verifies an ``https://`` proxy; it must be given
    for one (the opening passes blockws's default context when the option
    is unset).
    """

    def __init__(self, proxy: Proxy, proxy_ssl_context: ssl.SSLContext | None = None) -> None:
        self.proxy = proxy
        self.proxy_ssl_context = proxy_ssl_context

    @property
    def key(self) -> tuple[Proxy, int]:
        return (self.proxy, id(self.proxy_ssl_context))

    def __repr__(self) -> str:
        return f"<ProxyTunnel {self.proxy.redacted}>"

    def open(
        self,
        connector: Connector,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> Transport:
        """A transport to ``host:port`` through the proxy, with TLS to the host
        inside when ``ssl_context`` is given. Raises :class:`ProxyError` when
        the proxy refuses, ``ConnectError`` when it cannot be reached."""
        if self.proxy.scheme in ("http", "https"):
            return self._open_connect(connector, host, port, deadline, ssl_context, server_hostname)
        return self._open_socks(connector, host, port, deadline, ssl_context, server_hostname)

    # -- HTTP CONNECT -------------------------------------------------------------------

    def _open_connect(
        self,
        connector: Connector,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> Transport:
        proxy = self.proxy
        over_tls = proxy.scheme == "https"
        if over_tls and self.proxy_ssl_context is None:
            raise ProxyError(
                f"an https:// proxy needs a TLS context: {proxy.redacted}", proxy=proxy.redacted
            )
        outer = connector.connect_direct(
            proxy.host, proxy.port, deadline, self.proxy_ssl_context if over_tls else None
        )
        try:
            self._connect_request(outer, host, port, deadline)
        except BaseException:
            outer.abort()
            outer.close()
            raise
        if ssl_context is None:
            outer.alpn_protocol = None  # the proxy's ALPN, not the server's
            return outer
        if not over_tls:
            return connector.start_tls(outer.sock, deadline, ssl_context, server_hostname or host)
        try:
            return TLSInTLSTransport(outer, ssl_context, server_hostname or host, deadline)
        except BaseException:
            outer.abort()
            outer.close()
            if connector.aborted:
                raise ConnectionLost("connection aborted by close()") from None
            raise

    def _connect_request(
        self, outer: TCPTransport, host: str, port: int, deadline: Deadline
    ) -> None:
        """Send ``CONNECT`` and read the proxy's answer: returns on 2xx."""
        proxy = self.proxy
        target = _authority(host, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.has_credentials:
            creds = f"{proxy.username or ''}:{proxy.password or ''}".encode()
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(creds).decode("ascii"))
        outer.write([("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")])
        reader = ResponseReader(MAX_CONNECT_RESPONSE)
        response = None
        try:
            while response is None:
                data = outer.recv(deadline.remaining())
                if not data:
                    if outer.aborted:
                        raise ConnectionLost("connection aborted by close()")
                    raise ProxyError(
                        f"proxy {proxy.redacted} closed the connection before answering "
                        f"CONNECT {target}",
                        proxy=proxy.redacted,
                    )
                response = reader.feed(data)
        except OpenTimeout:
            raise OpenTimeout(f"timed out waiting for proxy {proxy.redacted} to answer") from None
        except InvalidHeader as exc:  # a malformed or oversized answer
            raise ProxyError(
                f"proxy {proxy.redacted} sent an invalid answer to CONNECT: {exc}",
                proxy=proxy.redacted,
            ) from None
        status, reason = response.status, response.reason
        if not 200 <= status < 300:
            hint = ""
            if status == 407:
                hint = (
                    ": the proxy wants credentials (give them in the proxy URL)"
                    if not proxy.has_credentials
                    else ": the proxy did not accept the credentials"
                )
            raise ProxyError(
                f"proxy {proxy.redacted} refused CONNECT {target}: HTTP {status} {reason}{hint}",
                status=status,
                reason=reason,
                proxy=proxy.redacted,
            )
        if response.extra:
            # Nothing may follow the answer: the server has not been sent anything yet.
            raise ProxyError(
                f"proxy {proxy.redacted} sent data after its answer to CONNECT",
                status=status,
                reason=reason,
                proxy=proxy.redacted,
            )

    # -- SOCKS --------------------------------------------------------------------------

    def _open_socks(
        self,
        connector: Connector,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> Transport:
        proxy = self.proxy
        try:
            from python_socks import ProxyError as SocksError
            from python_socks import ProxyTimeoutError, ProxyType
            from python_socks.sync import Proxy as SocksProxy
        except ImportError:
            raise ProxyError(
                f"a {proxy.scheme}:// proxy needs the python-socks package: "
                "pip install 'blockws[socks]'",
                proxy=proxy.redacted,
            ) from None
        kind = ProxyType.SOCKS5 if proxy.scheme.startswith("socks5") else ProxyType.SOCKS4
        socks = SocksProxy(
            kind,
            proxy.host,
            proxy.port,
            proxy.username,
            proxy.password,
            rdns=proxy.scheme == "socks5h",
            # python-socks reaches the proxy through its "forward" hop: ours
            # connects with the connector, so close() can abort the wait.
            forward=_ConnectorHop(connector, deadline),  # type: ignore[arg-type]
        )
        try:
            sock = socks.connect(host, port, timeout=deadline.remaining())
        except ProxyTimeoutError:
            raise OpenTimeout(f"timed out waiting for proxy {proxy.redacted}") from None
        except SocksError as exc:
            if connector.aborted:
                raise ConnectionLost("connection aborted by close()") from None
            code = getattr(exc, "error_code", None)
            raise ProxyError(
                f"proxy {proxy.redacted} refused to connect to {_authority(host, port)}: "
                f"{_safe_text(exc, proxy)}",
                status=code if isinstance(code, int) else None,
                reason=_safe_text(exc, proxy),
                proxy=proxy.redacted,
            ) from None
        except BlockwsError:
            raise  # from our hop to the proxy (ConnectError, OpenTimeout)
        except OSError as exc:
            raise os_error(exc, connecting=True) from exc
        if ssl_context is None:
            return TCPTransport(sock)
        return connector.start_tls(sock, deadline, ssl_context, server_hostname or host)


def _safe_text(exc: BaseException, proxy: Proxy) -> str:
    """``str(exc)`` without the proxy's credentials, should a library put them there."""
    text = str(exc)
    for secret in (proxy.password, proxy.username):
        if secret:
            text = text.replace(secret, "<credentials>")
    return text


class _ConnectorHop:
    """python-socks's ``forward`` interface: the TCP connection to the proxy."""

    def __init__(self, connector: Connector, deadline: Deadline) -> None:
        self.connector = connector
        self.deadline = deadline

    def connect(self, dest_host: str, dest_port: int, timeout: Any = None, **_: Any) -> Any:
        return self.connector.connect_direct(dest_host, dest_port, self.deadline).sock


# -- TLS inside TLS --------------------------------------------------------------------


class TLSInTLSTransport(Transport):
    """TLS to the server inside the TLS connection to an ``https://`` proxy.

    Python's ``SSLSocket`` cannot wrap another one, so the inner TLS runs in
    an ``ssl.SSLObject`` over memory buffers, fed from the outer transport.
    The handshake runs in the constructor (bounded by ``deadline``; raises
    what :func:`~blockws.transport.map_os_errors` maps TLS failures to).

    Threads: :meth:`recv` (the reader) and :meth:`write` (the writer) may
    run at once; ``_tls_lock`` serializes the calls into the ``SSLObject``
    and is never held across I/O, and ``_send_lock`` keeps TLS records in
    the order they were made. :meth:`abort` and :meth:`close` act on the
    outer transport, from any thread.
    """

    def __init__(
        self,
        outer: TCPTransport,
        ssl_context: ssl.SSLContext,
        server_hostname: str,
        deadline: Deadline,
    ) -> None:
        self._outer = outer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._tls = ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        with map_os_errors(connecting=True):
            while True:
                try:
                    self._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._feed(deadline.remaining())
        self._flush()
        self.alpn_protocol = self._tls.selected_alpn_protocol()

    def _feed(self, timeout: float | None) -> None:
        data = self._outer.recv(timeout)
        with self._tls_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def _flush(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                data = self._outgoing.read()
            if data:
                self._outer.write([data])

    def recv(self, timeout: float | None = None) -> bytes:
        while True:
            with self._tls_lock:
                try:
                    data = self._tls.read(RECV_SMALL)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    # close_notify, or the stream ended without one (as an
                    # SSLSocket with suppress_ragged_eofs, the default)
                    data = b""
                except ssl.SSLError as exc:
                    if self.aborted:
                        return b""
                    raise ConnectionLost(f"TLS error: {exc}") from exc
                pending = self._outgoing.pending
            if pending:
                self._flush()
            if data is not None:
                self.bytes_read += len(data)
                return data
            if self._incoming.eof:
                return b""  # the outer stream ended: no more records can come
            self._feed(timeout)

    def write(self, chunks: Sequence[BytesLike]) -> None:
        n = 0
        with self._send_lock:
            with self._tls_lock:
                for chunk in chunks:
                    self._tls.write(chunk)
                    n += len(chunk)
                data = self._outgoing.read()
            self.bytes_written += n
            self._outer.write([data])

    def abort(self) -> None:
        self.aborted = True
        self._outer.abort()

    def close(self) -> None:
        self._outer.close()
