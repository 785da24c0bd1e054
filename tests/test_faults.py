"""blockws against servers that misbehave: raw-socket fault servers (tests/faultserver.py).

Each fault must end the socket with exactly one ``on_closed`` carrying the code RFC 6455
asks for, ``ws.error`` of the right class, and no thread or descriptor left behind
(``no_leaks``). When blockws fails the connection (1002, 1007, 1009), the fault server
reads the close frame the client sent and the test checks its code.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest
from faultserver import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Peer,
    Recorder,
    accept_value,
    fault_server,
    frame_bytes,
)

import blockws
from peerutil import free_port

pytestmark = pytest.mark.usefixtures("no_leaks")

MiB = 1024 * 1024
TIMEOUT = 10.0


def echo_handler(peer: Peer) -> None:
    """A well-behaved server: echoes data frames, answers pings, echoes the close."""
    peer.handshake()
    while True:
        _, opcode, payload = peer.read_frame()
        if opcode == OP_CLOSE:
            peer.send_frame(OP_CLOSE, payload[:2])
            return
        if opcode == OP_PING:
            peer.send_frame(OP_PONG, payload)
        elif opcode in (OP_TEXT, OP_BINARY):
            peer.send_frame(opcode, payload)


def send_then_await_close(*chunks: bytes) -> Callable[[Peer], None]:
    """Answer the upgrade, send ``chunks``, read until the client's close frame, hang up."""

    def handler(peer: Peer) -> None:
        peer.handshake()
        for chunk in chunks:
            peer.send(chunk)
        peer.read_until_close()

    return handler


def run_to_close(url: str, timeout: float = 10.0, **options: Any
                 ) -> tuple[blockws.WebSocket, Recorder, int, str]:
    rec = Recorder()
    ws = blockws.WebSocket(url, **rec.callbacks(), **options)
    ws.open()
    code, reason = rec.wait_closed(ws, timeout)
    return ws, rec, code, reason


# -- the server breaks RFC 6455 -------------------------------------------------------

def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


PROTOCOL_FAULTS: list[tuple[str, bytes, int, type[BaseException]]] = [
    ("rsv1-text", frame_bytes(OP_TEXT, b"hi", rsv=0x40), 1002, blockws.ProtocolError),
    ("rsv2-binary", frame_bytes(OP_BINARY, b"hi", rsv=0x20), 1002, blockws.ProtocolError),
    ("rsv3-text", frame_bytes(OP_TEXT, b"hi", rsv=0x10), 1002, blockws.ProtocolError),
    ("rsv1-ping", frame_bytes(OP_PING, b"hi", rsv=0x40), 1002, blockws.ProtocolError),
    ("rsv1-continuation",
     frame_bytes(OP_TEXT, b"a", fin=False) + frame_bytes(OP_CONT, b"b", rsv=0x40),
     1002, blockws.ProtocolError),
    ("opcode-3", frame_bytes(0x3, b"x"), 1002, blockws.ProtocolError),
    ("opcode-7", frame_bytes(0x7), 1002, blockws.ProtocolError),
    ("opcode-0xb", frame_bytes(0xB, b"x"), 1002, blockws.ProtocolError),
    ("opcode-0xf", frame_bytes(0xF), 1002, blockws.ProtocolError),
    ("fragmented-ping", frame_bytes(OP_PING, b"x", fin=False), 1002, blockws.ProtocolError),
    ("fragmented-close", frame_bytes(OP_CLOSE, close_payload(1000), fin=False), 1002,
     blockws.ProtocolError),
    ("ping-126-bytes", frame_bytes(OP_PING, b"p" * 126), 1002, blockws.ProtocolError),
    ("pong-126-bytes", frame_bytes(OP_PONG, b"p" * 126), 1002, blockws.ProtocolError),
    ("masked-frame", frame_bytes(OP_TEXT, b"hello", mask=b"\x01\x02\x03\x04"), 1002,
     blockws.ProtocolError),
    ("orphan-continuation", frame_bytes(OP_CONT, b"x"), 1002, blockws.ProtocolError),
    ("text-inside-fragmented-message",
     frame_bytes(OP_TEXT, b"a", fin=False) + frame_bytes(OP_TEXT, b"b"), 1002,
     blockws.ProtocolError),
    ("length-top-bit-set", b"\x82\x7f" + struct.pack("!Q", 1 << 63), 1002,
     blockws.ProtocolError),
    ("invalid-utf8", frame_bytes(OP_TEXT, b"ok \xff\xfe"), 1007, blockws.InvalidPayload),
    ("utf8-surrogate", frame_bytes(OP_TEXT, b"\xed\xa0\x80"), 1007, blockws.InvalidPayload),
    ("utf8-overlong", frame_bytes(OP_TEXT, b"\xc0\xaf"), 1007, blockws.InvalidPayload),
    ("utf8-truncated-at-end", frame_bytes(OP_TEXT, b"a\xce"), 1007, blockws.InvalidPayload),
    ("invalid-utf8-across-fragments",
     frame_bytes(OP_TEXT, b"\xce", fin=False) + frame_bytes(OP_CONT, b"A"), 1007,
     blockws.InvalidPayload),
    ("close-reason-invalid-utf8", frame_bytes(OP_CLOSE, close_payload(1000, b"\xff")), 1007,
     blockws.InvalidPayload),
    ("close-1-byte-payload", frame_bytes(OP_CLOSE, b"\x03"), 1002, blockws.ProtocolError),
    *[
        (f"close-code-{code}", frame_bytes(OP_CLOSE, close_payload(code)), 1002,
         blockws.ProtocolError)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2999, 5000, 65535)
    ],
]


