"""The HTTP/1.1 upgrade of blockws.opening.open_transport over a memory transport:
the request written, the server's 101 (or not), and the bytes after the head."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Callable

import pytest
from memory import MemoryTransport

import blockws
import blockws.opening as opening
from blockws.deadline import Deadline
from blockws.deflate import PerMessageDeflate
from blockws.extensions import Extension
from blockws.frames import Frame, Opcode, encode_header
from blockws.handshake import Request, accept_key
from blockws.http2 import HTTP2Settings
from blockws.log import ContextAdapter

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

URL = "ws://example.invalid:8080/chat?room=1"
NO_H2 = HTTP2Settings(enabled=False)

# What the fake server sends, given the request's headers (lower-case names):
# a list of byte strings fed one after the other; None stands for EOF.
Script = Callable[[dict[str, str]], list[Any]]


def parse_request(data: bytes) -> tuple[str, dict[str, str]]:
    """The request line and the headers (lower-case names) of an upgrade request."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and rest == b"", "one complete request head, nothing after it"
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    return lines[0], headers


class ServerTransport(MemoryTransport):
    """A memory transport whose "server" answers the request once it is written."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.request_line = ""
        self.request_headers: dict[str, str] = {}

    def write(self, chunks: Sequence[Any]) -> None:
        super().write(chunks)
        self.request_line, self.request_headers = parse_request(self.written())
        for piece in self.script(self.request_headers):
            if piece is None:
                self.feed_eof()
            else:
                self.feed(piece)


class FakeConnector:
    """Stands in for blockws.transport.Connector: returns the scripted transport."""

    def __init__(self, script: Script) -> None:
        self.transport = ServerTransport(script)
        self.calls: list[tuple[Any, ...]] = []

    def connect(
        self,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: Any = None,
        server_hostname: str | None = None,
        alpn: Sequence[str] = ("http/1.1",),
    ) -> ServerTransport:
        self.calls.append((host, port, deadline, ssl_context, server_hostname))
        return self.transport


def response(
    headers: dict[str, str],
    *,
    status: str = "101 Switching Protocols",
    accept: str | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    upgrade: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if accept is None:
        accept = accept_key(headers["sec-websocket-key"])
    if accept:
        lines.append(f"Sec-WebSocket-Accept: {accept}")
    lines += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def server_text(text: str) -> bytes:
    payload = text.encode()
    return encode_header(0x80 | Opcode.TEXT, len(payload), None) + payload


def run_open(
    connector: FakeConnector,
    *,
    url: str = URL,
    subprotocols: Sequence[str] = (),
    extensions: Sequence[Extension] = (),
    http2: HTTP2Settings = NO_H2,
    timeout: float | None = 5.0,
    register: Callable[[Any], None] = lambda transport: None,
) -> opening.Opened:
    def new_request() -> Request:
        raise AssertionError("no fallback request over HTTP/1.1 alone")

    return opening.open_transport(
        Request(url, subprotocols=list(subprotocols)),
        deadline=Deadline(timeout),
        connector=connector,  # type: ignore[arg-type]
        ssl_context=None,
        server_hostname=None,
        extensions=list(extensions),
        http2=http2,
        register=register,
        new_request=new_request,
        log=ContextAdapter({}),
    )


def open_http1(script: Script, **options: Any) -> tuple[opening.Opened, FakeConnector, list[Any]]:
    """Open over a scripted server; returns what opened, the connector and the
    transports registered."""
    connector = FakeConnector(script)
    registered: list[Any] = []
    opened = run_open(connector, register=registered.append, **options)
    return opened, connector, registered


def attempt(
    script: Script, expected: type[BaseException], **options: Any
) -> tuple[Any, FakeConnector, list[Any]]:
    """Open over a scripted server, which must fail with exactly ``expected``;
    returns the error, the connector and the transports registered."""
    connector = FakeConnector(script)
    registered: list[Any] = []
    with pytest.raises(expected) as info:
        run_open(connector, register=registered.append, **options)
    assert type(info.value) is expected, repr(info.value)
    return info.value, connector, registered


def test_good_101_with_subprotocol_and_frames_after_the_head() -> None:
    first_frames = server_text("hello") + server_text("again")

    def script(headers: dict[str, str]) -> list[Any]:
        head = response(headers, extra_headers=[("Sec-WebSocket-Protocol", "superchat")])
        # The head arrives in two reads; the first frames come with its end.
        return [head[:20], head[20:] + first_frames]

    opened, connector, registered = open_http1(script, subprotocols=["chat", "superchat"])
    transport = connector.transport
    assert opened.transport is transport
    assert registered == [transport]  # registered before the handshake, for abort()
    assert opened.subprotocol == "superchat"
    assert opened.extensions == []
    assert opened.extra == first_frames
    frame, used = Frame.parse(opened.extra, masked=False)  # type: ignore[misc]
    assert (frame.opcode, frame.payload) == (Opcode.TEXT, b"hello")
    assert Frame.parse(opened.extra[used:], masked=False)[0].payload == b"again"  # type: ignore[index]
    # The connection was made for the URL's host and port, without TLS.
    assert len(connector.calls) == 1
    host, port, _deadline, ctx, server_hostname = connector.calls[0]
    assert (host, port, ctx, server_hostname) == ("example.invalid", 8080, None, None)
    # What the client asked for.
    assert transport.request_line == "GET /chat?room=1 HTTP/1.1"
    headers = transport.request_headers
    assert headers["host"] == "example.invalid:8080"
    assert headers["upgrade"].lower() == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert headers["sec-websocket-version"] == "13"
    assert headers["sec-websocket-protocol"] == "chat, superchat"
    assert "sec-websocket-extensions" not in headers
    assert len(base64.b64decode(headers["sec-websocket-key"], validate=True)) == 16


def test_101_without_extra_bytes_or_subprotocol() -> None:
    opened, connector, _ = open_http1(lambda headers: [response(headers)])
    assert opened.extra == b""
    assert opened.subprotocol is None
    assert "sec-websocket-protocol" not in connector.transport.request_headers
    assert not connector.transport.aborted and not connector.transport.closed


def test_head_trickled_byte_by_byte() -> None:
    def script(headers: dict[str, str]) -> list[Any]:
        head = response(headers)
        pieces = [head[i : i + 1] for i in range(len(head) - 1)]
        return [*pieces, head[-1:] + b"\x81\x00", b"\x82\x00"]

    opened, connector, _ = open_http1(script)
    # Only what came in the read that completed the head; later reads are the reader's.
    assert opened.extra == b"\x81\x00"
    assert connector.transport.recv(1.0) == b"\x82\x00"


def test_keys_are_fresh_per_handshake() -> None:
    keys = set()
    for _ in range(3):
        _, connector, _ = open_http1(lambda headers: [response(headers)])
        keys.add(connector.transport.request_headers["sec-websocket-key"])
    assert len(keys) == 3


def test_accepted_extension_is_a_fresh_negotiated_copy() -> None:
    offered = PerMessageDeflate()

    def script(headers: dict[str, str]) -> list[Any]:
        assert headers["sec-websocket-extensions"].startswith("permessage-deflate")
        answer = "permessage-deflate; server_no_context_takeover"
        return [response(headers, extra_headers=[("Sec-WebSocket-Extensions", answer)])]

    opened, _, _ = open_http1(script, extensions=[offered])
    assert len(opened.extensions) == 1
    accepted = opened.extensions[0]
    assert isinstance(accepted, PerMessageDeflate)
    assert accepted is not offered  # the socket's template stays untouched
    assert offered.agreed is None


def test_403_raises_invalid_status() -> None:
    def script(headers: dict[str, str]) -> list[Any]:
        return [
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 9\r\n\r\nno entry!"
        ]

    error, _, _ = attempt(script, blockws.InvalidStatus)
    assert error.status == 403 and error.reason == "Forbidden"
    assert error.body == b"no entry!"
    assert error.headers["content-type"] == "text/plain"


def test_wrong_accept_raises_invalid_header() -> None:
    wrong = accept_key("dGhlIHNhbXBsZSBub25jZQ==")  # RFC 6455's sample key, not ours
    error, _, _ = attempt(lambda headers: [response(headers, accept=wrong)], blockws.InvalidHeader)
    assert "Sec-WebSocket-Accept" in str(error)


def test_missing_accept_raises_invalid_header() -> None:
    error, _, _ = attempt(lambda headers: [response(headers, accept="")], blockws.InvalidHeader)
    assert "missing" in str(error)


def test_101_without_upgrade_headers_raises_invalid_header() -> None:
    error, _, _ = attempt(lambda headers: [response(headers, upgrade=False)], blockws.InvalidHeader)
    assert "Upgrade" in str(error)


def test_subprotocol_not_offered_raises_negotiation_error() -> None:
    def script(headers: dict[str, str]) -> list[Any]:
        return [response(headers, extra_headers=[("Sec-WebSocket-Protocol", "other")])]

    error, _, _ = attempt(script, blockws.NegotiationError, subprotocols=["chat"])
    assert "other" in str(error)


def test_eof_before_the_head_is_complete_raises() -> None:
    def script(headers: dict[str, str]) -> list[Any]:
        return [response(headers)[:-3], None]  # the blank line never comes

    error, connector, registered = attempt(script, blockws.InvalidHeader)
    assert isinstance(error, blockws.HandshakeError)
    assert "closed before" in str(error)
    assert registered == [connector.transport]


def test_eof_without_any_answer_raises() -> None:
    error, _, _ = attempt(lambda headers: [None], blockws.InvalidHeader)
    assert "closed before" in str(error)


class ResetAtWrite(ServerTransport):
    """The server reset the connection before the request could be written."""

    def write(self, chunks: Sequence[Any]) -> None:
        raise blockws.ConnectionLost("connection lost: Connection reset by peer")


@pytest.mark.parametrize("url", ["wss://example.invalid:8443/", URL])
def test_a_reset_as_the_request_is_written(url: str) -> None:
    """Over TLS 1.3 a server that refuses a missing client certificate closes
    after its handshake; our request may meet the reset. Over wss:// with
    nothing read that is the same advice as a close before any answer; over
    ws:// the ConnectionLost as it is."""
    connector = FakeConnector(lambda headers: [])
    connector.transport = ResetAtWrite(lambda headers: [])
    with pytest.raises(blockws.BlockwsError) as info:
        run_open(connector, url=url)
    if url.startswith("wss"):
        assert type(info.value) is blockws.InvalidHeader, repr(info.value)
        message = str(info.value)
        assert "example.invalid:8443 reset before the handshake response" in message
        assert "client certificate" in message and "load_cert_chain" in message
        assert isinstance(info.value.__cause__, blockws.ConnectionLost)
    else:
        assert type(info.value) is blockws.ConnectionLost, repr(info.value)


def test_abort_during_the_handshake_raises_connection_lost() -> None:
    registered: list[Any] = []

    def script(headers: dict[str, str]) -> list[Any]:
        registered[0].abort()  # close() on another thread aborts the registered transport
        return []

    connector = FakeConnector(script)
    with pytest.raises(blockws.ConnectionLost):
        run_open(connector, register=registered.append)
    assert registered == [connector.transport]


def test_expired_deadline_raises_open_timeout() -> None:
    attempt(lambda headers: [response(headers)], blockws.OpenTimeout, timeout=0.0)


def test_ws_url_never_tries_http2_without_cleartext(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_h2(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("HTTP/2 attempted for ws:// without cleartext")

    monkeypatch.setattr(opening.pool, "open", no_h2)
    opened, connector, _ = open_http1(
        lambda headers: [response(headers)],
        http2=HTTP2Settings(),  # HTTP/2 on (the default)
    )
    assert opened.transport is connector.transport
    assert opened.transport.http_version == "1.1"
