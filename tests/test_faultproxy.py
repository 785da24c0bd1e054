"""Network faults against live sockets in steady state (issue 11, "a fault proxy").

Each test opens a socket through :class:`faultproxy.FaultProxy` to a real peer, exchanges
messages (steady state), injects one fault, and checks one of the two allowed endings:
the socket carries on with nothing lost or reordered, or it ends in exactly one
``on_closed`` with the right code (1006: no close frame got through) and a blockws error.
Every fault runs over four stacks: plain TCP and TLS (the `websockets` echo peer),
permessage-deflate (the same peer, compressing) and HTTP/2 (hypercorn, h2c, one
connection per socket so that a fault hits one socket).

"Cut at every offset" ends the connection after each possible number of bytes of the
frame that answers a small message (measured first: a TLS record or an HTTP/2 DATA frame
around it is longer), and "split at every offset" delivers that frame in two reads at
each offset, on one socket that must carry on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import TLSCerts
from faultproxy import FaultProxy
from faultserver import Recorder

import blockws
from blockws.http2 import HTTP2Settings

KINDS = ["plain", "tls", "deflate", "h2"]


@dataclass
class Stack:
    """How to reach one peer through a proxy, and the socket options for it."""

    kind: str
    upstream_port: int
    scheme: str
    host: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self, proxy: FaultProxy, rec: Recorder, **options: Any) -> blockws.WebSocket:
        ws = blockws.WebSocket(proxy.url(self.scheme, self.host), **rec.callbacks(),
                               **{**self.options, **options})
        ws.open()
        rec.wait_open(ws)
        assert ws.http_version == ("2" if self.kind == "h2" else "1.1")
        assert bool(ws.extensions) == (self.kind == "deflate")
        return ws


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(params=KINDS)
def stack(request: pytest.FixtureRequest, tls_certs: TLSCerts) -> Iterator[Stack]:
    kind = request.param
    if kind == "plain":
        url = request.getfixturevalue("websockets_server")
        yield Stack(kind, _port(url), "ws", "127.0.0.1", {"extensions": []})
    elif kind == "tls":
        url = request.getfixturevalue("websockets_tls_server")
        yield Stack(kind, _port(url), "wss", "localhost",
                    {"extensions": [], "http2": False, "ssl_context": tls_certs.client_context()})
    elif kind == "deflate":
        url = request.getfixturevalue("websockets_deflate_server")
        # min_size=0: even the small messages of these tests are compressed.
        yield Stack(kind, _port(url), "ws", "127.0.0.1",
                    {"extensions": [blockws.PerMessageDeflate(min_size=0)]})
    else:
        server = request.getfixturevalue("hypercorn_h2_server")
        yield Stack(kind, _port(server.ws), "ws", "127.0.0.1", {
            "extensions": [],
            "http2": HTTP2Settings(cleartext=True, fallback=False, share=False, idle_timeout=0.2),
        })


def exchange(ws: blockws.WebSocket, rec: Recorder, messages: list[Any],
             timeout: float = 10.0) -> None:
    """Send ``messages`` and check the echo: all of them, in order, nothing else."""
    before = len(rec.messages)
    for message in messages:
        ws.send(message)
    rec.pump_until(ws, lambda: len(rec.messages) >= before + len(messages) or bool(rec.closes),
                   timeout, f"{len(messages)} echoes")
    assert rec.messages[before:] == messages
    assert not rec.closes


def close_cleanly(ws: blockws.WebSocket, rec: Recorder) -> None:
    ws.close()
    assert rec.wait_closed(ws) == (1000, "")
    assert ws.error is None


def check_failed(ws: blockws.WebSocket, rec: Recorder, *errors: type[BaseException]) -> None:
    """Exactly one on_closed, 1006, with one of ``errors`` (a blockws error) as the cause."""
    assert rec.wait_closed(ws) == (1006, "")
    assert isinstance(ws.error, errors or (blockws.TransportError,)), repr(ws.error)
    assert isinstance(ws.error, blockws.BlockwsError)


def payloads(n: int, size: int) -> list[Any]:
    """``n`` messages, text and binary in turn, of incompressible content."""
    out: list[Any] = []
    for i in range(n):
        data = os.urandom(size)
        out.append(data if i % 2 else data.hex()[:size])
    return out


# -- faults that a socket carries on through --------------------------------------------------


@pytest.mark.timeout(60)
def test_latency(stack: Stack, no_leaks: None) -> None:
    """40 ms each way: every message arrives, in order; the ping's latency shows the delay."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec, send_pings=True, ping_frequency=0.2,
                        close_after_no_message=2.0)
        exchange(ws, rec, ["before"])
        proxy.latency = 0.04
        exchange(ws, rec, payloads(30, 300))
        # A pong posts no callback, so ws.wait() does not wake for it: look every 50 ms.
        first, deadline = ws.latency, time.monotonic() + 5.0
        while (ws.latency is None or ws.latency == first) and time.monotonic() < deadline:
            ws.wait(0.05)
            ws.update()
        assert ws.latency is not None and ws.latency >= 0.08, ws.latency
        close_cleanly(ws, rec)