@pytest.mark.parametrize(("wire", "code", "error"),
                         [pytest.param(*case[1:], id=case[0]) for case in PROTOCOL_FAULTS])
def test_protocol_violation_fails_connection(wire: bytes, code: int,
                                             error: type[BaseException]) -> None:
    with fault_server(send_then_await_close(wire)) as server:
        ws, rec, got_code, reason = run_to_close(server.url)
        peer = server.peer()
    assert (got_code, reason) == (code, "")
    assert type(ws.error) is error, repr(ws.error)
    assert isinstance(ws.error, blockws.ProtocolError) and ws.error.close_code == code
    assert rec.events == [("open",), ("closed", code, "")]
    # RFC 6455 7.1.7: failing the connection sends a close frame with the code.
    assert peer.close_received is not None and peer.close_received[0] == code
    assert not ws.is_open and ws.closed


def test_messages_before_a_violation_are_delivered() -> None:
    wire = frame_bytes(OP_TEXT, b"first") + frame_bytes(OP_BINARY, b"\x00\x01") + frame_bytes(0x3)
    with fault_server(send_then_await_close(wire)) as server:
        ws, rec, code, _ = run_to_close(server.url)
    assert rec.events == [("open",), ("text", "first"), ("binary", b"\x00\x01"),
                          ("closed", 1002, "")]


def test_answers_to_messages_before_a_violation_go_out_before_the_close() -> None:
    """As a single-threaded client would: echo the message, then fail (Autobahn 3.2)."""
    wire = (frame_bytes(OP_TEXT, b"first") + frame_bytes(OP_TEXT, b"bad", rsv=0x20)
            + frame_bytes(OP_PING, b"after"))
    with fault_server(send_then_await_close(wire)) as server:
        rec = Recorder()
        callbacks = rec.callbacks()
        on_message = callbacks["on_message"]

        def echo(ws: blockws.WebSocket, text: str) -> None:
            on_message(ws, text)
            ws.send(text)  # accepted: the app has not been told of the failure yet

        callbacks["on_message"] = echo
        ws = blockws.WebSocket(server.url, **callbacks)
        ws.open()
        rec.wait_closed(ws)
        peer = server.peer()
    # The echo, then the failing close; the ping after the bad frame gets no pong.
    assert [(op, payload[:2] if op == OP_CLOSE else payload) for _, op, payload in peer.frames] \
        == [(OP_TEXT, b"first"), (OP_CLOSE, struct.pack("!H", 1002))]
    assert rec.events == [("open",), ("text", "first"), ("closed", 1002, "")]
    assert isinstance(ws.error, blockws.ProtocolError)


def test_failure_close_is_not_held_forever_without_update() -> None:
    """If nobody pumps update(), the failing close still goes out after a short grace."""
    wire = frame_bytes(OP_TEXT, b"first") + frame_bytes(0x3)
    closed_at: list[float] = []

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send(wire)
        start = time.monotonic()
        peer.read_until_close()
        closed_at.append(time.monotonic() - start)

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        assert ws.join(10), "the socket did not end without update()"
        peer = server.peer()
        rec.wait_closed(ws)
    assert peer.close_received == (1002, "")
    assert closed_at and closed_at[0] < 5.0
    assert rec.events == [("open",), ("text", "first"), ("closed", 1002, "")]


