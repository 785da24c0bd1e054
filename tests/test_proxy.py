"""Proxies (blockws/proxy.py): the ``proxy=`` option, the environment, ``no_proxy``, and
tunnels through real proxies started here.

Peers (``.ci/run`` installs them; see /work/shared/PEERS.md for their quirks):

* tinyproxy (Debian): HTTP CONNECT, without and with ``BasicAuth`` (bad credentials get
  401, not 407), and one that allows CONNECT to port 443 only (403 for any other). Its
  log file names every CONNECT, which proves a socket went through it.
* microsocks (Debian): SOCKS5, without and with user/password; it logs each connection.
* pproxy (PyPI), always ``--auth=0``: HTTP + SOCKS4 + SOCKS5 on one port, and HTTP over TLS
  (an ``https://`` proxy). ``-v`` logs ``proto client -> host:port``.

Raw-socket "proxies" (tests/faultserver.py) answer CONNECT wrongly or never.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultserver import FaultServer, Peer, Recorder
from redirectserver import RedirectServer

import blockws
from blockws.deadline import Deadline
from blockws.handshake import parse_url
from blockws.options import Options
from blockws.proxy import Proxy, bypasses_proxy, proxy_from_environment
from blockws.transport import Connector
from blockws.tunnel import ProxyTunnel, tunnel_for
from peerutil import free_port, start_server

TIMEOUT = 10.0
USER = "usr9f3kq"
PASSWORD = "pw-S3cr3t:x@y"  # ':' and '@' percent-encoded in URLs
PASSWORD_IN_URL = "pw-S3cr3t%3Ax%40y"
#: tinyproxy's config parser takes letters and digits here.
TINY_PASSWORD = "pwS3cr3tTiny"


# -- helpers ----------------------------------------------------------------------------


@dataclass
class ProxyPeer:
    """A running proxy: its URL without credentials and the file it logs to."""

    url: str
    log: Path
    #: The password it wants, as written in a URL (percent-encoded).
    password: str = PASSWORD_IN_URL

    def with_credentials(self, user: str = USER, password: str | None = None) -> str:
        scheme, rest = self.url.split("://")
        return f"{scheme}://{user}:{self.password if password is None else password}@{rest}"

    def logged(self, text: str, timeout: float = 5.0) -> bool:
        """Whether ``text`` shows up in the proxy's log within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            # The proxy is another process and tells no one when it writes: poll the file.
            if text in self.log.read_text(encoding="utf-8", errors="replace"):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


@contextlib.contextmanager
def _logged_server(cmd: list[str], port: int, log: Path) -> Iterator[None]:
    """``cmd`` with its output appended to ``log`` (unbuffered, for a Python proxy)."""
    log.touch()
    shell = ["sh", "-c", 'log="$1"; shift; exec "$@" >>"$log" 2>&1', "sh", str(log), *cmd]
    with start_server(shell, port, env={**os.environ, "PYTHONUNBUFFERED": "1"}):
        yield


def _tinyproxy(directory: Path, *extra: str, password: str = "") -> Iterator[ProxyPeer]:
    exe = _which("tinyproxy")
    directory.chmod(0o755)  # tinyproxy may drop root for "nobody", who must write its log
    port = free_port()
    log = directory / "tinyproxy.log"
    log.touch()
    log.chmod(0o666)
    conf = directory / "tinyproxy.conf"
    conf.write_text("\n".join([
        f"Port {port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 30", "MaxClients 50",
        "LogLevel Connect", f'LogFile "{log}"', *extra, "",
    ]))
    with start_server([exe, "-d", "-c", str(conf)], port):
        yield ProxyPeer(f"http://127.0.0.1:{port}", log, password)


@pytest.fixture(scope="module")
def tinyproxy_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    yield from _tinyproxy(tmp_path_factory.mktemp("tinyproxy-open"))


@pytest.fixture(scope="module")
def tinyproxy_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    yield from _tinyproxy(tmp_path_factory.mktemp("tinyproxy-auth"),
                          f"BasicAuth {USER} {TINY_PASSWORD}", password=TINY_PASSWORD)


@pytest.fixture(scope="module")
def tinyproxy_443_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    yield from _tinyproxy(tmp_path_factory.mktemp("tinyproxy-443"), "ConnectPort 443")


