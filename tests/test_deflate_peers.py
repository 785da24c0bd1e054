"""permessage-deflate (RFC 7692) against real servers: `websockets`, Node's `ws`, hypercorn.

Each server is started by the ``peer_servers`` fixture with the deflate parameters it should
impose (see tests/peers/ws_echo_server.py and node_ws_server.js); hypercorn (wsproto) cannot
be configured. For every client offer a server accepts, the socket must open with
``ws.extensions[0].agreed`` equal to the server's answer, and echo text and binary messages
of every size in a row. The answers, as observed (websockets 17, ws 8.23, wsproto 1.3), are
modelled by ``websockets_answer``, ``node_answer`` and ``wsproto_answer``; a raw handshake
with the same offer checks each model against the server before blockws connects.

What the servers refuse:

* websockets declines the extension (the socket opens uncompressed) when asked for
  ``server_max_window_bits=8``: zlib cannot compress with an 8-bit window.
* wsproto (hypercorn) declines it for ``server_max_window_bits=8`` and for
  ``client_max_window_bits=8``; it answers a bare ``client_max_window_bits`` with 15.
* Node's ws answers HTTP 400 when its own ``serverMaxWindowBits`` is above the offered
  ``server_max_window_bits``, or its ``clientMaxWindowBits`` is above the offered
  ``client_max_window_bits`` or that parameter was not offered. It accepts
  ``server_max_window_bits=8`` (zlib compresses with 9 bits then: blockws inflates with 9).
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit

import pytest

import blockws
from blockws import PerMessageDeflate

if TYPE_CHECKING:
    from conftest import PeerServers

TIMEOUT = 10.0
KiB = 1024
MiB = 1024 * KiB
#: A message that goes both ways is at most this many bytes on the wire if compressed well,
#: and at least ``LARGE`` if sent without back-references (200 random bytes, plus headers).
SMALL, LARGE = 60, 190

Agreed = dict[str, Any]
#: The server answers HTTP 400: the handshake fails.
REFUSED = "refused"
#: The server leaves permessage-deflate out of its answer: the socket opens uncompressed.
DECLINED = "declined"
Answer = Union[Agreed, str]


def agreed(snct: bool = False, cnct: bool = False, smwb: int | None = None,
           cmwb: int | None = None) -> Agreed:
    """The shape of ``PerMessageDeflate.agreed``."""
    return {
        "server_no_context_takeover": snct,
        "client_no_context_takeover": cnct,
        "server_max_window_bits": smwb,
        "client_max_window_bits": cmwb,
    }


# -- client offers --------------------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    name: str
    snct: bool = False
    cnct: bool = False
    smwb: int | None = None
    #: ``True``: offered without a value (blockws's default); ``None``: not offered.
    cmwb: int | bool | None = True
    #: Local settings, not offered: ``min_size`` and ``compress_window_bits``.
    min_size: int = 128
    compress_window_bits: int = 12

    def extension(self) -> PerMessageDeflate:
        return PerMessageDeflate(
            server_no_context_takeover=self.snct,
            client_no_context_takeover=self.cnct,
            server_max_window_bits=self.smwb,
            client_max_window_bits=False if self.cmwb is None else self.cmwb,
            min_size=self.min_size,
            compress_window_bits=self.compress_window_bits,
        )


BITS = range(8, 16)
ALL_OFFERS = [
    Offer("default"),
    Offer("snct", snct=True),
    Offer("cnct", cnct=True),
    Offer("no-cmwb", cmwb=None),
    *[Offer(f"smwb={n}", smwb=n) for n in BITS],
    *[Offer(f"cmwb={n}", cmwb=n) for n in BITS],
    Offer("all", snct=True, cnct=True, smwb=10, cmwb=9),
    Offer("min_size=0", min_size=0),  # compresses empty and tiny messages too
    Offer("cwb=15", compress_window_bits=15),  # blockws's biggest window, where allowed
]
SOME_OFFERS = [o for o in ALL_OFFERS if o.name in (
    "default", "snct", "cnct", "no-cmwb", "smwb=8", "smwb=9", "smwb=11", "smwb=15",
    "cmwb=8", "cmwb=9", "cmwb=11", "cmwb=15", "all",
)]


# -- servers and what they answer -------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    id: str
    kind: str  # "websockets", "node" or "hypercorn"
    flags: tuple[str, ...]
    snct: bool = False
    cnct: bool = False
    smwb: int | None = None
    cmwb: int | None = None

    def answer(self, offer: Offer) -> Answer:
        model = {"websockets": websockets_answer, "node": node_answer,
                 "hypercorn": wsproto_answer}[self.kind]
        return model(self, offer)


def configured(kind: str, id: str, *, snct: bool = False, cnct: bool = False,
               smwb: int | None = None, cmwb: int | None = None) -> Server:
    """A server started with the deflate flags that impose these parameters."""
    flags: list[str] = []
    if snct:
        flags.append("--server-no-context-takeover")
    if cnct:
        flags.append("--client-no-context-takeover")
    if smwb is not None:
        flags += ["--server-max-window-bits", str(smwb)]
    if cmwb is not None:
        flags += ["--client-max-window-bits", str(cmwb)]
    if not flags:
        flags = ["--deflate-no-defaults"] if kind == "websockets" else ["--deflate"]
    return Server(id, kind, tuple(flags), snct, cnct, smwb, cmwb)


def websockets_answer(server: Server, offer: Offer) -> Answer:
    """ServerPerMessageDeflateFactory.process_request_params, as documented in its tables."""
    smwb = offer.smwb
    if server.smwb is not None:
        smwb = server.smwb if smwb is None else min(smwb, server.smwb)
    if smwb == 8:
        return DECLINED  # "unsupported server_max_window_bits = 8, use 9"
    cmwb: int | None
    if offer.cmwb is None:
        cmwb = None  # not offered: never answered (unless required, which we don't test)
    elif offer.cmwb is True:
        cmwb = server.cmwb
    else:
        cmwb = offer.cmwb if server.cmwb is None else min(offer.cmwb, server.cmwb)
    return agreed(server.snct or offer.snct, server.cnct or offer.cnct, smwb, cmwb)


def node_answer(server: Server, offer: Offer) -> Answer:
    """ws's PerMessageDeflate.acceptAsServer: no fallback, an unacceptable offer gets 400."""
    if server.smwb is not None and offer.smwb is not None and server.smwb > offer.smwb:
        return REFUSED
    if server.cmwb is not None and (
        offer.cmwb is None or (offer.cmwb is not True and server.cmwb > offer.cmwb)
    ):
        return REFUSED
    smwb = offer.smwb if server.smwb is None else server.smwb
    cmwb = server.cmwb
    if cmwb is None and offer.cmwb is not True:
        cmwb = offer.cmwb  # a bare client_max_window_bits is dropped from the answer
    return agreed(server.snct or offer.snct, server.cnct or offer.cnct, smwb, cmwb)


