"""blockws.trace: what tests/test_trace.py leaves out.

The frame follower on frames without payload and with 64-bit lengths, pings beyond the
64 remembered and pongs that answer none, the logger set above ``DEBUG``, a logging filter
that raises, and the trace of a failed HTTP/2 attempt (against the ``websockets`` server,
which speaks no h2c).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import blockws
from blockws import trace
from blockws.frames import Opcode
from blockws.handshake import Headers
from blockws.http2 import HTTP2Settings
from blockws.protocol import Protocol, Role
from blockws.server import EchoServer

TIMEOUT = 10.0


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
    """Tracing on (16 payload bytes shown), its records captured; off again afterwards."""
    capture = Capture()
    trace.trace_logger.addHandler(capture)
    trace.enable_trace(payload_bytes=16)
    try:
        yield capture
    finally:
        trace.enable_trace(False)
        trace.trace_logger.removeHandler(capture)


def feed(tracer: trace.Tracer, direction: str, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        if direction == "<":
            tracer.incoming(data[i : i + piece])
        else:
            tracer.outgoing([data[i : i + piece]])


def frame_lines(capture: Capture, direction: str) -> list[str]:
    prefix = f"#5 {direction} "
    return [line[len(prefix):] for line in capture.lines() if line.startswith(prefix)]


# -- the frame follower, no sockets ----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("piece", [1, 4, 9, 100_000])
def test_empty_frames_and_64_bit_lengths(traced: Capture, piece: int) -> None:
    """Frames with no payload show at once; a 70,000-byte frame (a 64-bit length field,
    its header cut anywhere) shows its length and its first bytes, once."""
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER, max_fragment_size=1 << 20)
    big = bytes(range(256)) * 274  # 70,144 bytes: more than 65,535
    out = b"".join(
        [client.encode_control(Opcode.PING), *client.encode_data(Opcode.TEXT, b"", compress=False),
         client.encode_close(None)]
    )
    inc = b"".join([*server.encode_data(Opcode.BINARY, big), server.encode_close(None)])
    assert inc[1] == 127  # the 64-bit length form
    tracer = trace.Tracer({"id": 5})
    feed(tracer, ">", out, piece)
    feed(tracer, "<", inc, piece)
    assert frame_lines(traced, ">") == [
        "PING fin=1 rsv=000 mask=1 len=0 b''",
        "TEXT fin=1 rsv=000 mask=1 len=0 b''",
        "CLOSE fin=1 rsv=000 mask=1 len=0 b''",  # no code: no "code=" part
    ]
    assert frame_lines(traced, "<") == [
        f"BINARY fin=1 rsv=000 mask=0 len=70144 {bytes(range(16))!r}...",
        "CLOSE fin=1 rsv=000 mask=0 len=0 b''",
    ]


@pytest.mark.unit
def test_round_trips_only_for_pongs_to_our_remembered_pings(traced: Capture) -> None:
    """The last 64 pings sent are remembered: a pong to an older one, to a ping of the
    peer's, or to none shows no round trip; a pong to a remembered ping shows one."""
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    tracer = trace.Tracer({"id": 5})
    for i in range(65):  # ping 0 is forgotten when ping 64 goes out
        tracer.outgoing([client.encode_control(Opcode.PING, b"%d" % i)])
    tracer.incoming(server.encode_control(Opcode.PING, b"theirs"))
    tracer.outgoing([client.encode_control(Opcode.PONG, b"theirs")])  # our answer: no trip
    for payload in (b"0", b"64", b"64", b"theirs", b"unsolicited", b"1"):
        tracer.incoming(server.encode_control(Opcode.PONG, payload))
    pongs = [line for line in frame_lines(traced, "<") if line.startswith("PONG")]
    assert len(pongs) == 6
    with_trip = [" round trip " in line for line in pongs]
    assert with_trip == [False, True, False, False, False, True]
    assert pongs[1].startswith("PONG fin=1 rsv=000 mask=0 len=2 round trip ")
    assert pongs[1].endswith(" ms b'64'")
    assert pongs[0] == "PONG fin=1 rsv=000 mask=0 len=1 b'0'"
    assert frame_lines(traced, ">")[-1] == "PONG fin=1 rsv=000 mask=1 len=6 b'theirs'"