def _microsocks(directory: Path, *flags: str) -> Iterator[ProxyPeer]:
    exe = _which("microsocks")
    port = free_port()
    log = directory / "microsocks.log"
    # Never -1: it whitelists an IP after one login (PEERS.md).
    with _logged_server([exe, "-i", "127.0.0.1", "-p", str(port), *flags], port, log):
        yield ProxyPeer(f"socks5://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def microsocks_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    yield from _microsocks(tmp_path_factory.mktemp("microsocks-open"))


@pytest.fixture(scope="module")
def microsocks_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    yield from _microsocks(tmp_path_factory.mktemp("microsocks-auth"), "-u", USER, "-P", PASSWORD)


def _pproxy(directory: Path, listen: str, *flags: str) -> Iterator[ProxyPeer]:
    pytest.importorskip("pproxy", reason="pproxy is not installed (.ci/run installs it)")
    port = free_port()
    log = directory / "pproxy.log"
    # --auth=0: without it pproxy lets an IP in for 30 days after one login (PEERS.md).
    cmd = [sys.executable, "-m", "pproxy", "-v", "--auth=0",
           "-l", f"{listen}://127.0.0.1:{port}", *flags]
    with _logged_server(cmd, port, log):
        yield ProxyPeer(f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def pproxy_any(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPeer]:
    """HTTP, SOCKS4 and SOCKS5 on one port; ``.url`` is the http:// form."""
    yield from _pproxy(tmp_path_factory.mktemp("pproxy"), "http+socks4+socks5")


@pytest.fixture(scope="module")
def pproxy_tls(tmp_path_factory: pytest.TempPathFactory, tls_certs: Any) -> Iterator[ProxyPeer]:
    """An HTTP proxy reached over TLS (certificate for localhost from tls_certs)."""
    peers = _pproxy(tmp_path_factory.mktemp("pproxy-tls"), "http+ssl",
                    "--ssl", f"{tls_certs.certfile},{tls_certs.keyfile}")
    for peer in peers:
        yield ProxyPeer(peer.url.replace("http://127.0.0.1", "https://localhost"), peer.log)


def _port(url: str) -> int:
    return parse_url(url).port


def _localhost(url: str) -> str:
    return url.replace("127.0.0.1", "localhost")


def echo_through(url: str, proxy: Any, **options: Any) -> blockws.WebSocket:
    """Connect through ``proxy``, check an echo, close; returns the (closed) socket."""
    with blockws.connect(url, timeout=TIMEOUT, proxy=proxy, **options) as ws:
        ws.send("through the proxy")
        assert ws.receive(TIMEOUT) == "through the proxy"
    assert ws.error is None
    return ws


def failure(url: str, proxy: Any, **options: Any) -> tuple[BaseException, tuple[int, str]]:
    """Open a socket that must fail; returns its error and what on_closed got."""
    rec = Recorder()
    ws = blockws.WebSocket(url, proxy=proxy, **rec.callbacks(), **options)
    ws.open()
    closed = rec.wait_closed(ws, TIMEOUT)
    assert ws.error is not None
    return ws.error, closed


# -- the option and the proxy URL -------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("url", "expected"), [
    ("http://proxy:3128", ("http", "proxy", 3128, None, None)),
    ("http://proxy", ("http", "proxy", 80, None, None)),
    ("https://proxy", ("https", "proxy", 443, None, None)),
    ("HTTP://Proxy.Example:8080/", ("http", "proxy.example", 8080, None, None)),
    ("socks5://[::1]", ("socks5", "::1", 1080, None, None)),
    ("socks5h://u:p@h:1", ("socks5h", "h", 1, "u", "p")),
    ("socks4://h", ("socks4", "h", 1080, None, None)),
    (f"http://{USER}:{PASSWORD_IN_URL}@h:3", ("http", "h", 3, USER, PASSWORD)),
    ("http://only-user@h:3", ("http", "h", 3, "only-user", None)),
])
def test_proxy_url_parsing(url: str, expected: tuple[Any, ...]) -> None:
    p = Proxy.from_url(url)
    assert (p.scheme, p.host, p.port, p.username, p.password) == expected
    assert p == Proxy.from_url(url) and hash(p) == hash(Proxy.from_url(url))


@pytest.mark.unit
@pytest.mark.parametrize(("url", "message"), [
    (f"ftp://{USER}:{PASSWORD_IN_URL}@h", "scheme must be http, https, socks5"),
    (f"http://{USER}:{PASSWORD_IN_URL}@:3128", "has no host"),
    (f"http://{USER}:{PASSWORD_IN_URL}@h:99999", "invalid proxy URL"),
])
def test_bad_proxy_urls_fail_without_showing_credentials(url: str, message: str) -> None:
    with pytest.raises(blockws.InvalidURL) as info:
        blockws.WebSocket("ws://example.com/", proxy=url)
    text = str(info.value)
    assert message in text
    assert USER not in text and "S3cr3t" not in text and "<credentials>@" in text