def wsproto_answer(server: Server, offer: Offer) -> Answer:
    """wsproto's PerMessageDeflate.accept: echoes the offer; its windows are 9-15 bits."""
    if offer.smwb == 8 or (offer.cmwb is not True and offer.cmwb == 8):
        return DECLINED
    cmwb = 15 if offer.cmwb is True else offer.cmwb
    return agreed(offer.snct, offer.cnct, offer.smwb, cmwb)


WEBSOCKETS_DEFAULT = Server("websockets", "websockets", ("--deflate",), smwb=12, cmwb=12)
NODE_DEFAULT = Server("node", "node", ("--deflate",))
HYPERCORN = Server("hypercorn", "hypercorn", ())
DEFAULT_SERVERS = [WEBSOCKETS_DEFAULT, NODE_DEFAULT, HYPERCORN]
IMPOSING_SERVERS = [
    configured("websockets", "websockets-plain"),
    configured("websockets", "websockets-snct", snct=True),
    configured("websockets", "websockets-cnct", cnct=True),
    configured("websockets", "websockets-smwb=9", smwb=9),
    configured("websockets", "websockets-cmwb=8", cmwb=8),
    configured("websockets", "websockets-cmwb=10", cmwb=10),
    configured("websockets", "websockets-all", snct=True, cnct=True, smwb=10, cmwb=9),
    configured("node", "node-snct", snct=True),
    configured("node", "node-cnct", cnct=True),
    configured("node", "node-smwb=8", smwb=8),
    configured("node", "node-smwb=10", smwb=10),
    configured("node", "node-cmwb=8", cmwb=8),
    configured("node", "node-cmwb=10", cmwb=10),
    configured("node", "node-all", snct=True, cnct=True, smwb=10, cmwb=9),
]
MATRIX = [(s, o) for s in DEFAULT_SERVERS for o in ALL_OFFERS] + [
    (s, o) for s in IMPOSING_SERVERS for o in SOME_OFFERS
]


