"""Hostile probes of issue 11 ("nothing lost, nothing unbounded"): the socket's life.

close() in every phase of opening (item 5), leaks (item 6), secrets (item 7) and
exception types (item 8), one test per probe; each names the probe it answers in its
docstring. Servers: raw-socket fault servers (tests/faultserver.py), a hand-written h2c
server (tests/h2peers.py) and the real peers of tests/conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import threading
import time
import tracemalloc
from typing import Any

import hpack
import pytest
from faultserver import Peer, Recorder, fault_server
from h2peers import DATA, END_HEADERS, HEADERS, STATUS_200, MiniConn, MiniH2, frame

import blockws
from blockws.buffers import BufferPool
from blockws.http2 import HTTP2Settings

H2C = HTTP2Settings(cleartext=True, fallback=False)

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(60)]


def first_message(conn: MiniConn, stream_id: int) -> None:
    """Wait for the client's first message on ``stream_id`` (the stream is then open)."""
    conn.read_until(lambda f: f.type == DATA and f.stream_id == stream_id and bool(f.payload))


# -- item 5: close() in every phase of opening ---------------------------------------------

#: close() must end a socket within 100 ms, whatever phase it is in (issue 11, item 5);
#: measured at 0.2-0.4 ms here. The assertions allow a loaded machine's scheduling
#: slack on top; the old code never ended at all (open_timeout=None).
CLOSE_BOUND = 0.1
CLOSE_SLACK = 0.15


def close_and_time(ws: blockws.WebSocket, rec: Recorder) -> float:
    """close() now; returns how long until the socket had ended (threads joined)."""
    start = time.monotonic()
    ws.close()
    assert ws.join(5.0), "the socket did not end"
    elapsed = time.monotonic() - start
    code, _ = rec.wait_closed(ws)
    assert code == 1006
    print(f"close() ended the socket in {elapsed * 1000:.1f} ms")
    return elapsed


def test_close_during_a_tls_handshake_ends_the_socket_at_once() -> None:
    """Probe "close() ignored during a TLS handshake" (issue 11, item 5): wrap_socket
    moved the descriptor into the TLS socket, so abort closed the old object (EBADF,
    suppressed) and on_closed came only at open_timeout -- never with None, leaking the
    reader thread and its descriptor. Now close() ends it within 100 ms."""
    hello = threading.Event()

    def handler(peer: Peer) -> None:
        peer.sock.recv(4096)  # the ClientHello; never answered
        hello.set()
        peer.drain_forever()

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url.replace("ws://", "wss://"), open_timeout=None,
                               **rec.callbacks())
        ws.open()
        assert hello.wait(10)
        elapsed = close_and_time(ws, rec)
    assert elapsed < CLOSE_BOUND + CLOSE_SLACK, f"{elapsed * 1000:.0f} ms"


def test_close_while_a_dns_lookup_hangs_ends_the_socket_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe "close() during a hanging DNS lookup" (issue 11, item 5): close() and
    open_timeout waited for the resolver. Now the lookup is abandoned on its thread and
    on_closed comes at once."""
    release = threading.Event()
    asked = threading.Event()
    real = socket.getaddrinfo

    def hanging(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hangs.example":
            asked.set()
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "too late")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        rec = Recorder()
        ws = blockws.WebSocket("ws://hangs.example/", open_timeout=None, **rec.callbacks())
        ws.open()
        assert asked.wait(10)
        elapsed = close_and_time(ws, rec)
        assert elapsed < CLOSE_BOUND + CLOSE_SLACK, f"{elapsed * 1000:.0f} ms"
        # open_timeout does not wait for the resolver either.
        rec2 = Recorder()
        ws2 = blockws.WebSocket("ws://hangs.example/", open_timeout=0.3, **rec2.callbacks())
        start = time.monotonic()
        ws2.open()
        assert rec2.wait_closed(ws2)[0] == 1006
        assert time.monotonic() - start < 0.3 + CLOSE_BOUND + CLOSE_SLACK
        assert isinstance(ws2.error, blockws.OpenTimeout), repr(ws2.error)
    finally:
        release.set()


def test_close_while_waiting_for_the_upgrade_response_ends_the_socket_at_once() -> None:
    """Probe "close() in any phase" (issue 11, item 5): the HTTP/1.1 upgrade."""
    asked = threading.Event()

    def handler(peer: Peer) -> None:
        peer.read_request()
        asked.set()
        peer.drain_forever()

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, open_timeout=None, **rec.callbacks())
        ws.open()
        assert asked.wait(10)
        elapsed = close_and_time(ws, rec)
    assert elapsed < CLOSE_BOUND + CLOSE_SLACK, f"{elapsed * 1000:.0f} ms"


def test_close_during_the_http2_handshake_ends_the_socket_at_once(tls_certs: Any) -> None:
    """Probe "close() in any phase" (issue 11, item 5): the HTTP/2 attempt. The server
    completes TLS with ALPN h2, then never sends its SETTINGS."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    server_ctx.set_alpn_protocols(["h2"])
    preface = threading.Event()

    def handler(peer: Peer) -> None:
        tls = server_ctx.wrap_socket(peer.sock, server_side=True)
        tls.recv(4096)  # the client's preface and SETTINGS
        preface.set()
        with contextlib.suppress(OSError):
            while tls.recv(4096):
                pass

    with fault_server(handler) as server:
        rec = Recorder()
        ctx = tls_certs.client_context()
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        ws = blockws.WebSocket(f"wss://localhost:{server.port}/", open_timeout=None,
                               ssl_context=ctx, **rec.callbacks())
        ws.open()
        assert preface.wait(10)
        elapsed = close_and_time(ws, rec)
    assert elapsed < CLOSE_BOUND + CLOSE_SLACK, f"{elapsed * 1000:.0f} ms"