@pytest.mark.unit
def test_proxy_option_values() -> None:
    assert Options.build().proxy is True  # the environment, by default
    assert Options.build(proxy=None).proxy is None
    assert Options.build(proxy=False).proxy is None
    proxy = Proxy.from_url("socks5://h:1")
    assert Options.build(proxy=proxy).proxy is proxy
    assert Options.build(proxy="http://h:1").proxy == Proxy("http", "h", 1)
    with pytest.raises(TypeError, match="proxy must be"):
        Options.build(proxy=3128)
    assert Options.build().max_redirects == 10
    assert Options.build(max_redirects=0).max_redirects == 0
    with pytest.raises(ValueError, match="max_redirects"):
        Options.build(max_redirects=-1)
    with pytest.raises(TypeError, match="max_redirects"):
        Options.build(max_redirects="3")
    with pytest.raises(TypeError, match="proxy_ssl_context"):
        Options.build(proxy_ssl_context="ca.pem")


@pytest.mark.unit
def test_credentials_hidden_in_reprs() -> None:
    url = f"http://{USER}:{PASSWORD_IN_URL}@proxy.example:3128"
    ws = blockws.WebSocket("ws://example.com/", proxy=url)
    proxy = ws.proxy
    assert isinstance(proxy, Proxy) and proxy.password == PASSWORD
    shown = " ".join([repr(proxy), str(proxy), repr(ws), repr(Options.build(proxy=url)),
                      repr(ProxyTunnel(proxy)), repr(ws.context)])
    assert "proxy.example:3128" in shown
    assert USER not in shown and "S3cr3t" not in shown


# -- the environment ------------------------------------------------------------------------


WS, WSS = parse_url("ws://example.com/"), parse_url("wss://example.com/")


@pytest.mark.unit
@pytest.mark.parametrize(("env", "for_ws", "for_wss"), [
    ({}, None, None),
    ({"http_proxy": "http://h:1"}, "http://h:1", None),
    ({"https_proxy": "http://s:2"}, None, "http://s:2"),
    ({"all_proxy": "socks5://a:3"}, "socks5://a:3", "socks5://a:3"),
    ({"ws_proxy": "http://w:4", "http_proxy": "http://h:1", "all_proxy": "http://a:3"},
     "http://w:4", "http://a:3"),
    ({"wss_proxy": "http://w:5", "https_proxy": "http://s:2"}, None, "http://w:5"),
    ({"https_proxy": "http://s:2", "all_proxy": "http://a:3"}, "http://a:3", "http://s:2"),
    # upper case works; lower case wins over it; an empty value counts as unset
    ({"HTTPS_PROXY": "http://S:2"}, None, "http://s:2"),
    ({"https_proxy": "http://lower:2", "HTTPS_PROXY": "http://UPPER:2"}, None, "http://lower:2"),
    ({"https_proxy": " ", "HTTPS_PROXY": "http://upper:2"}, None, "http://upper:2"),
    ({"wss_proxy": "", "https_proxy": "http://s:2"}, None, "http://s:2"),
    # no scheme: an http:// proxy
    ({"http_proxy": "proxy.corp:3128"}, "http://proxy.corp:3128", None),
    # CGI (httpoxy): HTTP_PROXY may come from a request header, so it is ignored
    ({"HTTP_PROXY": "http://evil:1", "REQUEST_METHOD": "GET"}, None, None),
    ({"http_proxy": "http://ok:1", "REQUEST_METHOD": "GET"}, "http://ok:1", None),
])
def test_environment_lookup(env: dict[str, str], for_ws: str | None, for_wss: str | None) -> None:
    def found(url: Any) -> str | None:
        proxy = proxy_from_environment(url, env)
        return None if proxy is None else proxy.redacted

    assert found(WS) == for_ws
    assert found(WSS) == for_wss


@pytest.mark.unit
def test_environment_no_proxy_applies() -> None:
    env = {"https_proxy": "http://p:1", "NO_PROXY": "internal.example, 10.0.0.0/8"}
    assert proxy_from_environment(parse_url("wss://api.internal.example/"), env) is None
    assert proxy_from_environment(parse_url("wss://10.2.3.4:8443/"), env) is None
    assert proxy_from_environment(parse_url("wss://example.com/"), env) == Proxy("http", "p", 1)
    # lower case wins over upper case here too
    env["no_proxy"] = "other.example"
    assert proxy_from_environment(parse_url("wss://api.internal.example/"), env) is not None