def server_url(peers: PeerServers, server: Server) -> str:
    return peers.url(server.kind, *server.flags)


@pytest.fixture(params=DEFAULT_SERVERS, ids=[s.id for s in DEFAULT_SERVERS])
def default_server(request: pytest.FixtureRequest, peer_servers: PeerServers) -> Iterator[str]:
    """URL of each server with its default permessage-deflate settings."""
    yield server_url(peer_servers, request.param)


# -- the server's own answer, read with a raw handshake ------------------------------------

def raw_answer(url: str, offer: str | None) -> tuple[int, str | None]:
    """``(status, Sec-WebSocket-Extensions or None)`` of an upgrade request with ``offer``."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET / HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ]
    if offer is not None:
        lines.append(f"Sec-WebSocket-Extensions: {offer}")
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed before the response head: {head!r}"
            head += chunk
    status_line, *header_lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    values = [
        value.strip() for name, _, value in (h.partition(":") for h in header_lines)
        if name.strip().lower() == "sec-websocket-extensions"
    ]
    assert len(values) <= 1, values
    return int(status_line.split()[1]), values[0] if values else None


def answer_params(header: str) -> list[tuple[str, str | None]]:
    """The parameters of a single permessage-deflate answer, as ``accept()`` takes them."""
    name, *params = [p.strip() for p in header.split(";")]
    assert name == "permessage-deflate", header
    result: list[tuple[str, str | None]] = []
    for param in params:
        key, eq, value = param.partition("=")
        result.append((key.strip(), value.strip().strip('"') if eq else None))
    return result


def agreed_from_header(header: str) -> Agreed:
    params = dict(answer_params(header))
    bits = {k: int(v) if v is not None else None for k, v in params.items() if "bits" in k}
    return agreed(
        "server_no_context_takeover" in params, "client_no_context_takeover" in params,
        bits.get("server_max_window_bits"), bits.get("client_max_window_bits"),
    )


# -- payloads ----------------------------------------------------------------------------------

def json_text(size: int, seed: int = 1) -> str:
    """Valid JSON of about ``size`` bytes (at least), as a game might send: compressible."""
    rng = random.Random(seed)
    records = []
    length = 2
    i = 0
    while length < size:
        record = {"id": i, "name": f"player{rng.randrange(1000)}", "x": rng.randrange(10000) / 8,
                  "y": rng.randrange(10000) / 8, "alive": rng.random() < 0.9,
                  "items": ["sword", "shield", "potion"][: rng.randrange(4)]}
        length += len(json.dumps(record)) + 2
        records.append(record)
        i += 1
    return json.dumps(records)


def random_unicode(nchars: int, seed: int = 2) -> str:
    """Text that barely compresses: random CJK characters (3 UTF-8 bytes each)."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(nchars))


