"""Tunnels (blockws/tunnel.py): the ways a proxy exchange ends other than success, and TLS
inside the TLS to an ``https://`` proxy when the records come in pieces, carry garbage, or
the socket is aborted.

Proxies: raw-socket ones (tests/faultserver.py) that answer wrongly, never or with a reset,
and tests/connectproxy.py, a real relaying CONNECT proxy (plain or over TLS) that can
deliver the server's bytes in small pieces, stay silent after its 200, or inject bytes.

Some tests drive :class:`~blockws.tunnel.ProxyTunnel` with a :class:`Connector` directly:
that is where an abort by ``close()`` and a proxy that outlasts the deadline are told
apart from a refusal (a WebSocket reports its own ``open_timeout`` first, and a ``close()``
records no error).
"""

from __future__ import annotations

import contextlib
import errno
import select
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from connectproxy import ConnectProxy
from faultserver import FaultServer, Peer, Recorder

import blockws
from blockws.deadline import Deadline
from blockws.exceptions import ConnectionLost, OpenTimeout, ProxyError
from blockws.proxy import Proxy
from blockws.transport import Connector, TLSTransport, Transport
from blockws.tunnel import ProxyTunnel
from peerutil import free_port

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 10.0
#: A TLS application-data record header and 32 bytes that no key decrypts.
GARBAGE_RECORD = b"\x17\x03\x03\x00\x20" + bytes(range(32))


def open_in_thread(action: Callable[[], Transport]) -> tuple[threading.Thread, list[Any]]:
    """Run ``action`` (a tunnel's open) on its own thread, as the connecting thread does;
    the list gets what it returned or raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, name="test-open", daemon=True)
    thread.start()
    return thread, outcome


def outcome_of(thread: threading.Thread, outcome: list[Any]) -> Any:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the tunnel's open never returned"
    return outcome[0]


@pytest.fixture
def proxy_server_context(tls_certs: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    return ctx


# -- the proxy's answer never comes ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_close_while_the_proxy_is_silent_is_an_abort(kind: str) -> None:
    """An abort (what ``close()`` does) while waiting for the proxy raises ConnectionLost
    "aborted by close()". It used to raise whatever the abort broke, depending on timing:
    "proxy closed the connection before answering CONNECT" (the CONNECT wait checked the
    flag of a transport nothing aborts), "connection lost: Bad file descriptor", a bare
    ``OSError(EBADF)`` (not a blockws exception), or for SOCKS "cannot connect to the
    server: Bad file descriptor"."""
    asked = threading.Event()

    def handler(peer: Peer) -> None:
        peer.sock.recv(1)  # the CONNECT or SOCKS greeting has begun
        asked.set()
        peer.drain_forever()

    with FaultServer(handler) as proxy:
        connector = Connector()
        tunnel = ProxyTunnel(Proxy.from_url(f"{kind}://127.0.0.1:{proxy.port}"))
        thread, outcome = open_in_thread(
            lambda: tunnel.open(connector, "example.invalid", 80, Deadline(TIMEOUT), None, None))
        assert asked.wait(TIMEOUT)
        connector.abort()
        error = outcome_of(thread, outcome)
    assert isinstance(error, ConnectionLost), repr(error)
    assert str(error) == "connection aborted by close()"


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_proxy_slower_than_the_deadline(kind: str) -> None:
    def handler(peer: Peer) -> None:
        peer.drain_forever()

    with FaultServer(handler) as proxy:
        url = f"{kind}://127.0.0.1:{proxy.port}"
        tunnel = ProxyTunnel(Proxy.from_url(url))
        with pytest.raises(OpenTimeout) as info:
            tunnel.open(Connector(), "example.invalid", 80, Deadline(0.3), None, None)
    assert str(info.value).startswith(f"timed out waiting for proxy {url}")


@pytest.mark.unit
def test_https_proxy_without_a_context_fails_before_connecting() -> None:
    """The opening always passes one (blockws's default trust); a ProxyTunnel made by hand
    without one says what is missing instead of speaking plain HTTP to a TLS port."""
    tunnel = ProxyTunnel(Proxy.from_url("https://user:s3cret@proxy.invalid:8443"))
    with pytest.raises(ProxyError) as info:
        tunnel.open(Connector(), "example.com", 443, Deadline(1.0), None, None)
    assert str(info.value) == "an https:// proxy needs a TLS context: https://<credentials>@proxy.invalid:8443"


# -- SOCKS: failures that are not a SOCKS reply ------------------------------------------------


