"""blockws.enable_trace: frames, headers, pings and state changes on ``blockws.trace``.

Against real peers (the ``websockets`` server over HTTP/1.1, hypercorn over HTTP/2) and,
for the environment switch and the pure-Python path, the embedded echo server in a child
process. The frame follower itself is tested byte by byte without sockets.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultserver import Peer, fault_server

import blockws
from blockws import trace
from blockws.frames import Opcode
from blockws.protocol import Protocol, Role

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
SECRET = "s3cr3t-value"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def traced() -> Iterator[Capture]:
    """Tracing on, its records captured; off again afterwards."""
    capture = Capture()
    trace.trace_logger.addHandler(capture)
    trace.enable_trace(payload_bytes=16)
    try:
        yield capture
    finally:
        trace.enable_trace(False)
        trace.trace_logger.removeHandler(capture)


def frames(lines: list[str], direction: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in lines if line.split(" ")[1:2] == [direction]
            and not line.split(" ")[2].startswith(("GET", "CONNECT", "HTTP/"))]


# -- the frame follower, no sockets ---------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_follows_frames_cut_anywhere(traced: Capture, piece: int) -> None:
    """Client frames (masked) and server frames, fed in pieces of any size."""
    client = Protocol(Role.CLIENT, max_fragment_size=40)
    server = Protocol(Role.SERVER)
    out = b"".join(
        client.encode_data(Opcode.TEXT, ("é" * 30).encode())  # 60 bytes: two frames of 40 and 20
        + [client.encode_control(Opcode.PING, b"p1"), client.encode_close(4000, "bye")]
    )
    inc = b"".join(
        [*server.encode_data(Opcode.BINARY, bytes(range(200))), server.encode_control(
            Opcode.PONG, b"p1")]
    )
    tracer = trace.Tracer({"id": 42})
    for i in range(0, len(out), piece):
        tracer.outgoing([out[i : i + piece]])
    for i in range(0, len(inc), piece):
        tracer.incoming(inc[i : i + piece])
    lines = traced.lines()
    assert all(line.startswith("#42 ") for line in lines)
    sent = frames(lines, ">")
    assert sent[0].startswith("TEXT fin=0 rsv=000 mask=1 len=40 b'\\xc3\\xa9")
    assert repr("é".encode() * 8)[2:-1] in sent[0] and sent[0].endswith("...")
    assert sent[1].startswith("CONT fin=1 rsv=000 mask=1 len=20 ")
    assert sent[2] == "PING fin=1 rsv=000 mask=1 len=2 b'p1'"
    assert sent[3] == "CLOSE fin=1 rsv=000 mask=1 len=5 code=4000 reason='bye' b'\\x0f\\xa0bye'"
    got = frames(lines, "<")
    assert got[0] == "BINARY fin=1 rsv=000 mask=0 len=200 " + repr(bytes(range(16))) + "..."
    assert got[1].startswith("PONG fin=1 rsv=000 mask=0 len=2 round trip ")
    assert got[1].endswith(" ms b'p1'")
    assert len(sent) == 4 and len(got) == 2


@pytest.mark.unit
def test_a_partial_direct_write_is_traced_once(traced: Capture) -> None:
    """try_write takes 3 bytes; the writer writes the rest: each frame shows once, in order."""

    class Inner:
        http_version = "1.1"

        def __init__(self) -> None:
            self.data = b""

        def try_write(self, chunks: list[bytes]) -> int:
            self.data += b"".join(chunks)[:3]
            return 3

        def write(self, chunks: list[bytes]) -> None:
            self.data += b"".join(bytes(c) for c in chunks)

    client = Protocol(Role.CLIENT)
    one, two = client.encode_data(Opcode.TEXT, b"one"), client.encode_data(Opcode.TEXT, b"two")
    inner = Inner()
    transport: Any = trace.TracingTransport(inner, trace.Tracer({"id": 1}))
    assert transport.http_version == "1.1"  # the rest is the wrapped transport's
    written = transport.try_write(one + two)
    rest = (b"".join(one + two))[written:]
    transport.write([rest])
    assert inner.data == b"".join(one + two)
    assert frames(traced.lines(), ">") == [
        "TEXT fin=1 rsv=000 mask=1 len=3 b'one'",
        "TEXT fin=1 rsv=000 mask=1 len=3 b'two'",
    ]


@pytest.mark.unit
def test_payload_bytes_is_checked() -> None:
    with pytest.raises(ValueError):
        blockws.enable_trace(payload_bytes=-1)
    with pytest.raises(TypeError):
        blockws.enable_trace(payload_bytes=1.5)  # type: ignore[arg-type]
    assert not trace.is_enabled()


# -- real peers ---------------------------------------------------------------------------


def check_session(capture: Capture, ws: blockws.WebSocket) -> list[str]:
    lines = capture.lines()
    text = "\n".join(lines)
    assert SECRET not in text and "tok3n" not in text
    assert all(r.ws_context["id"] == ws.id for r in capture.records)  # type: ignore[attr-defined]
    assert all(line.startswith(f"#{ws.id} ") for line in lines)
    assert f"#{ws.id} state NEW -> CONNECTING" in lines
    assert f"#{ws.id} state CONNECTING -> OPEN" in lines
    assert f"#{ws.id} state CLOSING -> CLOSED" in lines
    sent, got = frames(lines, ">"), frames(lines, "<")
    assert "TEXT fin=1 rsv=000 mask=1 len=5 b'hello'" in sent
    assert "TEXT fin=1 rsv=000 mask=0 len=5 b'hello'" in got
    assert "BINARY fin=1 rsv=000 mask=1 len=20 " + repr(bytes(range(16))) + "..." in sent
    assert any(f.startswith("PING fin=1 rsv=000 mask=1 len=") for f in sent)
    assert any(" round trip " in f for f in got if f.startswith("PONG"))
    assert any(f.startswith("CLOSE fin=1 rsv=000 mask=1 len=2 code=1000") for f in sent)
    assert any(f.startswith("CLOSE fin=1 rsv=000 mask=0 len=2 code=1000") for f in got)
    return lines


def exchange(ws: blockws.WebSocket) -> None:
    ws.send("hello")
    assert ws.receive(TIMEOUT) == "hello"
    ws.send(bytes(range(20)))
    assert ws.receive(TIMEOUT) == bytes(range(20))
    ws.ping(b"trace-ping")
    deadline = 50
    while ws.latency is None and deadline:
        ws.wait(0.1)
        ws.update()
        deadline -= 1
    assert ws.latency is not None


@pytest.mark.timeout(60)
def test_http1_session_traced_with_secrets_redacted(websockets_server: str,
                                                    traced: Capture) -> None:
    url = websockets_server.replace("ws://", "ws://tok3n@")
    headers = {"Authorization": SECRET, "Cookie": f"a={SECRET}", "X-Plain": "visible"}
    with blockws.connect(url, timeout=TIMEOUT, headers=headers, extensions=[]) as ws:
        exchange(ws)
    lines = check_session(traced, ws)
    request = next(line for line in lines if " > GET " in line)
    assert "\n    Authorization: <redacted>" in request
    assert "\n    Cookie: <redacted>" in request
    assert "\n    X-Plain: visible" in request
    assert "\n    Sec-WebSocket-Version: 13" in request
    response = next(line for line in lines if " < HTTP/1.1 101 " in line)
    assert "\n    Sec-WebSocket-Accept: " in response


@pytest.mark.timeout(60)
def test_http2_session_traced(hypercorn_h2_server: Any, tls_context_h2: ssl.SSLContext,
                              traced: Capture) -> None:
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT, ssl_context=tls_context_h2,
                         headers={"Authorization": SECRET}, extensions=[]) as ws:
        assert ws.http_version == "2"
        exchange(ws)
    lines = check_session(traced, ws)
    request = next(line for line in lines if " > CONNECT wss://localhost:" in line)
    assert "HTTP/2 :protocol websocket" in request
    assert "\n    Authorization: <redacted>" in request
    assert any(" < HTTP/2 200 " in line for line in lines)


@pytest.mark.timeout(60)
def test_compressed_frames_show_rsv1(websockets_deflate_server: str, traced: Capture) -> None:
    with blockws.connect(websockets_deflate_server, timeout=TIMEOUT) as ws:
        ws.send("squeeze me " * 50)
        assert ws.receive(TIMEOUT) == "squeeze me " * 50
    sent = frames(traced.lines(), ">")
    assert any(f.startswith("TEXT fin=1 rsv=100 mask=1 len=") for f in sent), sent


@pytest.mark.timeout(60)
def test_off_costs_no_wrapper_and_logs_nothing(websockets_server: str) -> None:
    capture = Capture()
    trace.trace_logger.addHandler(capture)
    old = trace.trace_logger.level
    trace.trace_logger.setLevel(logging.DEBUG)
    try:
        assert not trace.is_enabled()
        with blockws.connect(websockets_server, timeout=TIMEOUT) as ws:
            ws.send("hello")
            assert ws.receive(TIMEOUT) == "hello"
            # The socket's transport is the plain one: nothing on the data path.
            assert type(ws._engine._transport).__name__ == "TCPTransport"  # noqa: SLF001
        assert capture.records == []
    finally:
        trace.trace_logger.setLevel(old)
        trace.trace_logger.removeHandler(capture)


@pytest.mark.timeout(60)
def test_turning_it_off_silences_a_traced_socket(websockets_server: str,
                                                 traced: Capture) -> None:
    with blockws.connect(websockets_server, timeout=TIMEOUT) as ws:
        ws.send("one")
        assert ws.receive(TIMEOUT) == "one"
        blockws.enable_trace(False)
        count = len(traced.records)
        ws.send("two")
        assert ws.receive(TIMEOUT) == "two"
    assert len(traced.records) == count


SCRIPT = """
import blockws, sys
from blockws import frames
from blockws.server import EchoServer
with EchoServer() as server:
    with blockws.connect(server.url, timeout=10) as ws:
        ws.send("x" * 100)
        assert ws.receive(10) == "x" * 100