def test_close_during_a_tcp_connect_that_hangs_ends_the_socket_at_once() -> None:
    """Probe "close() in any phase" (issue 11, item 5): the TCP connect. A listener whose
    accept queue is full drops SYNs, so connect() hangs; close() still ends the socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("the accept queue did not fill: connect() does not hang here")
        except TimeoutError:
            pass
        finally:
            probe.close()
        rec = Recorder()
        ws = blockws.WebSocket(f"ws://127.0.0.1:{port}/", open_timeout=None, **rec.callbacks())
        ws.open()
        time.sleep(0.2)  # in connect() by now (no event tells)
        assert not ws.closed
        elapsed = close_and_time(ws, rec)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert elapsed < CLOSE_BOUND + CLOSE_SLACK, f"{elapsed * 1000:.0f} ms"


# -- item 6: leaks ----------------------------------------------------------------------------


def test_closed_sockets_never_pumped_release_their_heavy_state(
    websockets_deflate_server: str, coverage_paused: None
) -> None:
    """Probe "leaks" (issue 11, item 6): every closed socket stays in the live set until
    its on_closed is pumped, and kept its protocol, compressors, transport and buffers
    meanwhile: 500 sockets closed and joined but never updated kept +42 MiB (~138 KiB
    each here, with compression). Now a closed socket keeps only its pending callbacks
    and a few locks: under 32 KiB each, and nothing once pumped."""
    count = 100
    warm = blockws.connect(websockets_deflate_server)
    warm.close()
    warm.join(5)
    warm.update()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        # A pool of their own: the process-wide one keeps returned buffers
        # (up to 32 MiB), which the measure below would count as kept.
        pool = BufferPool()
        sockets = [
            blockws.WebSocket(
                websockets_deflate_server, on_message=lambda ws, text: None, buffer_pool=pool
            )
            for _ in range(count)
        ]
        for ws in sockets:
            ws.open()
        deadline = time.monotonic() + 30
        for ws in sockets:
            while not ws.is_open:
                assert time.monotonic() < deadline and not ws.closed, ws.error
                time.sleep(0.002)
            ws.send("hello " * 100)  # compressed both ways
        for ws in sockets:
            while ws.bytes_received < 300:  # the echo came back (undelivered)
                assert time.monotonic() < deadline
                time.sleep(0.002)
            ws.close()
        for ws in sockets:
            assert ws.join(10)
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - base) / count
        assert all(ws.bytes_sent > 0 and ws.bytes_received > 0 for ws in sockets)
        assert all(ws.close_code == 1000 for ws in sockets)
        blockws.update_all()  # on_closed: the sockets leave the live set
        del sockets, ws, pool
        gc.collect()
        after = (tracemalloc.get_traced_memory()[0] - base) / count
    finally:
        tracemalloc.stop()
    assert held < 32 * 1024, f"{held / 1024:.1f} KiB per closed socket"
    assert after < 2 * 1024, f"{after / 1024:.1f} KiB per socket after on_closed"


def test_connect_closes_the_socket_when_on_open_raises() -> None:
    """Probe "leaks" (issue 11, item 6): an on_open that raises inside connect() left the
    half-made socket running, out of the caller's reach. connect() closes it first."""

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.drain_forever()

    def on_open(ws: blockws.WebSocket) -> None:
        raise RuntimeError("on_open failed")

    with fault_server(handler) as server:
        before = set(threading.enumerate())
        with pytest.raises(RuntimeError, match="on_open failed"):
            blockws.connect(server.url, on_open=on_open)
        left = [t.name for t in set(threading.enumerate()) - before
                if t.name.startswith("blockws-") and "timer" not in t.name]
        assert left == []
        assert blockws.update_all() == 0