def test_violation_in_first_bytes_after_handshake() -> None:
    """Frames that arrive in the same read as the 101 response are parsed too."""

    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(peer.response_101() + frame_bytes(OP_TEXT, b"hi") + frame_bytes(0x3))
        peer.read_until_close()

    with fault_server(handler) as server:
        ws, rec, code, _ = run_to_close(server.url)
        peer = server.peer()
    assert rec.events == [("open",), ("text", "hi"), ("closed", 1002, "")]
    assert peer.close_received is not None and peer.close_received[0] == 1002


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [(close_payload(1000), 1000, ""), (close_payload(1001, b"going away"), 1001, "going away"),
     (close_payload(3000, "ünïcode".encode()), 3000, "ünïcode"), (close_payload(4999), 4999, ""),
     (b"", 1005, "")],
    ids=["1000", "1001-reason", "3000-unicode", "4999", "empty"],
)
def test_server_close_with_valid_code(payload: bytes, code: int, reason: str) -> None:
    with fault_server(send_then_await_close(frame_bytes(OP_CLOSE, payload))) as server:
        ws, rec, got_code, got_reason = run_to_close(server.url)
        peer = server.peer()
    assert (got_code, got_reason) == (code, reason)
    assert ws.error is None
    # The client echoes the code (RFC 6455 5.5.1); an empty close gets an empty reply.
    assert peer.close_received is not None
    assert peer.close_received[0] == (None if code == 1005 else code)


@pytest.mark.parametrize("hangup", ["fin", "rst"])
def test_server_closes_and_hangs_up_at_once(hangup: str) -> None:
    """The server's close frame arrived: that is a clean close even if the TCP connection
    is gone before the client's reply can be written."""

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send_frame(OP_CLOSE, close_payload(4002, b"bye"))
        if hangup == "rst":
            peer.reset()

    with fault_server(handler) as server:
        ws, rec, code, reason = run_to_close(server.url)
    assert (code, reason) == (4002, "bye")
    assert ws.error is None, repr(ws.error)


# -- limits ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("wire", "accepted"),
    [
        (frame_bytes(OP_BINARY, b"b" * 1000), True),
        (frame_bytes(OP_TEXT, b"t" * 1000), True),
        (frame_bytes(OP_BINARY, b"b" * 500, fin=False) + frame_bytes(OP_CONT, b"b" * 500), True),
        (frame_bytes(OP_BINARY, b"b" * 1001), False),
        (frame_bytes(OP_TEXT, b"t" * 1001), False),
        (frame_bytes(OP_BINARY, b"b" * 600, fin=False) + frame_bytes(OP_CONT, b"b" * 600), False),
        (frame_bytes(OP_TEXT, b"t" * 600, fin=False) + frame_bytes(OP_CONT, b"t" * 401), False),
    ],
    ids=["binary-1000", "text-1000", "fragmented-1000", "binary-1001", "text-1001",
         "fragmented-1200", "fragmented-text-1001"],
)
def test_max_message_size(wire: bytes, accepted: bool) -> None:
    tail = frame_bytes(OP_CLOSE, close_payload(1000)) if accepted else b""
    with fault_server(send_then_await_close(wire + tail)) as server:
        ws, rec, code, _ = run_to_close(server.url, max_message_size=1000)
        peer = server.peer()
    assert peer.close_received is not None
    if accepted:
        assert len(rec.messages) == 1 and len(rec.messages[0]) == 1000
        assert code == 1000 and ws.error is None
    else:
        assert rec.messages == []
        assert code == 1009 and type(ws.error) is blockws.MessageTooBig
        assert peer.close_received[0] == 1009


@pytest.mark.parametrize("announced", [16 * MiB + 1, 1 << 40], ids=["16MiB+1", "1TiB"])
def test_default_max_message_size_fails_on_header(announced: int) -> None:
    """Over the default 16 MiB limit the header alone fails the connection: no payload
    needs to arrive (and none is allocated)."""
    header = frame_bytes(OP_BINARY, b"", length=announced)
    with fault_server(send_then_await_close(header + b"x" * 100)) as server:
        ws, rec, code, _ = run_to_close(server.url)
        peer = server.peer()
    assert code == 1009 and type(ws.error) is blockws.MessageTooBig
    assert peer.close_received is not None and peer.close_received[0] == 1009


# -- the opening handshake goes wrong ------------------------------------------------------

def respond_with(make: Callable[[Peer], bytes]) -> Callable[[Peer], None]:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(make(peer))
        peer.drain_forever()  # until the client hangs up

    return handler


def answer_and_hang_up(make: Callable[[Peer], bytes]) -> Callable[[Peer], None]:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(make(peer))

    return handler


def right_accept(peer: Peer) -> str:
    return accept_value(peer.request_headers["sec-websocket-key"])


def big_head(peer: Peer) -> bytes:
    head = peer.response_101(extra=[f"X-Filler-{i}: {'f' * 1000}" for i in range(70)])
    assert len(head) > 64 * 1024
    return head