@pytest.mark.unit
def test_environment_bad_proxy_names_the_variable() -> None:
    env = {"https_proxy": f"ftp://{USER}:{PASSWORD_IN_URL}@h"}
    with pytest.raises(blockws.InvalidURL, match="https_proxy environment variable") as info:
        proxy_from_environment(WSS, env)
    assert "S3cr3t" not in str(info.value)


@pytest.mark.unit
def test_no_environment_no_tunnel() -> None:
    """With nothing set, the default proxy=True connects directly (the rest of the suite
    relies on it; conftest clears the machine's variables)."""
    assert tunnel_for(True, WS, None, {}) is None
    assert tunnel_for(True, WSS, None, {"no_proxy": "*"}) is None
    assert tunnel_for(None, WS, None, {"all_proxy": "http://p:1"}) is None
    tunnel = tunnel_for(True, WS, None, {"all_proxy": "http://p:1"})
    assert tunnel is not None and tunnel.proxy == Proxy("http", "p", 1)
    # An explicit proxy ignores no_proxy.
    explicit = tunnel_for(Proxy("http", "q", 2), WS, None, {"no_proxy": "*"})
    assert explicit is not None and explicit.proxy == Proxy("http", "q", 2)


@pytest.mark.unit
def test_https_proxy_context_made_only_when_needed() -> None:
    made: list[ssl.SSLContext] = []

    def default_context() -> ssl.SSLContext:
        made.append(ssl.create_default_context())
        return made[-1]

    for setting in (None, True, Proxy("http", "p", 1), Proxy("socks5", "p", 1)):
        tunnel = tunnel_for(setting, WSS, None, {}, default_context=default_context)
        assert tunnel is None or tunnel.proxy_ssl_context is None
    assert made == []
    tunnel = tunnel_for(Proxy("https", "p", 1), WSS, None, {}, default_context=default_context)
    assert tunnel is not None and made == [tunnel.proxy_ssl_context]
    mine = ssl.create_default_context()
    tunnel = tunnel_for(Proxy("https", "p", 1), WS, mine, {}, default_context=default_context)
    assert tunnel is not None and tunnel.proxy_ssl_context is mine and len(made) == 1


@pytest.mark.unit
def test_tunnel_keys_tell_routes_apart() -> None:
    """The HTTP/2 pool keys connections by route: no sharing across proxies."""
    a, b = ProxyTunnel(Proxy("http", "p", 1)), ProxyTunnel(Proxy("http", "p", 1))
    assert a.key == b.key
    assert a.key != ProxyTunnel(Proxy("http", "p", 2)).key
    assert a.key != ProxyTunnel(Proxy("http", "p", 1, "u", "x")).key
    connector = Connector()
    assert connector.route_key is None
    connector.tunnel = a
    assert connector.route_key == b.key


@pytest.mark.unit
@pytest.mark.parametrize(("host", "port", "no_proxy", "expected"), [
    ("example.com", 443, "", False),
    ("example.com", 443, "*", True),
    ("example.com", 443, "example.com", True),
    ("api.example.com", 443, "example.com", True),
    ("api.example.com", 443, ".example.com", True),
    ("example.com", 443, ".example.com", True),
    ("api.example.com", 443, "*.example.com", True),
    ("badexample.com", 443, "example.com", False),
    ("example.com.", 443, "EXAMPLE.com", True),
    ("example.org", 443, "localhost,example.com", False),
    ("example.org", 443, "localhost example.org", True),
    ("example.com", 443, "example.com:443", True),
    ("example.com", 8443, "example.com:443", False),
    ("127.0.0.1", 80, "127.0.0.1", True),
    ("127.0.0.2", 80, "127.0.0.1", False),
    ("10.1.2.3", 80, "10.0.0.0/8", True),
    ("11.1.2.3", 80, "10.0.0.0/8", False),
    ("192.168.1.77", 80, "192.168.1.0/24:80", True),
    ("192.168.1.77", 81, "192.168.1.0/24:80", False),
    ("::1", 80, "::1", True),
    ("::1", 80, "[::1]", True),
    ("::1", 80, "[0:0::1]:80", True),
    ("::1", 81, "[::1]:80", False),
    ("fd00::5", 80, "fd00::/8", True),
    ("fe80::5", 80, "fd00::/8", False),
    ("10.1.2.3", 80, "fd00::/8", False),
    # names are not resolved to be matched against addresses, and the reverse
    ("localhost", 80, "127.0.0.0/8", False),
    ("127.0.0.1", 80, "localhost", False),
    ("example.com", 443, " , ,bogus/99, example.com", True),
])
def test_no_proxy_matching(host: str, port: int, no_proxy: str, expected: bool) -> None:
    assert bypasses_proxy(host, port, no_proxy) is expected