def _socks5_greeting_answered(then: Callable[[Peer], None]) -> Callable[[Peer], None]:
    def handler(peer: Peer) -> None:
        peer.sock.recv(3)  # version 5, one method: no authentication
        peer.send(b"\x05\x00")
        then(peer)
    return handler


def test_socks_proxy_that_resets_the_connection() -> None:
    """A reset during the SOCKS exchange is a ConnectError that keeps its errno."""
    pytest.importorskip("python_socks")

    def reset_after_greeting(peer: Peer) -> None:
        peer.sock.recv(1)
        peer.reset()

    with FaultServer(reset_after_greeting) as proxy:
        rec = Recorder()
        url = f"socks5://127.0.0.1:{proxy.port}"
        ws = blockws.WebSocket("ws://example.invalid/", proxy=url, **rec.callbacks())
        ws.open()
        assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
    assert isinstance(ws.error, blockws.ConnectError), repr(ws.error)
    assert ws.error.errno == errno.ECONNRESET
    assert f"proxy {url}" in str(ws.error), str(ws.error)


def test_socks_proxy_that_is_down() -> None:
    """The connection to the SOCKS proxy is ours (python-socks's "forward" hop): a refusal
    is blockws's ConnectionRefused naming the proxy's address, passed through as it is."""
    pytest.importorskip("python_socks")
    port = free_port()
    rec = Recorder()
    ws = blockws.WebSocket("ws://example.invalid/", proxy=f"socks5://127.0.0.1:{port}",
                           **rec.callbacks())
    ws.open()
    assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
    assert isinstance(ws.error, blockws.ConnectionRefused), repr(ws.error)
    assert str(ws.error).startswith(f"cannot connect to 127.0.0.1:{port}: "), str(ws.error)
    assert ws.error.errno == errno.ECONNREFUSED


def test_socks5_server_name_that_does_not_resolve() -> None:
    """socks5:// resolves the server's name here: when it does not resolve, the error names
    it, as a direct connection's does."""
    pytest.importorskip("python_socks")
    with FaultServer(_socks5_greeting_answered(lambda peer: peer.drain_forever())) as proxy:
        rec = Recorder()
        ws = blockws.WebSocket("ws://no-such-host.invalid/",
                               proxy=f"socks5://127.0.0.1:{proxy.port}", **rec.callbacks())
        ws.open()
        assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
    assert isinstance(ws.error, blockws.ConnectError), repr(ws.error)
    assert "cannot resolve host 'no-such-host.invalid'" in str(ws.error), str(ws.error)
    assert ws.error.errno is not None


# -- TLS inside the TLS to an https:// proxy ---------------------------------------------------


def test_tls_in_tls_with_the_servers_bytes_in_pieces(
        websockets_tls_server: str, tls_certs: Any, proxy_server_context: ssl.SSLContext) -> None:
    """The proxy forwards what the server sends 40 bytes at a time, each piece its own TLS
    record to the client: the inner handshake waits for the rest of the server's flight
    without sending anything meanwhile, and messages still arrive whole."""
    with ConnectProxy(proxy_server_context, chunk=40) as proxy:
        with blockws.connect(websockets_tls_server, timeout=TIMEOUT, proxy=proxy.url,
                             proxy_ssl_context=tls_certs.client_context(),
                             ssl_context=tls_certs.client_context(), http2=False) as ws:
            ws.send("in pieces" * 100)
            assert ws.receive(TIMEOUT) == "in pieces" * 100
        assert ws.error is None
        assert proxy.requests == [f"CONNECT localhost:{websockets_tls_server.rsplit(':', 1)[1]}"
                                  " HTTP/1.1"]


def test_garbage_inside_the_tunnel_is_a_tls_error(
        websockets_tls_server: str, tls_certs: Any, proxy_server_context: ssl.SSLContext,
        no_leaks: None) -> None:
    """A record the server's keys did not make (a proxy that corrupts the stream) ends
    the socket with ConnectionLost naming the TLS error, on_closed 1006."""
    with ConnectProxy(proxy_server_context) as proxy:
        rec = Recorder()
        ws = blockws.WebSocket(websockets_tls_server, proxy=proxy.url, http2=False,
                               proxy_ssl_context=tls_certs.client_context(),
                               ssl_context=tls_certs.client_context(), **rec.callbacks())
        ws.open()
        rec.wait_open(ws, TIMEOUT)
        ws.send("before")
        rec.pump_until(ws, lambda: ("text", "before") in rec.events, TIMEOUT)
        proxy.inject(GARBAGE_RECORD)
        assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
    assert isinstance(ws.error, ConnectionLost), repr(ws.error)
    assert str(ws.error).startswith("TLS error: "), str(ws.error)