HANDSHAKE_FAULTS: list[tuple[str, Callable[[Peer], bytes], type[BaseException], dict[str, Any]]]
HANDSHAKE_FAULTS = [
    ("status-200", lambda p: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
     blockws.InvalidStatus, {}),
    ("status-403", lambda p: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
     blockws.InvalidStatus, {}),
    ("status-404", lambda p: b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
     blockws.InvalidStatus, {}),
    ("missing-upgrade", lambda p: p.response_101(upgrade=None), blockws.InvalidHeader, {}),
    ("wrong-upgrade", lambda p: p.response_101(upgrade="h2c"), blockws.InvalidHeader, {}),
    ("missing-connection", lambda p: p.response_101(connection=None), blockws.InvalidHeader, {}),
    ("wrong-connection", lambda p: p.response_101(connection="keep-alive"),
     blockws.InvalidHeader, {}),
    ("missing-accept", lambda p: p.response_101(accept=None), blockws.InvalidHeader, {}),
    ("wrong-accept", lambda p: p.response_101(accept=accept_value("dGhlIHNhbXBsZSBub25jZQ==")),
     blockws.InvalidHeader, {}),
    ("repeated-accept",
     lambda p: p.response_101(extra=[f"Sec-WebSocket-Accept: {right_accept(p)}"]),
     blockws.InvalidHeader, {}),
    ("subprotocol-not-offered",
     lambda p: p.response_101(extra=["Sec-WebSocket-Protocol: superchat"]),
     blockws.NegotiationError, {"subprotocols": ["chat"]}),
    ("subprotocol-none-offered", lambda p: p.response_101(extra=["Sec-WebSocket-Protocol: chat"]),
     blockws.NegotiationError, {}),
    ("extension-not-offered",
     lambda p: p.response_101(extra=["Sec-WebSocket-Extensions: permessage-deflate"]),
     blockws.NegotiationError, {"extensions": []}),
    ("unknown-extension",
     lambda p: p.response_101(extra=["Sec-WebSocket-Extensions: x-webkit-deflate-frame"]),
     blockws.NegotiationError, {}),
    ("deflate-bad-parameter",
     lambda p: p.response_101(
         extra=["Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=16"]),
     blockws.NegotiationError, {}),
    ("head-over-64KiB", big_head, blockws.HeadersTooLarge, {}),
    ("head-never-ends",
     lambda p: b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Endless: yes\r\n" * 5000,
     blockws.HeadersTooLarge, {}),
    ("garbage-status-line", lambda p: b"SSH-2.0-OpenSSH_9.2\r\n\r\n", blockws.InvalidHeader, {}),
    # Guess: an incomplete answer then EOF is reported as a bad response (InvalidHeader),
    # which is what blockws does; see test_server_resets_mid_handshake for an RST.
    ("eof-mid-status-line", lambda p: b"HTTP/1.1 10", blockws.InvalidHeader, {}),
    ("eof-mid-headers", lambda p: p.response_101()[:-2], blockws.InvalidHeader, {}),
]


def _hangs_up(case_id: str) -> bool:
    return case_id.startswith("eof-")


@pytest.mark.parametrize(
    ("make", "error", "options"),
    [pytest.param(m, e, o, id=i) for i, m, e, o in HANDSHAKE_FAULTS],
)
def test_handshake_failure(request: pytest.FixtureRequest, make: Callable[[Peer], bytes],
                           error: type[BaseException], options: dict[str, Any]) -> None:
    case_id = request.node.callspec.id
    handler = answer_and_hang_up(make) if _hangs_up(case_id) else respond_with(make)
    with fault_server(handler) as server:
        ws, rec, code, reason = run_to_close(server.url, **options)
        assert (code, reason) == (1006, "")
        assert rec.events == [("closed", 1006, "")]  # never opened
        assert type(ws.error) is error, repr(ws.error)
        assert not ws.is_open and ws.protocol is None
        if isinstance(ws.error, blockws.InvalidStatus):
            assert ws.error.status == int(case_id.split("-")[1])
        with pytest.raises(error) as excinfo:
            blockws.connect(server.url, timeout=5.0, **options)
        assert type(excinfo.value) is error


def test_server_closes_before_answering() -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()  # ... and hang up

    with fault_server(handler) as server:
        ws, rec, code, _ = run_to_close(server.url)
        assert rec.events == [("closed", 1006, "")]
        assert isinstance(ws.error, blockws.InvalidHeader), repr(ws.error)
        with pytest.raises(blockws.InvalidHeader):
            blockws.connect(server.url, timeout=5.0)


def test_server_resets_mid_handshake() -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 101 Switching")
        peer.reset()

    with fault_server(handler) as server:
        ws, rec, code, _ = run_to_close(server.url)
        assert rec.events == [("closed", 1006, "")]
        assert type(ws.error) is blockws.ConnectionLost, repr(ws.error)
        with pytest.raises(blockws.ConnectionLost):
            blockws.connect(server.url, timeout=5.0)