def echo_sequence() -> list[str | bytes]:
    """Messages sent in a row: every size class, text and binary, and long-range repeats.

    A block repeated at distance 3000 lies outside a 9-11 bit window and inside blockws's
    default 12-bit one; at 20000, inside only a 15-bit window: a compressor that uses a
    bigger window than agreed makes the other side's inflater fail.
    """
    rng = random.Random(3)
    block3k, block20k = rng.randbytes(3000), rng.randbytes(20000)
    json64k, json1m = json_text(64 * KiB), json_text(MiB)
    return [
        "", b"",
        "below min_size " * 6, b"\x00\x01" * 50,  # 90 and 100 bytes
        "above min_size " * 14, b"\x00\x01" * 100,  # 210 and 200 bytes
        json64k, json64k.encode(),
        json1m, json1m.encode(),
        os.urandom(64 * KiB), random_unicode(22 * KiB),
        block3k + block3k, block3k, block3k.hex(),
        block20k + block20k, block20k,
        "é" * 1000, "after all",
    ]


def same(a: object, b: object) -> bool:
    """Equality without pytest diffing megabytes on failure."""
    return a == b


def describe(message: str | bytes) -> str:
    return f"{type(message).__name__} of {len(message)}"


# -- helpers -----------------------------------------------------------------------------------

def wait_drained(ws: blockws.WebSocket, timeout: float = 5.0) -> None:
    """Wait until the writer has written everything (so ``bytes_sent`` counts it).

    The writer updates ``bytes_sent`` and then ``buffered_amount`` once sendall() returns,
    which can be a moment after the echo arrived; no event marks it, so poll briefly.
    """
    deadline = time.monotonic() + timeout
    while ws.buffered_amount:
        assert time.monotonic() < deadline, f"buffered_amount stuck at {ws.buffered_amount}"
        time.sleep(0.001)


def round_trip(ws: blockws.WebSocket, message: str | bytes, **send: Any) -> tuple[int, int]:
    """Echo one message; returns the bytes it cost on the wire: ``(sent, received)``."""
    wait_drained(ws)
    sent, received = ws.bytes_sent, ws.bytes_received
    ws.send(message, **send)
    got = ws.receive(TIMEOUT)
    assert type(got) is type(message) and same(got, message), describe(message)
    wait_drained(ws)
    return ws.bytes_sent - sent, ws.bytes_received - received


def echo_all(ws: blockws.WebSocket, messages: Sequence[str | bytes]) -> None:
    """Send every message at once, then check the echoes arrive intact and in order."""
    for message in messages:
        ws.send(message)
    for i, message in enumerate(messages):
        got = ws.receive(TIMEOUT)
        assert type(got) is type(message), (i, describe(message), describe(got))
        assert len(got) == len(message) and same(got, message), (i, describe(message))


def check_closes_cleanly(ws: blockws.WebSocket) -> None:
    ws.close()
    assert ws.join(TIMEOUT)
    ws.update()
    assert ws.closed and ws.close_code == 1000 and ws.error is None, (ws.close_code, ws.error)


def headers_seen_by(ws: blockws.WebSocket) -> dict[str, str]:
    ws.send("!headers")
    reply = ws.receive(TIMEOUT)
    assert isinstance(reply, str)
    headers: dict[str, str] = json.loads(reply)["headers"]
    return headers


# -- negotiation and echo, for every offer each server accepts ---------------------------------