@pytest.mark.timeout(60)
def test_bandwidth_cap(stack: Stack, no_leaks: None) -> None:
    """200 KB/s each way: 160 KB each way arrives whole and in order, taking its time."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec)
        exchange(ws, rec, ["before"])
        proxy.bandwidth = 200_000
        start = time.monotonic()
        exchange(ws, rec, payloads(8, 20_000), timeout=20.0)
        assert time.monotonic() - start >= 0.5  # the cap was in force
        proxy.bandwidth = 0
        close_cleanly(ws, rec)


@pytest.mark.timeout(60)
def test_short_stall(stack: Stack, no_leaks: None) -> None:
    """A stall shorter than close_after_no_message: nothing arrives meanwhile, then
    everything, in order; the pings in flight do not close the socket."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec, send_pings=True, ping_frequency=0.2,
                        close_after_no_message=3.0)
        exchange(ws, rec, ["before"])
        proxy.stall()
        sent = payloads(6, 500)
        for message in sent:
            ws.send(message)
        deadline = time.monotonic() + 0.6
        while (left := deadline - time.monotonic()) > 0:  # the stall itself
            ws.wait(left)
            ws.update()
        assert rec.messages == ["before"] and not rec.closes
        proxy.resume()
        rec.pump_until(ws, lambda: len(rec.messages) == 7 or bool(rec.closes))
        assert rec.messages == ["before", *sent]
        exchange(ws, rec, ["after"])
        close_cleanly(ws, rec)


@pytest.mark.timeout(60)
def test_split_at_every_offset(stack: Stack, no_leaks: None) -> None:
    """The answer to a small message, delivered in two reads cut at each offset in turn:
    each arrives whole, and the socket carries on."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec)
        # Twice first: with deflate's context takeover, a repeated message is shorter.
        exchange(ws, rec, ["hello", "hello"])
        proxy.mark()
        exchange(ws, rec, ["hello"])
        size = proxy.since_mark()
        assert size >= 4  # at least a frame header and some payload
        for offset in range(size + 1):
            proxy.arm("split", offset)
            exchange(ws, rec, ["hello"])
            assert proxy.fired.is_set()
        close_cleanly(ws, rec)


# -- faults that end a socket ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_long_stall_ends_by_ping_timeout(stack: Stack, no_leaks: None) -> None:
    """A stall longer than close_after_no_message: one on_closed, 1006, PingTimeout."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec, send_pings=True, ping_frequency=0.1,
                        close_after_no_message=0.5)
        exchange(ws, rec, ["before"])
        proxy.stall()
        try:
            start = time.monotonic()
            check_failed(ws, rec, blockws.PingTimeout)
            assert time.monotonic() - start < 3.0
        finally:
            proxy.resume()
        assert rec.messages == ["before"]


@pytest.mark.timeout(60)
def test_rst_mid_frame(stack: Stack, no_leaks: None) -> None:
    """A reset in the middle of a 4 KB frame: one on_closed, 1006, ConnectionLost, and no
    part of the message delivered."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec)
        exchange(ws, rec, ["before"])
        proxy.arm("rst", 2000)
        ws.send(os.urandom(4000))
        check_failed(ws, rec, blockws.ConnectionLost)
        assert proxy.fired.is_set()
        assert rec.messages == ["before"]


@pytest.mark.timeout(60)
def test_half_close(stack: Stack, no_leaks: None) -> None:
    """The server's direction ends (a FIN reaches the client) while the client's stays
    open: one on_closed, 1006, without waiting for a timeout."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec, close_timeout=30.0)
        exchange(ws, rec, ["before"])
        start = time.monotonic()
        proxy.half_close()
        check_failed(ws, rec)
        assert time.monotonic() - start < 5.0
        assert rec.messages == ["before"]


@pytest.mark.timeout(120)
def test_cut_at_every_offset(stack: Stack, no_leaks: None) -> None:
    """The connection ends (FIN both ways) after each possible number of bytes of the
    answer to a small message, a new socket each time: one on_closed, 1006, and the
    message delivered whole exactly when all its bytes got through, never in part."""
    with FaultProxy(stack.upstream_port) as proxy:
        rec = Recorder()
        ws = stack.open(proxy, rec)
        exchange(ws, rec, ["before"])
        proxy.mark()
        exchange(ws, rec, ["hello"])
        size = proxy.since_mark()
        close_cleanly(ws, rec)
        for offset in range(size + 1):
            rec = Recorder()
            ws = stack.open(proxy, rec)
            exchange(ws, rec, ["before"])
            proxy.arm("cut", offset)
            ws.send("hello")
            check_failed(ws, rec)
            got = rec.messages[1:]
            assert got in ([], ["hello"]), (offset, got)
            if stack.kind != "h2":  # HTTP/2 may put a WINDOW_UPDATE before or after the echo
                assert got == (["hello"] if offset == size else []), (offset, size, got)