@pytest.mark.parametrize("reads_request", [True, False], ids=["reads", "silent"])
def test_server_never_answers_open_timeout(reads_request: bool) -> None:
    def handler(peer: Peer) -> None:
        if reads_request:
            peer.read_request()
        peer.drain_forever()

    with fault_server(handler) as server:
        start = time.monotonic()
        ws, rec, code, _ = run_to_close(server.url, open_timeout=0.3)
        elapsed = time.monotonic() - start
        assert rec.events == [("closed", 1006, "")]
        assert type(ws.error) is blockws.OpenTimeout, repr(ws.error)
        assert isinstance(ws.error, TimeoutError)
        assert 0.25 <= elapsed < 3.0
        with pytest.raises(blockws.OpenTimeout):
            blockws.connect(server.url, open_timeout=0.3)
        with pytest.raises(blockws.OpenTimeout):
            blockws.connect(server.url, timeout=0.3)


# -- network failures ----------------------------------------------------------------------

@pytest.mark.parametrize("how", ["fin", "rst"])
def test_server_drops_connection_mid_frame(how: str) -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send_frame(OP_TEXT, b"whole")
        peer.send(frame_bytes(OP_BINARY, b"0123456789", length=100))  # 10 of 100 bytes
        if how == "rst":
            peer.reset()

    with fault_server(handler) as server:
        ws, rec, code, _ = run_to_close(server.url)
    assert rec.events == [("open",), ("text", "whole"), ("closed", 1006, "")]
    assert type(ws.error) is blockws.ConnectionLost, repr(ws.error)


def test_server_drops_connection_without_close_frame() -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send_frame(OP_BINARY, b"last words")

    with fault_server(handler) as server:
        ws, rec, code, _ = run_to_close(server.url)
    assert rec.events == [("open",), ("binary", b"last words"), ("closed", 1006, "")]
    assert type(ws.error) is blockws.ConnectionLost


def test_connection_refused() -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    ws, rec, code, _ = run_to_close(url)
    assert rec.events == [("closed", 1006, "")]
    assert type(ws.error) is blockws.ConnectionRefused, repr(ws.error)
    assert isinstance(ws.error, blockws.ConnectError) and isinstance(ws.error, OSError)
    with pytest.raises(blockws.ConnectError):
        blockws.connect(url, timeout=5.0)


def test_name_does_not_resolve() -> None:
    url = "ws://nonexistent.invalid/"
    ws, rec, code, _ = run_to_close(url, open_timeout=5.0)
    assert rec.events == [("closed", 1006, "")]
    assert type(ws.error) is blockws.ConnectError, repr(ws.error)
    with pytest.raises(blockws.ConnectError):
        blockws.connect(url, timeout=5.0)


def test_server_resets_while_client_sends() -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.read_frame()  # the first of many
        peer.reset()

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        chunk = b"z" * MiB
        try:
            for _ in range(16):
                ws.send(chunk)
        except blockws.ConnectionClosed:
            pass  # the reset may already have been seen: also fine
        code, _ = rec.wait_closed(ws)
    assert code == 1006
    assert type(ws.error) is blockws.ConnectionLost, repr(ws.error)


def test_wss_to_a_plain_text_server() -> None:
    def handler(peer: Peer) -> None:
        peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        peer.drain_forever()

    with fault_server(handler) as server:
        url = server.url.replace("ws://", "wss://")
        ws, rec, code, _ = run_to_close(url)
        assert rec.events == [("closed", 1006, "")]
        assert type(ws.error) is blockws.TLSError, repr(ws.error)
        with pytest.raises(blockws.TLSError):
            blockws.connect(url, timeout=5.0)


def test_wss_server_never_starts_tls_open_timeout() -> None:
    with fault_server(lambda peer: peer.drain_forever()) as server:
        url = server.url.replace("ws://", "wss://")
        ws, rec, code, _ = run_to_close(url, open_timeout=0.3)
        assert rec.events == [("closed", 1006, "")]
        assert type(ws.error) is blockws.OpenTimeout, repr(ws.error)


# -- a server that stops reading -------------------------------------------------------------

def test_server_stops_reading_send_never_blocks() -> None:
    release = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake()
        release.wait(30)  # never read: the client's writes back up

    chunk = b"\xab" * (64 * 1024)
    count = 256  # 16 MiB: far more than the socket buffers on both sides hold
    with fault_server(handler, rcvbuf=4096) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, close_timeout=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        slowest = 0.0
        for _ in range(count):
            start = time.perf_counter()
            ws.send(chunk)
            slowest = max(slowest, time.perf_counter() - start)
        assert slowest < 0.05, f"a send() took {slowest * 1000:.1f} ms"
        # Most of it is still queued in blockws, not written (kernel buffers hold a few MiB).
        assert ws.buffered_amount >= count * len(chunk) // 2, ws.buffered_amount
        start = time.perf_counter()
        ws.close()
        assert time.perf_counter() - start < 0.05
        assert not ws.is_open
        code, _ = rec.wait_closed(ws, timeout=5.0)
        elapsed = time.perf_counter() - start
        release.set()
    assert code == 1006
    assert type(ws.error) is blockws.CloseTimeout, repr(ws.error)
    assert 0.25 <= elapsed < 3.0
    assert ws.buffered_amount == 0  # the queue was dropped at the end


