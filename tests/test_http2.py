"""WebSocket over HTTP/2 (RFC 8441) against real servers, and the fallback to HTTP/1.1.

Servers with RFC 8441 (conftest.py): hypercorn serving tests/peers/h2_asgi_app.py (``!version``
answers ``scope["http_version"]``), over TLS with ALPN h2 and over cleartext h2c; nghttpx as a
gateway in front of the `websockets` echo peer (``!stats``, ``!headers``: its ``via`` header
names the HTTP version nghttpx was spoken to with). Servers without it: hypercorn whose ALPN
offers only http/1.1, Node's http2 without the extended CONNECT (h2 over ALPN, SETTINGS lack
ENABLE_CONNECT_PROTOCOL; HTTP/1.1 WebSocket on the same port), h2_asgi_app's ``/h1-only`` path
(hypercorn refuses the CONNECT with 403), and nghttpd (h2 only: no RFC 8441, no HTTP/1.1).

Connections are counted on the server side by :class:`h2peers.CountingProxy`, a TCP proxy in
front of the server that also cuts every connection on demand. blockws's HTTP/2 pool is
process-wide: the autouse ``fresh_pool`` fixture clears its failed origins and closes its
connections after every test.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import ssl
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from faultserver import Recorder, random_text
from h2peers import (
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_CONNECT_PROTOCOL,
    CountingProxy,
    MiniConn,
    MiniH2,
    counting_proxy,
    frame,
)

import blockws
import blockws.opening
import blockws.tls
from blockws.exceptions import HTTP2Unavailable
from blockws.http2 import HTTP2Settings, RefusedOrigins, pool
from peerutil import PEERS_DIR, free_port, start_server

TIMEOUT = 10.0
KiB = 1024
MiB = 1024 * KiB
SIZES = [0, 125, 126, 65535, 65536, MiB, 16 * MiB]


# -- helpers ------------------------------------------------------------------------------




@dataclass
class Target:
    """An RFC 8441 server and how to reach it over HTTP/2."""

    name: str  # "hypercorn" or "nghttpx"
    url: str
    options: dict[str, Any] = field(default_factory=dict)  # WebSocket keywords


H2_TARGETS = ["hypercorn-tls", "hypercorn-h2c", "nghttpx-tls", "nghttpx-h2c"]


def make_target(request: pytest.FixtureRequest, which: str) -> Target:
    name, transport = which.split("-")
    server = request.getfixturevalue(
        "hypercorn_h2_server" if name == "hypercorn" else "nghttpx_gateway"
    )
    if transport == "tls":
        ctx = request.getfixturevalue("tls_context_h2")
        return Target(name, server.wss, {"ssl_context": ctx})
    return Target(name, server.ws, {"http2": HTTP2Settings(cleartext=True)})


@pytest.fixture(params=H2_TARGETS)
def target(request: pytest.FixtureRequest) -> Target:
    return make_target(request, request.param)


@pytest.fixture(params=["nghttpx-tls", "nghttpx-h2c"])
def nghttpx_target(request: pytest.FixtureRequest) -> Target:
    return make_target(request, request.param)


@pytest.fixture(scope="session")
def default_context_trusting(tls_certs: Any) -> ssl.SSLContext:
    """A default context (blockws.tls) that also trusts the test CA; built once (~70 ms)."""
    ctx = blockws.tls.build_default_context()
    tls_certs.ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def trusting_defaults(default_context_trusting: ssl.SSLContext,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """blockws's default context (blockws sets its ALPN per attempt), trusting the test CA
    as well: what a user who passes no ssl_context gets."""
    monkeypatch.setattr(blockws.opening, "default_context", lambda: default_context_trusting)


def open_socket(url: str, rec: Recorder, **options: Any) -> blockws.WebSocket:
    ws = blockws.WebSocket(url, **rec.callbacks(), **options)
    ws.open()
    rec.wait_open(ws)
    return ws


def close_socket(ws: blockws.WebSocket, rec: Recorder) -> tuple[int, str]:
    ws.close()
    return rec.wait_closed(ws)


def ask(ws: blockws.WebSocket, command: str) -> str:
    """Send a text command and return the text reply (a socket without handlers)."""
    ws.send(command)
    reply = ws.receive(TIMEOUT)
    assert isinstance(reply, str)
    return reply


def headers_seen(ws: blockws.WebSocket) -> dict[str, str]:
    result: dict[str, str] = json.loads(ask(ws, "!headers"))["headers"]
    return result


def assert_server_saw_http2(target: Target, ws: blockws.WebSocket) -> None:
    if target.name == "hypercorn":
        assert ask(ws, "!version") == "2"
    else:
        # nghttpx's Via names the version the client spoke to it.
        assert headers_seen(ws)["via"].startswith("2 "), headers_seen(ws)


def same(a: object, b: object) -> bool:
    """Equality without pytest diffing megabytes on failure."""
    return a == b


def h2_threads() -> list[threading.Thread]:
    """The connections' reader threads (``blockws-h2-<n>``), one per HTTP/2 connection."""
    return [t for t in threading.enumerate() if re.fullmatch(r"blockws-h2-\d+", t.name)]


def wait_no_h2_threads(timeout: float = 5.0) -> None:
    """Wait until no HTTP/2 thread is left: readers, and the short-lived flusher and closer
    threads (``blockws-h2-<n>-flush``, ``-close``) that end right after them."""
    deadline = time.monotonic() + timeout
    for thread in [t for t in threading.enumerate() if t.name.startswith("blockws-h2-")]:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t.name.startswith("blockws-h2-")]
    assert not left, f"HTTP/2 threads still running: {left}"


