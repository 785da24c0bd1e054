"""Reconnection against real servers: a `websockets` server killed and restarted on the same
port, a raw-socket server that refuses twice and then accepts, clean and unclean closes by
the server, close() during the backoff, and 50 reconnections without a leaked thread or
descriptor.

The policy's arithmetic and the engine's rules over memory transports are in
tests/test_reconnect.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import OP_CLOSE, OP_TEXT, Peer, fault_server

import blockws
from blockws import Reconnect
from peerutil import PEERS_DIR, free_port, start_server

pytestmark = pytest.mark.timeout(60)

#: Quick retries for tests: the backoff is real time.
QUICK = Reconnect(min_delay=0.02, max_delay=0.2, factor=2.0, jitter=0.5)


class Events:
    """Every callback in the order it ran, with what ws.error said then."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_open": lambda ws: self.log.append(("open",)),
            "on_message": lambda ws, text: self.log.append(("text", text)),
            "on_reconnecting": lambda ws, attempt, delay: self.log.append(
                ("reconnecting", attempt, delay, ws.error)
            ),
            "on_closed": lambda ws, code, reason: self.log.append(
                ("closed", code, reason, ws.error)
            ),
        }

    def count(self, kind: str) -> int:
        return sum(1 for e in self.log if e[0] == kind)

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == kind]

    def pump(self, ws: blockws.WebSocket, test: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            left = deadline - time.monotonic()
            assert left > 0, f"condition not reached: {self.log} error={ws.error!r}"
            ws.wait(min(left, 0.5))
            ws.update()

    def echo(self, ws: blockws.WebSocket, text: str) -> None:
        ws.send(text)
        self.pump(ws, lambda: ("text", text) in self.log)


class RestartableServer:
    """The `websockets` echo peer on a fixed port, stopped and started by the test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        assert self._stack is None
        cmd = [sys.executable, str(PEERS_DIR / "ws_echo_server.py"), "--port", str(self.port)]
        stack = contextlib.ExitStack()
        stack.enter_context(start_server(cmd, self.port))
        self._stack = stack

    def stop(self) -> None:
        """SIGTERM: the process dies at once; its connections end without a close frame."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@pytest.fixture
def restartable() -> Iterator[RestartableServer]:
    server = RestartableServer()
    server.start()
    yield server
    server.stop()


def blockws_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("blockws"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_server_restarted_mid_session(no_leaks: None, restartable: RestartableServer) -> None:
    """The server process is killed mid-session and started again on the same port: the
    socket reconnects by itself (refused while the server is down), on_open runs again,
    and messages flow on the new connection; on_closed runs once, at the end."""
    events = Events()
    ws = blockws.WebSocket(restartable.url, reconnect=QUICK, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    events.echo(ws, "before")
    restartable.stop()
    # The loss, then at least one attempt refused while nothing listens on the port.
    events.pump(ws, lambda: events.count("reconnecting") >= 2)
    assert not ws.is_open and not ws.closed
    with pytest.raises(blockws.InvalidState):
        ws.send("while down")
    restartable.start()
    events.pump(ws, lambda: events.count("open") == 2)
    reconnecting = events.of("reconnecting")
    assert [e[1] for e in reconnecting] == list(range(1, len(reconnecting) + 1))
    assert isinstance(reconnecting[0][3], blockws.ConnectionLost)  # no close frame came
    refused = [e[3] for e in reconnecting[1:]]
    assert refused and all(isinstance(e, blockws.ConnectError) for e in refused), refused
    assert all(0 < e[2] <= QUICK.max_delay for e in reconnecting)
    assert ws.is_open and ws.error is None
    events.echo(ws, "after")
    ws.close()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.of("closed") == [("closed", 1000, "", None)]
    assert ws.join(5)


def test_refused_twice_then_accepted_with_a_fresh_token_each_time(no_leaks: None) -> None:
    """A raw-socket server: the first connection opens and then drops; the next two
    handshakes are refused (HTTP 503); the fourth is accepted. Every attempt sends a new
    request, and on_internal_request_created refreshes its token each time."""
    seen: list[str] = []
    lock = threading.Lock()

    def handler(peer: Peer) -> None:
        headers = peer.read_request()
        with lock:
            seen.append(headers.get("authorization", ""))
            index = len(seen) - 1
        if index in (1, 2):
            peer.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        peer.send(peer.response_101())
        while True:
            _fin, opcode, payload = peer.read_frame()
            if opcode == OP_CLOSE:
                peer.send_frame(OP_CLOSE, payload)
                return
            peer.send_frame(opcode, payload)
            if index == 0:
                return  # the first connection drops after one echo: no close frame

    tokens = iter(range(1, 100))

    def refresh(ws: blockws.WebSocket, request: blockws.Request) -> None:
        request.headers["Authorization"] = f"Bearer t{next(tokens)}"

    events = Events()
    with fault_server(handler) as server:
        ws = blockws.WebSocket(server.url, reconnect=QUICK, on_internal_request_created=refresh,
                               extensions=[], **events.callbacks())
        ws.open()
        events.pump(ws, lambda: events.count("open") == 1)
        events.echo(ws, "one")  # and then the server drops the connection
        events.pump(ws, lambda: events.count("open") == 2)
        events.echo(ws, "two")
        ws.close()
        events.pump(ws, lambda: events.count("closed") == 1)
    reconnecting = events.of("reconnecting")
    assert [e[1] for e in reconnecting] == [1, 2, 3]
    assert isinstance(reconnecting[0][3], blockws.ConnectionLost)
    for _, _attempt, _delay, error in reconnecting[1:]:
        assert isinstance(error, blockws.InvalidStatus) and error.status == 503
    assert seen == ["Bearer t1", "Bearer t2", "Bearer t3", "Bearer t4"]
    assert [e[0] for e in events.log] == [
        "open", "text", "reconnecting", "reconnecting", "reconnecting", "open", "text", "closed"
    ]
    assert events.of("closed") == [("closed", 1000, "", None)]


def test_clean_close_by_the_server_ends_the_socket(websockets_server: str, no_leaks: None
                                                   ) -> None:
    """1000 from the server: the close was meant, so with the default policy the socket
    ends (on_closed once, no reconnection)."""
    events = Events()
    ws = blockws.WebSocket(websockets_server, reconnect=QUICK, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    ws.send("!close 1000 done")
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.count("reconnecting") == 0
    assert events.of("closed") == [("closed", 1000, "done", None)]
    assert ws.join(5)


def test_clean_close_reconnects_with_on_clean_close(websockets_server: str, no_leaks: None
                                                    ) -> None:
    events = Events()
    policy = Reconnect(min_delay=0.02, max_delay=0.2, on_clean_close=True)
    ws = blockws.WebSocket(websockets_server, reconnect=policy, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    ws.send("!close 1000 done")
    events.pump(ws, lambda: events.count("open") == 2)
    (_, attempt, delay, error), = events.of("reconnecting")
    assert attempt == 1 and 0.01 <= delay <= 0.02 and error is None  # a clean close: no error
    events.echo(ws, "again")
    ws.close()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.of("closed") == [("closed", 1000, "", None)]


def test_service_restart_code_reconnects_by_default(websockets_server: str) -> None:
    events = Events()
    ws = blockws.WebSocket(websockets_server, reconnect=True, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    ws.send("!close 1012 restarting")
    events.pump(ws, lambda: events.count("open") == 2)
    (_, attempt, delay, _error), = events.of("reconnecting")
    assert attempt == 1 and 0.25 <= delay <= 0.5  # Reconnect(): 0.5 s less up to half
    assert (ws.close_code, ws.close_reason) == (1012, "restarting")  # the lost connection's
    ws.close()
    events.pump(ws, lambda: events.count("closed") == 1)


def test_close_during_backoff_ends_at_once(websockets_server: str, no_leaks: None) -> None:
    events = Events()
    policy = Reconnect(min_delay=30.0, max_delay=30.0, jitter=0)
    ws = blockws.WebSocket(websockets_server, reconnect=policy, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    ws.send("!close 1011 oops")
    events.pump(ws, lambda: events.count("reconnecting") == 1)
    assert events.of("reconnecting")[0][2] == 30.0
    started = time.monotonic()
    ws.close()
    assert ws.join(2.0)
    events.pump(ws, lambda: events.count("closed") == 1, timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert events.of("closed") == [("closed", 1006, "", None)]


def test_iteration_and_receive_keep_waiting_across_a_reconnect(websockets_server: str) -> None:
    """A script: `for message in ws` goes on through a reconnection; on_open (pumped by
    receive()) announces each connection."""
    opens: list[int] = []

    def on_open(ws: blockws.WebSocket) -> None:
        opens.append(1)
        ws.send(f"open {len(opens)}")

    ws = blockws.connect(websockets_server, timeout=10, reconnect=QUICK, on_open=on_open)
    got = []
    for message in ws:
        got.append(message)
        if message == "open 1":
            ws.send("!close 1012 restart")
        elif message == "open 2":
            ws.close()
    assert got == ["open 1", "open 2"]
    assert ws.closed and ws.error is None


def test_fifty_reconnects_leak_no_thread_or_descriptor(websockets_server: str,
                                                       no_leaks: None) -> None:
    """50 connections lost and replaced: the socket's threads and the process's file
    descriptors stay as they were after the first few, and all go at the end (no_leaks)."""
    events = Events()
    policy = Reconnect(min_delay=0.0, max_delay=0.0, jitter=0)
    ws = blockws.WebSocket(websockets_server, reconnect=policy, extensions=[],
                           **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    samples: dict[int, tuple[int, int]] = {}
    for n in range(1, 51):
        ws.send("!close 1012")
        events.pump(ws, lambda n=n: events.count("open") == n + 1)  # type: ignore[misc]
        events.echo(ws, f"m{n}")
        if n in (5, 50):
            # The writer ends after a second idle and an old link's threads just after it
            # was replaced: wait for the socket's threads to settle before counting.
            deadline = time.monotonic() + 5
            while len(blockws_threads()) > 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            samples[n] = (len(blockws_threads()), fd_count())
    assert events.count("reconnecting") == 50 and events.count("closed") == 0
    assert [e[1] for e in events.of("reconnecting")] == [1] * 50  # each outage: one attempt
    threads50, fds50 = samples[50]
    assert threads50 <= 3, blockws_threads()  # reader, writer, timer at most
    assert fds50 <= samples[5][1], samples
    ws.close()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert ws.join(5)


def test_failed_first_open_is_not_retried(no_leaks: None) -> None:
    """Reconnection starts once the socket has been open: a first open() that fails ends
    the socket, and connect() raises the cause at once."""
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(blockws.ConnectError):
        blockws.connect(f"ws://127.0.0.1:{port}/", timeout=10, reconnect=True)
    assert time.monotonic() - started < 5


def test_a_server_that_keeps_refusing_is_given_up(no_leaks: None) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        if len(server.peers) == 1:
            peer.send(peer.response_101())
            peer.read_frame()
            peer.send_frame(OP_TEXT, b"bye")
            return  # drop
        peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    events = Events()
    with fault_server(handler) as server:
        policy = Reconnect(max_attempts=3, min_delay=0.01, max_delay=0.05)
        ws = blockws.WebSocket(server.url, reconnect=policy, extensions=[], **events.callbacks())
        ws.open()
        events.pump(ws, lambda: events.count("open") == 1)
        ws.send("hi")
        events.pump(ws, lambda: events.count("closed") == 1)
        assert len(server.peers) == 4  # the first connection and three attempts
    assert [e[1] for e in events.of("reconnecting")] == [1, 2, 3]
    (_, code, _reason, error), = events.of("closed")
    assert code == 1006 and isinstance(error, blockws.InvalidStatus) and error.status == 403
    assert ws.closed and ws.join(5)


@pytest.mark.parametrize("transport", ["h2c", "tls"])
def test_reconnects_over_http2(transport: str, hypercorn_h2_server: Any,
                               request: pytest.FixtureRequest) -> None:
    """Over RFC 8441 the teardown runs on the shared connection's reader thread, not the
    socket's own: each lost stream is replaced by a new stream, again over HTTP/2."""
    if transport == "tls":
        url = hypercorn_h2_server.wss
        options: dict[str, Any] = {"ssl_context": request.getfixturevalue("tls_context_h2")}
    else:
        url = hypercorn_h2_server.ws
        options = {"http2": blockws.HTTP2Settings(cleartext=True)}
    events = Events()
    ws = blockws.WebSocket(url, reconnect=QUICK, **options, **events.callbacks())
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    versions = [ws.http_version]
    for n in range(2, 5):
        ws.send("!close 1012 again")
        events.pump(ws, lambda n=n: events.count("open") == n)  # type: ignore[misc]
        versions.append(ws.http_version)
        events.echo(ws, f"m{n}")
    assert versions == ["2"] * 4
    assert [e[1] for e in events.of("reconnecting")] == [1, 1, 1]
    ws.close()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.of("closed")[0][1] == 1000
    assert ws.join(5)


def test_each_attempt_follows_the_redirect_again(websockets_server: str) -> None:
    """A reconnection starts from the URL given at open(), not the one redirected to:
    the redirect is asked for (and the hook runs) again on each attempt."""
    from redirectserver import RedirectServer

    events = Events()
    urls: list[str] = []
    target = websockets_server.rstrip("/") + "/"
    with RedirectServer({"/a": (302, target)}) as server:
        ws = blockws.WebSocket(
            server.url("/a"), reconnect=QUICK,
            on_internal_request_created=lambda ws, request: urls.append(request.url),
            **events.callbacks(),
        )
        ws.open()
        events.pump(ws, lambda: events.count("open") == 1)
        assert ws.context["url"] == target
        ws.send("!close 1012 restarting")
        events.pump(ws, lambda: events.count("open") == 2)
        events.echo(ws, "after the redirect again")
        ws.close()
        events.pump(ws, lambda: events.count("closed") == 1)
    assert urls == [server.url("/a"), target] * 2
    assert [seen.path for seen in server.requests] == ["/a", "/a"]