print("speedups" if frames.apply_mask is frames.c_apply_mask else "pure")
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pure", ["", "1"])
def test_environment_turns_it_on_with_or_without_speedups(pure: str) -> None:
    env = dict(os.environ, BLOCKWS_TRACE="1", BLOCKWS_PURE_PYTHON=pure,
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    if pure:
        assert result.stdout.strip() == "pure"
    err = result.stderr
    assert "#1 > TEXT fin=1 rsv=100 mask=1 len=" in err or "#1 > TEXT fin=1 rsv=000" in err
    assert "#1 < TEXT fin=1 rsv=" in err
    assert "#1 > GET / HTTP/1.1" in err
    assert "#1 state OPEN -> CLOSING" in err


@pytest.mark.timeout(60)
def test_a_rejected_upgrade_shows_the_response_headers(traced: Capture) -> None:
    """What troubleshooting a 403 needs: the status and the headers of the refusal."""
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nSet-Cookie: sid=" + SECRET.encode()
                  + b"\r\nX-Reason: origin not allowed\r\nContent-Length: 0\r\n\r\n")

    with fault_server(handler) as server:
        with pytest.raises(blockws.InvalidStatus):
            blockws.connect(server.url, timeout=TIMEOUT)
    response = next(line for line in traced.lines() if " < HTTP/1.1 403 Forbidden" in line)
    assert "\n    X-Reason: origin not allowed" in response
    assert "\n    Set-Cookie: <redacted>" in response and SECRET not in response


@pytest.mark.timeout(120)
def test_the_cost_benchmark_runs() -> None:
    """``python -m benchmarks.trace`` end to end with tiny counts (figures not asserted)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.trace", "--messages", "300", "--rounds", "1"],
        capture_output=True, text=True, timeout=110, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == ["off", "off-after-on", "on-filtered", "on"]