def test_close_during_the_inner_handshake_is_an_abort(
        tls_certs: Any, proxy_server_context: ssl.SSLContext) -> None:
    """The proxy answers 200 and relays nothing: the inner TLS handshake waits for the
    server until the connector is aborted, which ends it at once with ConnectionLost."""
    with ConnectProxy(proxy_server_context, silent=True) as proxy:
        connector = Connector()
        tunnel = ProxyTunnel(Proxy.from_url(proxy.url), tls_certs.client_context())
        thread, outcome = open_in_thread(lambda: tunnel.open(
            connector, "localhost", 9, Deadline(TIMEOUT), tls_certs.client_context(), None))
        assert proxy.client_spoke.wait(TIMEOUT)  # the inner ClientHello went through
        connector.abort()
        error = outcome_of(thread, outcome)
    assert isinstance(error, ConnectionLost), repr(error)
    assert str(error) == "connection aborted by close()"


@contextlib.contextmanager
def inner_tls_server(tls_certs: Any, then: Callable[[ssl.SSLSocket], None] | None = None,
                     ctx: ssl.SSLContext | None = None) -> Iterator[int]:
    """A TLS server that completes the handshake, sends nothing (no session tickets
    either) unless ``then(tls_socket)`` does, and reads until the client goes away;
    yields its port."""
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    ctx.num_tickets = 0

    def handler(peer: Peer) -> None:
        assert ctx is not None
        peer.sock = ctx.wrap_socket(peer.sock, server_side=True)
        if then is not None:
            then(peer.sock)
        peer.drain_forever()

    with FaultServer(handler) as server:
        yield server.port


