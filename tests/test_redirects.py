"""Redirects of the upgrade request (blockws/redirects.py).

The policy is unit-tested through :func:`follow_redirects` with a stand-in for the opening;
end to end, a raw-socket redirecting server (tests/redirectserver.py) sends the socket on to
the `websockets` echo peer, whose ``!headers`` command shows what the last request carried.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import pytest
from faultserver import Recorder
from redirectserver import RedirectServer

import blockws
import blockws.opening
from blockws.exceptions import HTTP2Unavailable, InvalidStatus
from blockws.handshake import Headers, Request, parse_url
from blockws.log import ContextAdapter
from blockws.redirects import follow_redirects, keeps_credentials, resolve_location

TIMEOUT = 10.0


# -- the policy ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("current", "location", "expected"), [
    ("ws://a.example/x/y", "z", "ws://a.example/x/z"),
    ("ws://a.example/x/y", "/z?q=1", "ws://a.example/z?q=1"),
    ("ws://a.example/x/y", "../z", "ws://a.example/z"),
    ("wss://a.example:8443/x", "/z", "wss://a.example:8443/z"),
    ("ws://a.example/", "//b.example:81/w", "ws://b.example:81/w"),
    ("ws://a.example/", "http://b.example/w", "ws://b.example/w"),
    ("ws://a.example/", "https://b.example/w", "wss://b.example/w"),
    ("ws://a.example/", "WSS://b.example", "wss://b.example/"),
    ("wss://a.example/", "ws://b.example/w#frag", "ws://b.example/w"),
    ("ws://u:p@a.example/x", "/y", "ws://u:p@a.example/y"),
])
def test_resolve_location(current: str, location: str, expected: str) -> None:
    assert resolve_location(current, location) == expected


@pytest.mark.unit
@pytest.mark.parametrize("location", ["ftp://b.example/", "mailto:x@y", "http://:80/", "ws://[bad"])
def test_resolve_location_refuses(location: str) -> None:
    with pytest.raises(ValueError):
        resolve_location("ws://a.example/", location)


@pytest.mark.unit
@pytest.mark.parametrize(("old", "new", "keep"), [
    ("ws://a.example/x", "ws://a.example/y", True),
    ("ws://a.example/x", "ws://A.EXAMPLE:80/y", True),
    ("ws://a.example/x", "wss://a.example/y", True),  # upgrade to TLS on the default ports
    ("ws://a.example:8080/", "wss://a.example:8443/", False),
    ("ws://a.example/", "ws://a.example:81/", False),
    ("ws://a.example/", "ws://b.example/", False),
    ("ws://a.example/", "ws://sub.a.example/", False),
    ("wss://a.example/", "wss://a.example:443/z", True),
])
def test_keeps_credentials(old: str, new: str, keep: bool) -> None:
    assert keeps_credentials(parse_url(old), parse_url(new)) is keep


class Hops:
    """Stands in for the opening: ``answers[url]`` is a Location (a redirect) or None (open)."""

    def __init__(self, answers: dict[str, str | None], status: int = 302,
                 http2: bool = False) -> None:
        self.answers = answers
        self.status = status
        self.http2 = http2
        self.opened: list[str] = []
        self.made: list[tuple[str, bool]] = []

    def open_hop(self, request: Request) -> str:
        self.opened.append(request.url)
        location = self.answers[request.url]
        if location is None:
            return request.url
        error = InvalidStatus(self.status, "Found", Headers([("Location", location)]))
        if self.http2:
            raise HTTP2Unavailable("refused", error)
        raise error

    def next_request(self, url: str, keep: bool) -> Request:
        self.made.append((url, keep))
        return Request(url)

    def follow(self, url: str, max_redirects: int = 10) -> str:
        return follow_redirects(Request(url), max_redirects=max_redirects,
                                open_hop=self.open_hop, next_request=self.next_request,
                                log=ContextAdapter({"id": 0}))


@pytest.mark.unit
@pytest.mark.parametrize("http2", [False, True])
def test_follows_a_chain(http2: bool) -> None:
    hops = Hops({"ws://a/1": "/2", "ws://a/2": "http://b/3", "ws://b/3": None}, http2=http2)
    assert hops.follow("ws://a/1") == "ws://b/3"
    assert hops.opened == ["ws://a/1", "ws://a/2", "ws://b/3"]
    assert hops.made == [("ws://a/2", True), ("ws://b/3", False)]


@pytest.mark.unit
def test_credentials_stay_dropped() -> None:
    """Once the chain left the first origin, coming back does not restore credentials."""
    hops = Hops({"ws://u:p@a/1": "ws://b/2", "ws://b/2": "ws://a/3", "ws://a/3": "/4",
                 "ws://a/4": None})
    hops.follow("ws://u:p@a/1")
    assert hops.made == [("ws://b/2", False), ("ws://a/3", False), ("ws://a/4", False)]


@pytest.mark.unit
def test_url_credentials_carried_within_the_origin_only() -> None:
    hops = Hops({"ws://u:p@a/1": "ws://a/2", "ws://u:p@a/2": "https://a/3",
                 "wss://u:p@a/3": "wss://c/4", "wss://c/4": None})
    hops.follow("ws://u:p@a/1")
    assert hops.made == [("ws://u:p@a/2", True), ("wss://u:p@a/3", True), ("wss://c/4", False)]


@pytest.mark.unit
def test_loop() -> None:
    hops = Hops({"ws://a/1": "/2", "ws://a/2": "ws://a/1"})
    with pytest.raises(InvalidStatus) as info:
        hops.follow("ws://a/1")
    assert "redirect loop: ws://a/1 -> ws://a/2 -> ws://a/1" in str(info.value)
    assert info.value.chain == ("ws://a/1", "ws://a/2", "ws://a/1")
    assert info.value.status == 302
    assert hops.opened == ["ws://a/1", "ws://a/2"]


@pytest.mark.unit
def test_too_many() -> None:
    hops = Hops({f"ws://a/{i}": f"/{i + 1}" for i in range(20)})
    with pytest.raises(InvalidStatus, match=r"too many redirects \(max_redirects=3\)") as info:
        hops.follow("ws://a/0", max_redirects=3)
    assert info.value.chain == ("ws://a/0", "ws://a/1", "ws://a/2", "ws://a/3", "ws://a/4")
    assert len(hops.opened) == 4  # the first request and three redirects


@pytest.mark.unit
def test_max_redirects_zero_reports_the_redirect() -> None:
    hops = Hops({"ws://a/0": "/1"})
    with pytest.raises(InvalidStatus) as info:
        hops.follow("ws://a/0", max_redirects=0)
    assert str(info.value) == "server rejected the WebSocket upgrade: HTTP 302 Found"
    assert hops.made == []


@pytest.mark.unit
@pytest.mark.parametrize(("location", "message"), [
    ("ws://a/plain", "refused a redirect from wss to ws"),
    ("http://a/plain", "refused a redirect from wss to ws"),
    ("ftp://a/file", "cannot follow the redirect to 'ftp://a/file'"),
])
def test_refused_targets(location: str, message: str) -> None:
    hops = Hops({"wss://a/0": location})
    with pytest.raises(InvalidStatus, match=message):
        hops.follow("wss://a/0")
    assert hops.made == []


@pytest.mark.unit
def test_other_statuses_and_missing_location_are_not_followed() -> None:
    for status in (300, 304, 200, 404):
        hops = Hops({"ws://a/0": "/1"}, status=status)
        with pytest.raises(InvalidStatus) as info:
            hops.follow("ws://a/0")
        assert info.value.chain == ()
    hops = Hops({"ws://a/0": ""})
    with pytest.raises(InvalidStatus, match="HTTP 302 Found$"):
        hops.follow("ws://a/0")


@pytest.mark.unit
def test_docstring_examples() -> None:
    import doctest

    import blockws.redirects

    assert doctest.testmod(blockws.redirects).failed == 0


# -- end to end -------------------------------------------------------------------------------


class HookLog:
    """on_internal_request_created: numbers each request with ``X-Hop``."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.requests: list[blockws.Request] = []

    def __call__(self, ws: blockws.WebSocket, request: blockws.Request) -> None:
        self.requests.append(request)
        self.urls.append(request.url)
        request.headers["X-Hop"] = str(len(self.urls))