class HookLog:
    """An on_internal_request_created hook that tags each request with ``X-Attempt: N``."""

    def __init__(self) -> None:
        self.requests: list[blockws.Request] = []
        self.versions: list[str] = []  # request.http_version when the hook ran

    def __call__(self, ws: blockws.WebSocket, request: blockws.Request) -> None:
        self.requests.append(request)
        self.versions.append(request.http_version)
        request.headers["X-Attempt"] = str(len(self.requests))


# -- servers with RFC 8441 -------------------------------------------------------------------


def test_public_names() -> None:
    """The HTTP/2 names are exported from the package, as documented (``blockws.X``)."""
    assert blockws.HTTP2Unavailable is HTTP2Unavailable
    assert blockws.HTTP2Settings is HTTP2Settings


def test_opens_over_http2(target: Target) -> None:
    hook = HookLog()
    rec = Recorder(text=False, binary=False)
    ws = blockws.WebSocket(target.url, on_internal_request_created=hook,
                           on_open=rec.on_open, on_closed=rec.on_closed, **target.options)
    ws.open()
    rec.wait_open(ws)
    assert ws.http_version == "2"
    assert len(hook.requests) == 1 and hook.requests[0] is ws.internal_request
    assert ws.internal_request.http_version == "2"
    assert_server_saw_http2(target, ws)
    # The hook's header went out on the extended CONNECT.
    assert headers_seen(ws)["x-attempt"] == "1"
    assert close_socket(ws, rec) == (1000, "")
    assert ws.error is None


@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_echo(target: Target, kind: str, size: int) -> None:
    data: str | bytes = random_text(size) if kind == "text" else os.urandom(size)
    rec = Recorder()
    ws = open_socket(target.url, rec, **target.options)
    assert ws.http_version == "2"
    ws.send(data)
    rec.pump_until(ws, lambda: len(rec.messages) == 1 or bool(rec.closes), timeout=40.0,
                   what="echo")
    assert not rec.closes, f"closed instead of echoing: {rec.summary()} error={ws.error!r}"
    assert rec.events[1][0] == kind
    got = rec.messages[0]
    assert len(got) == len(data) and same(got, data)
    assert close_socket(ws, rec) == (1000, "")
    assert ws.error is None


def test_byte_counters(target: Target) -> None:
    """bytes_sent / bytes_received count the WebSocket bytes carried by the stream."""
    data = os.urandom(10000)
    with blockws.connect(target.url, timeout=TIMEOUT, extensions=[], **target.options) as ws:
        assert ws.http_version == "2"
        ws.send(data)
        assert same(ws.receive(TIMEOUT), data)
        assert ws.bytes_sent >= len(data) + 4
        assert ws.bytes_received >= len(data) + 4


def test_client_close_with_code(target: Target) -> None:
    rec = Recorder()
    ws = open_socket(target.url, rec, close_timeout=5.0, **target.options)
    started = time.monotonic()
    ws.close(4000, "bye")
    code, reason = rec.wait_closed(ws)
    elapsed = time.monotonic() - started
    assert code == 4000 and reason in ("bye", "")
    assert ws.error is None
    assert elapsed < 2.0, f"closing took {elapsed:.2f} s: waited for close_timeout?"


def test_server_close_with_code(target: Target) -> None:
    rec = Recorder()
    ws = open_socket(target.url, rec, close_timeout=5.0, **target.options)
    started = time.monotonic()
    ws.send("!close 4001 why")
    assert rec.wait_closed(ws) == (4001, "why")
    assert time.monotonic() - started < 2.0
    assert rec.events == [("open",), ("closed", 4001, "why")]
    assert ws.error is None and not ws.is_open


def test_pings_measure_latency(target: Target) -> None:
    rec = Recorder()
    ws = open_socket(target.url, rec, send_pings=True, ping_frequency=0.1,
                     close_after_no_message=2.0, **target.options)
    # No callback announces a pong: pace the wait with echoes (events), not sleeps.
    deadline = time.monotonic() + TIMEOUT
    sent = 0
    while ws.latency is None or sent < 5:
        assert time.monotonic() < deadline, "no pong within the deadline"
        sent += 1
        ws.send(f"tick {sent}")
        rec.pump_until(ws, lambda n=sent: len(rec.messages) == n, what="echo")
    assert 0 < ws.latency < 1.0
    ws.ping(b"manual")
    ws.send("after ping")
    rec.pump_until(ws, lambda: rec.messages[-1] == "after ping")
    assert ws.is_open and ws.error is None
    assert close_socket(ws, rec) == (1000, "")


def test_server_pings_are_answered(nghttpx_target: Target) -> None:
    with blockws.connect(nghttpx_target.url, timeout=TIMEOUT, **nghttpx_target.options) as ws:
        for _ in range(3):
            ws.send("!ping")
        assert ask(ws, "after pings") == "after pings"
        assert ws.is_open
    assert ws.close_code == 1000 and ws.error is None


@pytest.mark.parametrize(("size", "frames"), [(1000, 1), (1001, 2), (10001, 11)])
def test_max_fragment_size(nghttpx_target: Target, size: int, frames: int) -> None:
    data = os.urandom(size)
    with blockws.connect(nghttpx_target.url, timeout=TIMEOUT, extensions=[],
                         max_fragment_size=1000, **nghttpx_target.options) as ws:
        assert ws.http_version == "2"
        ws.send(data)
        assert same(ws.receive(TIMEOUT), data)
        assert json.loads(ask(ws, "!stats")) == {"frames": frames, "messages": 1}