@pytest.mark.unit
def test_logger_above_debug_logs_nothing(traced: Capture) -> None:
    """Tracing on, but the logger raised to INFO (or a level a handler set): no record,
    from the handshake, the lifecycle or the frames."""
    trace.trace_logger.setLevel(logging.INFO)
    context = {"id": 5}
    trace.phase(context, "NEW", "CONNECTING")
    trace.request_http1(context, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    trace.request_http2(context, "wss://h/", [("authorization", "x")])
    trace.response(context, "1.1", 101, "Switching Protocols", Headers())
    trace.event(context, "HTTP/2 attempt failed: no")
    tracer = trace.Tracer(context)
    tracer.outgoing([Protocol(Role.CLIENT).encode_control(Opcode.PING, b"p")])
    assert traced.records == []
    trace.trace_logger.setLevel(logging.DEBUG)
    trace.event(context, "HTTP/2 attempt failed: no")
    assert traced.lines() == ["#5 HTTP/2 attempt failed: no"]


class ChokesOnBinary(logging.Filter):
    """A logging filter with a bug: it raises on the records of binary frames received."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if args[1:3] == ("<", "BINARY"):
            raise RuntimeError("this filter cannot take that record")
        return True


@pytest.fixture
def choking_filter() -> Iterator[None]:
    bad = ChokesOnBinary()
    trace.trace_logger.addFilter(bad)
    try:
        yield
    finally:
        trace.trace_logger.removeFilter(bad)


@pytest.mark.unit
def test_a_raising_filter_stops_that_direction_only(traced: Capture, choking_filter: None
                                                    ) -> None:
    """The follower catches what its logging raises: that direction's trace stops (and
    says why), the other goes on, and feeding never raises."""
    client, server = Protocol(Role.CLIENT), Protocol(Role.SERVER)
    tracer = trace.Tracer({"id": 5})
    tracer.incoming(b"".join(server.encode_data(Opcode.TEXT, b"first")))
    tracer.incoming(b"".join(server.encode_data(Opcode.BINARY, b"\x00\x01")))  # the filter raises
    tracer.incoming(b"".join(server.encode_data(Opcode.TEXT, b"after")))  # not followed any more
    tracer.outgoing(client.encode_data(Opcode.TEXT, b"out"))
    assert traced.lines() == [
        "#5 < TEXT fin=1 rsv=000 mask=0 len=5 b'first'",
        "#5 < cannot follow the frames: RuntimeError('this filter cannot take that record')",
        "#5 > TEXT fin=1 rsv=000 mask=1 len=3 b'out'",
    ]


# -- real peers ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_raising_filter_never_breaks_the_socket(traced: Capture, choking_filter: None
                                                  ) -> None:
    """The same on a live socket: its reader thread meets the raising filter; the socket
    works on, and closes cleanly."""
    with EchoServer() as server:
        with blockws.connect(server.url, timeout=TIMEOUT, extensions=[]) as ws:
            ws.send(b"\x00binary")
            assert ws.receive(TIMEOUT) == b"\x00binary"
            ws.send("text after")
            assert ws.receive(TIMEOUT) == "text after"
        assert ws.error is None
    lines = traced.lines()
    assert f"#{ws.id} < cannot follow the frames: RuntimeError('this filter cannot take that " \
           "record')" in lines
    sent = [line for line in lines if line.startswith(f"#{ws.id} > ")]
    assert any(line.endswith("b'text after'") for line in sent)  # the other direction goes on
    assert any(" CLOSE " in line and "code=1000" in line for line in sent)
    got = [line for line in lines if line.startswith(f"#{ws.id} < ") and "fin=" in line]
    assert got == []  # the binary echo was the first frame in, and broke that direction


@pytest.mark.timeout(60)
def test_a_failed_http2_attempt_is_traced(websockets_server: str, traced: Capture) -> None:
    """h2c offered to a server without it: the trace says the attempt failed, and why,
    before the HTTP/1.1 request that follows."""
    with blockws.connect(websockets_server, timeout=TIMEOUT,
                         http2=HTTP2Settings(cleartext=True)) as ws:
        assert ws.http_version == "1.1"
    lines = traced.lines()
    failed = [i for i, line in enumerate(lines)
              if line.startswith(f"#{ws.id} HTTP/2 attempt failed: ")]
    request = [i for i, line in enumerate(lines) if line.startswith(f"#{ws.id} > GET / HTTP/1.1")]
    assert len(failed) == 1 and len(request) == 1 and failed[0] < request[0], lines
    assert len(lines[failed[0]]) > len(f"#{ws.id} HTTP/2 attempt failed: ")  # the reason