@pytest.mark.parametrize(
    ("server", "offer"), MATRIX, ids=[f"{s.id}-{o.name}" for s, o in MATRIX]
)
def test_negotiation_and_echo(peer_servers: PeerServers, server: Server, offer: Offer) -> None:
    url = server_url(peer_servers, server)
    expected = server.answer(offer)
    extension = offer.extension()
    status, header = raw_answer(url, extension.offer())

    if expected == REFUSED:
        assert (status, header) == (400, None)
        with pytest.raises(blockws.InvalidStatus) as excinfo:
            blockws.connect(url, timeout=TIMEOUT, extensions=[extension])
        assert excinfo.value.status == 400
        return

    assert status == 101
    if expected == DECLINED:
        assert header is None
    else:
        assert header is not None, f"no permessage-deflate in the answer, expected {expected}"
        assert agreed_from_header(header) == expected, header

    ws = blockws.connect(url, timeout=TIMEOUT, extensions=[extension])
    assert extension.agreed is None  # the socket negotiates with a fresh copy
    if expected == DECLINED:
        assert ws.extensions == []
    else:
        assert len(ws.extensions) == 1
        accepted = ws.extensions[0]
        assert isinstance(accepted, PerMessageDeflate)
        assert accepted.agreed == expected

    echo_all(ws, echo_sequence())
    check_context_takeover(ws, expected)
    check_closes_cleanly(ws)


def check_context_takeover(ws: blockws.WebSocket, answer: Answer) -> None:
    """A repeated 200-byte random message shrinks to a back-reference iff takeover is on.

    Each side's window is at least 9 bits (512 bytes) here, except a client limited to
    8 bits, which blockws honours by compressing without back-references at all.
    """
    block = os.urandom(200)
    round_trip(ws, block)
    sent, received = round_trip(ws, block)
    if answer == DECLINED:
        client_refers = server_refers = False
    else:
        assert isinstance(answer, dict)
        client_refers = (not answer["client_no_context_takeover"]
                         and answer["client_max_window_bits"] != 8)
        server_refers = not answer["server_no_context_takeover"]
    assert (sent < SMALL) if client_refers else (sent > LARGE), (sent, answer)
    assert (received < SMALL) if server_refers else (received > LARGE), (received, answer)


# -- bytes on the wire -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "binary"])
def test_wire_bytes_shrink_with_deflate(default_server: str, kind: str) -> None:
    text = json_text(MiB)
    message: str | bytes = text if kind == "text" else text.encode()
    size = len(text)
    with blockws.connect(default_server, timeout=TIMEOUT) as ws:
        assert [e.name for e in ws.extensions] == ["permessage-deflate"]
        sent, received = round_trip(ws, message)
        assert sent < size / 3 and received < size / 3, (size, sent, received)
    assert ws.close_code == 1000 and ws.error is None


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_wire_bytes_without_deflate(default_server: str, kind: str) -> None:
    text = json_text(MiB)
    message: str | bytes = text if kind == "text" else text.encode()
    size = len(text)
    with blockws.connect(default_server, timeout=TIMEOUT, extensions=[]) as ws:
        assert ws.extensions == []
        sent, received = round_trip(ws, message)
        # Frame headers only: 8 bytes per 32 KiB fragment sent, 10 for the echo.
        assert size < sent < size * 1.01 and size < received < size * 1.01, (sent, received)
    assert ws.close_code == 1000 and ws.error is None


# -- turning compression off -------------------------------------------------------------------

def test_extensions_empty_sends_no_offer(default_server: str) -> None:
    with blockws.connect(default_server, timeout=TIMEOUT) as ws:
        assert headers_seen_by(ws)["sec-websocket-extensions"] == (
            "permessage-deflate; client_max_window_bits"
        )
    with blockws.connect(default_server, timeout=TIMEOUT, extensions=[]) as ws:
        assert ws.extensions == []
        assert "sec-websocket-extensions" not in headers_seen_by(ws)
        echo_all(ws, echo_sequence())
    assert ws.close_code == 1000 and ws.error is None


@pytest.mark.parametrize("fixture", ["websockets_server", "node_ws_server"])
def test_server_without_deflate(request: pytest.FixtureRequest, fixture: str) -> None:
    url = request.getfixturevalue(fixture)
    assert raw_answer(url, PerMessageDeflate().offer()) == (101, None)
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        assert ws.extensions == []
        assert "permessage-deflate" in headers_seen_by(ws)["sec-websocket-extensions"]
        echo_all(ws, echo_sequence())
        text = json_text(64 * KiB)
        sent, received = round_trip(ws, text)
        assert sent > len(text) and received > len(text)
    assert ws.close_code == 1000 and ws.error is None