def test_deflate(target: Target) -> None:
    text = "all work and no play makes jack a dull boy " * 25000  # ~1 MiB, compressible
    with blockws.connect(target.url, timeout=TIMEOUT, **target.options) as ws:
        assert ws.http_version == "2"
        assert [e.name for e in ws.extensions] == ["permessage-deflate"]
        ws.send(text)
        assert same(ws.receive(TIMEOUT), text)
        binary = os.urandom(100 * KiB)  # incompressible
        ws.send(binary)
        assert same(ws.receive(TIMEOUT), binary)
        # Compressed on the wire: far fewer bytes than the text went through the stream.
        assert 0 < ws.bytes_sent < len(text) // 10 + len(binary) + 1024


# -- servers without RFC 8441: the fallback to HTTP/1.1 --------------------------------------


def check_fallback(ws: blockws.WebSocket, hook: HookLog) -> None:
    """Opened over HTTP/1.1 after a failed HTTP/2 attempt, with a second, hooked request."""
    assert ws.http_version == "1.1"
    assert len(hook.requests) == 2, hook.versions
    first, second = hook.requests
    assert first is not second and ws.internal_request is second
    assert second.http_version == "1.1" and hook.versions[1] == "1.1"
    # The header the hook added to the fallback request reached the server.
    assert headers_seen(ws)["x-attempt"] == "2"
    assert ask(ws, "!version") == "1.1"
    assert ask(ws, "echo") == "echo"


def open_with_hook(url: str, **options: Any) -> tuple[blockws.WebSocket, HookLog]:
    hook = HookLog()
    ws = blockws.connect(url, timeout=TIMEOUT, on_internal_request_created=hook, **options)
    return ws, hook


def check_second_socket_skips_http2(url: str, proxy: CountingProxy, **options: Any) -> None:
    before = proxy.accepted
    ws, hook = open_with_hook(url, **options)
    with ws:
        assert ws.http_version == "1.1"
        assert len(hook.requests) == 1  # no HTTP/2 attempt, no second request
        assert ask(ws, "!version") == "1.1"
    assert ws.error is None
    assert proxy.accepted == before + 1


def test_fallback_alpn_http11_only(hypercorn_h1_only_server: Any, tls_context_h2: ssl.SSLContext
                                   ) -> None:
    """ALPN picks http/1.1: the HTTP/1.1 handshake goes on the same TLS connection."""
    with counting_proxy(hypercorn_h1_only_server.wss) as proxy:
        url = proxy.url("wss", "localhost")
        ws, hook = open_with_hook(url, ssl_context=tls_context_h2)
        with ws:
            check_fallback(ws, hook)
            assert proxy.accepted == 1  # the TLS connection was reused
        assert ws.error is None
        check_second_socket_skips_http2(url, proxy, ssl_context=tls_context_h2)


def test_fallback_no_connect_protocol_default_context(node_h2_server: Any,
                                                      trusting_defaults: None) -> None:
    """ALPN picks h2 but SETTINGS lack ENABLE_CONNECT_PROTOCOL: a new connection, ALPN
    http/1.1, with blockws's default contexts."""
    with counting_proxy(node_h2_server.wss) as proxy:
        url = proxy.url("wss", "localhost")
        ws, hook = open_with_hook(url)
        with ws:
            check_fallback(ws, hook)
            assert proxy.accepted == 2  # the h2 attempt, then HTTP/1.1
        assert ws.error is None
        check_second_socket_skips_http2(url, proxy)


def test_fallback_no_connect_protocol_user_context(node_h2_server: Any,
                                                   tls_context_h2: ssl.SSLContext) -> None:
    """The same with the caller's context offering h2 (issue 10, bug 2: the socket failed
    with HTTP2Unavailable because the fallback connection offered h2 again): blockws sets
    the context's ALPN per attempt, so the fallback offers http/1.1 only and opens."""
    with counting_proxy(node_h2_server.wss) as proxy:
        url = proxy.url("wss", "localhost")
        ws, hook = open_with_hook(url, ssl_context=tls_context_h2)
        with ws:
            check_fallback(ws, hook)
            assert proxy.accepted == 2  # the h2 attempt, then HTTP/1.1
        assert ws.error is None
        check_second_socket_skips_http2(url, proxy, ssl_context=tls_context_h2)


def test_fallback_many_sockets_at_once(node_h2_server: Any, trusting_defaults: None) -> None:
    """Sockets opening together while the origin's HTTP/2 attempt fails all fall back."""
    hooks = [HookLog() for _ in range(5)]
    sockets = []
    for hook in hooks:
        rec = Recorder(text=False, binary=False)
        ws = blockws.WebSocket(node_h2_server.wss, on_internal_request_created=hook,
                               on_open=rec.on_open, on_closed=rec.on_closed)
        ws.open()
        sockets.append((ws, rec))
    for (ws, rec), hook in zip(sockets, hooks):
        rec.wait_open(ws)
        assert ws.http_version == "1.1"
        assert hook.requests[-1] is ws.internal_request
        assert headers_seen(ws)["x-attempt"] == str(len(hook.requests))
    for ws, rec in sockets:
        assert close_socket(ws, rec) == (1000, "")


