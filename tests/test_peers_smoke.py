"""Checks of the test peers and fixtures themselves, with the `websockets` sync client.

No blockws here: if these fail, the peers are broken, not the library.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from collections.abc import Iterator
from typing import Any

import certifi
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from peerutil import PEERS_DIR, PeerError, free_port, port_open, start_server

SERVERS = ["websockets_server", "websockets_deflate_server", "node_ws_server",
           "node_ws_deflate_server"]
TLS_SERVERS = ["websockets_tls_server", "node_ws_tls_server"]
TIMEOUT = 5.0


@pytest.fixture(params=SERVERS)
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def ws(url: str) -> Iterator[ClientConnection]:
    with connect(url, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as conn:
        yield conn


def stats(ws: ClientConnection) -> dict[str, Any]:
    ws.send("!stats")
    reply = ws.recv(timeout=TIMEOUT)
    assert isinstance(reply, str)
    result: dict[str, Any] = json.loads(reply)
    return result


def record_frames(ws: ClientConnection) -> list[Frame]:
    """Record every frame the client parses from now on (same trick as the Python peer)."""
    frames: list[Frame] = []
    original = ws.protocol.recv_frame

    def recv_frame(frame: Frame) -> None:
        frames.append(frame)
        original(frame)

    ws.protocol.recv_frame = recv_frame  # type: ignore[method-assign]
    return frames


def test_echo_text_and_binary(ws: ClientConnection) -> None:
    ws.send("héllo")
    assert ws.recv(timeout=TIMEOUT) == "héllo"
    ws.send(b"\x00\x01\xff")
    assert ws.recv(timeout=TIMEOUT) == b"\x00\x01\xff"
    ws.send("")
    assert ws.recv(timeout=TIMEOUT) == ""
    big = os.urandom(1 << 20)
    ws.send(big)
    assert ws.recv(timeout=TIMEOUT) == big


@pytest.mark.parametrize("server", SERVERS)
def test_deflate_negotiated_only_with_flag(request: pytest.FixtureRequest, server: str) -> None:
    url = request.getfixturevalue(server)
    with connect(url, open_timeout=TIMEOUT) as ws:  # the client offers permessage-deflate
        assert ws.response is not None
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ("permessage-deflate" in extensions) == ("deflate" in server)
        message = "compressible " * 1000
        ws.send(message)
        assert ws.recv(timeout=TIMEOUT) == message


def test_stats_counts_fragmented_message(ws: ClientConnection) -> None:
    assert stats(ws) == {"frames": 0, "messages": 0}
    # websockets' send(iterable) sends each fragment, then an empty final continuation frame:
    # 3 fragments make 4 frames.
    ws.send(["ab", "cd", "ef"])
    assert ws.recv(timeout=TIMEOUT) == "abcdef"
    # Plus the first "!stats" message, one frame.
    assert stats(ws) == {"frames": 1 + 4, "messages": 1 + 1}


def test_stats_counts_exact_frames(ws: ClientConnection) -> None:
    # Exactly three data frames, with a ping (a control frame, not counted) in the middle.
    with ws.send_context():
        ws.protocol.send_text(b"ab", fin=False)
        ws.protocol.send_continuation(b"cd", fin=False)
        ws.protocol.send_ping(b"cli")
        ws.protocol.send_continuation(b"ef", fin=True)
    assert ws.recv(timeout=TIMEOUT) == "abcdef"
    assert stats(ws) == {"frames": 3, "messages": 1}
    # Pipelined messages: !stats counts only what came before it, not what follows it.
    ws.send(b"x")
    ws.send("!stats")
    ws.send("y")
    assert ws.recv(timeout=TIMEOUT) == b"x"
    assert json.loads(ws.recv(timeout=TIMEOUT)) == {"frames": 5, "messages": 3}
    assert ws.recv(timeout=TIMEOUT) == "y"


def test_close_command(ws: ClientConnection) -> None:
    ws.send("!close 4001 bye")
    with pytest.raises(ConnectionClosed) as excinfo:
        ws.recv(timeout=TIMEOUT)
    assert excinfo.value.rcvd is not None
    assert excinfo.value.rcvd.code == 4001
    assert excinfo.value.rcvd.reason == "bye"


def test_close_command_reason_with_spaces(ws: ClientConnection) -> None:
    ws.send("!close 4002 see you later")
    with pytest.raises(ConnectionClosed) as excinfo:
        ws.recv(timeout=TIMEOUT)
    assert excinfo.value.rcvd is not None
    assert (excinfo.value.rcvd.code, excinfo.value.rcvd.reason) == (4002, "see you later")


def test_close_command_invalid_code(ws: ClientConnection) -> None:
    ws.send("!close 1005")
    reply = ws.recv(timeout=TIMEOUT)
    assert isinstance(reply, str) and reply.startswith("error:")
    ws.send("still open")
    assert ws.recv(timeout=TIMEOUT) == "still open"


def test_ping_command(ws: ClientConnection) -> None:
    frames = record_frames(ws)
    ws.send("!ping")
    ws.send("!ping")  # a second one while the first may still await its pong
    ws.send("after")
    assert ws.recv(timeout=TIMEOUT) == "after"  # nothing echoed for !ping
    pings = [f.data for f in frames if f.opcode is Opcode.PING]
    assert pings == [b"srv", b"srv"]


def test_headers_command(url: str) -> None:
    with connect(f"{url}/some/path?q=1", additional_headers={"X-Test": "yes"},
                 open_timeout=TIMEOUT) as ws:
        ws.send("!headers")
        reply = json.loads(ws.recv(timeout=TIMEOUT))
    assert reply["path"] == "/some/path?q=1"
    assert reply["headers"]["x-test"] == "yes"
    assert reply["headers"]["upgrade"].lower() == "websocket"
    assert "sec-websocket-key" in reply["headers"]


@pytest.mark.parametrize(
    ("offered", "expected"),
    [(None, ""), (["superchat", "chat"], "superchat"), (["other", "chat"], "chat"),
     (["other"], "")],
)
def test_subprotocol_command(url: str, offered: list[str] | None, expected: str) -> None:
    with connect(url, subprotocols=offered, open_timeout=TIMEOUT) as ws:  # type: ignore[arg-type]
        assert (ws.subprotocol or "") == expected
        ws.send("!subprotocol")
        assert ws.recv(timeout=TIMEOUT) == expected


@pytest.mark.parametrize("server", TLS_SERVERS)
def test_tls_server_trusted_with_test_ca(request: pytest.FixtureRequest, server: str,
                                         tls_certs: Any) -> None:
    url = request.getfixturevalue(server)
    assert url.startswith("wss://localhost:")
    with connect(url, ssl=tls_certs.client_context(), open_timeout=TIMEOUT) as ws:
        ws.send("secure")
        assert ws.recv(timeout=TIMEOUT) == "secure"
    # The certificate also names 127.0.0.1.
    ip_url = url.replace("localhost", "127.0.0.1")
    with connect(ip_url, ssl=tls_certs.client_context(), open_timeout=TIMEOUT) as ws:
        ws.send("by ip")
        assert ws.recv(timeout=TIMEOUT) == "by ip"


@pytest.mark.parametrize("server", TLS_SERVERS)
def test_tls_server_rejected_by_certifi_alone(request: pytest.FixtureRequest,
                                              server: str) -> None:
    url = request.getfixturevalue(server)
    ctx = ssl.create_default_context(cafile=certifi.where())
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        connect(url, ssl=ctx, open_timeout=TIMEOUT)


def test_start_server_reports_early_exit() -> None:
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(PeerError, match=r"(?s)exited with code 3.*boom"):
        with start_server(cmd, port):
            pass


def test_start_server_times_out_and_kills() -> None:
    port = free_port()
    cmd = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"]
    with pytest.raises(PeerError, match=r"(?s)did not listen.*sleeping"):
        with start_server(cmd, port, timeout=0.5):
            pass


def test_start_server_stops_process_group() -> None:
    port = free_port()
    cmd = [sys.executable, str(PEERS_DIR / "ws_echo_server.py"), "--port", str(port)]
    with start_server(cmd, port) as proc:
        assert port_open(port)
    assert proc.returncode is not None
    assert not port_open(port)


def test_no_leaks_passes_for_clean_test(no_leaks: None, websockets_server: str) -> None:
    with connect(websockets_server, open_timeout=TIMEOUT) as ws:
        ws.send("x")
        assert ws.recv(timeout=TIMEOUT) == "x"