def test_server_ignores_close_close_timeout() -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.drain_forever()  # reads the close frame, never answers it

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, close_timeout=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        start = time.monotonic()
        ws.close(4003, "anyone?")
        code, _ = rec.wait_closed(ws, timeout=5.0)
        elapsed = time.monotonic() - start
    assert code == 1006
    assert type(ws.error) is blockws.CloseTimeout, repr(ws.error)
    assert 0.25 <= elapsed < 3.0


@pytest.mark.parametrize("initiator", ["server", "client"])
def test_server_never_closes_tcp_after_closing_handshake(initiator: str) -> None:
    """RFC 6455 7.1.1: the server should close TCP first; if it does not, the client
    drops it after close_timeout. The handshake completed, so that is no error."""
    release = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake()
        if initiator == "server":
            peer.send_frame(OP_CLOSE, close_payload(4000, b"server"))
            peer.read_until_close()
        else:
            peer.read_until_close()
            peer.send_frame(OP_CLOSE, close_payload(4000, b"server"))
        release.wait(30)  # keep the TCP connection open

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, close_timeout=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        start = time.monotonic()
        if initiator == "client":
            ws.close(4000)
        code, reason = rec.wait_closed(ws, timeout=5.0)
        elapsed = time.monotonic() - start
        release.set()
    assert (code, reason) == (4000, "server")
    assert ws.error is None, repr(ws.error)
    assert elapsed < 3.0


def test_nothing_is_sent_after_the_close_frame() -> None:
    """Threads sending while another closes: the close frame is the last frame on the wire."""
    after_close: list[tuple[bool, int, bytes]] = []

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.read_until_close()
        peer.send_frame(OP_CLOSE, close_payload(1000))
        peer.sock.shutdown(socket.SHUT_WR)  # our FIN: the client may now hang up
        while True:
            after_close.append(peer.read_frame())

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        go = threading.Barrier(5)
        going = threading.Event()
        sent = [0] * 4

        def sender(t: int) -> None:
            go.wait()
            try:
                while True:
                    ws.send(f"{t}" * 100)
                    sent[t] += 1
                    if sent[t] == 50:
                        going.set()
            except blockws.ConnectionClosed:
                pass

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        go.wait()
        assert going.wait(TIMEOUT)  # close while they are in full swing
        ws.close()
        for thread in threads:
            thread.join(TIMEOUT)
        code, _ = rec.wait_closed(ws)
        peer = server.peer()
    assert code == 1000 and ws.error is None
    assert after_close == []
    data_frames = [f for f in peer.frames if f[1] == OP_TEXT]
    assert len(data_frames) == sum(sent)  # everything accepted before close() went out
    assert peer.frames[-1][1] == OP_CLOSE


# -- legal but unusual server behaviour -------------------------------------------------------

def test_control_frames_between_fragments_and_data_after_close() -> None:
    wire = (
        frame_bytes(OP_TEXT, b"frag", fin=False)
        + frame_bytes(OP_PING, b"mid")
        + frame_bytes(OP_CONT, "mënt".encode(), fin=False)
        + frame_bytes(OP_PONG, b"unsolicited")
        + frame_bytes(OP_CONT, b"ed")
        + frame_bytes(OP_CLOSE, close_payload(1000, b"done"))
        + frame_bytes(OP_TEXT, b"after close: discarded")
    )
    with fault_server(send_then_await_close(wire)) as server:
        ws, rec, code, reason = run_to_close(server.url)
        peer = server.peer()
    assert rec.events == [("open",), ("text", "fragmënted"), ("closed", 1000, "done")]
    assert ws.error is None
    pongs = [f for f in peer.frames if f[1] == OP_PONG]
    assert pongs == [(True, OP_PONG, b"mid")]