def test_fallback_connect_refused(hypercorn_h2_server: Any, trusting_defaults: None) -> None:
    """An RFC 8441 server answers the extended CONNECT with 403 (h2_asgi_app's /h1-only)."""
    ws, hook = open_with_hook(hypercorn_h2_server.wss + "/h1-only")
    with ws:
        check_fallback(ws, hook)
    assert ws.error is None


def test_fallback_connect_refused_h2c(hypercorn_h2_server: Any) -> None:
    ws, hook = open_with_hook(hypercorn_h2_server.ws + "/h1-only",
                              http2=HTTP2Settings(cleartext=True))
    with ws:
        check_fallback(ws, hook)
    assert ws.error is None


def test_fallback_from_h2c_to_http11_server(websockets_server: str) -> None:
    """cleartext=True against a server without h2c: it sees the preface as bad HTTP/1.1."""
    hook = HookLog()
    with blockws.connect(websockets_server, timeout=TIMEOUT, on_internal_request_created=hook,
                         http2=HTTP2Settings(cleartext=True)) as ws:
        assert ws.http_version == "1.1"
        assert len(hook.requests) == 2 and ws.internal_request is hook.requests[1]
        assert headers_seen(ws)["x-attempt"] == "2"
    assert ws.error is None


@pytest.mark.parametrize("context", ["user", "default"])
def test_fallback_fails_on_h2_only_server(nghttpd_server: Any, context: str,
                                          request: pytest.FixtureRequest) -> None:
    """nghttpd has neither RFC 8441 nor HTTP/1.1: the fallback fails, the cause in ws.error."""
    if context == "user":
        options = {"ssl_context": request.getfixturevalue("tls_context_h2")}
    else:
        request.getfixturevalue("trusting_defaults")
        options = {}
    hook = HookLog()
    rec = Recorder()
    ws = blockws.WebSocket(nghttpd_server.wss, on_internal_request_created=hook,
                           **rec.callbacks(), **options)
    ws.open()
    assert rec.wait_closed(ws) == (1006, "")
    assert rec.events == [("closed", 1006, "")]
    assert isinstance(ws.error, blockws.BlockwsError), repr(ws.error)
    # The fallback offered http/1.1 only, with either context: the HTTP/1.1 attempt's failure.
    assert not isinstance(ws.error, HTTP2Unavailable), repr(ws.error)
    assert len(hook.requests) == 2 and hook.requests[1].http_version == "1.1"


# -- fallback disabled -------------------------------------------------------------------------


NO_RFC8441 = ["hypercorn-alpn-http11", "node-no-connect", "nghttpd", "hypercorn-refuses"]


@pytest.fixture(params=NO_RFC8441)
def no_rfc8441_url(request: pytest.FixtureRequest) -> str:
    fixture = {"hypercorn-alpn-http11": "hypercorn_h1_only_server",
               "node-no-connect": "node_h2_server", "nghttpd": "nghttpd_server",
               "hypercorn-refuses": "hypercorn_h2_server"}[request.param]
    server = request.getfixturevalue(fixture)
    return str(server.wss + ("/h1-only" if request.param == "hypercorn-refuses" else ""))


def test_fallback_disabled(no_rfc8441_url: str, tls_context_h2: ssl.SSLContext,
                           no_leaks: None) -> None:
    # A refused CONNECT leaves an idle HTTP/2 connection: let it close quickly (no_leaks).
    settings = HTTP2Settings(fallback=False, idle_timeout=0.2)
    hook = HookLog()
    rec = Recorder()
    ws = blockws.WebSocket(no_rfc8441_url, ssl_context=tls_context_h2, http2=settings,
                           on_internal_request_created=hook, **rec.callbacks())
    ws.open()
    assert rec.wait_closed(ws) == (1006, "")
    assert rec.events == [("closed", 1006, "")]
    assert isinstance(ws.error, HTTP2Unavailable), repr(ws.error)
    assert len(hook.requests) == 1  # no fallback request
    pool.failed_origins.clear()
    with pytest.raises(HTTP2Unavailable):
        blockws.connect(no_rfc8441_url, timeout=TIMEOUT, ssl_context=tls_context_h2,
                        http2=settings)


def test_fallback_disabled_after_remembered_failure(
    hypercorn_h1_only_server: Any, tls_context_h2: ssl.SSLContext
) -> None:
    """An origin that refused HTTP/2 (remembered) still means "HTTP/2 or fail" with fallback
    off, and the socket really tries (issue 10: it used to fail at once, from memory)."""
    with counting_proxy(hypercorn_h1_only_server.wss) as proxy:
        url = proxy.url("wss", "localhost")
        with blockws.connect(url, timeout=TIMEOUT, ssl_context=tls_context_h2) as ws:
            assert ws.http_version == "1.1"  # fell back; the origin is remembered
        assert pool.failed_origins.get(("wss", "localhost", proxy.port)) is not None
        before = proxy.accepted
        hook = HookLog()
        rec = Recorder()
        ws = blockws.WebSocket(url, ssl_context=tls_context_h2,
                               http2=HTTP2Settings(fallback=False),
                               on_internal_request_created=hook, **rec.callbacks())
        ws.open()
        assert rec.wait_closed(ws) == (1006, "")
        assert rec.events == [("closed", 1006, "")], "opened over HTTP/1.1 despite fallback=False"
        assert isinstance(ws.error, HTTP2Unavailable), repr(ws.error)
        assert "ALPN chose http/1.1" in str(ws.error)  # the attempt's own answer
        assert proxy.accepted == before + 1  # it connected: not a failure from memory
        assert len(hook.requests) == 1


