"""The embedded echo server (blockws/server.py) against raw-socket clients: requests it
refuses, clients that leave early or misbehave, and ``close()`` with connections open.

The client here is a plain socket writing the upgrade request and masked frames by hand
(``faultserver.frame_bytes``), so each test controls exactly what the server sees.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from faultserver import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_value, frame_bytes

import blockws
from blockws.server import EchoServer

MASK = b"\x01\x02\x03\x04"


def request(key: str | None = None, *, method: str = "GET", upgrade: str = "websocket",
            version: str = "13", extra: str = "") -> bytes:
    lines = [f"{method} / HTTP/1.1", "Host: 127.0.0.1", f"Upgrade: {upgrade}",
             "Connection: Upgrade", f"Sec-WebSocket-Version: {version}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a reset counts as the end)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head, and what came after it in the same reads."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def read_frame(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bytes]:
    """One unmasked server frame (payloads under 126 bytes): opcode, payload, rest."""
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {buf!r}"
        buf += chunk
    assert buf[1] & 0x80 == 0, "a server must not mask its frames"
    n = buf[1] & 0x7F
    assert n < 126
    return buf[0] & 0x0F, buf[2:2 + n], buf[2 + n:]


@pytest.fixture
def server() -> Iterator[EchoServer]:
    with EchoServer() as srv:
        yield srv


def connect(server: EchoServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def upgraded(server: EchoServer, then: bytes = b"") -> tuple[socket.socket, bytes]:
    """A raw client past the handshake (``then`` goes in the request's write)."""
    sock = connect(server)
    key = new_key()
    sock.sendall(request(key) + then)
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert f"Sec-WebSocket-Accept: {accept_value(key)}".encode() in head.split(b"\r\n")
    return sock, rest


def echo_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blockws-echo-")
            and t.name != "blockws-echo-accept"]


def wait_no_echo_threads(timeout: float = 5.0) -> None:
    """The server's per-connection threads end on their own (no event to wait on: they
    are the server's; polled)."""
    deadline = time.monotonic() + timeout
    while echo_threads():
        assert time.monotonic() < deadline, [t.name for t in echo_threads()]
        time.sleep(0.01)