def test_connect_interrupted_by_ctrl_c_closes_the_socket() -> None:
    """Probe "leaks" (issue 11, item 6): Ctrl-C while connect() waits (the server never
    answers the upgrade) closes the half-made socket before the interrupt propagates."""
    asked = threading.Event()

    def handler(peer: Peer) -> None:
        peer.read_request()
        asked.set()
        peer.drain_forever()

    main = threading.main_thread().ident
    assert main is not None
    with fault_server(handler) as server:
        before = set(threading.enumerate())
        timer = threading.Thread(target=lambda: asked.wait(10) and signal.pthread_kill(
            main, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            blockws.connect(server.url, open_timeout=None)
        timer.join(5)
        # connect() aborted the socket and joined its reader for up to 1 s before
        # re-raising; on a loaded machine the reader may need longer to finish
        # (a CI run with two fuzzers beside it saw it still alive): it must end.
        left = [t for t in set(threading.enumerate()) - before
                if t.name.startswith("blockws-") and "timer" not in t.name]
        for thread in left:
            thread.join(5)
        assert [t.name for t in left if t.is_alive()] == []


def test_connect_interrupted_while_starting_its_reader_closes_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C that lands in ``open()``, in its wait for the reader thread to start
    (CI, on a loaded machine: the reader had connected and sent the request by
    then), ends the socket as one in connect()'s loop does: the reader left
    waiting for an answer that never comes is woken and ends."""
    asked = threading.Event()

    def handler(peer: Peer) -> None:
        peer.read_request()
        asked.set()
        peer.drain_forever()

    real_open = blockws.connection.Connection.open
    started: list[threading.Thread] = []

    def open_then_interrupted(self: blockws.connection.Connection) -> None:
        before = set(threading.enumerate())
        real_open(self)
        started.extend(t for t in set(threading.enumerate()) - before
                       if t.name.endswith("-reader"))
        assert asked.wait(10)  # the reader is past the request, waiting for the answer
        raise KeyboardInterrupt  # as if delivered in Thread.start()'s wait

    monkeypatch.setattr(blockws.connection.Connection, "open", open_then_interrupted)
    with fault_server(handler) as server:
        with pytest.raises(KeyboardInterrupt):
            blockws.connect(server.url, open_timeout=None)
        assert len(started) == 1
        started[0].join(5)
        assert not started[0].is_alive()
        assert blockws.update_all() == 0


@pytest.mark.unit
def test_abort_before_open_closes_the_socket_at_once() -> None:
    """``abort()`` on a socket never opened ends it at once, as ``close()`` does:
    ``closed``, ``join()`` returns at once, no ``on_closed``; open() then refuses."""
    closed: list[int] = []
    ws = blockws.WebSocket("ws://127.0.0.1:9/", on_closed=lambda w, c, r: closed.append(c))
    ws.abort()
    assert ws.closed
    assert ws.join(0)
    assert ws.update() == 0
    assert closed == []
    with pytest.raises(blockws.InvalidState):
        ws.open()

# -- item 7: secrets ----------------------------------------------------------------------------

SECRETS = ("hunter2", "TOKEN-5f2a", "cookie-secret-0123456789", "api-key-secret", "proxy-secret")


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.unit
def test_urls_and_requests_show_no_credentials() -> None:
    """Probe "secrets" (issue 11, item 7): repr(ws.internal_request) showed
    wss://alice:hunter2@example.com/chat, every InvalidURL message held the raw URL with
    its password, and a token as the URL's user part was redacted nowhere."""
    ws = blockws.WebSocket("wss://alice:hunter2@example.com/chat")
    assert _leaks(repr(ws.internal_request)) == []
    assert "alice:<redacted>@example.com" in repr(ws.internal_request)
    assert _leaks(repr(ws.internal_request.parsed_url)) == []
    assert _leaks(repr(ws)) == []
    token = blockws.WebSocket("wss://TOKEN-5f2a@example.com/")
    assert _leaks(repr(token.internal_request)) == [] and _leaks(repr(token)) == []
    assert _leaks(str(token.context)) == []
    for bad in (
        "https://alice:hunter2@example.com/",
        "wss://alice:hunter2@example.com/#frag",
        "wss://alice:hunter2@:443/",
        "wss://alice:hunter2@example.com:99999/",
        "ftp://TOKEN-5f2a@example.com/",
    ):
        with pytest.raises(blockws.InvalidURL) as info:
            blockws.WebSocket(bad)
        assert _leaks(str(info.value)) == [], str(info.value)
        assert _leaks(repr(info.value)) == [], repr(info.value)
    request = ws.internal_request
    request.headers["Cookie"] = "cookie-secret-0123456789"
    request.headers["X-Api-Key"] = "api-key-secret"
    request.headers.mark_sensitive("x-api-key")
    assert _leaks(repr(request)) == []


def test_http2_sends_credentials_never_indexed_and_logs_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probe "secrets" (issue 11, item 7) over HTTP/2: Authorization, Cookie,
    Proxy-Authorization and user-marked headers (X-Api-Key) go as never-indexed fields
    (RFC 7541 7.1.3); with every logger at DEBUG (h2 and hpack included), no secret
    appears in any record, exception or repr."""
    fields: list[Any] = []

    def scenario(conn: MiniConn) -> None:
        conn.handshake()
        request = conn.read_until(lambda f: f.type == HEADERS)
        fields.extend(hpack.Decoder().decode(request.payload, raw=True))
        conn.send(frame(HEADERS, END_HEADERS, request.stream_id, STATUS_200))
        first_message(conn, request.stream_id)

    def mark(ws: blockws.WebSocket, request: Any) -> None:
        request.headers.mark_sensitive("X-Api-Key")

    with caplog.at_level(logging.DEBUG), MiniH2(scenario) as server:
        for name in ("hpack", "hpack.hpack", "hpack.table", "h2", "blockws"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        url = server.url.replace("ws://", "ws://alice:hunter2@")
        ws = blockws.WebSocket(
            url, http2=H2C, extensions=[], on_internal_request_created=mark,
            headers={"Cookie": "cookie-secret-0123456789", "X-Api-Key": "api-key-secret",
                     "Proxy-Authorization": "Basic proxy-secret", "X-Plain": "visible"},
        )
        rec = Recorder()
        for name, cb in rec.callbacks().items():
            setattr(ws, name, cb)
        ws.open()
        rec.wait_open(ws)
        ws.send("hello")
        assert server.done.wait(10)
        ws.abort()
        rec.wait_closed(ws)
        # (The test server's own hpack decoding logs, on its thread, are not blockws's.)
        texts = [r.getMessage() for r in caplog.records if not r.threadName.startswith("mini-h2")]
        texts += [repr(ws), repr(ws.internal_request), str(ws.error), repr(ws.error)]
    kinds = {bytes(f[0]).decode(): type(f).__name__ for f in fields}
    for name in ("authorization", "cookie", "proxy-authorization", "x-api-key"):
        assert kinds[name] == "NeverIndexedHeaderTuple", kinds
    assert kinds["x-plain"] == "HeaderTuple"
    basic = base64.b64encode(b"alice:hunter2").decode()
    leaked = [t for t in texts if _leaks(t) or basic in t]
    assert leaked == [], leaked[:3]
    assert any(r.name.startswith("hpack") and not r.threadName.startswith("mini-h2")
               for r in caplog.records)  # the client's hpack did log at DEBUG


# -- item 8: exception types ----------------------------------------------------------------------


def test_running_out_of_descriptors_raises_a_blockws_error_with_its_errno() -> None:
    """Probe "wrong exception types" (issue 11, item 8): with no descriptor left (EMFILE),
    connect() raised a bare OSError(24) from socket.socket(), outside the mapping. Now it
    is a ConnectError (a blockws error, and an OSError) carrying errno EMFILE."""
    import errno
    import resource

    socket.getaddrinfo("127.0.0.1", 9, type=socket.SOCK_STREAM)  # imports its codec now
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.dup(0))
        with pytest.raises(blockws.BlockwsError) as info:
            blockws.connect("ws://127.0.0.1:9/", open_timeout=5)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    error = info.value
    assert isinstance(error, blockws.ConnectError) and isinstance(error, OSError), repr(error)
    assert error.errno == errno.EMFILE, error.errno
    assert "Too many open files" in str(error)


def test_on_closed_raising_while_a_with_block_unwinds_does_not_replace_its_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probe "wrong exception types" (issue 11, item 8): an on_closed that raised while a
    `with` block unwound replaced the block's own exception. The block's exception now
    wins, and the callback's is logged."""

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.read_until_close()
        peer.send_frame(0x8, b"\x03\xe8")

    def on_closed(ws: blockws.WebSocket, code: int, reason: str) -> None:
        raise RuntimeError("on_closed failed")

    class Mine(Exception):
        pass

    with fault_server(handler) as server, caplog.at_level(logging.ERROR, logger="blockws"):
        with pytest.raises(Mine):
            with blockws.connect(server.url, on_closed=on_closed):
                raise Mine("the user's own error")
        # Without an exception in the block, the callback's propagates as before.
        with pytest.raises(RuntimeError, match="on_closed failed"):
            with blockws.connect(server.url, on_closed=on_closed):
                pass
    logged = [r for r in caplog.records if r.exc_info and "on_closed failed" in str(r.exc_info[1])]
    assert len(logged) == 1