def test_fallback_disabled_tries_despite_memory(hypercorn_h2_server: Any,
                                                trusting_defaults: None) -> None:
    """A remembered refusal does not stop a fallback=False socket from trying, and the
    server may accept this time (here: hypercorn refused the CONNECT to /h1-only, and
    accepts it to /)."""
    with blockws.connect(hypercorn_h2_server.wss + "/h1-only", timeout=TIMEOUT) as ws:
        assert ws.http_version == "1.1"
    assert ("wss", "localhost", int(hypercorn_h2_server.wss.rsplit(":", 1)[1])) in \
        pool.failed_origins
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT,
                         http2=HTTP2Settings(fallback=False)) as ws:
        assert ws.http_version == "2"
        assert ask(ws, "!version") == "2"
    assert ws.error is None


def test_fallback_disabled_h2c(websockets_server: str) -> None:
    with pytest.raises(HTTP2Unavailable):
        blockws.connect(websockets_server, timeout=TIMEOUT,
                        http2=HTTP2Settings(cleartext=True, fallback=False))


def test_http2_disabled(hypercorn_h2_server: Any, trusting_defaults: None) -> None:
    hook = HookLog()
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT,
                         http2=HTTP2Settings(enabled=False),
                         on_internal_request_created=hook) as ws:
        assert ws.http_version == "1.1" and len(hook.requests) == 1
        assert ask(ws, "!version") == "1.1"
    assert pool.connections() == []


# -- connection sharing -----------------------------------------------------------------------


SHARED = ["hypercorn-h2c", "nghttpx-tls"]


@pytest.fixture(params=SHARED)
def shared_target(request: pytest.FixtureRequest) -> Iterator[tuple[Target, CountingProxy]]:
    """An RFC 8441 server behind a CountingProxy."""
    target = make_target(request, request.param)
    with counting_proxy(target.url) as proxy:
        scheme = "wss" if "tls" in request.param else "ws"
        host = "localhost" if scheme == "wss" else "127.0.0.1"
        yield Target(target.name, proxy.url(scheme, host), target.options), proxy


def open_many(url: str, n: int, **options: Any) -> list[tuple[blockws.WebSocket, Recorder]]:
    sockets = []
    for _ in range(n):
        rec = Recorder()
        ws = blockws.WebSocket(url, **rec.callbacks(), **options)
        ws.open()  # all connecting at once
        sockets.append((ws, rec))
    for ws, rec in sockets:
        rec.wait_open(ws)
        assert ws.http_version == "2"
    return sockets


def echo_all(sockets: list[tuple[blockws.WebSocket, Recorder]], size: int = 1000) -> None:
    payloads = []
    for i, (ws, _rec) in enumerate(sockets):
        data = bytes([i]) * size
        payloads.append(data)
        ws.send(data)
    for (ws, rec), data in zip(sockets, payloads):
        rec.pump_until(ws, lambda rec=rec, data=data: bool(rec.closes) or (
            bool(rec.messages) and rec.messages[-1] == data), timeout=30.0, what="echo")
        assert not rec.closes, f"closed instead of echoing: {rec.summary()} error={ws.error!r}"


def test_ten_sockets_share_one_connection(shared_target: tuple[Target, CountingProxy]) -> None:
    target, proxy = shared_target
    sockets = open_many(target.url, 10, **target.options)
    assert proxy.accepted == 1
    assert len(pool.connections()) == 1
    echo_all(sockets)
    # One closes, the server closes another, a third is aborted (not the one that opened the
    # connection: see test_abort_one_socket_keeps_the_others); the rest keep echoing.
    first, first_rec = sockets.pop(0)
    assert close_socket(first, first_rec) == (1000, "")
    assert first.error is None
    ws, rec = sockets.pop(0)
    ws.send("!close 4002 you")
    assert rec.wait_closed(ws) == (4002, "you") and ws.error is None
    ws, rec = sockets.pop(0)
    ws.abort()
    assert rec.wait_closed(ws) == (1006, "")
    echo_all(sockets, 100 * KiB)
    # Big messages on every stream at once: flow control shares the connection.
    echo_all(sockets, MiB)
    assert proxy.accepted == 1
    for ws, rec in sockets:
        assert close_socket(ws, rec) == (1000, "")
        assert ws.error is None
    assert proxy.accepted == 1


@pytest.mark.parametrize("which", ["opener", "other"])
def test_abort_one_socket_keeps_the_others(hypercorn_h2_server: Any, which: str) -> None:
    """abort() resets one stream; the socket that opened the shared connection is no
    different from the others."""
    sockets = open_many(hypercorn_h2_server.ws, 3, http2=HTTP2Settings(cleartext=True))
    echo_all(sockets)
    assert len(pool.connections()) == 1
    ws, rec = sockets.pop(0 if which == "opener" else 1)
    ws.abort()
    assert rec.wait_closed(ws) == (1006, "")
    echo_all(sockets)
    for ws, rec in sockets:
        assert ws.is_open, repr(ws.error)
        assert close_socket(ws, rec) == (1000, "")
        assert ws.error is None