@pytest.mark.unit
def test_socks_without_python_socks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional package, a SOCKS proxy fails before any I/O, saying what to install."""
    monkeypatch.setitem(sys.modules, "python_socks", None)  # import now raises ImportError
    tunnel = ProxyTunnel(Proxy.from_url(f"socks5://{USER}:{PASSWORD_IN_URL}@127.0.0.1:1"))
    with pytest.raises(blockws.ProxyError, match=r"pip install 'blockws\[socks\]'") as info:
        tunnel.open(Connector(), "example.com", 443, Deadline(1.0), None, None)
    assert "S3cr3t" not in str(info.value) and USER not in str(info.value)


# -- HTTP CONNECT: tinyproxy -------------------------------------------------------------------


def test_http_connect(tinyproxy_open: ProxyPeer, websockets_server: str) -> None:
    url = _localhost(websockets_server)
    ws = echo_through(url, tinyproxy_open.url)
    assert ws.http_version == "1.1"
    assert tinyproxy_open.logged(f"localhost:{_port(url)}")


def test_http_connect_basic_auth(tinyproxy_auth: ProxyPeer, websockets_server: str) -> None:
    echo_through(websockets_server, tinyproxy_auth.with_credentials())
    assert tinyproxy_auth.logged(f"127.0.0.1:{_port(websockets_server)}")


def test_http_connect_without_credentials_gets_407(
    tinyproxy_auth: ProxyPeer, websockets_server: str
) -> None:
    error, closed = failure(websockets_server, tinyproxy_auth.url)
    assert isinstance(error, blockws.ProxyError)
    assert isinstance(error, blockws.TransportError) and isinstance(error, OSError)
    assert error.status == 407 and error.proxy == tinyproxy_auth.url
    assert "407" in str(error) and "wants credentials" in str(error)
    assert closed == (1006, "")


def test_http_connect_wrong_credentials(tinyproxy_auth: ProxyPeer, websockets_server: str) -> None:
    error, closed = failure(websockets_server, tinyproxy_auth.with_credentials(password="nope"))
    assert isinstance(error, blockws.ProxyError)
    assert error.status == 401  # tinyproxy's answer to bad credentials (PEERS.md)
    assert "did not accept the credentials" in str(error)
    assert closed == (1006, "")
    assert USER not in str(error) and "<credentials>@" in str(error)


def test_http_connect_forbidden_gets_403(
    tinyproxy_443_only: ProxyPeer, websockets_server: str
) -> None:
    error, closed = failure(websockets_server, tinyproxy_443_only.url)
    assert isinstance(error, blockws.ProxyError) and error.status == 403
    assert closed == (1006, "")


@pytest.mark.parametrize("kind", ["tinyproxy", "microsocks"])
def test_proxy_cannot_reach_the_server(kind: str, request: pytest.FixtureRequest) -> None:
    """The proxy is up but the server is not: the proxy's status says so."""
    peer: ProxyPeer = request.getfixturevalue(f"{kind}_open")
    error, closed = failure(f"ws://127.0.0.1:{free_port()}/", peer.url)
    assert isinstance(error, blockws.ProxyError), error
    assert isinstance(error.status, int)
    if kind == "tinyproxy":
        assert 500 <= error.status < 600 and f"HTTP {error.status}" in str(error)
    else:
        assert error.status == 5  # SOCKS5: connection refused (RFC 1928 section 6)
    assert closed == (1006, "")


def test_connect_error_when_proxy_is_down(websockets_server: str) -> None:
    error, closed = failure(websockets_server, f"http://127.0.0.1:{free_port()}")
    assert isinstance(error, blockws.ConnectError)
    assert closed == (1006, "")


def test_wss_through_http_connect(tinyproxy_open: ProxyPeer, websockets_tls_server: str,
                                  tls_certs: Any) -> None:
    """TLS to the server runs end to end inside the tunnel, certificate checked."""
    echo_through(websockets_tls_server, tinyproxy_open.url, ssl_context=tls_certs.client_context())
    assert tinyproxy_open.logged(f"localhost:{_port(websockets_tls_server)}")
    # ... and a certificate the client does not trust still fails, through the tunnel.
    error, _ = failure(websockets_tls_server, tinyproxy_open.url, open_timeout=TIMEOUT)
    assert isinstance(error, blockws.TLSError)


