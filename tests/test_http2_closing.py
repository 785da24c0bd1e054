"""Closing WebSockets over HTTP/2, checked on the far side of a gateway.

nghttpx (RFC 8441) stands in front of an in-process raw backend (:mod:`faultserver`) that
records every frame the client sent, so a test knows whether the client's close frame got
through before the connection dropped. nghttpx discards client data that arrives in the same
read as a RST_STREAM from the client: a stream reset written right behind the close reply
loses the reply (tests/peers PEERS.md). After a close, nghttpx ends the stream itself
(END_STREAM, then RST_STREAM NO_ERROR). hypercorn never ends it, and drops the whole TCP
connection on a client END_STREAM: the client must reset the stream with CANCEL.

The backend's paths: ``/server-close`` (it closes with 4000 "bye" and waits for the reply),
``/client-close`` (it answers the client's close with the same code and reason) and
``/protocol-error`` (Autobahn case 4.2.5: a text message, then a frame with the reserved
control opcode 0xB; it then records what the client sends until its close).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import OP_CLOSE, OP_TEXT, FaultServer, Peer, Recorder
from h2peers import CANCEL, DATA, END_STREAM, HEADERS, RST_STREAM, Gateway, Relay, nghttpx, port_of

import blockws
from blockws.http2 import HTTP2Settings

H2C = HTTP2Settings(cleartext=True, fallback=False)
REPEATS = 20




def backend(peer: Peer) -> None:
    peer.read_request()
    path = peer.request_line.split()[1]
    peer.send(peer.response_101())
    if path == "/server-close":
        peer.send_frame(OP_CLOSE, struct.pack("!H", 4000) + b"bye")
        peer.read_until_close()  # EOFError (the client's reply lost) leaves close_received None
    elif path == "/client-close":
        code, reason = peer.read_until_close()
        assert code is not None
        peer.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode())
    elif path == "/protocol-error":
        peer.send_frame(OP_TEXT, b"Hello")
        peer.send_frame(0xB)  # a reserved control opcode: the client fails with 1002
        peer.read_until_close()
    else:
        raise AssertionError(f"unexpected path {path!r}")


@pytest.fixture(scope="module")
def recording_gateway(tls_certs: Any) -> Iterator[tuple[FaultServer, Gateway]]:
    with FaultServer(backend) as server, \
            nghttpx(server.port, tls_certs.keyfile, tls_certs.certfile) as gateway:
        yield server, gateway


@pytest.fixture(params=["h2c", "tls"])
def via_nghttpx(request: pytest.FixtureRequest, recording_gateway: tuple[FaultServer, Gateway]
                ) -> tuple[FaultServer, str, dict[str, Any]]:
    server, gateway = recording_gateway
    if request.param == "h2c":
        return server, gateway.ws, {"http2": H2C}
    ctx = request.getfixturevalue("tls_context_h2")
    return server, gateway.wss, {"ssl_context": ctx, "http2": HTTP2Settings(fallback=False)}


def open_ws(url: str, rec: Recorder, **options: Any) -> blockws.WebSocket:
    ws = blockws.WebSocket(url, extensions=[], **rec.callbacks(), **options)
    ws.open()
    rec.wait_open(ws)
    assert ws.http_version == "2"
    return ws


def backend_peers(server: FaultServer, first: int, count: int) -> list[Peer]:
    """The backend connections ``first`` .. ``first + count - 1``, once their handlers ended."""
    return [server.peer(i) for i in range(first, first + count)]


# -- the close reply is not lost (nghttpx) ------------------------------------------------------


@pytest.mark.timeout(120)
def test_server_close_reply_reaches_the_backend(
    via_nghttpx: tuple[FaultServer, str, dict[str, Any]],
) -> None:
    """The server closes; the client's reply reaches the backend every time."""
    server, url, options = via_nghttpx
    first = len(server.peers)
    for _ in range(REPEATS):
        rec = Recorder()
        ws = open_ws(url + "/server-close", rec, **options)
        assert rec.wait_closed(ws) == (4000, "bye")
        assert ws.error is None
    peers = backend_peers(server, first, REPEATS)
    lost = [i for i, peer in enumerate(peers) if peer.close_received is None]
    assert not lost, f"the backend got no close reply in runs {lost} of {REPEATS}"
    assert all(peer.close_received[0] == 4000 for peer in peers if peer.close_received)