def test_close_while_connecting_keeps_the_others(hypercorn_h2_server: Any) -> None:
    """A socket still waiting for its CONNECT answer (``/slow``) is closed at once."""
    settings = HTTP2Settings(cleartext=True)
    slow_rec = Recorder()
    slow = blockws.WebSocket(hypercorn_h2_server.ws + "/slow", http2=settings,
                             **slow_rec.callbacks())
    slow.open()  # it opens the shared connection, then waits ~3 s for its answer
    sockets = open_many(hypercorn_h2_server.ws, 2, http2=settings)
    assert len(pool.connections()) == 1
    started = time.monotonic()
    slow.close()
    assert slow_rec.wait_closed(slow) == (1006, "")
    assert time.monotonic() - started < 1.0
    echo_all(sockets)
    for ws, rec in sockets:
        assert ws.is_open, repr(ws.error)
        assert close_socket(ws, rec) == (1000, "")


def test_no_sharing(hypercorn_h2_server: Any) -> None:
    settings = HTTP2Settings(cleartext=True, share=False)
    with counting_proxy(hypercorn_h2_server.ws) as proxy:
        sockets = open_many(proxy.url("ws"), 3, http2=settings)
        assert proxy.accepted == 3
        echo_all(sockets)
        for ws, rec in sockets:
            assert close_socket(ws, rec) == (1000, "")


def test_max_concurrent_streams_opens_another_connection(
    hypercorn_h2_three_streams_server: Any,
) -> None:
    settings = HTTP2Settings(cleartext=True)
    with counting_proxy(hypercorn_h2_three_streams_server.ws) as proxy:
        url = proxy.url("ws")
        sockets = open_many(url, 3, http2=settings)
        assert proxy.accepted == 1
        sockets += open_many(url, 1, http2=settings)  # a 4th stream does not fit
        assert proxy.accepted == 2
        sockets += open_many(url, 3, http2=settings)  # 2 more fit there, the 7th not
        assert proxy.accepted == 3
        assert len(pool.connections()) == 3
        echo_all(sockets)
        # A stream ends on the first connection: its slot is reused, no new connection.
        ws, rec = sockets.pop(0)
        assert close_socket(ws, rec) == (1000, "")
        sockets += open_many(url, 1, http2=settings)
        assert proxy.accepted == 3
        echo_all(sockets)
        for ws, rec in sockets:
            assert close_socket(ws, rec) == (1000, "")


def test_idle_connection_reused_then_closed(hypercorn_h2_server: Any) -> None:
    settings = HTTP2Settings(cleartext=True, idle_timeout=0.5)
    with counting_proxy(hypercorn_h2_server.ws) as proxy:
        url = proxy.url("ws")
        for _ in range(2):  # the second socket comes within the idle timeout
            ws, rec = open_many(url, 1, http2=settings)[0]
            echo_all([(ws, rec)])
            assert close_socket(ws, rec) == (1000, "")
        assert proxy.accepted == 1
        threads = h2_threads()
        assert len(threads) == 1
        threads[0].join(5.0)  # the idle timeout closes the connection and ends its thread
        assert not threads[0].is_alive()
        assert pool.connections() == []
        ws, rec = open_many(url, 1, http2=settings)[0]
        assert proxy.accepted == 2
        assert close_socket(ws, rec) == (1000, "")


# -- the server drops the shared connection ---------------------------------------------------


def check_all_lost(sockets: list[tuple[blockws.WebSocket, Recorder]]) -> None:
    for ws, rec in sockets:
        assert rec.wait_closed(ws) == (1006, "")  # exactly one on_closed
        assert isinstance(ws.error, blockws.TransportError), repr(ws.error)
        assert not ws.is_open
        with pytest.raises(blockws.ConnectionClosed):
            ws.send("too late")


def test_connection_cut(hypercorn_h2_server: Any) -> None:
    with counting_proxy(hypercorn_h2_server.ws) as proxy:
        sockets = open_many(proxy.url("ws"), 5, http2=HTTP2Settings(cleartext=True))
        echo_all(sockets)
        assert proxy.accepted == 1
        proxy.cut()
        check_all_lost(sockets)
    for ws, _rec in sockets:
        assert isinstance(ws.error, blockws.ConnectionLost), repr(ws.error)
    assert pool.connections() == []


def test_connection_cut_while_sending(hypercorn_h2_server: Any) -> None:
    with counting_proxy(hypercorn_h2_server.ws) as proxy:
        sockets = open_many(proxy.url("ws"), 3, http2=HTTP2Settings(cleartext=True))
        for ws, _rec in sockets:
            for _ in range(8):
                ws.send(os.urandom(MiB))
        proxy.cut()
        check_all_lost(sockets)


@pytest.fixture
def own_hypercorn(tls_certs: Any) -> Iterator[tuple[str, Any]]:
    """A hypercorn (RFC 8441, TLS) for this test alone, to be killed."""
    port = free_port()
    cmd = [sys.executable, "-m", "hypercorn", "-w", "0", "--certfile", tls_certs.certfile,
           "--keyfile", tls_certs.keyfile, "-b", f"127.0.0.1:{port}", "h2_asgi_app:app"]
    with start_server(cmd, port, cwd=str(PEERS_DIR)) as proc:
        yield f"wss://localhost:{port}", proc


def test_server_killed(own_hypercorn: tuple[str, Any], tls_context_h2: ssl.SSLContext) -> None:
    url, proc = own_hypercorn
    sockets = open_many(url, 4, ssl_context=tls_context_h2)
    echo_all(sockets)
    assert len(pool.connections()) == 1
    proc.kill()
    proc.wait(TIMEOUT)
    check_all_lost(sockets)
    assert pool.connections() == []


# -- hygiene -----------------------------------------------------------------------------------


