"""permessage-deflate (RFC 7692): negotiation rule by rule, and the frame path byte by byte.

No sockets. The negotiation tests feed ``PerMessageDeflate.accept`` (and
``handshake.validate_response``) the server answers RFC 7692 section 7.1 allows and
forbids. The round trips pair a client :class:`~blockws.protocol.Protocol` carrying a
negotiated ``PerMessageDeflate`` with a server half written here with plain ``zlib``
(raw deflate; strip ``00 00 ff ff`` after a sync flush, append it before inflating), and
parse the client's frames with a parser written from RFC 6455, not imported from blockws.

``inflate_stats`` is a small DEFLATE decoder (RFC 1951) that also reports every
back-reference distance in a stream: it is how the tests prove a window limit was
honoured (zlib would only tell whether the data decodes).
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import pytest
from faultserver import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, frame_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thorough import examples

from blockws import (
    InvalidPayload,
    MessageTooBig,
    NegotiationError,
    PerMessageDeflate,
    ProtocolError,
)
from blockws.extensions import parse_extension_header
from blockws.handshake import (
    Headers,
    Request,
    Response,
    accept_key,
    build_request,
    validate_response,
)
from blockws.protocol import (
    BinaryMessage,
    Event,
    Failure,
    Ping,
    Pong,
    Protocol,
    Role,
    TextMessage,
)

pytestmark = pytest.mark.unit

KEY = b"\x37\xfa\x21\x3d"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
TAIL = b"\x00\x00\xff\xff"
RSV1 = 0x40
OP_CLOSE, OP_PONG = 0x8, 0xA

Frame = tuple[bool, int, int, bytes]  # (fin, rsv bits, opcode, unmasked payload)


def noise(n: int, seed: int = 0) -> bytes:
    """``n`` incompressible bytes, the same for the same seed."""
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(n))


# -- helpers: negotiation -----------------------------------------------------------------


def params(answer: str) -> list[tuple[str, str | None]]:
    """The parameters of a ``Sec-WebSocket-Extensions`` answer for permessage-deflate."""
    ((name, items),) = parse_extension_header(answer)
    assert name == "permessage-deflate"
    return items


def negotiated(answer: str = "permessage-deflate", **options: Any) -> PerMessageDeflate:
    """A per-connection extension that offered with ``options`` and got ``answer``."""
    ext = PerMessageDeflate(**options).fresh()
    ext.accept(params(answer))
    return ext


def agreed(snct: bool = False, cnct: bool = False, sbits: int | None = None,
           cbits: int | None = None) -> dict[str, Any]:
    return {
        "server_no_context_takeover": snct,
        "client_no_context_takeover": cnct,
        "server_max_window_bits": sbits,
        "client_max_window_bits": cbits,
    }


# -- helpers: frames ------------------------------------------------------------------------


def client(ext: PerMessageDeflate, **kwargs: Any) -> Protocol:
    """A client protocol with ``ext`` and a fixed masking key."""
    return Protocol(Role.CLIENT, extensions=[ext], mask_keys=lambda: KEY, **kwargs)


def parse_frames(data: bytes) -> list[Frame]:
    """Split masked client frames (RFC 6455 5.2); asserts each frame is masked."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        assert b1 & 0x80, "client frame not masked"
        key = data[pos : pos + 4]
        pos += 4
        body = data[pos : pos + n]
        assert len(body) == n, "truncated frame"
        pos += n
        mask = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(body, "little") ^ int.from_bytes(mask, "little")).to_bytes(
            n, "little")
        frames.append((bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, payload))
    return frames


def sent(proto: Protocol, opcode: int, payload: bytes, **kwargs: Any) -> list[Frame]:
    return parse_frames(b"".join(proto.encode_data(opcode, payload, **kwargs)))


def message_of(frames: Sequence[Frame]) -> tuple[int, int, bytes]:
    """``(opcode, rsv of the first frame, joined payload)`` of one sent message, after
    checking the fragmentation rules: FIN only on the last frame, continuation frames
    with opcode 0 and no RSV bit (RFC 7692 6.1: only the first frame carries RSV1)."""
    assert frames
    fin, rsv, opcode, _ = frames[0]
    assert opcode in (OP_TEXT, OP_BINARY)
    for i, (f_fin, f_rsv, f_op, _) in enumerate(frames):
        assert f_fin == (i == len(frames) - 1)
        if i:
            assert (f_op, f_rsv) == (OP_CONT, 0)
    return opcode, rsv, b"".join(f[3] for f in frames)


def server_message(opcode: int, payload: bytes, *, rsv: int = RSV1,
                   fragments: Sequence[int] = ()) -> bytes:
    """A message as the server sends it (unmasked). ``fragments`` are the sizes of the
    leading frames; the rest of the payload goes in the last one."""
    out = []
    pos = 0
    first = True
    for size in fragments:
        out.append(frame_bytes(opcode if first else OP_CONT, payload[pos : pos + size],
                               fin=False, rsv=rsv if first else 0))
        pos += size
        first = False
    out.append(frame_bytes(opcode if first else OP_CONT, payload[pos:],
                           rsv=rsv if first else 0))
    return b"".join(out)


def summarize(events: Sequence[Event]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, TextMessage):
            out.append(("text", e.text))
        elif isinstance(e, BinaryMessage):
            out.append(("binary", bytes(e)))
        elif isinstance(e, Ping):
            out.append(("ping", e.payload))
        elif isinstance(e, Pong):
            out.append(("pong", e.payload))
        elif isinstance(e, Failure):
            out.append(("failure", type(e.error), e.error.close_code))
        else:  # pragma: no cover
            out.append(("other", e))
    return out


def feed(proto: Protocol, data: bytes, step: int | None = None) -> list[tuple[Any, ...]]:
    """Feed ``data`` whole, or ``step`` bytes at a time; summarize the events."""
    if step is None:
        return summarize(proto.receive_data(data))
    events: list[Event] = []
    for i in range(0, len(data), step):
        events.extend(proto.receive_data(data[i : i + step]))
    return summarize(events)


def queued_close(proto: Protocol) -> int | None:
    """The code of the close frame the protocol queued (after a failure)."""
    frames = parse_frames(b"".join(proto.data_to_send()))
    closes = [f for f in frames if f[2] == OP_CLOSE]
    assert len(closes) == 1, frames
    fin, rsv, _, payload = closes[0]
    assert fin and rsv == 0
    return struct.unpack("!H", payload[:2])[0] if payload else None