@contextlib.contextmanager
def tls_in_tls(tls_certs: Any, proxy: ConnectProxy, port: int,
               ssl_context: ssl.SSLContext | None = None) -> Iterator[tuple[Any, Any]]:
    """A TLSTransport inside TLS to ``localhost:port`` through ``proxy``, built by hand so the
    test holds the outer transport too; yields (transport, outer), closes them after."""
    connector = Connector()
    deadline = Deadline(TIMEOUT)
    outer = connector.connect_direct("localhost", proxy.port, deadline,
                                     tls_certs.client_context())
    outer.write([f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode()])
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += outer.recv(TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 200 ")
    transport = TLSTransport(outer, ssl_context or tls_certs.client_context(), "localhost")
    transport.handshake(deadline)
    try:
        yield transport, outer
    finally:
        transport.close()


@pytest.mark.parametrize("ending", ["close_notify", "cut"])
def test_tunnel_end_is_the_end_of_the_stream(
        tls_certs: Any, proxy_server_context: ssl.SSLContext, ending: str) -> None:
    """The server ends its TLS with close_notify, or its connection without one (the proxy
    then ends the tunnel): recv() returns what came before, then b"" (the end), without
    an error, as an SSLSocket does (suppress_ragged_eofs). When cut, it used to raise
    ConnectionLost "TLS error: EOF occurred in violation of protocol" (see
    test_server_that_drops_the_connection)."""
    def last_words(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"last words")
        if ending == "close_notify":
            with contextlib.suppress(OSError):  # it waits for ours, which never comes
                tls.unwrap()
        else:
            tls.close()

    with inner_tls_server(tls_certs, last_words) as port, \
            ConnectProxy(proxy_server_context) as proxy, \
            tls_in_tls(tls_certs, proxy, port) as (transport, _):
        received = b""
        while not received.endswith(b"last words"):
            data = transport.recv(TIMEOUT)
            assert data, received
            received += data
        assert received == b"last words"
        assert transport.recv(TIMEOUT) == b""
        assert transport.recv(TIMEOUT) == b""  # and stays ended


@pytest.mark.parametrize("through", ["direct", "https proxy"])
def test_server_that_drops_the_connection(tls_certs: Any, proxy_server_context: ssl.SSLContext,
                                          through: str, no_leaks: None) -> None:
    """A wss:// server that opens, then ends its connection without a close frame or a
    close_notify: the same error whether a proxy's TLS is around it or not. Through an
    https:// proxy it used to be "TLS error: EOF occurred in violation of protocol": the
    alert OpenSSL queued about the missing close_notify was written to the ended tunnel,
    and that write's failure replaced the end of the stream."""
    def handler(peer: Peer) -> None:
        peer.sock = proxy_server_context.wrap_socket(peer.sock, server_side=True)
        peer.handshake()
        peer.sock.close()

    with FaultServer(handler) as server, ConnectProxy(proxy_server_context) as proxy:
        rec = Recorder()
        ws = blockws.WebSocket(f"wss://localhost:{server.port}/", http2=False,
                               ssl_context=tls_certs.client_context(),
                               proxy=proxy.url if through == "https proxy" else None,
                               proxy_ssl_context=tls_certs.client_context(), **rec.callbacks())
        ws.open()
        assert rec.wait_closed(ws, TIMEOUT) == (1006, "")
        assert proxy.requests == ([f"CONNECT localhost:{server.port} HTTP/1.1"]
                                  if through == "https proxy" else [])
    assert isinstance(ws.error, ConnectionLost), repr(ws.error)
    assert str(ws.error) == "connection closed without a close frame"


def test_post_handshake_client_certificate(tls_certs: Any,
                                           proxy_server_context: ssl.SSLContext) -> None:
    """A TLS 1.3 server that asks for the client certificate after the handshake (post-
    handshake authentication, ``post_handshake_auth`` on the caller's context): the answer
    is made while reading, and recv() sends it on."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    server_ctx.load_verify_locations(tls_certs.cafile)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    server_ctx.post_handshake_auth = True

    def ask_for_a_certificate(tls: ssl.SSLSocket) -> None:
        assert tls.getpeercert() is None
        tls.verify_client_post_handshake()
        tls.sendall(b"who are you?")  # carries the CertificateRequest
        assert tls.recv(100) == b"ok"  # the client's certificate comes before it
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        tls.sendall(f"hello {subject['commonName']}".encode())

    client = tls_certs.client_context()
    tls_certs.ca.issue_cert("client.example", common_name="client.example").configure_cert(client)
    client.post_handshake_auth = True
    with inner_tls_server(tls_certs, ask_for_a_certificate, server_ctx) as port, \
            ConnectProxy(proxy_server_context) as proxy, \
            tls_in_tls(tls_certs, proxy, port, client) as (transport, _):
        assert transport.recv(TIMEOUT) == b"who are you?"
        transport.write([b"ok"])
        assert transport.recv(TIMEOUT) == b"hello client.example"


def test_abort_makes_recv_end_even_with_garbage_waiting(
        tls_certs: Any, proxy_server_context: ssl.SSLContext) -> None:
    """A TLS error found after abort() is our own doing: recv() returns b"" (the end),
    as for any aborted transport, and does not raise. Without the abort the same bytes
    raise ConnectionLost."""
    with inner_tls_server(tls_certs) as port, ConnectProxy(proxy_server_context) as proxy:
        for aborted in (False, True):
            with tls_in_tls(tls_certs, proxy, port) as (transport, outer):
                proxy.inject(GARBAGE_RECORD)
                # The garbage is in the socket's buffer before anything reads it.
                assert select.select([outer.sock], [], [], TIMEOUT)[0]
                if aborted:
                    transport.abort()
                    assert transport.recv(TIMEOUT) == b""
                else:
                    with pytest.raises(ConnectionLost, match="^TLS error: "):
                        transport.recv(TIMEOUT)


@pytest.mark.unit
@pytest.mark.parametrize("ignore_unexpected_eof", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_memory_bio_at_eof_never_asks_for_more(ignore_unexpected_eof: bool, partial: bool,
                                               tls_certs: Any) -> None:
    """TLSTransport.recv relies on this OpenSSL behaviour: once the incoming buffer is
    at EOF (the tunnel ended), reading raises SSLEOFError or returns b"" (with
    OP_IGNORE_UNEXPECTED_EOF), after a whole record or in the middle of one; it never
    raises SSLWantReadError, which would make recv read the ended stream again."""
    client_ctx = tls_certs.client_context()
    if ignore_unexpected_eof:
        client_ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls_certs.certfile, tls_certs.keyfile)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(5):
        for i, end in enumerate((client, server)):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
                done[i] = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert done == [True, True]
    server.write(b"last words")
    record = s_out.read()
    c_in.write(record[:-3] if partial else record)
    if partial:
        with pytest.raises(ssl.SSLWantReadError):
            client.read(100)
    else:
        assert client.read(100) == b"last words"
    c_in.write_eof()
    for _ in range(2):
        if ignore_unexpected_eof:
            assert client.read(100) == b""
        else:
            with pytest.raises(ssl.SSLEOFError):
                client.read(100)