def test_no_h2_thread_remains(hypercorn_h2_server: Any, tls_context_h2: ssl.SSLContext) -> None:
    assert h2_threads() == []
    sockets = open_many(hypercorn_h2_server.wss, 3, ssl_context=tls_context_h2,
                        http2=HTTP2Settings(idle_timeout=0.2))
    sockets += open_many(hypercorn_h2_server.ws, 3,
                         http2=HTTP2Settings(cleartext=True, idle_timeout=0.2))
    echo_all(sockets)
    threads = h2_threads()
    assert len(threads) == 2  # one connection per origin
    for ws, rec in sockets:
        assert close_socket(ws, rec) == (1000, "")
    for thread in threads:
        thread.join(5.0)  # after the idle timeout, the connection closes
    wait_no_h2_threads()
    assert pool.connections() == []


def test_url_credentials_and_origin_reach_the_server_over_http2(hypercorn_h2_server: Any) -> None:
    # HTTP/1.1 and HTTP/2 build their offer headers in one place (offer_headers).
    url = hypercorn_h2_server.ws.replace("ws://", "ws://user:p%40ss@")
    with blockws.connect(url, timeout=TIMEOUT, origin="https://game.example",
                         subprotocols=["chat"], http2=HTTP2Settings(cleartext=True)) as ws:
        assert ws.http_version == "2"
        seen = headers_seen(ws)
    assert seen["authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert seen["origin"] == "https://game.example"
    assert "chat" in seen["sec-websocket-protocol"]


# -- the caller's context, and what is remembered (issue 10) ----------------------------------


def origin_of(url: str) -> tuple[str, str, int]:
    return blockws.Request(url).parsed_url.origin_key


def test_caller_context_without_alpn_gets_http2(hypercorn_h2_server: Any, tls_certs: Any,
                                                tls_context_h2: ssl.SSLContext) -> None:
    """Issue 10, bug 1: a context offering no ALPN opened over HTTP/1.1 and the origin was
    remembered as "no HTTP/2", so the next socket, whose context offered h2, failed with
    HTTP2Unavailable. blockws now sets the ALPN list itself: both open over HTTP/2."""
    url = hypercorn_h2_server.wss
    bare = tls_certs.client_context()  # no set_alpn_protocols()
    with blockws.connect(url, timeout=TIMEOUT, ssl_context=bare) as ws:
        assert ws.http_version == "2" and ask(ws, "!version") == "2"
    assert origin_of(url) not in pool.failed_origins
    with blockws.connect(url, timeout=TIMEOUT, ssl_context=tls_context_h2) as ws:
        assert ws.http_version == "2" and ask(ws, "!version") == "2"
    assert ws.error is None


def test_one_context_for_http2_and_fallback_at_once(hypercorn_h2_server: Any,
                                                    node_h2_server: Any, tls_certs: Any) -> None:
    """Sockets sharing one caller's context connect at the same time, some to an RFC 8441
    server (ALPN h2 wanted) and some falling back (ALPN http/1.1 wanted): each connection
    gets the list of its own attempt."""
    ctx = tls_certs.client_context()
    sockets = []
    for i in range(8):
        url = hypercorn_h2_server.wss if i % 2 else node_h2_server.wss
        rec = Recorder(text=False, binary=False)
        ws = blockws.WebSocket(url, ssl_context=ctx, on_open=rec.on_open,
                               on_closed=rec.on_closed, http2=HTTP2Settings(share=False))
        ws.open()
        sockets.append((i, ws, rec))
    for i, ws, rec in sockets:
        rec.wait_open(ws)
        assert ws.http_version == ("2" if i % 2 else "1.1"), i
    for _, ws, rec in sockets:
        assert close_socket(ws, rec) == (1000, "")
    assert origin_of(hypercorn_h2_server.wss) not in pool.failed_origins
    assert origin_of(node_h2_server.wss) in pool.failed_origins


def test_timeout_is_not_remembered(hypercorn_h2_server: Any, trusting_defaults: None) -> None:
    """h2_asgi_app answers the CONNECT to /slow after 3 s: the attempt times out, and the
    origin is not remembered: the next socket opens over HTTP/2."""
    with pytest.raises(blockws.OpenTimeout):
        blockws.connect(hypercorn_h2_server.wss + "/slow", timeout=1.0)
    assert origin_of(hypercorn_h2_server.wss) not in pool.failed_origins
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT) as ws:
        assert ws.http_version == "2"


def _settings_then(then: bytes) -> Callable[[MiniConn], None]:
    """A MiniH2 scenario: the server's SETTINGS (extended CONNECT on) followed by ``then``
    in the same write, before the client's CONNECT; then wait for the client to leave."""
    def scenario(conn: MiniConn) -> None:
        conn.read_frame()  # the client's SETTINGS
        conn.send(frame(SETTINGS, 0, 0, struct.pack("!HI", SETTINGS_ENABLE_CONNECT_PROTOCOL, 1))
                  + then)
        conn.read_until(lambda f: False)
    return scenario


def _answer_connect(answer: Callable[[int], bytes]) -> Callable[[MiniConn], None]:
    """A MiniH2 scenario: a normal HTTP/2 handshake, then ``answer(stream_id)`` to the
    extended CONNECT; then wait for the client to leave."""
    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        request = conn.read_until(lambda f: f.type == HEADERS)
        conn.send(answer(request.stream_id))
        conn.read_until(lambda f: False)
    return scenario


def _hangs_up(conn: MiniConn) -> None:
    conn.read_frame()  # the client's SETTINGS, then close without ours