def test_frames_trickling_in_one_byte_at_a_time() -> None:
    """Every frame split across many reads: the parser must resume anywhere."""
    wire = (
        frame_bytes(OP_PING, b"p" * 125)
        + frame_bytes(OP_TEXT, "ünï".encode(), fin=False)
        + frame_bytes(OP_CONT, "cödé ✓".encode())
        + frame_bytes(OP_BINARY, bytes(range(256)) * 2)  # 16-bit length
        + frame_bytes(OP_PING, b"")
        + frame_bytes(OP_CLOSE, close_payload(4005, "fïn".encode()))
    )

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(wire)):
            peer.send(wire[i : i + 1])
        peer.read_until_close()

    with fault_server(handler) as server:
        ws, rec, code, reason = run_to_close(server.url)
        peer = server.peer()
    assert rec.events == [("open",), ("text", "ünïcödé ✓"), ("binary", bytes(range(256)) * 2),
                          ("closed", 4005, "fïn")]
    assert ws.error is None
    pongs = [f[2] for f in peer.frames if f[1] == OP_PONG]
    assert pongs == [b"p" * 125, b""]  # each ping answered with its own payload
    assert peer.close_received == (4005, "")


# -- keepalive ---------------------------------------------------------------------------------

def test_server_never_answers_pings() -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.drain_forever()  # reads every ping, answers none, sends nothing

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, send_pings=True, ping_frequency=0.1,
                               close_after_no_message=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        opened = time.monotonic()
        code, reason = rec.wait_closed(ws, timeout=5.0)
        elapsed = time.monotonic() - opened
    assert (code, reason) == (1006, "")
    assert type(ws.error) is blockws.PingTimeout, repr(ws.error)
    assert isinstance(ws.error, TimeoutError)
    # First ping after 0.1 s, then 0.3 s without any frame.
    assert 0.3 <= elapsed < 2.0
    assert ws.latency is None


def test_server_answering_pings_keeps_socket_open() -> None:
    answered = threading.Event()
    pings = []

    def handler(peer: Peer) -> None:
        peer.handshake()
        while True:
            _, opcode, payload = peer.read_frame()
            if opcode == OP_PING:
                peer.send_frame(OP_PONG, payload)
                pings.append(time.monotonic())
                if len(pings) >= 10:  # ~1 s: three times close_after_no_message
                    answered.set()
            elif opcode == OP_CLOSE:
                peer.send_frame(OP_CLOSE, payload[:2])
                return

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, send_pings=True, ping_frequency=0.1,
                               close_after_no_message=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        assert answered.wait(10.0)
        ws.update()
        assert ws.is_open and ws.error is None and rec.closes == []
        assert pings[-1] - pings[0] > 0.3 * 2
        assert ws.latency is not None and 0 < ws.latency < 0.3
        ws.close()
        code, _ = rec.wait_closed(ws)
    assert code == 1000 and ws.error is None