def headers_seen(ws: blockws.WebSocket) -> dict[str, Any]:
    ws.send("!headers")
    reply = ws.receive(TIMEOUT)
    assert isinstance(reply, str)
    result: dict[str, Any] = json.loads(reply)
    return result


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_each_redirect_status(websockets_server: str, status: int) -> None:
    final = websockets_server + "/final"
    with RedirectServer({"/start": (status, final)}) as server:
        hook = HookLog()
        with blockws.connect(server.url("/start"), timeout=TIMEOUT,
                             on_internal_request_created=hook) as ws:
            seen = headers_seen(ws)
            assert ws.url == final and ws.context["url"] == final
        assert ws.error is None
    assert seen["path"] == "/final"
    assert hook.urls == [server.url("/start"), final]
    assert hook.requests[1] is ws.internal_request and hook.requests[0] is not hook.requests[1]
    assert server.requests[0].headers["x-hop"] == "1" and seen["headers"]["x-hop"] == "2"


def test_chain_drops_credentials_across_origins(websockets_server: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Same origin (a relative Location): credentials go on; another origin: they stop."""
    caplog.set_level(logging.INFO, logger="blockws")
    final = websockets_server.replace("127.0.0.1", "localhost") + "/final"
    with RedirectServer({"/a": (307, "/b"), "/b": (308, final)}) as server:
        headers = {"Authorization": "Bearer tok", "Cookie": "c=1", "X-Other": "kept"}
        with blockws.connect(server.url("/a"), timeout=TIMEOUT, headers=headers) as ws:
            seen = headers_seen(ws)
        assert [r.path for r in server.requests] == ["/a", "/b"]
        assert server.connections == 2  # a new connection per hop
        for hop in server.requests:
            assert hop.headers["authorization"] == "Bearer tok" and hop.headers["cookie"] == "c=1"
    assert "authorization" not in seen["headers"] and "cookie" not in seen["headers"]
    assert seen["headers"]["x-other"] == "kept"
    assert "following HTTP 307 Temporary Redirect to " + server.url("/b") in caplog.text


def test_url_credentials_dropped_across_origins(websockets_server: str) -> None:
    final = websockets_server.replace("127.0.0.1", "localhost") + "/final"
    with RedirectServer({"/b": (302, final)}) as server:
        server.routes["/a"] = (302, server.url("/b"))  # absolute, same origin, no userinfo
        url = server.url("/a").replace("ws://", "ws://alice:s3cret@")
        with blockws.connect(url, timeout=TIMEOUT) as ws:
            seen = headers_seen(ws)
            assert "s3cret" not in repr(ws) and "s3cret" not in str(ws.context)
        basic = "Basic YWxpY2U6czNjcmV0"  # alice:s3cret
        assert [h.headers.get("authorization") for h in server.requests] == [basic, basic]
    assert "authorization" not in seen["headers"]


def test_hook_can_add_credentials_for_the_new_origin(websockets_server: str) -> None:
    final = websockets_server.replace("127.0.0.1", "localhost") + "/final"

    def hook(ws: blockws.WebSocket, request: blockws.Request) -> None:
        if "localhost" in request.url:
            request.headers["Authorization"] = "Bearer for-localhost"

    with RedirectServer({"/a": (302, final)}) as server:
        with blockws.connect(server.url("/a"), timeout=TIMEOUT, on_internal_request_created=hook,
                             headers={"Authorization": "Bearer for-127"}) as ws:
            seen = headers_seen(ws)
        assert server.requests[0].headers["authorization"] == "Bearer for-127"
    assert seen["headers"]["authorization"] == "Bearer for-localhost"


def test_ws_to_wss(websockets_tls_server: str, tls_certs: Any) -> None:
    https = websockets_tls_server.replace("wss://", "https://") + "/secure"
    with RedirectServer({"/a": (301, https)}) as server:
        with blockws.connect(server.url("/a"), timeout=TIMEOUT,
                             ssl_context=tls_certs.client_context()) as ws:
            assert ws.url == websockets_tls_server + "/secure"
            assert headers_seen(ws)["path"] == "/secure"


def _fails(url: str, **options: Any) -> tuple[BaseException, tuple[int, str]]:
    rec = Recorder()
    ws = blockws.WebSocket(url, **rec.callbacks(), **options)
    ws.open()
    closed = rec.wait_closed(ws, TIMEOUT)
    assert ws.error is not None
    return ws.error, closed


def test_wss_to_ws_refused(websockets_server: str, tls_certs: Any) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    with RedirectServer({"/a": (302, websockets_server + "/plain")}, tls=server_ctx) as server:
        error, closed = _fails(server.url("/a"), ssl_context=tls_certs.client_context(),
                               http2=False)
        assert server.connections == 1
    assert isinstance(error, InvalidStatus) and error.status == 302
    assert "refused a redirect from wss to ws" in str(error)
    assert closed == (1006, "")


def test_loop_and_too_many(websockets_server: str) -> None:
    routes = {"/a": (302, "/b"), "/b": (302, "/a")}
    with RedirectServer(routes) as server:
        error, closed = _fails(server.url("/a"))
        assert isinstance(error, InvalidStatus) and closed == (1006, "")
        assert str(error).endswith(
            f"redirect loop: {server.url('/a')} -> {server.url('/b')} -> {server.url('/a')}")
        assert server.connections == 2
    routes = {f"/{i}": (302, f"/{i + 1}") for i in range(10)}
    with RedirectServer(routes) as server:
        error, _ = _fails(server.url("/0"), max_redirects=2)
        assert isinstance(error, InvalidStatus)
        assert "too many redirects (max_redirects=2)" in str(error)
        assert error.chain == tuple(server.url(f"/{i}") for i in range(4))
        assert server.connections == 3
    with RedirectServer(routes) as server:
        error, _ = _fails(server.url("/0"), max_redirects=0)
        assert str(error) == "server rejected the WebSocket upgrade: HTTP 302 Found"
        assert server.connections == 1


def test_redirect_with_connect_helper_raises(websockets_server: str) -> None:
    with RedirectServer({"/a": (302, "/a")}) as server:
        with pytest.raises(InvalidStatus, match="redirect loop"):
            blockws.connect(server.url("/a"), timeout=TIMEOUT)


def test_no_leaks_across_hops(websockets_server: str, no_leaks: None) -> None:
    routes = {f"/{i}": (302, f"/{i + 1}") for i in range(5)}
    routes["/5"] = (302, websockets_server + "/end")
    with RedirectServer(routes) as server:
        with blockws.connect(server.url("/0"), timeout=TIMEOUT) as ws:
            assert headers_seen(ws)["path"] == "/end"
        assert server.connections == 6


def test_fallback_after_a_redirect_keeps_the_new_url(
    node_h2_server: Any, tls_certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redirect to a server without RFC 8441: the HTTP/1.1 fallback request goes to the
    server redirected to (not back to the first URL), and the hook sees every request."""

    def trusting_default() -> ssl.SSLContext:  # the test CA; blockws sets ALPN per attempt
        return tls_certs.client_context()

    monkeypatch.setattr(blockws.opening, "default_context", trusting_default)
    target = node_h2_server.wss + "/after-redirect"
    with RedirectServer({"/a": (302, target)}) as server:
        hook = HookLog()
        with blockws.connect(server.url("/a"), timeout=TIMEOUT,
                             on_internal_request_created=hook) as ws:
            assert ws.http_version == "1.1"
            assert ws.url == target
        assert server.connections == 1
    assert hook.urls == [server.url("/a"), target, target]


@pytest.mark.parametrize("scheme", ["wss", "ws"])
def test_redirect_over_http2(hypercorn_h2_server: Any, tls_context_h2: ssl.SSLContext,
                             scheme: str) -> None:
    """A 302 answering the extended CONNECT (RFC 8441) is followed, still over HTTP/2: a
    redirect is an answer, not a refusal of HTTP/2, so nothing is remembered against it."""
    base = hypercorn_h2_server.wss if scheme == "wss" else hypercorn_h2_server.ws
    options: dict[str, Any] = ({"ssl_context": tls_context_h2} if scheme == "wss"
                               else {"http2": blockws.HTTP2Settings(cleartext=True)})
    hook = HookLog()
    with blockws.connect(base + "/redirect", timeout=TIMEOUT, on_internal_request_created=hook,
                         **options) as ws:
        assert ws.http_version == "2"
        assert headers_seen(ws)["path"] == "/redirected"
    assert hook.urls == [base + "/redirect", base + "/redirected"]
    assert not blockws.http2.pool.failed_origins