def _status(code: bytes) -> Callable[[int], bytes]:
    # HPACK literal header field without indexing, name ":status" (static index 8).
    return lambda sid: frame(HEADERS, END_HEADERS, sid, b"\x08\x03" + code)


REFUSED_STREAM, ENHANCE_YOUR_CALM, HTTP_1_1_REQUIRED = 0x7, 0xB, 0xD

#: name: (scenario, remembered?)
H2_ENDINGS: dict[str, tuple[Callable[[MiniConn], None], bool]] = {
    "goaway-before-connect": (_settings_then(frame(GOAWAY, 0, 0, struct.pack(
        "!II", 0, ENHANCE_YOUR_CALM))), False),
    "closed-before-settings": (_hangs_up, False),
    "connect-reset-refused-stream": (_answer_connect(lambda sid: frame(
        RST_STREAM, 0, sid, struct.pack("!I", REFUSED_STREAM))), False),
    "connect-503": (_answer_connect(_status(b"503")), False),
    "connect-reset-protocol-error": (_answer_connect(lambda sid: frame(
        RST_STREAM, 0, sid, struct.pack("!I", PROTOCOL_ERROR))), True),
    "connect-reset-http-1.1-required": (_answer_connect(lambda sid: frame(
        RST_STREAM, 0, sid, struct.pack("!I", HTTP_1_1_REQUIRED))), True),
    "connect-403": (_answer_connect(_status(b"403")), True),
    "no-connect-protocol": (lambda conn: conn.handshake({SETTINGS_ENABLE_CONNECT_PROTOCOL: 0})
                            or conn.read_until(lambda f: False), True),
}


@pytest.mark.parametrize("ending", list(H2_ENDINGS))
def test_only_refusals_are_remembered(ending: str) -> None:
    """Issue 10: a GOAWAY, a reset or a lost connection is never remembered (it was); the
    server's own "no" is. A transient failure leaves the next socket trying HTTP/2 again."""
    scenario, remembered = H2_ENDINGS[ending]
    # Not shared: each socket makes its own connection, which the scenario serves.
    settings = HTTP2Settings(cleartext=True, fallback=False, share=False, idle_timeout=0.2)
    with MiniH2(scenario) as server:
        with pytest.raises(HTTP2Unavailable) as info:
            blockws.connect(server.url, timeout=TIMEOUT, http2=settings)
        assert info.value.refused is remembered, str(info.value)
        assert (origin_of(server.url) in pool.failed_origins) is remembered
        with pytest.raises(HTTP2Unavailable):
            blockws.connect(server.url, timeout=TIMEOUT, http2=settings)
        assert len(server.conns) == 2  # fallback=False tries again, remembered or not


def test_remembered_refusal_expires(node_h2_server: Any, trusting_defaults: None,
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """The refusal skips HTTP/2 for later sockets (the log says it came from memory) until it
    expires; then HTTP/2 is tried again."""
    now = [1000.0]
    monkeypatch.setattr(pool, "failed_origins", RefusedOrigins(ttl=300.0, clock=lambda: now[0]))
    with counting_proxy(node_h2_server.wss) as proxy:
        url = proxy.url("wss", "localhost")
        with blockws.connect(url, timeout=TIMEOUT) as ws:
            assert ws.http_version == "1.1"
        assert proxy.accepted == 2  # refused HTTP/2, then HTTP/1.1
        now[0] += 299.0
        with caplog.at_level(logging.INFO, logger="blockws"):
            check_second_socket_skips_http2(url, proxy)
        assert "HTTP/2 not tried: this origin refused it 299 s ago" in caplog.text
        assert "SETTINGS_ENABLE_CONNECT_PROTOCOL" in caplog.text  # the reason remembered
        now[0] += 1.0
        before = proxy.accepted
        ws, hook = open_with_hook(url)
        with ws:
            check_fallback(ws, hook)  # tried HTTP/2 again, and fell back
        assert proxy.accepted == before + 2


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_error_says_http2_was_skipped_from_memory(nghttpd_server: Any,
                                                  trusting_defaults: None) -> None:
    """nghttpd speaks h2 only, without RFC 8441: the first socket's fallback fails; the
    second skips HTTP/2 from memory, and its error says so."""
    with pytest.raises(blockws.BlockwsError) as first:
        blockws.connect(nghttpd_server.wss, timeout=TIMEOUT)
    assert not getattr(first.value, "__notes__", None)
    with pytest.raises(blockws.BlockwsError) as second:
        blockws.connect(nghttpd_server.wss, timeout=TIMEOUT)
    notes = getattr(second.value, "__notes__", [])
    assert any("HTTP/2 not tried: this origin refused it" in note for note in notes), notes


@pytest.mark.unit
def test_refused_origins_expire() -> None:
    now = [0.0]
    refused = RefusedOrigins(ttl=300.0, clock=lambda: now[0])
    origin = ("wss", "example.com", 443)
    assert refused.get(origin) is None and origin not in refused
    refused.add(origin, "no RFC 8441")
    now[0] = 120.0
    got = refused.get(origin)
    assert got is not None and got.reason == "no RFC 8441"
    assert refused.age(got) == 120.0 and refused.left(got) == 180.0
    now[0] = 299.9
    assert origin in refused
    refused.add(origin, "again")  # a new refusal starts the time again
    now[0] = 500.0
    assert origin in refused
    now[0] = 599.9 + 0.1
    assert origin not in refused
    refused.add(origin, "x")
    refused.clear()
    assert origin not in refused