class ZlibServer:
    """The server's half of permessage-deflate, with plain zlib.

    ``takeover``: the server keeps its compressor between messages;
    ``client_takeover``: the client does, so the server keeps its inflater.
    ``finish`` ends each message with a BFINAL block (RFC 7692 7.2.3.3) instead of a
    sync flush, which needs a new compressor per message.
    """

    def __init__(self, *, takeover: bool = True, client_takeover: bool = True,
                 wbits: int = 15, client_wbits: int = 15, finish: bool = False) -> None:
        self.takeover = takeover
        self.client_takeover = client_takeover
        self.wbits = wbits
        self.client_wbits = client_wbits
        self.finish = finish
        self._comp: Any = None
        self._decomp: Any = None

    def compress(self, data: bytes) -> bytes:
        if self._comp is None or not self.takeover or self.finish:
            self._comp = zlib.compressobj(6, zlib.DEFLATED, -self.wbits)
        if self.finish:
            return self._comp.compress(data) + self._comp.flush(zlib.Z_FINISH)
        out = self._comp.compress(data) + self._comp.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(TAIL)
        return out[:-4]

    def decompress(self, payload: bytes) -> bytes:
        if self._decomp is None or not self.client_takeover:
            self._decomp = zlib.decompressobj(-self.client_wbits)
        out = self._decomp.decompress(payload + TAIL)
        assert not self._decomp.unconsumed_tail and not self._decomp.eof
        return bytes(out)


# -- a DEFLATE decoder that reports back-references (RFC 1951) ------------------------------

_LBASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83,
          99, 115, 131, 163, 195, 227, 258]
_LEXT = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5,
         5, 0]
_DBASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
          1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577]
_DEXT = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11,
         12, 12, 13, 13]
_CL_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]


#: Each byte's bits in the order DEFLATE reads them: from the lowest (RFC 1951 3.1.1).
_BYTE_BITS = [format(b, "08b")[::-1] for b in range(256)]


class _BitReader:
    """The bits of ``data`` as a string of "0"/"1" in reading order (a string
    rather than a byte and a shift per bit: the window tests decode ~100 KB)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stream = "".join([_BYTE_BITS[b] for b in data])
        self.pos = 0  # in bits

    def bits(self, n: int) -> int:
        """The next ``n`` bits as a number, the first read being its lowest bit."""
        if not n:
            return 0
        end = self.pos + n
        if end > len(self.stream):
            raise IndexError("the stream is truncated")
        value = int(self.stream[self.pos : end][::-1], 2)
        self.pos = end
        return value


def _huffman(lengths: Sequence[int]) -> dict[str, int]:
    """Canonical Huffman codes (RFC 1951 3.2.2): {code: symbol}, each code written
    as its bits from the highest, the order in which they are read."""
    max_len = max(lengths, default=0)
    count = [0] * (max_len + 1)
    for n in lengths:
        if n:
            count[n] += 1
    next_code = [0] * (max_len + 2)
    code = 0
    for n in range(1, max_len + 1):
        code = (code + count[n - 1]) << 1
        next_code[n] = code
    table = {}
    for symbol, n in enumerate(lengths):
        if n:
            table[format(next_code[n], f"0{n}b")] = symbol
            next_code[n] += 1
    return table


def _symbol(br: _BitReader, table: dict[str, int]) -> int:
    stream, pos = br.stream, br.pos
    for n in range(1, 16):
        if pos + n > len(stream):
            raise IndexError("the stream is truncated")
        symbol = table.get(stream[pos : pos + n])
        if symbol is not None:
            br.pos = pos + n
            return symbol
    raise ValueError("invalid Huffman code")


def inflate_stats(data: bytes) -> tuple[bytes, list[int]]:
    """Decode raw DEFLATE ``data`` (a sync-flushed message plus ``00 00 ff ff``).

    Returns the output and the distance of every back-reference, in order. Stops at a
    BFINAL block or where a block ends exactly at the end of the data.
    """
    br = _BitReader(data)
    out = bytearray()
    distances: list[int] = []
    fixed_lit = _huffman([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8)
    fixed_dist = _huffman([5] * 30)
    while True:
        final = br.bits(1)
        btype = br.bits(2)
        if btype == 0:
            br.pos = (br.pos + 7) & ~7
            length, nlength = br.bits(16), br.bits(16)
            assert length ^ nlength == 0xFFFF, "bad stored block length"
            start = br.pos >> 3
            out += data[start : start + length]
            assert len(data) >= start + length
            br.pos += 8 * length
        elif btype in (1, 2):
            if btype == 1:
                lit, dist = fixed_lit, fixed_dist
            else:
                hlit, hdist, hclen = br.bits(5) + 257, br.bits(5) + 1, br.bits(4) + 4
                cl_lengths = [0] * 19
                for i in range(hclen):
                    cl_lengths[_CL_ORDER[i]] = br.bits(3)
                cl_table = _huffman(cl_lengths)
                lengths: list[int] = []
                while len(lengths) < hlit + hdist:
                    sym = _symbol(br, cl_table)
                    if sym < 16:
                        lengths.append(sym)
                    elif sym == 16:
                        lengths += [lengths[-1]] * (3 + br.bits(2))
                    elif sym == 17:
                        lengths += [0] * (3 + br.bits(3))
                    else:
                        lengths += [0] * (11 + br.bits(7))
                lit, dist = _huffman(lengths[:hlit]), _huffman(lengths[hlit:])
            while True:
                sym = _symbol(br, lit)
                if sym < 256:
                    out.append(sym)
                elif sym == 256:
                    break
                else:
                    sym -= 257
                    length = _LBASE[sym] + br.bits(_LEXT[sym])
                    dsym = _symbol(br, dist)
                    distance = _DBASE[dsym] + br.bits(_DEXT[dsym])
                    assert distance <= len(out), "distance before the start of the stream"
                    distances.append(distance)
                    for _ in range(length):
                        out.append(out[-distance])
        else:
            raise ValueError("reserved block type 3")
        if final or br.pos == 8 * len(data):
            return bytes(out), distances


def test_inflate_stats_agrees_with_zlib() -> None:
    """The test's own decoder first: it decodes what zlib makes, and sees its matches."""
    for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FIXED, zlib.Z_HUFFMAN_ONLY):
        for level in (0, 1, 9):
            msg = noise(300, 1) + b"abcabcabc" * 50 + noise(300, 1)
            comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy)
            data = comp.compress(msg) + comp.flush(zlib.Z_SYNC_FLUSH)
            out, distances = inflate_stats(data)
            assert out == msg
            if strategy == zlib.Z_HUFFMAN_ONLY or level == 0:
                assert distances == []
            else:
                assert 3 in distances  # "abc" repeats
                if level == 9:
                    assert 750 in distances  # the second noise block
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = comp.compress(b"hello hello hello") + comp.flush(zlib.Z_FINISH)
    assert inflate_stats(data)[0] == b"hello hello hello"