def test_http2_through_http_connect(tinyproxy_open: ProxyPeer, hypercorn_h2_server: Any,
                                    tls_context_h2: ssl.SSLContext) -> None:
    """HTTP/2 (RFC 8441) through a CONNECT tunnel: ALPN h2 inside the tunnel."""
    url = hypercorn_h2_server.wss
    with blockws.connect(url, timeout=TIMEOUT, proxy=tinyproxy_open.url,
                         ssl_context=tls_context_h2) as ws:
        assert ws.http_version == "2"
        ws.send("!version")
        assert ws.receive(TIMEOUT) == "2"
    assert tinyproxy_open.logged(f"localhost:{_port(url)}")


def test_h2c_through_http_connect(tinyproxy_open: ProxyPeer, hypercorn_h2_server: Any) -> None:
    """Cleartext HTTP/2 (h2c, prior knowledge) goes through the tunnel as it is."""
    url = hypercorn_h2_server.ws
    with blockws.connect(url, timeout=TIMEOUT, proxy=tinyproxy_open.url,
                         http2=blockws.HTTP2Settings(cleartext=True)) as ws:
        assert ws.http_version == "2"
        ws.send("!version")
        assert ws.receive(TIMEOUT) == "2"
    assert tinyproxy_open.logged(f"127.0.0.1:{_port(url)}")


def test_http2_connections_not_shared_across_routes(
    tinyproxy_open: ProxyPeer, hypercorn_h2_server: Any, tls_context_h2: ssl.SSLContext
) -> None:
    """A socket without a proxy never rides an HTTP/2 connection made through one."""
    url = hypercorn_h2_server.wss
    with blockws.connect(url, timeout=TIMEOUT, proxy=tinyproxy_open.url,
                         ssl_context=tls_context_h2) as proxied:
        with blockws.connect(url, timeout=TIMEOUT, proxy=None,
                             ssl_context=tls_context_h2) as direct:
            assert proxied.http_version == direct.http_version == "2"
            assert len(blockws.http2.pool.connections()) == 2
        with blockws.connect(url, timeout=TIMEOUT, proxy=tinyproxy_open.url,
                             ssl_context=tls_context_h2) as again:
            assert again.http_version == "2"
            assert len(blockws.http2.pool.connections()) == 2  # shared with `proxied`


# -- the environment, end to end ---------------------------------------------------------------