# -- refused requests ------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(request(new_key(), method="POST"), id="not-GET"),
        pytest.param(request(new_key(), upgrade="h2c"), id="upgrade-not-websocket"),
        pytest.param(request(new_key(), version="8"), id="version-not-13"),
        pytest.param(request(None), id="no-key"),
        pytest.param(request(""), id="empty-key"),
    ],
)
def test_bad_upgrade_request_gets_400_and_the_connection_closes(
    server: EchoServer, raw: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(raw)
        assert read_all(sock) == b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    # A refused request echoes nothing, and the server keeps serving.
    assert server.echoed == 0
    with blockws.connect(server.url, timeout=5) as ws:
        ws.send("after the 400")
        assert ws.receive(timeout=5) == "after the 400"


@pytest.mark.timeout(10)
def test_upgrade_header_is_case_insensitive(server: EchoServer) -> None:
    sock = connect(server)
    key = new_key()
    sock.sendall(request(key, upgrade="WebSocket"))
    head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 ")
    sock.close()


@pytest.mark.timeout(10)
def test_request_head_over_16_kib_drops_the_connection_without_an_answer(
    server: EchoServer,
) -> None:
    """No end of head within 16 KiB: HeadersTooLarge inside the server, which just drops
    the connection (no response, no crash of the server)."""
    with connect(server) as sock:
        filler = "".join(f"X-Filler-{i}: {'a' * 100}\r\n" for i in range(200))  # ~23 KiB
        sock.sendall(f"GET / HTTP/1.1\r\nHost: x\r\n{filler}".encode())
        assert read_all(sock) == b""
    wait_no_echo_threads()
    with blockws.connect(server.url, timeout=5) as ws:
        ws.send("still serving")
        assert ws.receive(timeout=5) == "still serving"


@pytest.mark.timeout(10)
def test_client_leaving_during_the_request_gets_no_answer(server: EchoServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end of head
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    wait_no_echo_threads()
    assert server.echoed == 0


# -- the echo loop ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_frames_sent_with_the_request_are_echoed(server: EchoServer) -> None:
    """Frames in the same write as the upgrade request (read past the head) are handled."""
    frames = (frame_bytes(OP_TEXT, b"early", mask=MASK)
              + frame_bytes(OP_BINARY, b"\x00\xff", mask=MASK))
    sock, rest = upgraded(server, then=frames)
    with sock:
        op, payload, rest = read_frame(sock, rest)
        assert (op, payload) == (OP_TEXT, b"early")
        op, payload, rest = read_frame(sock, rest)
        assert (op, payload) == (OP_BINARY, b"\x00\xff")
    assert server.echoed == 2


@pytest.mark.timeout(10)
def test_client_dropping_tcp_without_a_close_frame_ends_its_thread(server: EchoServer) -> None:
    sock, rest = upgraded(server)
    sock.sendall(frame_bytes(OP_TEXT, b"one", mask=MASK))
    assert read_frame(sock, rest)[:2] == (OP_TEXT, b"one")
    assert len(echo_threads()) == 1
    sock.close()  # no close frame: the server's read sees EOF
    wait_no_echo_threads()
    assert server.echoed == 1


@pytest.mark.timeout(10)
def test_close_handshake_is_completed_and_the_server_closes_tcp(server: EchoServer) -> None:
    sock, rest = upgraded(server)
    with sock:
        sock.sendall(frame_bytes(OP_CLOSE, (4001).to_bytes(2, "big") + b"bye", mask=MASK))
        op, payload, rest = read_frame(sock, rest)
        assert (op, payload) == (OP_CLOSE, (4001).to_bytes(2, "big"))  # the code echoed
        assert rest + read_all(sock) == b""  # then the server closes the connection first


@pytest.mark.timeout(10)
def test_ping_is_answered_and_a_pong_is_ignored(server: EchoServer) -> None:
    # The unasked pong comes with the request, so it is handled alone: nothing to answer.
    sock, rest = upgraded(server, then=frame_bytes(OP_PONG, b"unasked", mask=MASK))
    with sock:
        sock.sendall(frame_bytes(OP_PING, b"are you there", mask=MASK))
        op, payload, rest = read_frame(sock, rest)
        assert (op, payload) == (OP_PONG, b"are you there")
        sock.sendall(frame_bytes(OP_TEXT, b"after", mask=MASK))
        assert read_frame(sock, rest)[:2] == (OP_TEXT, b"after")
    assert server.echoed == 1


@pytest.mark.timeout(10)
def test_unmasked_client_frame_fails_with_1002(server: EchoServer) -> None:
    """A protocol error from the client: the server sends close 1002 and drops it."""
    sock, rest = upgraded(server)
    with sock:
        sock.sendall(frame_bytes(OP_TEXT, b"unmasked"))
        op, payload, rest = read_frame(sock, rest)
        assert op == OP_CLOSE
        assert int.from_bytes(payload[:2], "big") == 1002
        assert rest + read_all(sock) == b""
    assert server.echoed == 0


# -- close() ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_close_drops_open_connections_and_joins_their_threads() -> None:
    server = EchoServer().start()
    sock, rest = upgraded(server)
    half = connect(server)  # a second client still in its handshake
    half.sendall(b"GET / HTTP/1.1\r\n")
    with sock, half:
        sock.sendall(frame_bytes(OP_TEXT, b"ping me", mask=MASK))
        assert read_frame(sock, rest)[:2] == (OP_TEXT, b"ping me")
        deadline = time.monotonic() + 5
        while len(echo_threads()) < 2:  # the second connection is being served
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.close()
        # close() returned: every thread it started was joined...
        assert echo_threads() == []
        assert not any(t.name == "blockws-echo-accept" for t in threading.enumerate())
        # ...and both clients see the end of the connection, without a close frame.
        assert read_all(sock) == b""
        assert read_all(half) == b""
    with pytest.raises(OSError):
        connect(server).close()  # no longer listening


@pytest.mark.timeout(10)
def test_close_does_not_hang_on_a_client_that_stopped_reading() -> None:
    """A client sends large messages and never reads the echoes: the connection's thread
    ends up blocked writing. close() still drops it and returns."""
    server = EchoServer().start()
    sock, _ = upgraded(server)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        message = frame_bytes(OP_BINARY, bytes(1 << 20), mask=MASK)
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):  # both ways' buffers full: the echo is stuck
            for _ in range(256):
                sock.sendall(message)
        assert server.echoed >= 1
        closing = threading.Thread(target=server.close, daemon=True)
        closing.start()
        closing.join(5)
        assert not closing.is_alive(), "close() hung on a connection stuck in a write"
        assert echo_threads() == []


@pytest.mark.timeout(10)
def test_close_without_start_and_twice() -> None:
    server = EchoServer()
    assert server.url == f"ws://127.0.0.1:{server.port}/"
    server.close()
    server.close()  # idempotent
    with pytest.raises(OSError):
        connect(server).close()