# -- offer ---------------------------------------------------------------------------------

OFFERS: list[tuple[dict[str, Any], str]] = [
    ({}, "permessage-deflate; client_max_window_bits"),
    ({"client_max_window_bits": False}, "permessage-deflate"),
    ({"client_max_window_bits": 8}, "permessage-deflate; client_max_window_bits=8"),
    ({"client_max_window_bits": 15}, "permessage-deflate; client_max_window_bits=15"),
    ({"server_no_context_takeover": True},
     "permessage-deflate; server_no_context_takeover; client_max_window_bits"),
    ({"client_no_context_takeover": True},
     "permessage-deflate; client_no_context_takeover; client_max_window_bits"),
    ({"server_max_window_bits": 8},
     "permessage-deflate; server_max_window_bits=8; client_max_window_bits"),
    ({"server_max_window_bits": 15, "client_max_window_bits": False},
     "permessage-deflate; server_max_window_bits=15"),
    ({"server_no_context_takeover": True, "client_no_context_takeover": True,
      "server_max_window_bits": 10, "client_max_window_bits": 9},
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
     "server_max_window_bits=10; client_max_window_bits=9"),
    # Local settings are not negotiated: they never show in the offer.
    ({"compress_level": 9, "compress_window_bits": 15, "mem_level": 9, "min_size": 0},
     "permessage-deflate; client_max_window_bits"),
]


@pytest.mark.parametrize(("options", "offer"), OFFERS)
def test_offer(options: dict[str, Any], offer: str) -> None:
    ext = PerMessageDeflate(**options)
    assert ext.offer() == offer
    assert ext.fresh().offer() == offer
    # Each parameter at most once (RFC 7692 7.1), and it parses back.
    names = [name for name, _ in params(offer)]
    assert len(names) == len(set(names))


def test_offer_goes_into_the_upgrade_request() -> None:
    request = build_request(Request("ws://example.com/"), WS_KEY,
                            [PerMessageDeflate(server_max_window_bits=10)])
    assert (b"\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10; "
            b"client_max_window_bits\r\n") in request


# -- accept: valid answers -----------------------------------------------------------------

VALID: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    ({}, "", agreed()),
    ({"client_max_window_bits": False}, "", agreed()),
    # The flags, asked for and not: a server may add either (RFC 7692 7.1.1.1, 7.1.1.2).
    ({"server_no_context_takeover": True}, "server_no_context_takeover", agreed(snct=True)),
    ({}, "server_no_context_takeover", agreed(snct=True)),
    ({"client_no_context_takeover": True}, "client_no_context_takeover", agreed(cnct=True)),
    ({}, "client_no_context_takeover", agreed(cnct=True)),
    ({"client_max_window_bits": False}, "client_no_context_takeover", agreed(cnct=True)),
    # An offered client_no_context_takeover is a promise the server need not echo.
    ({"client_no_context_takeover": True}, "", agreed(cnct=True)),
    # A requested server_no_context_takeover the server leaves out: it keeps its context.
    ({"server_no_context_takeover": True}, "", agreed()),
    ({}, "server_no_context_takeover; client_no_context_takeover",
     agreed(snct=True, cnct=True)),
    # server_max_window_bits: any 8-15 unasked; equal or smaller when asked (7.1.2.1).
    *[({}, f"server_max_window_bits={b}", agreed(sbits=b)) for b in range(8, 16)],
    *[({"server_max_window_bits": 15}, f"server_max_window_bits={b}", agreed(sbits=b))
      for b in range(8, 16)],
    *[({"server_max_window_bits": b}, f"server_max_window_bits={b}", agreed(sbits=b))
      for b in range(8, 16)],
    ({"server_max_window_bits": 12}, "server_max_window_bits=9", agreed(sbits=9)),
    ({"server_max_window_bits": 12}, "", agreed()),
    # client_max_window_bits: offered without a value, the server picks any 8-15 (7.1.2.2).
    *[({}, f"client_max_window_bits={b}", agreed(cbits=b)) for b in range(8, 16)],
    *[({"client_max_window_bits": 15}, f"client_max_window_bits={b}", agreed(cbits=b))
      for b in range(8, 16)],
    *[({"client_max_window_bits": b}, f"client_max_window_bits={b}", agreed(cbits=b))
      for b in range(8, 16)],
    ({"client_max_window_bits": 10}, "client_max_window_bits=8", agreed(cbits=8)),
    ({"client_max_window_bits": 10}, "", agreed()),
    # Quoted-string values (RFC 7692 7.1) and spacing.
    ({}, 'server_max_window_bits="10"', agreed(sbits=10)),
    ({}, 'client_max_window_bits="9"', agreed(cbits=9)),
    ({}, "  server_max_window_bits = 11 ;client_max_window_bits=12 ",
     agreed(sbits=11, cbits=12)),
    ({"server_no_context_takeover": True, "client_no_context_takeover": True,
      "server_max_window_bits": 12, "client_max_window_bits": 11},
     "client_max_window_bits=11; server_max_window_bits=12; client_no_context_takeover; "
     "server_no_context_takeover",
     agreed(snct=True, cnct=True, sbits=12, cbits=11)),
]


def case_id(options: dict[str, Any], answer: str) -> str:
    offer = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
    return f"{offer}->{answer or 'none'}"


@pytest.mark.parametrize(("options", "answer", "expected"),
                         [pytest.param(*case, id=case_id(*case[:2])) for case in VALID])
def test_accept_valid_answer(options: dict[str, Any], answer: str,
                             expected: dict[str, Any]) -> None:
    ext = negotiated(f"permessage-deflate; {answer}" if answer else "permessage-deflate",
                     **options)
    assert ext.agreed == expected


# -- accept: invalid answers ---------------------------------------------------------------

BAD_BITS = ["7", "16", "0", "1", "08", "015", "1a", "a", "", '""', "9.0", "+9", "-9", "0x9",
            "1 0", "\u0669", "99", "150"]