def test_environment_proxy_is_used_by_default(
    tinyproxy_open: ProxyPeer, websockets_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = websockets_server + "/env-default"
    monkeypatch.setenv("http_proxy", tinyproxy_open.url)
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        ws.send("x")
        assert ws.receive(TIMEOUT) == "x"
    assert tinyproxy_open.logged(f"127.0.0.1:{_port(url)}")


def test_environment_no_proxy_and_proxy_none(
    websockets_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An environment proxy that is down: no_proxy or proxy=None connect directly."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    error, _ = failure(websockets_server, True)
    assert isinstance(error, blockws.ConnectError)  # it did try the proxy
    echo_through(websockets_server, None)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
    echo_through(websockets_server, True)


def test_each_redirect_hop_picks_its_own_route(
    tinyproxy_open: ProxyPeer, websockets_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is read per request: the redirecting server (127.0.0.1, in no_proxy)
    is reached directly, the server it points to (localhost) through the proxy."""
    port = _port(websockets_server)
    monkeypatch.setenv("http_proxy", tinyproxy_open.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with RedirectServer({"/hop": (302, f"ws://localhost:{port}/routed")}) as server:
        with blockws.connect(server.url("/hop"), timeout=TIMEOUT) as ws:
            ws.send("x")
            assert ws.receive(TIMEOUT) == "x"
        assert server.connections == 1
    assert tinyproxy_open.logged(f"localhost:{port}")
    assert not tinyproxy_open.logged(f":{server.port}", timeout=0.0)


# -- SOCKS: microsocks and pproxy ----------------------------------------------------------------


def test_socks5(microsocks_open: ProxyPeer, websockets_server: str) -> None:
    echo_through(websockets_server, microsocks_open.url)
    assert microsocks_open.logged(f"connected to 127.0.0.1:{_port(websockets_server)}")


def test_socks5_with_credentials(microsocks_auth: ProxyPeer, websockets_server: str) -> None:
    echo_through(websockets_server, microsocks_auth.with_credentials())
    assert microsocks_auth.logged(f"connected to 127.0.0.1:{_port(websockets_server)}")


@pytest.mark.parametrize("password", [None, "wrong"])
def test_socks5_refused(microsocks_auth: ProxyPeer, websockets_server: str,
                        password: str | None) -> None:
    proxy = microsocks_auth.url if password is None else microsocks_auth.with_credentials(
        password=password)
    error, closed = failure(websockets_server, proxy)
    assert isinstance(error, blockws.ProxyError)
    assert error.proxy.replace("<credentials>@", "") == microsocks_auth.url
    assert closed == (1006, "")


def test_socks5_wss_and_http2(microsocks_open: ProxyPeer, hypercorn_h2_server: Any,
                              tls_context_h2: ssl.SSLContext) -> None:
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT, proxy=microsocks_open.url,
                         ssl_context=tls_context_h2) as ws:
        assert ws.http_version == "2"
        ws.send("!version")
        assert ws.receive(TIMEOUT) == "2"


@pytest.mark.parametrize(("scheme", "seen_as"), [
    ("socks4", "127.0.0.1"),  # SOCKS4 carries an IPv4 address: resolved here
    ("socks5", "127.0.0.1"),  # resolved here
    ("socks5h", "localhost"),  # the proxy resolves the name
    ("http", "localhost"),
])
def test_pproxy_schemes(pproxy_any: ProxyPeer, websockets_server: str, scheme: str,
                        seen_as: str) -> None:
    port = _port(websockets_server)
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", port, socket.AF_INET)}
    if seen_as == "127.0.0.1" and addresses != {"127.0.0.1"}:
        pytest.skip("localhost does not resolve to 127.0.0.1 alone here")
    proxy = pproxy_any.url.replace("http://", f"{scheme}://")
    echo_through(f"ws://localhost:{port}/{scheme}", proxy)
    assert pproxy_any.logged(f"-> {seen_as}:{port}")


# -- https:// proxies: TLS to the proxy (pproxy) -------------------------------------------------


def test_https_proxy_plain_server(pproxy_tls: ProxyPeer, websockets_server: str,
                                  tls_certs: Any) -> None:
    echo_through(websockets_server, pproxy_tls.url, proxy_ssl_context=tls_certs.client_context())
    assert pproxy_tls.logged(f"-> 127.0.0.1:{_port(websockets_server)}")


def test_https_proxy_tls_in_tls(pproxy_tls: ProxyPeer, websockets_tls_server: str,
                                tls_certs: Any) -> None:
    """wss:// through an https:// proxy: TLS inside TLS, large messages both ways."""
    big = os.urandom(3 * 1024 * 1024)
    with blockws.connect(websockets_tls_server, timeout=TIMEOUT, proxy=pproxy_tls.url,
                         proxy_ssl_context=tls_certs.client_context(),
                         ssl_context=tls_certs.client_context()) as ws:
        for _ in range(3):
            ws.send(big)
        for _ in range(3):
            assert ws.receive(TIMEOUT) == big
        ws.send("small")
        assert ws.receive(TIMEOUT) == "small"
    assert ws.error is None
    assert pproxy_tls.logged(f"-> localhost:{_port(websockets_tls_server)}")


def test_https_proxy_http2_tls_in_tls(pproxy_tls: ProxyPeer, hypercorn_h2_server: Any,
                                      tls_certs: Any, tls_context_h2: ssl.SSLContext) -> None:
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT, proxy=pproxy_tls.url,
                         proxy_ssl_context=tls_certs.client_context(),
                         ssl_context=tls_context_h2) as ws:
        assert ws.http_version == "2"
        ws.send("!version")
        assert ws.receive(TIMEOUT) == "2"


def test_https_proxy_certificate_checked(pproxy_tls: ProxyPeer, websockets_server: str) -> None:
    """By default an https:// proxy is verified like a server: the test CA is not trusted."""
    error, closed = failure(websockets_server, pproxy_tls.url)
    assert isinstance(error, blockws.TLSError)
    assert closed == (1006, "")


def test_nothing_left_behind(tinyproxy_auth: ProxyPeer, microsocks_auth: ProxyPeer,
                            pproxy_tls: ProxyPeer, websockets_server: str,
                            websockets_tls_server: str, tls_certs: Any, no_leaks: None) -> None:
    """No thread or descriptor outlives a socket, through every kind of tunnel, opened or
    refused."""
    for _ in range(3):
        echo_through(websockets_server, tinyproxy_auth.with_credentials())
        echo_through(websockets_server, microsocks_auth.with_credentials())
        echo_through(websockets_tls_server, pproxy_tls.url,
                     proxy_ssl_context=tls_certs.client_context(),
                     ssl_context=tls_certs.client_context())
        failure(websockets_server, tinyproxy_auth.url)  # 407
        failure(websockets_server, microsocks_auth.url)  # no credentials
        failure(websockets_server, pproxy_tls.url)  # the proxy's certificate
        failure(websockets_tls_server, pproxy_tls.url,  # the server's certificate, inside
                proxy_ssl_context=tls_certs.client_context())


# -- misbehaving proxies (raw sockets) -----------------------------------------------------------


def _answering(answer: bytes) -> Any:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer)
        peer.drain_forever()
    return handler


@pytest.mark.parametrize(("answer", "message"), [
    (b"", "closed the connection before answering"),
    (b"SPDY/9 200 OK\r\n\r\n", "invalid answer"),
    (b"HTTP/1.1 200 Connection established\r\n\r\nsurprise", "sent data after its answer"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad", "HTTP 502 Bad Gateway"),
])
def test_proxy_answers_wrongly(answer: bytes, message: str) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        if answer:
            peer.send(answer)
            peer.drain_forever()

    with FaultServer(handler) as proxy:
        error, closed = failure("ws://example.invalid/", f"http://127.0.0.1:{proxy.port}")
        assert isinstance(error, blockws.ProxyError), error
        assert message in str(error)
        assert closed == (1006, "")
        peer = proxy.peer(0)
        assert peer.request_line == "CONNECT example.invalid:80 HTTP/1.1"
        assert peer.request_headers["host"] == "example.invalid:80"
        assert "proxy-authorization" not in peer.request_headers


def test_proxy_authorization_header() -> None:
    with FaultServer(_answering(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")) as proxy:
        url = f"http://{USER}:{PASSWORD_IN_URL}@127.0.0.1:{proxy.port}"
        error, _ = failure("wss://[::1]:8443/", url)
        assert isinstance(error, blockws.ProxyError) and error.status == 407
        assert "did not accept the credentials" in str(error)
        peer = proxy.peer(0)
        assert peer.request_line == "CONNECT [::1]:8443 HTTP/1.1"
        import base64
        expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert peer.request_headers["proxy-authorization"] == f"Basic {expected}"


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_close_while_waiting_for_the_proxy(kind: str) -> None:
    """close() during the proxy exchange ends the socket at once (the connector aborts
    the connection to the proxy), not after open_timeout."""
    asked = threading.Event()

    def handler(peer: Peer) -> None:
        peer.sock.recv(1)  # the CONNECT or SOCKS greeting has begun
        asked.set()
        peer.drain_forever()

    with FaultServer(handler) as proxy:
        rec = Recorder()
        ws = blockws.WebSocket("ws://example.invalid/", proxy=f"{kind}://127.0.0.1:{proxy.port}",
                               open_timeout=30.0, **rec.callbacks())
        ws.open()
        assert asked.wait(TIMEOUT)
        started = time.monotonic()
        ws.close()
        assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
        assert time.monotonic() - started < 2.0
        assert ws.join(TIMEOUT)


def test_timeout_waiting_for_the_proxy() -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.drain_forever()

    with FaultServer(handler) as proxy:
        error, closed = failure("ws://example.invalid/", f"http://127.0.0.1:{proxy.port}",
                                open_timeout=0.3)
        assert isinstance(error, blockws.OpenTimeout)
        assert closed == (1006, "")


# -- credentials never shown ---------------------------------------------------------------------


def test_credentials_never_in_logs_errors_or_reprs(
    tinyproxy_auth: ProxyPeer, microsocks_auth: ProxyPeer, websockets_server: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger, and so every logger below it
    shown: list[str] = []
    for proxy in (tinyproxy_auth, microsocks_auth):
        ws = echo_through(websockets_server, proxy.with_credentials())
        shown += [repr(ws), repr(ws.proxy), str(ws.proxy), repr(dict(ws.context))]
        for password in ("wrong-S3cr3t", None):
            url = proxy.with_credentials(password=password or "")
            if password is None:
                url = url.replace(":@", "@")  # a user name alone
            error, _ = failure(websockets_server, url)
            assert isinstance(error, blockws.ProxyError)
            shown += [str(error), repr(error), repr(error.args),
                      "".join(traceback.format_exception(type(error), error, error.__traceback__))]
            cause = error.__cause__ or error.__context__
            if cause is not None:
                shown += [str(cause), repr(cause)]
    text = "\n".join(shown) + "\n" + caplog.text
    assert "through proxy" in caplog.text  # the proxy was logged, without its credentials
    for secret in (USER, PASSWORD, PASSWORD_IN_URL, TINY_PASSWORD, "S3cr3t"):
        assert secret not in text


@pytest.mark.unit
def test_docstring_examples() -> None:
    import doctest

    import blockws.proxy

    assert doctest.testmod(blockws.proxy).attempted > 5
    assert doctest.testmod(blockws.proxy).failed == 0