@pytest.mark.timeout(120)
def test_client_close_reaches_the_backend(
    via_nghttpx: tuple[FaultServer, str, dict[str, Any]],
) -> None:
    server, url, options = via_nghttpx
    first = len(server.peers)
    for i in range(REPEATS):
        rec = Recorder()
        ws = open_ws(url + "/client-close", rec, **options)
        ws.close(4001, f"client {i}")
        assert rec.wait_closed(ws) == (4001, f"client {i}")
        assert ws.error is None
    peers = backend_peers(server, first, REPEATS)
    assert [peer.close_received for peer in peers] == [
        (4001, f"client {i}") for i in range(REPEATS)
    ]


# -- hypercorn never ends the stream ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_close_with_hypercorn(hypercorn_h2_server: Any) -> None:
    """Closes either way end promptly and cleanly; the client resets each stream with CANCEL
    (never END_STREAM, on which hypercorn would drop the connection), and every socket used
    one TCP connection."""
    with Relay(port_of(hypercorn_h2_server.ws)) as relay:
        url = relay.url()
        for i in range(5):
            rec = Recorder()
            ws = open_ws(url, rec, http2=H2C)
            ws.send(f"echo {i}")
            rec.pump_until(ws, lambda rec=rec: bool(rec.messages) or bool(rec.closes))
            started = time.monotonic()
            ws.close(4000 + i, "bye")
            assert rec.wait_closed(ws) == (4000 + i, "bye")
            assert time.monotonic() - started < 1.0
            assert ws.error is None
            rec = Recorder()
            ws = open_ws(url, rec, http2=H2C)
            ws.send(f"!close {4100 + i} why")
            assert rec.wait_closed(ws) == (4100 + i, "why")
            assert ws.error is None
        assert relay.accepted == 1
        streams = sorted({f.stream_id for f in relay.frames_up if f.type == HEADERS})
        assert len(streams) == 10
        deadline = time.monotonic() + 5.0
        while True:
            resets: dict[int, int] = {}  # the first RST_STREAM of each stream
            for f in list(relay.frames_up):
                if f.type == RST_STREAM:
                    resets.setdefault(f.stream_id, f.error_code)
            if len(resets) == len(streams) or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # the last reset goes out a moment after on_closed: no event
        assert resets == {sid: CANCEL for sid in streams}
        assert not [f for f in relay.frames_up if f.type == DATA and f.flags & END_STREAM]
        # The connection is still good.
        rec = Recorder()
        ws = open_ws(url, rec, http2=H2C)
        ws.send("still there")
        rec.pump_until(ws, lambda: bool(rec.messages) or bool(rec.closes))
        assert rec.messages == ["still there"]
        ws.close()
        assert rec.wait_closed(ws) == (1000, "")
        assert relay.accepted == 1


# -- a protocol error does not overtake the reply to the message before it (Autobahn 4.2.5) ----


class Echoer(Recorder):
    """Echoes every text message from its callback."""

    refused = 0

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        super().on_message(ws, text)
        try:
            ws.send(text)
        except blockws.ConnectionClosed:
            self.refused += 1


def check_echo_then_1002(peer: Peer) -> None:
    data = [(opcode, payload) for _fin, opcode, payload in peer.frames if opcode != OP_CLOSE]
    assert data == [(OP_TEXT, b"Hello")], f"the client sent {peer.frames} (echo missing?)"
    assert peer.frames[-1][1] == OP_CLOSE and peer.close_received is not None
    assert peer.close_received[0] == 1002, peer.close_received


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader", ["callback", "receive"])
def test_protocol_error_after_a_message_over_http2(
    recording_gateway: tuple[FaultServer, Gateway], reader: str
) -> None:
    server, gateway = recording_gateway
    first = len(server.peers)
    runs = 10
    for _ in range(runs):
        url = gateway.ws + "/protocol-error"
        if reader == "callback":
            rec = Echoer()
            ws = open_ws(url, rec, http2=H2C)
            rec.pump_until(ws, lambda rec=rec: bool(rec.closes), timeout=10)
            assert rec.messages == ["Hello"] and rec.refused == 0
        else:
            ws = blockws.connect(url, timeout=10, extensions=[], http2=H2C)
            assert ws.http_version == "2"
            message = ws.receive(10)
            assert message == "Hello"
            ws.send(message)
            assert ws.join(10)
        assert isinstance(ws.error, blockws.ProtocolError), repr(ws.error)
    for peer in backend_peers(server, first, runs):
        check_echo_then_1002(peer)