INVALID: list[tuple[dict[str, Any], str]] = [
    # Parameters RFC 7692 does not define for a response.
    ({}, "foo"),
    ({}, "foo=1"),
    ({}, "max_window_bits=10"),
    ({}, "client_max_window_bit=10"),
    ({}, "server_no_context_takeover; x"),
    # Each parameter at most once (7.1).
    ({}, "server_no_context_takeover; server_no_context_takeover"),
    ({}, "client_no_context_takeover; client_no_context_takeover"),
    ({}, "server_max_window_bits=10; server_max_window_bits=10"),
    ({}, "server_max_window_bits=10; server_max_window_bits=11"),
    ({}, "client_max_window_bits=10; client_max_window_bits=10"),
    ({"client_max_window_bits": 12}, "client_max_window_bits=9; client_max_window_bits=10"),
    # The flags have no value (7.1.1.1, 7.1.1.2).
    ({}, "server_no_context_takeover=1"),
    ({}, "client_no_context_takeover=true"),
    ({}, "server_no_context_takeover="),
    ({}, 'client_no_context_takeover=""'),
    # Window bits: 8-15, decimal, no leading zero (7.1.2), and a value in a response.
    *[({}, f"server_max_window_bits={v}") for v in BAD_BITS],
    *[({}, f"client_max_window_bits={v}") for v in BAD_BITS],
    ({}, "client_max_window_bits"),
    ({"client_max_window_bits": 12}, "client_max_window_bits"),
    ({}, "server_max_window_bits"),
    ({"server_max_window_bits": 10}, "server_max_window_bits"),
    # server_max_window_bits above the value offered (7.1.2.1).
    *[({"server_max_window_bits": b}, f"server_max_window_bits={b + 1}") for b in range(8, 15)],
    ({"server_max_window_bits": 8}, "server_max_window_bits=15"),
    # client_max_window_bits not offered at all, or above the value offered (7.1.2.2).
    *[({"client_max_window_bits": False}, f"client_max_window_bits={b}") for b in (8, 12, 15)],
    ({"client_max_window_bits": False}, "client_max_window_bits"),
    *[({"client_max_window_bits": b}, f"client_max_window_bits={b + 1}") for b in range(8, 15)],
    ({"client_max_window_bits": 8}, "client_max_window_bits=15"),
]


@pytest.mark.parametrize(("options", "answer"),
                         [pytest.param(*case, id=case_id(*case)) for case in INVALID])
def test_accept_invalid_answer(options: dict[str, Any], answer: str) -> None:
    ext = PerMessageDeflate(**options).fresh()
    with pytest.raises(NegotiationError):
        ext.accept(params(f"permessage-deflate; {answer}"))
    assert ext.agreed is None


# -- the handshake's rules (blockws.handshake.validate_response) ---------------------------


def response(*extension_headers: str) -> Response:
    headers = Headers([("Upgrade", "websocket"), ("Connection", "Upgrade"),
                       ("Sec-WebSocket-Accept", accept_key(WS_KEY))])
    for value in extension_headers:
        headers.add("Sec-WebSocket-Extensions", value)
    return Response(101, "Switching Protocols", headers)


def test_handshake_server_declines() -> None:
    """No Sec-WebSocket-Extensions in the answer: the connection runs without deflate."""
    ext = PerMessageDeflate().fresh()
    assert validate_response(response(), WS_KEY, [], [ext]) == (None, [])
    assert ext.agreed is None


@pytest.mark.parametrize(("header", "expected"), [
    ("permessage-deflate", agreed()),
    ("permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
     agreed(sbits=10, cnct=True)),
    ("permessage-deflate;client_max_window_bits=\"8\"", agreed(cbits=8)),
])
def test_handshake_server_accepts(header: str, expected: dict[str, Any]) -> None:
    ext = PerMessageDeflate().fresh()
    assert validate_response(response(header), WS_KEY, [], [ext]) == (None, [ext])
    assert ext.agreed == expected


@pytest.mark.parametrize("headers", [
    pytest.param(("x-webkit-deflate-frame",), id="other-extension"),
    pytest.param(("permessage-deflate, x-foo",), id="deflate-and-other"),
    pytest.param(("permessage-deflate, permessage-deflate",), id="twice-one-header"),
    pytest.param(("permessage-deflate", "permessage-deflate"), id="twice-two-headers"),
    pytest.param(("permessage-deflate; server_max_window_bits=10",
                  "permessage-deflate; server_max_window_bits=10"), id="twice-same-params"),
    pytest.param(("permessage-deflate; foo",), id="bad-parameter"),
    pytest.param(("permessage-deflate; server_max_window_bits=16",), id="bad-bits"),
])
def test_handshake_negotiation_error(headers: tuple[str, ...]) -> None:
    with pytest.raises(NegotiationError):
        validate_response(response(*headers), WS_KEY, [], [PerMessageDeflate().fresh()])