def test_chatty_server_without_pongs_keeps_socket_open() -> None:
    """close_after_no_message counts any frame: data that keeps coming is enough."""
    count, pace = 40, 0.025  # ~1 s of traffic: several pings and close_after_no_message
    stop = threading.Event()

    def handler(peer: Peer) -> None:
        peer.handshake()
        for i in range(count):
            peer.send_frame(OP_TEXT, str(i).encode())
            if stop.wait(pace):  # pacing only; set if the test gave up
                return
        peer.read_until_close()  # the pings read here were never answered
        peer.send_frame(OP_CLOSE, close_payload(1000))

    with fault_server(handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, send_pings=True, ping_frequency=0.1,
                               close_after_no_message=0.3, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        started = time.monotonic()
        try:
            rec.pump_until(ws, lambda: len(rec.messages) == count or bool(rec.closes))
        except BaseException:
            stop.set()
            raise
        assert rec.closes == [], ws.error
        assert time.monotonic() - started > 0.6
        assert ws.is_open and ws.latency is None  # pings went unanswered
        ws.close()
        code, _ = rec.wait_closed(ws)
    assert code == 1000 and ws.error is None, repr(ws.error)


def test_a_callback_that_raises_leaves_the_rest_of_its_read_queued() -> None:
    """Messages parsed from one read are dispatched as one batch; a callback
    that raises in the middle stops update(), and the messages after it are
    delivered by the next update(), in order, once each."""
    frames = b"".join(frame_bytes(OP_TEXT, f"m{i}".encode()) for i in range(6))
    frames += frame_bytes(OP_BINARY, b"bin") + frame_bytes(OP_TEXT, b"last")

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send(frames)  # one write: one read on the client, most likely
        peer.read_until_close()
        peer.send_frame(OP_CLOSE, close_payload(1000))

    seen: list[Any] = []

    def on_message(ws: blockws.WebSocket, text: str) -> None:
        seen.append(text)
        if text in ("m2", "m4"):
            raise RuntimeError(text)

    with fault_server(handler) as server:
        # Not connect(): its own update() calls would run (and raise from) the
        # callbacks of messages that came with the handshake response.
        ws = blockws.WebSocket(server.url, on_message=on_message,
                               on_binary=lambda ws, seg: seen.append(bytes(seg))).open()
        deadline = time.monotonic() + 10
        raised: list[str] = []
        while len(seen) < 8:
            assert time.monotonic() < deadline, seen
            ws.wait(1.0)
            try:
                ws.update()
            except RuntimeError as exc:
                raised.append(str(exc))
        assert seen == ["m0", "m1", "m2", "m3", "m4", "m5", b"bin", "last"]
        assert raised == ["m2", "m4"]
        ws.close()
        assert ws.join(10)
        assert ws.update() == 1  # on_closed
    assert ws.close_code == 1000 and ws.error is None


def test_update_counts_every_message_of_a_batch() -> None:
    frames = b"".join(frame_bytes(OP_TEXT, f"m{i}".encode()) for i in range(5))

    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.send(frames)
        peer.read_until_close()
        peer.send_frame(OP_CLOSE, close_payload(1000))

    with fault_server(handler) as server:
        seen: list[str] = []
        ws = blockws.WebSocket(server.url, on_message=lambda ws, t: seen.append(t)).open()
        ran = 0
        deadline = time.monotonic() + 10
        while len(seen) < 5:
            assert time.monotonic() < deadline
            ws.wait(1.0)
            ran += ws.update()
        assert ran == 1 + 5 and seen == [f"m{i}" for i in range(5)]  # on_open, messages
        ws.close()
        assert ws.join(10)
        ws.update()


# -- misuse of the API ----------------------------------------------------------------------------

def test_send_before_open_raises_invalid_state() -> None:
    ws = blockws.WebSocket("ws://127.0.0.1:9/")
    with pytest.raises(blockws.InvalidState):
        ws.send("too early")
    with pytest.raises(blockws.InvalidState):
        ws.send(b"too early")
    with pytest.raises(blockws.InvalidState):
        ws.receive(0.1)
    ws.close()  # never opened: a no-op that starts nothing


def test_send_while_connecting_raises_invalid_state() -> None:
    with fault_server(lambda peer: peer.drain_forever()) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        with pytest.raises(blockws.InvalidState):
            ws.send("still connecting")
        with pytest.raises(blockws.InvalidState):
            ws.open()
        ws.close()
        code, _ = rec.wait_closed(ws)
    assert code == 1006
    assert rec.events == [("closed", 1006, "")]


def test_send_after_close_and_close_twice() -> None:
    with fault_server(echo_handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        ws.send("one")
        ws.close(4000, "done")
        assert not ws.is_open
        with pytest.raises(blockws.ConnectionClosed):
            ws.send("closing")
        ws.close()  # a no-op while closing
        ws.close(1000)
        code, reason = rec.wait_closed(ws)
        with pytest.raises(blockws.ConnectionClosed) as excinfo:
            ws.send(b"closed")
        ws.close()  # and once closed
        peer = server.peer()
    assert (code, reason) == (4000, "")  # the test server echoes the code only
    assert excinfo.value.code == 4000
    assert isinstance(excinfo.value, blockws.ConnectionClosedOK)
    assert peer.close_received == (4000, "done")
    # Messages queued before close() still go out before the close frame.
    assert [f[1] for f in peer.frames] == [OP_TEXT, OP_CLOSE]
    assert rec.events[:2] == [("open",), ("text", "one")]


@pytest.mark.parametrize(("code", "reason"),
                         [(999, ""), (1004, ""), (1005, ""), (1006, ""), (1015, ""),
                          (5000, ""), (0, ""), (1000, "x" * 124), (4000, "é" * 62)])
def test_invalid_close_arguments_raise_value_error(code: int, reason: str) -> None:
    with fault_server(echo_handler) as server:
        rec = Recorder()
        ws = blockws.WebSocket(server.url, **rec.callbacks())
        ws.open()
        rec.wait_open(ws)
        with pytest.raises(ValueError):
            ws.close(code, reason)
        assert ws.is_open  # nothing changed
        ws.send("still open")
        rec.pump_until(ws, lambda: rec.messages == ["still open"])
        ws.close()
        assert rec.wait_closed(ws)[0] == 1000


def test_ping_frequency_below_minimum() -> None:
    with pytest.raises(ValueError):
        blockws.WebSocket("ws://127.0.0.1:9/", ping_frequency=0.05)
    ws = blockws.WebSocket("ws://127.0.0.1:9/", ping_frequency=0.1)
    with pytest.raises(ValueError):
        ws.ping_frequency = 0.05
    assert ws.ping_frequency == 0.1


@pytest.mark.parametrize("url", ["http://x", "https://example.com/ws", "ftp://x/", "x",
                                 "ws://", "ws:///path", "ws://host/#fragment", "ws://h:99999/"])
def test_bad_url_raises_value_error_at_construction(url: str) -> None:
    with pytest.raises(ValueError):
        blockws.WebSocket(url)
    with pytest.raises(blockws.InvalidURL):
        blockws.connect(url)
