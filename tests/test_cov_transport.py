"""blockws.transport: the paths tests/test_transport.py leaves out.

What an ``OSError`` becomes (no socket), then the TCP transport over socket
pairs and 127.0.0.1 listeners, and the connector's resolver, connect and TLS
phases against a listener whose backlog is full (its connects hang) or that
never answers a TLS hello.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from memory import MemoryTransport

import blockws
from blockws.deadline import Deadline
from blockws.exceptions import (
    ConnectError,
    ConnectionLost,
    ConnectionRefused,
    OpenTimeout,
    TLSError,
)
from blockws.transport import (
    Connector,
    TCPTransport,
    TLSTransport,
    is_ip_literal,
    map_os_errors,
    os_error,
)

pytestmark = pytest.mark.timeout(20)

ABORTED = "connection aborted by close()"


# -- what an OSError becomes (no socket) -----------------------------------------------


@pytest.mark.unit
def test_a_timeout_while_opening_is_an_open_timeout_naming_the_server() -> None:
    exc = os_error(socket.timeout("timed out"), connecting=True, where="example.com:443")
    assert type(exc) is OpenTimeout
    assert str(exc) == "timed out opening the WebSocket to example.com:443"
    assert str(os_error(socket.timeout())) == "timed out opening the WebSocket"


@pytest.mark.unit
def test_a_rejected_certificate_is_a_tls_error_with_the_verifier_message() -> None:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] failed")
    error.verify_message = "self-signed certificate"
    exc = os_error(error, connecting=True, where="example.com:443")
    assert type(exc) is TLSError
    assert str(exc) == (
        "TLS certificate verification failed example.com:443: self-signed certificate"
    )


@pytest.mark.unit
def test_a_tls_error_fails_the_handshake_when_opening_and_loses_the_connection_later() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    opening = os_error(error, connecting=True, where="example.com:443")
    assert type(opening) is TLSError
    assert str(opening).startswith("TLS handshake failed example.com:443: ")
    assert "WRONG_VERSION_NUMBER" in str(opening)
    later = os_error(error)
    assert type(later) is ConnectionLost
    assert str(later).startswith("TLS error: ") and "WRONG_VERSION_NUMBER" in str(later)


@pytest.mark.unit
def test_a_name_that_does_not_resolve_names_the_host() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    exc = os_error(error, connecting=True, where="nowhere.invalid:80")
    assert type(exc) is ConnectError and exc.errno == socket.EAI_NONAME
    assert str(exc) == "cannot resolve host 'nowhere.invalid': Name or service not known"
    assert str(os_error(error, connecting=True)) == (
        "cannot resolve host: Name or service not known"
    )


@pytest.mark.unit
def test_connect_failures_and_later_failures_keep_errno_and_strerror() -> None:
    refused = os_error(
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        connecting=True, where="127.0.0.1:9",
    )
    assert type(refused) is ConnectionRefused and isinstance(refused, ConnectionRefusedError)
    assert str(refused) == "cannot connect to 127.0.0.1:9: Connection refused"
    unreachable = os_error(OSError(errno.EHOSTUNREACH, "No route to host"), connecting=True)
    assert type(unreachable) is ConnectError
    assert str(unreachable) == "cannot connect to the server: No route to host"
    assert unreachable.errno == errno.EHOSTUNREACH
    lost = os_error(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert type(lost) is ConnectionLost and lost.errno == errno.ECONNRESET
    assert str(lost) == "connection lost: Connection reset by peer"
    assert str(os_error(OSError("no errno"))) == "connection lost: no errno"


@pytest.mark.unit
def test_map_os_errors_leaves_blockws_errors_alone() -> None:
    ours = ConnectionLost("already ours")
    with pytest.raises(ConnectionLost) as info, map_os_errors(connecting=True):
        raise ours
    assert info.value is ours
    with pytest.raises(ConnectError) as mapped, map_os_errors(connecting=True, where="h:1"):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    assert str(mapped.value) == "cannot connect to h:1: Network is unreachable"
    assert isinstance(mapped.value.__cause__, OSError)


@pytest.mark.unit
def test_a_transport_without_direct_writes_takes_nothing_from_try_write() -> None:
    """The base class's defaults: a transport that cannot write without blocking
    (here the test suite's memory transport) leaves every byte to the writer thread,
    and pausing is left to the caller."""
    transport = MemoryTransport()
    assert not transport.can_try_write and not transport.can_read_bounded
    assert transport.try_write([b"hello"]) == 0
    assert transport.written() == b"" and transport.bytes_written == 0
    assert transport.pause_reading() is False


# -- the TCP transport ---------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[TCPTransport, socket.socket]]:
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    try:
        yield transport, b
    finally:
        transport.close()
        b.close()


def test_recv_with_no_time_left_is_an_open_timeout_and_the_socket_goes_on(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    """A zero timeout (the opening handshake's deadline, all spent) with nothing to
    read is a timeout: it was reported as "connection lost: Resource temporarily
    unavailable". The socket is left blocking and works afterwards."""
    transport, peer = pair
    with pytest.raises(OpenTimeout, match="timed out opening the WebSocket"):
        transport.recv(0)
    assert transport.sock.gettimeout() is None
    peer.sendall(b"late")
    assert transport.recv(1.0) == b"late"
    assert transport.bytes_read == 4


def test_reads_after_our_own_close_are_an_end_of_stream(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    """After ``close()`` (ours, with or without an abort) a read is the end of the
    stream, as after ``abort()``: the reader thread's recv raised a bare ValueError
    (poll cannot register a closed descriptor) and a bounded read a ConnectionLost
    ("Bad file descriptor")."""
    transport, _ = pair
    transport.close()
    assert transport.recv() == b""
    assert transport.recv(1.0) == b""
    assert transport.read(0.5) == b""  # the SO_RCVTIMEO path
    assert transport.read(0) == b""  # the MSG_DONTWAIT path


def test_reads_after_abort_and_close_are_an_end_of_stream() -> None:
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    transport.abort()
    transport.close()
    assert transport.aborted
    assert transport.recv() == b"" and transport.read(0.5) == b"" and transport.read(0) == b""
    b.close()


def test_a_read_error_not_of_our_doing_is_a_connection_loss() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    transport = TCPTransport(client)
    try:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()  # linger 0: a reset
        with pytest.raises(ConnectionLost, match="connection lost") as info:
            transport.read(1.0)
        assert info.value.errno == errno.ECONNRESET
    finally:
        transport.close()


def test_the_reader_thread_is_not_bounded_by_a_caller_s_read_timeout(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    """A caller's bounded read sets SO_RCVTIMEO on the socket; the reader thread's
    recv, once its socket is busy (it reads without polling first), then meets that
    timeout: it goes back to waiting in poll() rather than failing or returning."""
    transport, peer = pair
    peer.sendall(b"busy")
    assert transport.recv() == b"busy"  # came at once: the socket counts as busy
    assert transport.read(0.2) is None  # a caller's bounded read: sets SO_RCVTIMEO
    got: list[Any] = []
    inside = threading.Event()

    def reader() -> None:
        inside.set()
        try:
            got.append(transport.recv())
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            got.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(5)
    thread.join(0.3)  # several SO_RCVTIMEO periods (0.05 s) with nothing to read
    assert got == [] and thread.is_alive()
    peer.sendall(b"later")
    thread.join(5)
    assert got == [b"later"]


def test_a_short_wait_on_a_descriptor_above_select_s_limit_uses_poll() -> None:
    """select() takes descriptors below 1024 only; a process with more open files
    has its short bounded reads wait in poll() instead (millisecond timeouts)."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = limits
    if soft != resource.RLIM_INFINITY and soft <= 1024:
        if hard != resource.RLIM_INFINITY and hard <= 1024:
            pytest.skip("no descriptor above 1023 allowed (RLIMIT_NOFILE)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    a, b = socket.socketpair()
    try:
        high = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1024)  # the lowest free one from 1024
        transport = TCPTransport(socket.socket(fileno=high))
        try:
            assert transport.sock.fileno() >= 1024
            started = time.monotonic()
            assert transport.read(0.02) is None  # nothing within 20 ms
            assert 0.015 < time.monotonic() - started < 5.0
            b.sendall(b"ping")
            assert transport.read(0.05) == b"ping"  # the same poller, now readable
            assert transport.read(0.02) is None
        finally:
            transport.close()
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_try_write_joins_more_chunks_than_one_sendmsg_takes(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    chunks = [b"%03d" % i for i in range(100)]  # over _IOV_MAX (64)
    assert transport.try_write(chunks) == 300
    assert transport.bytes_written == 300
    got = b""
    while len(got) < 300:
        got += peer.recv(1024)
    assert got == b"".join(chunks)


def test_try_write_takes_nothing_once_the_kernel_buffer_is_full(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    block = b"x" * 65536
    accepted = 0
    for _ in range(1000):
        n = transport.try_write([block])
        accepted += n
        if n == 0:
            break
    else:
        pytest.fail("the socket buffer never filled")
    assert transport.bytes_written == accepted > 0
    assert transport.try_write([b"a", b"b"]) == 0  # the sendmsg path, full too
    peer.setblocking(False)
    received = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            received += len(peer.recv(1 << 20))
    assert received == accepted  # every byte counted went out, none more


def test_try_write_to_a_peer_that_hung_up_is_a_connection_loss(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    transport, peer = pair
    peer.close()
    with pytest.raises(ConnectionLost, match="connection lost") as info:
        transport.try_write([b"hello"])
    assert info.value.errno == errno.EPIPE


def test_a_tls_transport_leaves_every_write_to_the_writer_thread() -> None:
    a, b = socket.socketpair()
    transport = TLSTransport(TCPTransport(a), ssl.create_default_context(), "localhost")
    try:
        assert not transport.can_try_write and transport.can_read_bounded
        assert transport.try_write([b"hello"]) == 0 and transport.bytes_written == 0
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(10)  # nothing was sent
    finally:
        transport.close()
        b.close()


# -- the connector --------------------------------------------------------------------------


@contextlib.contextmanager
def hanging_listener() -> Iterator[tuple[str, int]]:
    """A 127.0.0.1 listener whose backlog is full: a new connect hangs (its SYN is
    dropped) until it times out or is aborted."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    filler = socket.create_connection(address)  # takes the one backlog slot
    try:
        yield address
    finally:
        filler.close()
        server.close()


@contextlib.contextmanager
def resolver(
    monkeypatch: pytest.MonkeyPatch, host: str, answer: Any
) -> Iterator[threading.Event]:
    """``host`` resolves by ``answer()`` (others as usual); the Event is set once asked."""
    real = socket.getaddrinfo
    asked = threading.Event()

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == host:
            asked.set()
            return answer(real, *args, **kwargs)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn(*args)`` on a thread; the list gets its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", True),
        ("0.0.0.0", True),
        ("::1", True),
        ("2001:db8::8a2e:370:7334", True),
        ("::ffff:192.0.2.1", True),
        ("fe80::1%eth0", True),  # a scope: getaddrinfo takes it, with no lookup
        ("localhost", False),
        ("example.com", False),
        ("1.2.3", False),  # inet_aton would take it; a resolver is asked instead
        ("256.1.1.1", False),
        ("1.2.3.4.5", False),
        ("::1::", False),
        ("[::1]", False),  # brackets are the caller's to strip
        ("", False),
        ("127.0.0.1\x00", False),  # a NUL: ValueError inside, not raised
        ("%eth0", False),
    ],
)
def test_is_ip_literal_tells_addresses_from_names(host: str, literal: bool) -> None:
    assert is_ip_literal(host) is literal


def test_a_connector_aborted_before_it_starts_connects_nowhere() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for host in ("localhost", "127.0.0.1"):  # a lookup thread; a numeric host
            connector = Connector()
            connector.abort()
            with pytest.raises(ConnectError, match=r"^connection aborted by close\(\)$"):
                connector.connect(host, port, Deadline(5))
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()  # neither connected


def test_a_lookup_slower_than_the_deadline_is_an_open_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def hangs(real: Any, *args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "too late")

    try:
        with resolver(monkeypatch, "slow.example", hangs) as asked:
            started = time.monotonic()
            with pytest.raises(OpenTimeout, match="^looking up 'slow.example' took too long$"):
                Connector().connect("slow.example", 80, Deadline(0.2))
            assert asked.is_set() and time.monotonic() - started < 2.0
    finally:
        release.set()


def test_a_lookup_that_returns_as_close_comes_connects_nowhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connector = Connector()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answers_as_close_comes(real: Any, *args: Any, **kwargs: Any) -> Any:
            connector.abort()  # close() on another thread, just as the answer comes
            return real("127.0.0.1", *args, **kwargs)

        with resolver(monkeypatch, "racy.example", answers_as_close_comes):
            with pytest.raises(ConnectError, match=r"^connection aborted by close\(\)$"):
                connector.connect("racy.example", port, Deadline(5))
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"], ids=["empty", "long"])
def test_a_host_name_that_cannot_be_looked_up_is_a_connect_error(host: str) -> None:
    """A name with an empty label or one over 63 characters cannot be encoded for
    the resolver (IDNA): ``connect()`` and ``ws.error`` had the resolver's bare
    UnicodeError, not a blockws error."""
    with pytest.raises(ConnectError, match=f"^cannot resolve host '{host}': ") as info:
        Connector().connect(host, 80, Deadline(5))
    assert isinstance(info.value.__cause__, UnicodeError)
    with pytest.raises(ConnectError, match="cannot resolve host"):
        blockws.connect(f"ws://{host}/", timeout=5)
    ws = blockws.WebSocket(f"ws://{host}/")
    ws.open()
    assert ws.join(5)
    ws.update()
    assert isinstance(ws.error, ConnectError) and ws.close_code == 1006


def test_close_during_a_tcp_connect_ends_it_at_once() -> None:
    with hanging_listener() as (host, port):
        connector = Connector()
        thread, out = in_thread(connector.connect, host, port, Deadline(10))
        thread.join(0.3)  # into the connect, which hangs (the backlog is full)
        assert thread.is_alive()
        started = time.monotonic()
        connector.abort()
        thread.join(5)
        assert time.monotonic() - started < 2.0
    assert len(out) == 1 and type(out[0]) is ConnectError and str(out[0]) == ABORTED


def test_close_just_before_the_tcp_connect_starts_ends_it_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An abort between the socket's registration and its connect: the shutdown
    does nothing to a socket not yet connecting, so the connect must see the
    abort's flag, not wait for the (full) listener until the deadline."""
    connector = Connector()
    real = socket.socket.connect_ex

    def aborted_first(sock: socket.socket, address: Any) -> int:
        connector.abort()  # close() on another thread, just before the connect
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect_ex", aborted_first)
    with hanging_listener() as (host, port):
        started = time.monotonic()
        with pytest.raises(ConnectError) as info:
            connector.connect(host, port, Deadline(10))
        assert time.monotonic() - started < 2.0
    assert str(info.value) == ABORTED

def test_a_tcp_connect_past_the_deadline_is_an_open_timeout_naming_the_server() -> None:
    with hanging_listener() as (host, port):
        started = time.monotonic()
        with pytest.raises(OpenTimeout) as info:
            Connector().connect(host, port, Deadline(0.3))
        assert 0.25 < time.monotonic() - started < 3.0
    assert str(info.value) == f"timed out opening the WebSocket to {host}:{port}"


def test_close_during_a_tls_handshake_ends_it_at_once() -> None:
    hello = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def silent_server() -> None:
            peer, _ = server.accept()
            with peer:
                if peer.recv(4096):  # the ClientHello; no answer
                    hello.set()
                peer.recv(4096)  # until the client goes

        serving = threading.Thread(target=silent_server)
        serving.start()
        connector = Connector()
        thread, out = in_thread(
            connector.connect, "127.0.0.1", port, Deadline(10), ssl.create_default_context()
        )
        assert hello.wait(5)
        started = time.monotonic()
        connector.abort()
        thread.join(5)
        assert time.monotonic() - started < 2.0
        serving.join(5)
    assert len(out) == 1 and type(out[0]) is ConnectError and str(out[0]) == ABORTED


def test_a_refused_connection_names_the_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(ConnectionRefused) as info:  # nothing listens there now
        Connector().connect("127.0.0.1", port, Deadline(5))
    assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert info.value.errno == errno.ECONNREFUSED


def test_a_socket_closed_behind_the_transport_s_back_is_a_connection_loss(
    pair: tuple[TCPTransport, socket.socket],
) -> None:
    """Not our close: the reader thread's recv reports a ConnectionLost (it raised
    poll's bare ValueError for the closed descriptor)."""
    transport, _ = pair
    transport.sock.close()
    with pytest.raises(ConnectionLost, match="^connection lost: "):
        transport.recv()
    with pytest.raises(ConnectionLost, match="^connection lost: "):
        transport.read(0.5)