def test_handshake_deflate_not_offered() -> None:
    with pytest.raises(NegotiationError):
        validate_response(response("permessage-deflate"), WS_KEY, [], [])


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"server_max_window_bits": 7}, {"server_max_window_bits": 16},
    {"server_max_window_bits": 0}, {"server_max_window_bits": -1},
    {"client_max_window_bits": 7}, {"client_max_window_bits": 16},
    {"client_max_window_bits": 0},
    {"compress_window_bits": 8}, {"compress_window_bits": 16},
    {"compress_level": -1}, {"compress_level": 10},
    {"mem_level": 0}, {"mem_level": 10},
    {"min_size": -1},
])
def test_constructor_rejects(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PerMessageDeflate(**options)


@pytest.mark.parametrize("options", [
    {"server_max_window_bits": 8}, {"server_max_window_bits": 15},
    {"client_max_window_bits": 8}, {"client_max_window_bits": 15},
    {"client_max_window_bits": True}, {"client_max_window_bits": False},
    {"compress_window_bits": 9}, {"compress_window_bits": 15},
    {"compress_level": 0}, {"compress_level": 9},
    {"mem_level": 1}, {"mem_level": 9}, {"min_size": 0},
])
def test_constructor_accepts_the_limits(options: dict[str, Any]) -> None:
    ext = PerMessageDeflate(**options)
    assert ext.agreed is None
    assert "PerMessageDeflate" in repr(ext)


# -- round trips: context takeover ---------------------------------------------------------


def test_client_to_server_context_takeover() -> None:
    proto = client(negotiated(min_size=0))
    server = ZlibServer()
    msg = noise(2000)
    sizes = []
    for _ in range(3):
        opcode, rsv, payload = message_of(sent(proto, OP_BINARY, msg))
        assert (opcode, rsv) == (OP_BINARY, RSV1)
        assert server.decompress(payload) == msg
        sizes.append(len(payload))
    assert sizes[0] > 1900  # noise does not compress...
    assert sizes[1] < 50 and sizes[2] < 50  # ...but a repeat refers back to the last one


@pytest.mark.parametrize(("answer", "options"), [
    ("permessage-deflate; client_no_context_takeover", {}),
    ("permessage-deflate", {"client_no_context_takeover": True}),  # our promise
])
def test_client_to_server_no_context_takeover(answer: str, options: dict[str, Any]) -> None:
    proto = client(negotiated(answer, min_size=0, **options))
    server = ZlibServer(client_takeover=False)  # a fresh inflater for every message
    msg = noise(2000)
    payloads = []
    for _ in range(3):
        _, rsv, payload = message_of(sent(proto, OP_BINARY, msg))
        assert rsv == RSV1
        assert server.decompress(payload) == msg
        assert inflate_stats(payload + TAIL)[0] == msg  # decodes from nothing
        payloads.append(payload)
    assert len(payloads[0]) > 1900
    # Each message starts afresh: the same input gives the same bytes.
    assert payloads[1] == payloads[0] and payloads[2] == payloads[0]


def test_server_to_client_context_takeover() -> None:
    proto = client(negotiated())
    server = ZlibServer()
    msg = noise(3000)
    payloads = [server.compress(msg) for _ in range(3)]
    assert len(payloads[0]) > 2900 and len(payloads[1]) < 50 and len(payloads[2]) < 50
    wire = b"".join(server_message(OP_BINARY, p) for p in payloads)
    assert feed(proto, wire) == [("binary", msg)] * 3


def test_server_no_context_takeover_fresh_stream_per_message() -> None:
    proto = client(negotiated("permessage-deflate; server_no_context_takeover"))
    server = ZlibServer(takeover=False)
    msgs = [noise(2000, 1), noise(2000, 1), b"x" * 500, noise(2000, 1)]
    wire = b"".join(server_message(OP_TEXT if m == b"x" * 500 else OP_BINARY,
                                   server.compress(m)) for m in msgs)
    assert feed(proto, wire) == [("binary", msgs[0]), ("binary", msgs[1]), ("text", "x" * 500),
                                 ("binary", msgs[3])]
    assert feed(client(negotiated("permessage-deflate; server_no_context_takeover")), wire,
                step=1) == [("binary", msgs[0]), ("binary", msgs[1]), ("text", "x" * 500),
                            ("binary", msgs[3])]


def test_server_no_context_takeover_client_resets_its_window() -> None:
    """With server_no_context_takeover agreed, the client inflates every message from an
    empty window: a second message that refers back into the first cannot decode."""
    server = ZlibServer()  # a server breaking its word: it keeps its context
    msg = noise(2000)
    wire = server_message(OP_BINARY, server.compress(msg))
    wire += server_message(OP_BINARY, server.compress(msg))
    # The same stream decodes with takeover (the window is kept)...
    assert feed(client(negotiated()), wire) == [("binary", msg)] * 2
    # ...and without it, the back-reference points before the start of the stream.
    proto = client(negotiated("permessage-deflate; server_no_context_takeover"))
    assert feed(proto, wire) == [("binary", msg), ("failure", ProtocolError, 1002)]
    assert queued_close(proto) == 1002


@pytest.mark.parametrize("answer", ["permessage-deflate",
                                    "permessage-deflate; server_no_context_takeover"])
def test_messages_ending_with_a_bfinal_block(answer: str) -> None:
    """RFC 7692 7.2.3.3: a server may end each message with a BFINAL block, starting a
    new DEFLATE stream for the next. Every message must decode, none go missing."""
    server = ZlibServer(finish=True)
    msgs = [b"hello " * 40, noise(500), b"", b"hello " * 40]
    wire = b"".join(server_message(OP_BINARY, server.compress(m)) for m in msgs)
    expected = [("binary", m) for m in msgs]
    assert feed(client(negotiated(answer)), wire) == expected
    assert feed(client(negotiated(answer)), wire, step=1) == expected
    # Fragmented, with the final block ending in the middle frame.
    payload = ZlibServer(finish=True).compress(b"hello " * 40)
    frames = server_message(OP_BINARY, payload, fragments=[3, len(payload) - 3]) * 2
    assert feed(client(negotiated(answer)), frames) == [("binary", b"hello " * 40)] * 2


def test_data_after_the_final_block_fails() -> None:
    """Nothing may follow a BFINAL block within the message; zlib would hold it all."""
    payload = ZlibServer(finish=True).compress(b"hello")
    for wire in (server_message(OP_BINARY, payload + b"junk"),
                 server_message(OP_BINARY, payload + b"junk", fragments=[len(payload)]),
                 server_message(OP_BINARY, payload + noise(1000), fragments=[len(payload), 1])):
        proto = client(negotiated())
        assert feed(proto, wire) == [("failure", ProtocolError, 1002)]
        assert queued_close(proto) == 1002


@pytest.mark.parametrize("size", [100, 8000, 9000, 40_000])
def test_last_piece_inflated_with_the_tail_or_after_it(size: int) -> None:
    """The last piece of a message is inflated with the tail in one call when it is small
    (blockws.deflate._JOIN_TAIL), in two calls when not: both decode a message ending in a
    BFINAL block or in a sync flush, in one frame or two, and both refuse data after a
    BFINAL block (a tail left over after the final block is not such data)."""
    import blockws.deflate

    assert blockws.deflate._JOIN_TAIL < 9000  # the sizes cover both paths
    message = noise(size // 2) + b"hello " * (size // 12)
    for server in (ZlibServer(finish=True), ZlibServer()):
        payload = server.compress(message)
        for fragments in ((), [len(payload) // 2]):
            wire = server_message(OP_BINARY, payload, fragments=fragments)
            assert feed(client(negotiated()), wire) == [("binary", message)]
    payload = ZlibServer(finish=True).compress(message)
    for junk in (b"x", bytes(4), b"\x00\x00\xff\xff"):
        for fragments in ((), [len(payload)]):
            proto = client(negotiated())
            wire = server_message(OP_BINARY, payload + junk, fragments=fragments)
            assert feed(proto, wire) == [("failure", ProtocolError, 1002)]
            assert queued_close(proto) == 1002


# -- round trips: fragmentation and control frames -----------------------------------------


@pytest.mark.parametrize("fragment", [1, 7, 125, 126, 1000])
def test_outgoing_fragments_only_first_has_rsv1(fragment: int) -> None:
    proto = client(negotiated(min_size=0), max_fragment_size=fragment)
    server = ZlibServer()
    for opcode, msg in [(OP_BINARY, noise(1500)), (OP_TEXT, ("héllo wörld " * 100).encode()),
                        (OP_BINARY, noise(1500))]:
        frames = sent(proto, opcode, msg)
        assert all(len(f[3]) <= fragment for f in frames)
        got_opcode, rsv, payload = message_of(frames)
        assert (got_opcode, rsv) == (opcode, RSV1)
        assert frames[0][1] == RSV1 and all(f[1] == 0 for f in frames[1:])
        assert len(frames) == max(1, -(-len(payload) // fragment))
        assert server.decompress(payload) == msg


@pytest.mark.parametrize("step", [None, 1, 3])
def test_incoming_compressed_message_in_many_frames(step: int | None) -> None:
    server = ZlibServer()
    msg1 = (noise(300).hex() + "ünïcode ✓").encode()
    msg2 = noise(1000) + b"\x00" * 1000
    p1, p2 = server.compress(msg1), server.compress(msg2)
    wire = (server_message(OP_TEXT, p1, fragments=[1] * 20 + [0, 7] * 5)
            + server_message(OP_BINARY, p2, fragments=[0, 0, 1, len(p2) - 2])
            + server_message(OP_BINARY, server.compress(msg1), fragments=[2]))
    # Empty frames: a first frame and continuations carrying no payload.
    payload3 = server.compress(msg2)
    wire += server_message(OP_BINARY, payload3, fragments=[0, len(payload3)])
    proto = client(negotiated())
    assert feed(proto, wire, step) == [("text", msg1.decode()), ("binary", msg2),
                                       ("binary", msg1), ("binary", msg2)]


def test_rsv1_on_a_continuation_frame_fails() -> None:
    payload = ZlibServer().compress(b"hello " * 50)
    wire = frame_bytes(OP_BINARY, payload[:5], fin=False, rsv=RSV1)
    wire += frame_bytes(OP_CONT, payload[5:], rsv=RSV1)
    proto = client(negotiated())
    assert feed(proto, wire) == [("failure", ProtocolError, 1002)]
    assert queued_close(proto) == 1002


@pytest.mark.parametrize("rsv", [0x20, 0x10])
def test_other_rsv_bits_still_fail_with_deflate(rsv: int) -> None:
    proto = client(negotiated())
    assert feed(proto, frame_bytes(OP_BINARY, b"x", rsv=rsv)) == [
        ("failure", ProtocolError, 1002)]


def test_control_frames_interleaved_and_never_compressed() -> None:
    proto = client(negotiated(min_size=0), max_fragment_size=10)
    server = ZlibServer()
    msg = ("ping me " * 100).encode()
    payload = server.compress(msg)
    assert len(payload) > 6
    wire = (frame_bytes(OP_TEXT, payload[:3], fin=False, rsv=RSV1)
            + frame_bytes(OP_PING, b"p" * 125)
            + frame_bytes(OP_CONT, payload[3:6], fin=False)
            + frame_bytes(OP_PONG, b"")
            + frame_bytes(OP_PING, b"")
            + frame_bytes(OP_CONT, payload[6:]))
    assert feed(proto, wire, step=1) == [("ping", b"p" * 125), ("pong", b""), ("ping", b""),
                                         ("text", msg.decode())]
    # The pongs went out as plain control frames: FIN, no RSV bit, payload as is.
    assert parse_frames(b"".join(proto.data_to_send())) == [
        (True, 0, OP_PONG, b"p" * 125), (True, 0, OP_PONG, b"")]
    # A compressible ping or close from the client is not compressed either.
    assert parse_frames(proto.encode_control(OP_PING, b"a" * 125)) == [
        (True, 0, OP_PING, b"a" * 125)]
    assert parse_frames(proto.encode_control(OP_PONG, b"a" * 125)) == [
        (True, 0, OP_PONG, b"a" * 125)]
    assert parse_frames(proto.encode_close(1000, "a" * 100)) == [
        (True, 0, OP_CLOSE, b"\x03\xe8" + b"a" * 100)]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_rsv1_on_a_control_frame_fails(opcode: int) -> None:
    proto = client(negotiated())
    payload = b"\x03\xe8" if opcode == OP_CLOSE else b"x"
    assert feed(proto, frame_bytes(opcode, payload, rsv=RSV1)) == [
        ("failure", ProtocolError, 1002)]


# -- min_size, compress=False, empty messages ----------------------------------------------


def test_min_size() -> None:
    proto = client(negotiated())  # min_size=128
    server = ZlibServer()
    for n, rsv in [(0, 0), (1, 0), (127, 0), (128, RSV1), (5000, RSV1), (127, 0)]:
        msg = b"a" * n
        _, got_rsv, payload = message_of(sent(proto, OP_BINARY, msg))
        assert got_rsv == rsv
        if rsv:
            assert server.decompress(payload) == msg
        else:
            assert payload == msg
    proto = client(negotiated(min_size=10))
    assert message_of(sent(proto, OP_TEXT, b"123456789"))[1:] == (0, b"123456789")
    assert message_of(sent(proto, OP_TEXT, b"1234567890"))[1] == RSV1


def test_uncompressed_messages_received_between_compressed_ones() -> None:
    """RSV1 clear: the message is taken as is, and the inflater's stream is untouched."""
    server = ZlibServer()
    msg = noise(1000)
    wire = (server_message(OP_BINARY, server.compress(msg))
            + server_message(OP_TEXT, b"short", rsv=0)
            + server_message(OP_BINARY, b"\x00\x00\xff\xff", rsv=0, fragments=[1, 1])
            + server_message(OP_BINARY, server.compress(msg))
            + server_message(OP_TEXT, b"", rsv=0))
    for step in (None, 1):
        proto = client(negotiated())
        assert feed(proto, wire, step) == [("binary", msg), ("text", "short"),
                                           ("binary", TAIL), ("binary", msg), ("text", "")]


def test_compress_false() -> None:
    proto = client(negotiated(min_size=0))
    server = ZlibServer()
    msg = b"compressible " * 100
    _, rsv, payload = message_of(sent(proto, OP_BINARY, msg))
    assert rsv == RSV1 and server.decompress(payload) == msg
    # compress=False: RSV1 clear, the bytes as given; the compressor is not touched...
    assert message_of(sent(proto, OP_TEXT, msg, compress=False)) == (OP_TEXT, 0, msg)
    assert message_of(sent(proto, OP_BINARY, noise(300), compress=False)) == (
        OP_BINARY, 0, noise(300))
    # ...so the next compressed message continues the server's stream.
    _, rsv, payload = message_of(sent(proto, OP_BINARY, msg))
    assert rsv == RSV1 and len(payload) < 20 and server.decompress(payload) == msg


def test_empty_messages() -> None:
    proto = client(negotiated(min_size=0))
    server = ZlibServer()
    # RFC 7692 7.2.3.6: an empty message compresses to a single 0x00 byte.
    assert message_of(sent(proto, OP_TEXT, b"")) == (OP_TEXT, RSV1, b"\x00")
    assert server.decompress(b"\x00") == b""
    msg = b"after the empty one " * 20
    _, _, payload = message_of(sent(proto, OP_BINARY, msg))
    assert server.decompress(payload) == msg
    assert message_of(sent(proto, OP_BINARY, b""))[1:] == (RSV1, b"\x00")
    # Default min_size: an empty message goes out uncompressed.
    assert message_of(sent(client(negotiated()), OP_BINARY, b"")) == (OP_BINARY, 0, b"")
    # Incoming: 0x00 with RSV1 is an empty message; the stream stays in step.
    wire = (server_message(OP_TEXT, b"\x00") + server_message(OP_BINARY, server.compress(b""))
            + server_message(OP_BINARY, server.compress(msg))
            + server_message(OP_TEXT, server.compress(b"")))
    for step in (None, 1):
        assert feed(client(negotiated()), wire, step) == [
            ("text", ""), ("binary", b""), ("binary", msg), ("text", "")]


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("text", [b"ok \xff\xfe", b"\xed\xa0\x80", b"a\xce", b"\xc0\xaf",
                                  "é".encode() * 500 + b"\xe2\x82"])
def test_invalid_utf8_after_inflating(text: bytes, step: int | None) -> None:
    payload = ZlibServer().compress(text)
    for wire in (server_message(OP_TEXT, payload),
                 server_message(OP_TEXT, payload, fragments=[1] * (len(payload) - 1))):
        proto = client(negotiated())
        assert feed(proto, wire, step) == [("failure", InvalidPayload, 1007)]
        assert queued_close(proto) == 1007


def test_utf8_split_across_inflated_chunks() -> None:
    msg = "é✓𝄞" * 300
    payload = ZlibServer().compress(msg.encode())
    assert feed(client(negotiated()), server_message(OP_TEXT, payload), step=1) == [
        ("text", msg)]


@pytest.mark.parametrize("payload", [
    pytest.param(b"\xff\xff\xff\xff", id="reserved-block-type"),
    pytest.param(b"\x00\x05\x00\x00\x00", id="stored-length-mismatch"),
    pytest.param(b"\x04\xff\xff\xff\xff", id="too-many-length-symbols"),
    pytest.param(b"\x04\x80\xff\xff\xff\xff\xff", id="invalid-code-lengths"),
    pytest.param(zlib.compress(b"hello"), id="zlib-header-not-raw"),
])
def test_corrupt_compressed_data_fails_1002(payload: bytes) -> None:
    for wire in (server_message(OP_BINARY, payload),
                 server_message(OP_TEXT, payload, fragments=[1])):
        proto = client(negotiated())
        events = feed(proto, frame_bytes(OP_TEXT, b"before") + wire + frame_bytes(OP_PING))
        assert events == [("text", "before"), ("failure", ProtocolError, 1002)]
        assert queued_close(proto) == 1002


# -- window bits ---------------------------------------------------------------------------


def test_client_max_window_bits_8_is_huffman_only() -> None:
    """zlib cannot deflate with an 8-bit window; blockws then sends Huffman-only data.

    Proofs: the test's own decoder finds no back-reference at all (so any window decodes
    it), zlib inflates it with a 256-byte window, and it equals zlib's Z_HUFFMAN_ONLY
    output, message after message (context takeover kept)."""
    for answer, options in [("permessage-deflate; client_max_window_bits=8", {}),
                            ("permessage-deflate", {"client_max_window_bits": 8})]:
        proto = client(negotiated(answer, min_size=0, **options))
        reference = zlib.compressobj(1, zlib.DEFLATED, -9, 5, zlib.Z_HUFFMAN_ONLY)
        small_window = zlib.decompressobj(-8)
        for msg in [b"abcdefgh" * 300, b"abcdefgh" * 300, noise(700) * 2, b"z" * 10000]:
            _, rsv, payload = message_of(sent(proto, OP_BINARY, msg))
            assert rsv == RSV1
            out, distances = inflate_stats(payload + TAIL)
            assert out == msg and distances == []
            assert len(payload) >= len(msg) // 8  # at least a bit per byte: no matches
            assert small_window.decompress(payload + TAIL) == msg
            expected = reference.compress(msg) + reference.flush(zlib.Z_SYNC_FLUSH)
            assert payload == expected[:-4]


@pytest.mark.parametrize(("answer", "options", "window"), [
    ("permessage-deflate; client_max_window_bits=9", {}, 9),
    ("permessage-deflate; client_max_window_bits=10", {}, 10),
    ("permessage-deflate", {"client_max_window_bits": 10}, 10),  # our own promise
    ("permessage-deflate; client_max_window_bits=15", {}, 12),  # compress_window_bits
    ("permessage-deflate", {"compress_window_bits": 9}, 9),
    ("permessage-deflate", {"compress_window_bits": 15}, 15),
])
def test_client_window_limit_honoured(answer: str, options: dict[str, Any],
                                      window: int) -> None:
    """No back-reference reaches further than the window in force."""
    proto = client(negotiated(answer, min_size=0, **options))
    server = ZlibServer(client_wbits=window)
    block = noise(400)
    # Repeats at distances from 400 to 20000: some fit each window, some do not.
    msg = block + noise(100, 2) + block + noise(2000, 3) + block + noise(20000, 4) + block
    stream = b""
    for _ in range(2):  # the second message may refer back into the first
        _, _, payload = message_of(sent(proto, OP_BINARY, msg))
        assert server.decompress(payload) == msg  # a window of exactly 2**window does
        stream += payload + TAIL
    out, distances = inflate_stats(stream)
    assert out == msg * 2
    assert max(distances, default=0) <= 1 << window
    if window >= 12:
        assert max(distances) > 2000  # the larger window is used


def test_server_max_window_bits_8_data_decodes() -> None:
    """zlib's smallest raw window is 9 bits: data made with it decodes when 8 was agreed."""
    server = ZlibServer(wbits=9)
    msgs = [b"window " * 200, noise(200) * 3, b"window " * 200]
    payloads = [server.compress(m) for m in msgs]
    assert max(inflate_stats(payloads[1] + TAIL)[1]) <= 512
    wire = b"".join(server_message(OP_BINARY, p) for p in payloads)
    for answer in ("permessage-deflate; server_max_window_bits=8",
                   "permessage-deflate; server_max_window_bits=9"):
        for step in (None, 1):
            proto = client(negotiated(answer))
            assert feed(proto, wire, step) == [("binary", m) for m in msgs]


def test_client_inflates_with_the_agreed_server_window() -> None:
    """The client's inflater holds only the window the server agreed to.

    zlib resolves a reference into output made by the same call whatever the window,
    so the data goes in a byte at a time: then a reference 1000 bytes back must come
    from the window, and a 9-bit one (512 bytes) cannot hold it. A server that agreed
    to 9 bits and sends that breaks its word; with 10 bits it is fine."""
    block = noise(300)
    msg = block + noise(700, 5) + block
    payload = ZlibServer().compress(msg)
    assert max(inflate_stats(payload + TAIL)[1]) == 1000
    wire = server_message(OP_BINARY, payload)
    for bits in (10, 15):
        proto = client(negotiated(f"permessage-deflate; server_max_window_bits={bits}"))
        assert feed(proto, wire, step=1) == [("binary", msg)]
    proto = client(negotiated("permessage-deflate; server_max_window_bits=9"))
    assert feed(proto, wire, step=1) == [("failure", ProtocolError, 1002)]
    assert queued_close(proto) == 1002


# -- max_message_size counts inflated bytes --------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
@pytest.mark.parametrize("step", [None, 1, 1000])
@pytest.mark.parametrize("fragments", [(), (5, 0, 1, 10), (1,) * 30])
def test_max_message_size_counts_inflated_bytes(opcode: int, step: int | None,
                                                fragments: tuple[int, ...]) -> None:
    limit = 20000
    for size, fits in [(limit, True), (limit + 1, False)]:
        msg = b"a" * size
        payload = ZlibServer().compress(msg)
        assert len(payload) < 100  # far below the limit on the wire
        proto = client(negotiated(), max_message_size=limit)
        events = feed(proto, server_message(opcode, payload, fragments=fragments), step)
        if fits:
            assert events == [("text" if opcode == OP_TEXT else "binary",
                               msg.decode() if opcode == OP_TEXT else msg)]
        else:
            assert events == [("failure", MessageTooBig, 1009)]
            assert queued_close(proto) == 1009


def test_max_message_size_uncompressed_message_with_deflate() -> None:
    """RSV1 clear: the announced length is checked at the header, as without deflate."""
    proto = client(negotiated(), max_message_size=100)
    assert feed(proto, frame_bytes(OP_BINARY, b"a" * 100)) == [("binary", b"a" * 100)]
    assert feed(proto, frame_bytes(OP_BINARY, b"", length=101)[:4]) == [
        ("failure", MessageTooBig, 1009)]


def test_max_message_size_none_with_deflate() -> None:
    msg = b"b" * 200000
    proto = client(negotiated(), max_message_size=None)
    assert feed(proto, server_message(OP_BINARY, ZlibServer().compress(msg))) == [
        ("binary", msg)]


# -- fresh(): per-connection state -----------------------------------------------------------


def test_fresh_gives_independent_state() -> None:
    options = PerMessageDeflate(min_size=0, server_max_window_bits=12)
    a, b = options.fresh(), options.fresh()
    assert isinstance(a, PerMessageDeflate) and a is not options and a is not b
    assert a.offer() == b.offer() == options.offer()
    a.accept(params("permessage-deflate; client_max_window_bits=10"))
    b.accept(params("permessage-deflate; server_no_context_takeover"))
    assert a.agreed == agreed(cbits=10) and b.agreed == agreed(snct=True)
    assert options.agreed is None
    # Compressors: a's second message refers back to its first; b's first does not.
    msg = noise(300)
    pa, pb = client(a), client(b)
    first = message_of(sent(pa, OP_BINARY, msg))[2]
    assert len(message_of(sent(pa, OP_BINARY, msg))[2]) < 30
    assert len(message_of(sent(pb, OP_BINARY, msg))[2]) > 290
    # A fresh copy of the options object (or of a used copy) starts from nothing.
    for source in (options, a):
        c = source.fresh()
        assert c.agreed is None
        c.accept(params("permessage-deflate; client_max_window_bits=10"))
        assert message_of(sent(client(c), OP_BINARY, msg))[2] == first
    # Inflaters: a second message that needs the first decodes only where the first went.
    server = ZlibServer()
    m1 = server_message(OP_BINARY, server.compress(msg))
    m2 = server_message(OP_BINARY, server.compress(msg))
    assert feed(pa, m1) == [("binary", msg)]
    fresh_one = client(negotiated(min_size=0))
    assert feed(fresh_one, m2) == [("failure", ProtocolError, 1002)]
    assert feed(pa, m2) == [("binary", msg)]


# -- hypothesis: random messages, fragments, chunking, takeover ------------------------------

_messages = st.lists(
    st.one_of(
        st.binary(max_size=3000),
        st.text(max_size=400),
        st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=20), st.integers(1, 300)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    messages=_messages,
    fragment=st.integers(1, 2000),
    server_nct=st.booleans(),
    client_nct=st.booleans(),
    min_size=st.sampled_from([0, 1, 64, 128]),
    client_bits=st.sampled_from([None, 8, 9, 12, 15]),
    data=st.data(),
)
def test_hypothesis_round_trip(messages: list[Any], fragment: int, server_nct: bool,
                               client_nct: bool, min_size: int, client_bits: int | None,
                               data: st.DataObject) -> None:
    answer = "permessage-deflate"
    if server_nct:
        answer += "; server_no_context_takeover"
    if client_nct:
        answer += "; client_no_context_takeover"
    if client_bits is not None:
        answer += f"; client_max_window_bits={client_bits}"
    proto = client(negotiated(answer, min_size=min_size), max_fragment_size=fragment)
    server = ZlibServer(takeover=not server_nct, client_takeover=not client_nct)
    expected = []
    wire = b""
    for m in messages:
        opcode = OP_TEXT if isinstance(m, str) else OP_BINARY
        raw = m.encode() if isinstance(m, str) else m
        expected.append(("text", m) if isinstance(m, str) else ("binary", m))
        # Client to server.
        frames = sent(proto, opcode, raw)
        got_opcode, rsv, payload = message_of(frames)
        assert got_opcode == opcode and all(len(f[3]) <= fragment for f in frames)
        assert rsv == (RSV1 if len(raw) >= min_size else 0)
        assert (server.decompress(payload) if rsv else payload) == raw
        # Server to client, fragmented at random.
        if data.draw(st.booleans(), "compress incoming"):
            compressed = server.compress(raw)
            cuts = sorted(data.draw(st.lists(st.integers(0, len(compressed)), max_size=5)))
            sizes = [b - a for a, b in zip([0, *cuts], cuts)]
            wire += server_message(opcode, compressed, fragments=sizes)
        else:
            wire += server_message(opcode, raw, rsv=0)
    receiver = client(negotiated(answer))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), "chunking"))
    events: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)]):
        events.extend(receiver.receive_data(wire[a:b]))
    assert summarize(events) == expected
