"""Tunnels through a proxy: HTTP CONNECT, TLS to the proxy, SOCKS.

:class:`ProxyTunnel` is the :class:`~blockws.transport.Tunnel` the opening
hands its :class:`~blockws.transport.Connector` for each request whose
proxy :mod:`blockws.proxy` chose:

* ``http://[user:pass@]host[:port]``: HTTP ``CONNECT host:port`` (RFC 9110
  section 9.3.6), with ``Proxy-Authorization: Basic`` when the URL has
  credentials. A ``wss://`` server's TLS (and its ALPN, so HTTP/2 too)
  runs inside the tunnel, end to end; a ``ws://`` server's bytes go through
  as they are (HTTP/1.1, or h2c when cleartext HTTP/2 is on).
* ``https://...``: the same, over TLS to the proxy (verified with the
  ``proxy_ssl_context`` option, default blockws's own trust). A ``wss://``
  server's TLS then runs inside that TLS (:class:`~blockws.transport.TLSTransport`).
* ``socks5://`` (names resolved here), ``socks5h://`` (resolved by the
  proxy), ``socks4://`` (resolved here, IPv4 only): through the optional
  `python-socks <https://pypi.org/project/python-socks/>`_ package
  (``pip install 'blockws[socks]'``); without it, opening raises
  :class:`~blockws.exceptions.ProxyError` saying so.

A proxy that refuses raises :class:`~blockws.exceptions.ProxyError`
(``status`` holds its HTTP status or SOCKS reply code), and the socket ends
with ``on_closed`` 1006; a proxy that cannot be reached raises
``ConnectError``, one too slow ``OpenTimeout``. Credentials never appear in
a message, ``repr`` or log record.

Threads: a tunnel opens on the socket's connecting thread. A ``close()``
meanwhile aborts the connector, which ends a wait for the proxy at once;
``open_timeout`` bounds the whole of it.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from .deadline import Deadline
from .exceptions import (
    BlockwsError,
    ConnectionLost,
    InvalidHeader,
    OpenTimeout,
    ProxyError,
)
from .handshake import WSURL, ResponseReader
from .proxy import Proxy, choose_proxy
from .tls import HTTP1_ALPN
from .transport import (
    Connector,
    TCPTransport,
    TLSTransport,
    Transport,
    map_os_errors,
    os_error,
)

__all__ = ["ProxyTunnel", "tunnel_for"]

#: Bound on the proxy's answer to CONNECT (status line and headers).
MAX_CONNECT_RESPONSE = 16 * 1024


def tunnel_for(
    setting: Proxy | bool | None,
    url: WSURL,
    proxy_ssl_context: ssl.SSLContext | None,
    environ: Mapping[str, str] | None = None,
    *,
    default_context: Callable[[], ssl.SSLContext] | None = None,
) -> ProxyTunnel | None:
    """The route for a request to ``url`` under the ``proxy=`` ``setting``
    (``None``: connect directly). ``default_context`` makes the context for
    an ``https://`` proxy when ``proxy_ssl_context`` is ``None`` (called only
    then: building a trust store costs milliseconds)."""
    proxy = choose_proxy(setting, url, environ)
    if proxy is None:
        return None
    if proxy_ssl_context is None and proxy.scheme == "https" and default_context is not None:
        proxy_ssl_context = default_context()
    return ProxyTunnel(proxy, proxy_ssl_context)


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
        alpn: Sequence[str] = HTTP1_ALPN,
    ) -> Transport:
        """A transport to ``host:port`` through the proxy, with TLS to the host
        inside (offering ``alpn``) when ``ssl_context`` is given. Raises :class:`ProxyError` when
        the proxy refuses, ``ConnectError`` when it cannot be reached, ``OpenTimeout`` when
        ``deadline`` passes first, and ``ConnectionLost`` when ``connector`` was aborted
        meanwhile (``close()`` from another thread)."""
        try:
            if self.proxy.scheme in ("http", "https"):
                return self._open_connect(
                    connector, host, port, deadline, ssl_context, server_hostname, alpn
                )
            return self._open_socks(
                connector, host, port, deadline, ssl_context, server_hostname, alpn
            )
        except BaseException:
            # Whatever an abort broke (a read that ended, a descriptor closed under
            # a call about to use it, a handshake cut short), close() caused it.
            if connector.aborted:
                raise ConnectionLost("connection aborted by close()") from None
            raise

    # -- HTTP CONNECT -------------------------------------------------------------------

    def _open_connect(
        self,
        connector: Connector,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        alpn: Sequence[str],
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
            if ssl_context is not None and over_tls:
                # TLS inside the proxy's TLS: the inner one over memory buffers.
                inner = TLSTransport(outer, ssl_context, server_hostname or host, alpn)
                with map_os_errors(connecting=True):
                    inner.handshake(deadline)
                return inner
        except BaseException:
            outer.abort()
            outer.close()
            raise
        if ssl_context is None:
            outer.alpn_protocol = None  # the proxy's ALPN, not the server's
            return outer
        assert isinstance(outer, TCPTransport)  # not over_tls: a plain connection
        return connector.start_tls(
            outer.sock, deadline, ssl_context, server_hostname or host, alpn, host, port
        )

    def _connect_request(
        self, outer: Transport, host: str, port: int, deadline: Deadline
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
            if status in (401, 407):  # 407 is the standard answer; some proxies send 401
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
        alpn: Sequence[str],
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
            # python-socks resolves the server's name here for socks4:// and socks5://,
            # so a lookup failure is about the server; anything else, about the proxy.
            where = (_authority(host, port) if isinstance(exc, socket.gaierror)
                     else f"proxy {proxy.redacted}")
            raise os_error(exc, connecting=True, where=where) from exc
        if ssl_context is None:
            return TCPTransport(sock)
        return connector.start_tls(
            sock, deadline, ssl_context, server_hostname or host, alpn, host, port
        )


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