def test_hypercorn_with_and_without_deflate(hypercorn_echo_server: str) -> None:
    for extensions in (None, []):
        with blockws.connect(hypercorn_echo_server, timeout=TIMEOUT,
                             extensions=extensions) as ws:
            assert ws.http_version == "1.1"
            ws.send("!http_version")
            assert ws.receive(TIMEOUT) == "1.1"
            assert len(ws.extensions) == (1 if extensions is None else 0)
            json1m = json_text(MiB)
            sent, received = round_trip(ws, json1m)
            if extensions is None:
                assert sent < len(json1m) / 3 and received < len(json1m) / 3
            else:
                assert sent > len(json1m) and received > len(json1m)
        assert ws.close_code == 1000 and ws.error is None


# -- send(..., compress=False) -----------------------------------------------------------------

def test_send_uncompressed(default_server: str) -> None:
    text = json_text(64 * KiB)
    data = text.encode()
    with blockws.connect(default_server, timeout=TIMEOUT) as ws:
        compressed_cost = round_trip(ws, text)
        for message in (text, data, "", b"", "short"):
            sent, received = round_trip(ws, message, compress=False)
            assert sent >= len(message)
            if len(message) > 1000:
                assert received < len(message) / 3  # the server still compresses its echo
        # Uncompressed messages in between left the compression context intact.
        sent, _ = round_trip(ws, text)
        assert sent < len(text) / 3 and compressed_cost[0] < len(text) / 3
        ws.send(b"\x00" * 500, compress=False)
        ws.send(b"\x00" * 500)
        ws.send("!close 4000 done")
        assert ws.receive(TIMEOUT) == b"\x00" * 500
        assert ws.receive(TIMEOUT) == b"\x00" * 500
        with pytest.raises(blockws.ConnectionClosedOK):
            ws.receive(TIMEOUT)
    assert ws.close_code == 4000 and ws.close_reason == "done" and ws.error is None


# -- fragmented compressed messages ------------------------------------------------------------

FRAGMENTED_SERVERS = [WEBSOCKETS_DEFAULT, NODE_DEFAULT, HYPERCORN] + [
    s for s in IMPOSING_SERVERS
    if s.id in ("websockets-all", "node-all", "websockets-cmwb=8", "node-smwb=8")
]


@pytest.mark.parametrize("server", FRAGMENTED_SERVERS, ids=[s.id for s in FRAGMENTED_SERVERS])
def test_fragmented_compressed_messages(peer_servers: PeerServers, server: Server) -> None:
    url = server_url(peer_servers, server)
    offer = ALL_OFFERS[0]
    _, header = raw_answer(url, offer.extension().offer())
    assert header is not None
    messages = echo_sequence()
    with blockws.connect(url, timeout=TIMEOUT, max_fragment_size=1000) as ws:
        assert ws.extensions[0].agreed == agreed_from_header(header)
        echo_all(ws, messages)
        if server.kind == "hypercorn":
            return  # ASGI hides frames: no !stats
        # Replay the compression locally: zlib is deterministic, so the same settings and
        # history give the same compressed sizes, hence the frame count the server saw.
        local = offer.extension()
        local.accept(answer_params(header))
        frames = 0
        for message in messages:
            payload = message.encode() if isinstance(message, str) else message
            data, _ = local.encode(1 if isinstance(message, str) else 2, payload)
            frames += max(1, math.ceil(len(data) / 1000))
        ws.send("!stats")
        reply = ws.receive(TIMEOUT)
        assert isinstance(reply, str)
        assert json.loads(reply) == {"frames": frames, "messages": len(messages)}
    assert ws.close_code == 1000 and ws.error is None
