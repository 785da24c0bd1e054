"""A raw-socket WebSocket "fuzzing server" that plays Autobahn TestSuite client cases.

The Autobahn TestSuite (``wstest -m fuzzingserver``) cannot run here, so this module
reproduces what it does for client testees, without any WebSocket library:

* ``FuzzServer`` listens on 127.0.0.1 (port 0), accepts one connection, answers the HTTP
  upgrade with 101 and the right ``Sec-WebSocket-Accept``, then plays one ``Case``: a list of
  steps (frames with any opcode / RSV / FIN / length, raw octets, octet-wise "chops" and
  per-frame "sync" writes, waits, the closing handshake, ``killAfter`` / ``closeAfter``
  timers). Meanwhile it parses and unmasks everything the client sends and keeps a ``Record``
  of it with timestamps: messages, pings, pongs, the close frame and its code, who closed the
  TCP connection, and any protocol violation by the client.
* ``judge(case, record)`` rates the run the way Autobahn's ``Case.onConnectionLost`` does
  (``autobahntestsuite/case/case.py``): the observed events must equal one of the expected
  event lists (``OK`` or ``NON-STRICT``), then the closing behaviour is checked
  (``closedByMe``, ``requireClean``, close code). The per-case overrides of the suite are
  data on the ``Case`` (``wrong_code_is_fatal`` for category 7,
  ``closed_by_wrong_endpoint_is_fatal`` for the UTF-8 cases, ``informational``).

Autobahn reports two columns (behaviour and close behaviour); ``judge`` folds them into one
verdict: FAILED if either is a failure (close ``FAILED`` / ``UNCLEAN``), NON-STRICT if the
behaviour is non-strict or the close code is wrong (Autobahn colours that column
"non-strict"), else OK. It is slightly stricter than Autobahn in two ways: any protocol
violation by the client (unmasked frame, invalid close payload or close code, RSV bits, ...)
fails the case, and echoed payloads in the performance cases are compared byte for byte
(Autobahn only compares lengths).

permessage-deflate (RFC 7692, Autobahn categories 12 and 13): a ``Case`` with a ``deflate``
policy answers the client's ``Sec-WebSocket-Extensions`` offer the way the case's
``SERVER_ACCEPT`` does in ``case12_x_x.py`` (``DeflatePolicy``), using the offer parsing and the
accept rules of the autobahn library the suite runs on (``DeflateOffer`` / ``DeflateAccept``,
after ``autobahn/websocket/compress_deflate.py``). Every other case ignores the offer, as
Autobahn's fuzzing server does (its default ``perMessageCompressionAccept`` accepts nothing), so
RSV1 stays a protocol violation there. With the extension in use the fuzzer compresses every
message it sends (raw deflate, ``Z_SYNC_FLUSH``, the ``00 00 ff ff`` tail stripped; zlib's default
level, memLevel 8 and window 15, like autobahn) and inflates the client's RSV1 messages with the
negotiated context takeover and window; a client message that does not inflate, RSV1 on a
continuation or control frame, or RSV2/RSV3 are violations. A case whose client did not
negotiate the extension is UNIMPLEMENTED, as in Autobahn: the fuzzer closes with 1000 at once.

8-bit windows: zlib cannot *compress* raw deflate with an 8-bit window (``wbits=-8`` is
refused), so were a client to ask for ``server_max_window_bits=8`` the fuzzer would compress
with 9 bits, which is still exact: zlib's matches reach back at most ``2**wbits - 262``
octets (its MAX_DIST), 250 for 9 bits. For *inflating* (``client_max_window_bits=8``, cases
13.3, 13.5, 13.7) zlib does accept ``wbits=-8``, as autobahn used it, but it does not enforce
the window within one call; so ``deflate_max_distance`` parses the client's first
``WINDOW_CHECK_BUDGET`` compressed octets per connection and fails any back-reference beyond a
negotiated ``client_max_window_bits`` below 15 (a 9-bit zlib or a Huffman-only compressor
passes, a client that ignores the limit does not).

Timing model (Autobahn runs on a Twisted reactor): frames written in the same step batch go
out in one ``send()`` (one TCP segment on loopback); ``sync=True`` frames and every chop of a
``chopsize`` frame are separate writes with a short pause after each, as Autobahn's
``send_queue`` does. ``Wait`` is ``continueLater``: if the connection is still open when it
expires, ``("timeout", tag)`` is appended to the observed events, which is how the fail-fast
cases (6.4.x) tell "failed right after the bad octets" from "failed only at the end".
"""

from __future__ import annotations

import base64
import collections
import hashlib
import socket
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Verdicts (Autobahn's Case.OK etc.)
OK = "OK"
NON_STRICT = "NON-STRICT"
FAILED = "FAILED"
INFORMATIONAL = "INFORMATIONAL"
#: a permessage-deflate case the client did not negotiate the extension for
UNIMPLEMENTED = "UNIMPLEMENTED"
WRONG_CODE = "WRONG CODE"
UNCLEAN = "UNCLEAN"

# Opcodes
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

# Close codes
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007

#: Close codes an endpoint may put in a close frame: RFC 6455 7.4.1 plus the IANA registry
#: (1012-1014) and the registered / private ranges 3000-4999. 1004-1006 and 1015 are reserved.
VALID_CLOSE_CODES = frozenset(
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
    + list(range(3000, 5000))
)

#: Pause after each chop of a ``chopsize`` frame (Autobahn queues chops 10 us apart on its
#: reactor; a little more makes them reliably separate segments for a Python client). Frames
#: chopped into more than ``CHOP_DELAY_MAX_CHOPS`` pieces are written back to back instead,
#: still one ``send()`` per chop, so the performance cases stay fast.
CHOP_DELAY = 0.0005
CHOP_DELAY_MAX_CHOPS = 2000
#: Pause after a ``sync=True`` write.
SYNC_DELAY = 0.001
#: How long the server waits for the client's close frame after sending its own, before it
#: drops the TCP connection (Autobahn's default closeHandshakeTimeout is 1 s).
CLOSE_HANDSHAKE_TIMEOUT = 2.0
#: After the server shut down its side of the TCP connection, how long it waits for the
#: client to close its side before it aborts.
LINGER_TIMEOUT = 2.0
ACCEPT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# Frame helpers


def repeat_to(pattern: bytes, length: int | None) -> bytes:
    """Autobahn's ``payload_len``: ``pattern`` repeated and cut to ``length`` octets."""
    if length is None:
        return pattern
    if length == 0:
        return b""
    if not pattern:
        raise ValueError("cannot repeat an empty pattern")
    return (pattern * (length // len(pattern) + 1))[:length]


def xor_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """Mask or unmask ``data`` with the 4-octet ``key`` (fast for large payloads)."""
    n = len(data)
    if n == 0:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")
    return value.to_bytes(n, "little")


def frame_header(
    opcode: int,
    length: int,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    b0 = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mbit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, mbit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, length)
    return head + (mask or b"")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    body = xor_mask(payload, mask) if mask is not None else payload
    return frame_header(opcode, len(payload), fin, rsv, mask) + body


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    """Autobahn's ``sendCloseFrame``: optional 2-octet code, then the reason as given."""
    return (struct.pack("!H", code) if code is not None else b"") + reason


# --------------------------------------------------------------------------------------
# permessage-deflate (RFC 7692), the server side

RSV1 = 4
DEFLATE_TAIL = b"\x00\x00\xff\xff"
#: window sizes autobahn permitted when the suite was current (later releases dropped 8)
WINDOW_BITS = range(8, 16)
#: The biggest message the fuzzer inflates: a bound against a compression bomb.
MAX_INFLATED_MESSAGE = 64 << 20
#: Compressed octets per connection that ``deflate_max_distance`` parses to check a negotiated
#: ``client_max_window_bits`` below 15 (pure Python, ~1-2 us per symbol, hence the bound).
WINDOW_CHECK_BUDGET = 32 << 10


def parse_extensions(value: str) -> list[tuple[str, dict[str, list[str | bool]]]]:
    """Autobahn's ``_parseExtensionsHeader``: ``[(name, {param: [value or True, ...]})]``."""
    extensions = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        parts = [x.strip() for x in item.split(";")]
        params: dict[str, list[str | bool]] = {}
        for part in parts[1:]:
            kv = [x.strip() for x in part.split("=")]
            val: str | bool = True
            if len(kv) > 1:
                text = "=".join(kv[1:])
                if text[:1] == '"':
                    text = text[1:]
                if text[-1:] == '"':
                    text = text[:-1]
                val = text
            params.setdefault(kv[0].lower(), []).append(val)
        extensions.append((parts[0].lower(), params))
    return extensions


def _window_bits(name: str, val: str | bool) -> int:
    try:
        bits = int(val) if not isinstance(val, bool) else 0
    except ValueError:
        bits = 0
    if bits not in WINDOW_BITS:
        raise ValueError(f"illegal value {val!r} for parameter {name!r} of permessage-deflate")
    return bits


@dataclass(frozen=True)
class DeflateOffer:
    """A client's permessage-deflate offer as autobahn's ``PerMessageDeflateOffer.parse`` reads
    it. ``accept_no_context_takeover`` is True even when the client did not say so (RFC 7692: a
    client must always support client_no_context_takeover); ``accept_max_window_bits`` needs
    ``client_max_window_bits`` in the offer (a value is only a hint)."""

    accept_no_context_takeover: bool = True
    accept_max_window_bits: bool = False
    request_no_context_takeover: bool = False  # server_no_context_takeover
    request_max_window_bits: int = 0  # server_max_window_bits (0: not asked)

    @classmethod
    def parse(cls, params: dict[str, list[str | bool]]) -> DeflateOffer:
        """Raise ``ValueError`` on an offer autobahn refuses (its handshake then fails)."""
        accept_bits, request_nct, request_bits = False, False, 0
        for name, values in params.items():
            if len(values) > 1:
                raise ValueError(f"parameter {name!r} of permessage-deflate repeated")
            val = values[0]
            if name == "client_max_window_bits":
                if val is not True:
                    _window_bits(name, val)
                accept_bits = True
            elif name in ("client_no_context_takeover", "server_no_context_takeover"):
                if val is not True:
                    raise ValueError(f"parameter {name!r} of permessage-deflate takes no value")
                request_nct = request_nct or name == "server_no_context_takeover"
            elif name == "server_max_window_bits":
                request_bits = _window_bits(name, val)
            else:
                raise ValueError(f"illegal parameter {name!r} of permessage-deflate")
        return cls(True, accept_bits, request_nct, request_bits)


@dataclass(frozen=True)
class DeflateAccept:
    """autobahn's ``PerMessageDeflateOfferAccept``: the server accepts ``offer`` and may ask
    the client for no context takeover / a window limit (only if the offer allows it). The
    server's own direction follows what the offer requested."""

    offer: DeflateOffer
    request_no_context_takeover: bool = False  # -> client_no_context_takeover
    request_max_window_bits: int = 0  # -> client_max_window_bits=N

    def __post_init__(self) -> None:
        if self.request_no_context_takeover and not self.offer.accept_no_context_takeover:
            raise ValueError("client_no_context_takeover not supported by the offer")
        if self.request_max_window_bits:
            if self.request_max_window_bits not in WINDOW_BITS:
                raise ValueError(f"invalid client_max_window_bits {self.request_max_window_bits}")
            if not self.offer.accept_max_window_bits:
                raise ValueError("client_max_window_bits not supported by the offer")

    def extension_string(self) -> str:
        parts = ["permessage-deflate"]
        if self.offer.request_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.offer.request_max_window_bits:
            parts.append(f"server_max_window_bits={self.offer.request_max_window_bits}")
        if self.request_no_context_takeover:
            parts.append("client_no_context_takeover")
        if self.request_max_window_bits:
            parts.append(f"client_max_window_bits={self.request_max_window_bits}")
        return "; ".join(parts)


@dataclass(frozen=True)
class DeflatePolicy:
    """A case's ``SERVER_ACCEPT`` (``accept1`` ... ``accept7`` in ``case12_x_x.py``): the
    (client_no_context_takeover, client_max_window_bits) choices tried in order, each against
    every offer; the first offer that supports a choice is accepted with it. No match: the
    extension is not used (the case is then UNIMPLEMENTED)."""

    choices: tuple[tuple[bool, int], ...] = ((False, 0),)

    def choose(self, offers: Sequence[DeflateOffer]) -> DeflateAccept | None:
        for nct, bits in self.choices:
            for offer in offers:
                if nct and not offer.accept_no_context_takeover:
                    continue
                if bits and not offer.accept_max_window_bits:
                    continue
                return DeflateAccept(offer, nct, bits)
        return None


class DeflateSession:
    """The fuzzer's half of a negotiated permessage-deflate (autobahn's ``PerMessageDeflate``
    with ``is_server``): compresses what it sends, inflates what the client compressed."""

    def __init__(self, accept: DeflateAccept) -> None:
        offer = accept.offer
        self.server_no_context_takeover = offer.request_no_context_takeover
        self.client_no_context_takeover = accept.request_no_context_takeover
        self.server_max_window_bits = offer.request_max_window_bits or 15
        self.client_max_window_bits = accept.request_max_window_bits or 15
        self.window_check_left = WINDOW_CHECK_BUDGET if self.client_max_window_bits < 15 else 0
        self._compressor: Any = None
        self._decompressor: Any = None

    def agreed(self) -> dict[str, Any]:
        return {
            "server_no_context_takeover": self.server_no_context_takeover,
            "client_no_context_takeover": self.client_no_context_takeover,
            "server_max_window_bits": self.server_max_window_bits,
            "client_max_window_bits": self.client_max_window_bits,
        }

    def compress(self, payload: bytes) -> bytes:
        """One message: deflate, sync flush, strip the ``00 00 ff ff`` tail."""
        if self._compressor is None or self.server_no_context_takeover:
            # zlib refuses an 8-bit window for raw deflate; with 9 bits its matches still
            # reach back at most 2**9 - 262 = 250 octets (MAX_DIST), within an 8-bit window.
            wbits = max(self.server_max_window_bits, 9)
            self._compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits, 8
            )
        data = self._compressor.compress(payload) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(DEFLATE_TAIL)
        return data[:-4]

    def check_window(self, data: bytes) -> str | None:
        """A violation if the client's message reaches back beyond its negotiated window
        (checked while the per-connection budget lasts)."""
        if self.window_check_left <= 0:
            return None
        self.window_check_left -= len(data)
        try:
            dist = deflate_max_distance(data + DEFLATE_TAIL)
        except ValueError as exc:
            return f"invalid compressed message: {exc}"
        if dist > 1 << self.client_max_window_bits:
            return (f"compressed message refers {dist} octets back, beyond the negotiated "
                    f"client_max_window_bits={self.client_max_window_bits}")
        return None

    def inflate(self, data: bytes) -> bytes:
        """One message; raises ``zlib.error`` / ``ValueError`` on bad data."""
        d = self._decompressor
        if d is None or self.client_no_context_takeover or d.eof:
            try:
                d = zlib.decompressobj(-self.client_max_window_bits)
            except (ValueError, zlib.error):  # a zlib without 8-bit inflate windows
                d = zlib.decompressobj(-max(self.client_max_window_bits, 9))
            self._decompressor = d
        out = d.decompress(data + DEFLATE_TAIL, MAX_INFLATED_MESSAGE + 1)
        if d.unconsumed_tail or len(out) > MAX_INFLATED_MESSAGE:
            raise ValueError(f"message inflates to more than {MAX_INFLATED_MESSAGE} octets")
        return out


# A raw-deflate parser that only tracks back-reference distances (RFC 1951).
_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83,
             99, 115, 131, 163, 195, 227, 258)
_LEN_EXTRA = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4 + (0,)
_DIST_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
              1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577)
_DIST_EXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11,
               11, 12, 12, 13, 13)
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


def _huffman(lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Canonical code as (count per length, symbols by code) for ``_BitReader.decode``."""
    counts = [0] * 16
    for n in lengths:
        counts[n] += 1
    offs = [0] * 16
    for n in range(1, 15):
        offs[n + 1] = offs[n] + counts[n]
    symbols = [0] * len(lengths)
    for sym, n in enumerate(lengths):
        if n:
            symbols[offs[n]] = sym
            offs[n] += 1
    return counts, symbols


_FIXED_LIT = _huffman([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8)
_FIXED_DIST = _huffman([5] * 30)


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.bitbuf = 0
        self.bitcnt = 0

    def bits(self, n: int) -> int:
        buf, cnt = self.bitbuf, self.bitcnt
        while cnt < n:
            if self.pos >= len(self.data):
                raise ValueError("compressed data ends inside a block")
            buf |= self.data[self.pos] << cnt
            self.pos += 1
            cnt += 8
        self.bitbuf, self.bitcnt = buf >> n, cnt - n
        return buf & ((1 << n) - 1)

    def decode(self, table: tuple[list[int], list[int]]) -> int:
        counts, symbols = table
        buf, cnt, data, pos = self.bitbuf, self.bitcnt, self.data, self.pos
        code = first = index = 0
        for length in range(1, 16):
            if not cnt:
                if pos >= len(data):
                    raise ValueError("compressed data ends inside a block")
                buf, cnt = data[pos], 8
                pos += 1
            code |= buf & 1
            buf >>= 1
            cnt -= 1
            count = counts[length]
            if code - first < count:
                self.bitbuf, self.bitcnt, self.pos = buf, cnt, pos
                return symbols[index + code - first]
            index += count
            first = (first + count) << 1
            code <<= 1
        raise ValueError("invalid Huffman code")


def deflate_max_distance(data: bytes) -> int:
    """Parse complete raw deflate blocks (a permessage-deflate message plus its restored
    ``00 00 ff ff`` tail) and return the longest back-reference distance used (0 if none).
    Raises ``ValueError`` on malformed data."""
    r = _BitReader(data)
    longest = 0
    while r.pos < len(data):  # (a block takes 10 bits at least: fewer left are padding)
        final = r.bits(1)
        btype = r.bits(2)
        if btype == 0:
            r.bitbuf = r.bitcnt = 0  # stored: skip to the byte boundary
            if r.pos + 4 > len(data):
                raise ValueError("truncated stored block")
            n = int.from_bytes(data[r.pos : r.pos + 2], "little")
            if n ^ 0xFFFF != int.from_bytes(data[r.pos + 2 : r.pos + 4], "little"):
                raise ValueError("stored block length check failed")
            r.pos += 4 + n
            if r.pos > len(data):
                raise ValueError("truncated stored block")
        elif btype in (1, 2):
            if btype == 1:
                lit, dist = _FIXED_LIT, _FIXED_DIST
            else:
                nlen, ndist, ncode = r.bits(5) + 257, r.bits(5) + 1, r.bits(4) + 4
                cl = [0] * 19
                for i in range(ncode):
                    cl[_CL_ORDER[i]] = r.bits(3)
                cl_table = _huffman(cl)
                lengths: list[int] = []
                while len(lengths) < nlen + ndist:
                    sym = r.decode(cl_table)
                    if sym < 16:
                        lengths.append(sym)
                    elif sym == 16:
                        if not lengths:
                            raise ValueError("repeat with no previous length")
                        lengths += [lengths[-1]] * (3 + r.bits(2))
                    else:
                        lengths += [0] * ((3 + r.bits(3)) if sym == 17 else (11 + r.bits(7)))
                if len(lengths) > nlen + ndist:
                    raise ValueError("too many code lengths")
                lit, dist = _huffman(lengths[:nlen]), _huffman(lengths[nlen:])
            while True:
                sym = r.decode(lit)
                if sym < 256:
                    continue
                if sym == 256:
                    break
                sym -= 257
                if sym >= 29:
                    raise ValueError("invalid length symbol")
                if _LEN_EXTRA[sym]:
                    r.bits(_LEN_EXTRA[sym])
                dsym = r.decode(dist)
                if dsym >= 30:
                    raise ValueError("invalid distance symbol")
                d = _DIST_BASE[dsym] + (r.bits(_DIST_EXTRA[dsym]) if _DIST_EXTRA[dsym] else 0)
                if d > longest:
                    longest = d
        else:
            raise ValueError("invalid block type 3")
        if final:
            break
    return longest


# --------------------------------------------------------------------------------------
# Steps: what a case does, as data


@dataclass(frozen=True)
class Frame:
    """``sendFrame``: one frame, any opcode / RSV / FIN. ``payload_len`` repeats ``payload``
    to that many octets. ``chopsize`` writes the frame octets in pieces of that size, each a
    separate write; ``sync`` writes the frame on its own."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    payload_len: int | None = None
    mask: bytes | None = None
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Raw:
    """Raw octets (e.g. a frame header announcing more payload than follows)."""

    data: bytes
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Message:
    """``sendMessage``: a whole text / binary message, in one frame or in frames of
    ``fragment_size`` payload octets (Autobahn's fragmentSize / autoFragmentSize)."""

    payload: bytes
    binary: bool = False
    payload_len: int | None = None
    fragment_size: int | None = None
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Close:
    """``sendClose`` / ``sendCloseFrame``: start the closing handshake. The payload is the
    2-octet ``code`` (if not None) followed by ``reason``, unchecked, so invalid close
    frames can be sent. Ignored (like Autobahn) when a close was already sent; send a raw
    ``Frame(OP_CLOSE, ...)`` for a second close frame."""

    code: int | None = None
    reason: bytes = b""


@dataclass(frozen=True)
class Wait:
    """``continueLater``: wait ``seconds``; if the connection is still open afterwards,
    record ``("timeout", tag)`` (when ``tag`` is given) and go on with the next steps,
    otherwise stop playing. With ``require_open=False`` the steps also go on while the
    closing handshake is in progress (Autobahn's 5.19 part 2 does not check the state)."""

    seconds: float
    tag: str | None = None
    require_open: bool = True


@dataclass(frozen=True)
class StartRoundtrip:
    """Send the first message of the case's ``Roundtrip`` (each echo then triggers the next);
    like ``Message``, compressed when permessage-deflate is in use."""


@dataclass(frozen=True)
class KillAfter:
    """``killAfter``: if the connection is not closed ``seconds`` after the steps were
    written, fail it (send close 1001 and wait for the client's close, or drop the TCP
    connection if a close was already sent)."""

    seconds: float


@dataclass(frozen=True)
class CloseAfter:
    """``closeAfter``: if the connection is still open ``seconds`` after the steps were
    written, start the closing handshake (a close frame without payload)."""

    seconds: float


Step = Union[Frame, Raw, Message, Close, Wait, StartRoundtrip, KillAfter, CloseAfter]

#: An observed event, compared to the expected lists like Autobahn's ``received``:
#: ("message", payload: bytes, is_binary: bool) | ("ping", payload) | ("pong", payload)
#: | ("timeout", tag)
Event = tuple[Any, ...]


@dataclass(frozen=True)
class EchoCheck:
    """Category 9.1-9.6 (and the like): the first message the client sends must be the
    echo of the message sent (same type, same octets); then the server closes with 1000."""

    binary: bool
    length: int
    pattern: bytes

    def expected_payload(self) -> bytes:
        return repeat_to(self.pattern, self.length)


@dataclass(frozen=True)
class Roundtrip:
    """Category 9.7 / 9.8, 12 and 13: send ``count`` messages one at a time, each after the
    echo of the previous one came back; then the server closes with 1000. Every message is
    ``pattern`` repeated to ``length`` octets, or, with ``data`` (a function returning the
    test data, so it is built only when used), the next ``length`` octets of the data read as
    a ring (Autobahn's ``sendOne`` in ``case12_x_x.py``). ``fragment_size`` is the
    autoFragmentSize applied to the (compressed) message payload (0: one frame)."""

    count: int
    length: int
    binary: bool
    pattern: bytes = b""
    data: Callable[[], bytes] | None = None
    fragment_size: int = 0

    def payload(self, index: int) -> bytes:
        """Message number ``index`` (0-based)."""
        if self.data is None:
            return repeat_to(self.pattern, self.length)
        data = self.data()
        size = len(data)
        start = (index * self.length) % size
        end = (start + self.length) % size
        return data[start:end] if end > start else data[start:] + data[:end]


@dataclass(frozen=True, eq=False)
class Case:
    id: str
    description: str
    expectation: str
    steps: tuple[Step, ...]
    #: verdict ("OK" / "NON-STRICT") -> the exact list of events observed for that verdict.
    #: Insertion order matters: the first match wins.
    expected: dict[str, list[Event]]
    #: Autobahn's expectedClose: must the fuzzer (True) or the client (False) start the close?
    closed_by_me: bool
    #: close codes the client may send (a close frame without code is always accepted)
    close_codes: tuple[int, ...]
    #: must the closing handshake complete (close frames both ways)?
    require_clean: bool
    #: UTF-8 cases: the client not failing the connection fails the case itself
    closed_by_wrong_endpoint_is_fatal: bool = False
    #: category 7: a wrong close code fails the case itself
    wrong_code_is_fatal: bool = False
    #: the outcome is reported as INFORMATIONAL (only client protocol violations fail it)
    informational: bool = False
    #: do not start the closing handshake once the expected events were observed
    suppress_close: bool = False
    echo: EchoCheck | None = None
    roundtrip: Roundtrip | None = None
    #: extra check on the record; returns an error string or None (10.1.1's frame counts)
    check: Callable[[Record], str | None] | None = None
    #: permessage-deflate: how the fuzzer answers the client's offer (categories 12 and 13);
    #: None ignores the offer. Not negotiated although set: UNIMPLEMENTED.
    deflate: DeflatePolicy | None = None
    #: hard limit for the whole case (server side), seconds
    time_limit: float = 0.0
    #: how the case was scaled down from Autobahn's, if it was
    scaled: str = ""

    def __post_init__(self) -> None:
        if not self.time_limit:
            waits = sum(s.seconds for s in self.steps if isinstance(s, Wait))
            timers = [s.seconds for s in self.steps if isinstance(s, (KillAfter, CloseAfter))]
            limit = waits + max(timers, default=1.0) + 2 * CLOSE_HANDSHAKE_TIMEOUT + 5.0
            object.__setattr__(self, "time_limit", limit)

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Case({self.id})"


# --------------------------------------------------------------------------------------
# What happened


@dataclass
class Record:
    case_id: str
    started: float = 0.0  # time.monotonic() when the handshake completed
    connected: bool = False
    opened: bool = False
    handshake_error: str | None = None
    request_line: str = ""
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    #: the client's Sec-WebSocket-Extensions (None: not sent) and the fuzzer's answer
    extensions_offered: str | None = None
    extensions_response: str | None = None
    #: the permessage-deflate parameters in use (None: not negotiated)
    deflate: dict[str, Any] | None = None
    #: a deflate case without the extension: the fuzzer closed at once (Autobahn's UNIMPLEMENTED)
    unimplemented: bool = False
    #: data messages from the client with / without RSV1, their octets on the wire and inflated
    rx_compressed: int = 0
    rx_uncompressed: int = 0
    rx_wire_octets: int = 0
    rx_octets: int = 0
    #: messages the fuzzer compressed, and their octets before / after
    tx_compressed: int = 0
    tx_octets: int = 0
    tx_wire_octets: int = 0
    #: Autobahn's ``received``: messages, pings, pongs (from the client) and timeouts
    received: list[Event] = field(default_factory=list)
    #: seconds since open at which each ``received`` event happened
    received_at: list[float] = field(default_factory=list)
    #: (seconds since open, what, detail) for diagnostics
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    closed_by_me: bool = False  # the fuzzer sent the first close frame
    was_clean: bool = False  # close frames went both ways
    local_close_code: int | None = None
    local_close_at: float | None = None
    client_close_payload: bytes | None = None
    client_close_at: float | None = None
    remote_close_code: int | None = None  # the client's (valid) close code
    remote_close_reason: str | None = None
    tcp_closed_by: str | None = None  # "client" or "server": who closed TCP first
    tcp_closed_at: float | None = None
    violations: list[str] = field(default_factory=list)
    steps_done_at: float | None = None  # all step octets handed to the kernel
    steps_completed: bool = False  # every step ran (no early stop on close)
    #: queued writes (chops, frames) dropped because the connection closed first: > 0 means
    #: the client closed before the fuzzer had sent everything
    discarded_writes: int = 0
    kill_fired: bool = False
    close_after_fired: bool = False
    close_timeout_fired: bool = False
    timed_out: bool = False  # the case's hard time limit was hit
    tx_data_frames: dict[int, int] = field(default_factory=dict)
    echo_ok: bool | None = None
    echo_result: str = ""
    roundtrips: int = 0
    duration: float = 0.0

    def note(self, what: str, detail: str = "") -> None:
        t = time.monotonic() - self.started if self.started else 0.0
        self.timeline.append((round(t, 4), what, detail))

    def format_timeline(self, limit: int = 60) -> str:
        lines = [f"{t:8.4f}s  {what:<18} {detail}" for t, what, detail in self.timeline]
        if len(lines) > limit:
            lines = lines[: limit // 2] + [f"   ... {len(lines) - limit} more ..."] + lines[
                -limit // 2 :
            ]
        return "\n".join(lines)


def _short(data: bytes, n: int = 40) -> str:
    if len(data) <= n:
        return f"{len(data)}B {data!r}"
    return f"{len(data)}B {data[:n]!r}..."


def _event_repr(ev: Event) -> str:
    parts = []
    for x in ev:
        if isinstance(x, (bytes, bytearray)) and len(x) > 40:
            parts.append(f"<{len(x)} octets {bytes(x[:16])!r}...>")
        else:
            parts.append(repr(x))
    return "(" + ", ".join(parts) + ")"


def events_repr(events: Sequence[Event]) -> str:
    return "[" + ", ".join(_event_repr(e) for e in events) + "]"


# --------------------------------------------------------------------------------------
# The server

_CONNECTING, _OPEN, _CLOSING, _CLOSED = "CONNECTING", "OPEN", "CLOSING", "CLOSED"


class FuzzServer:
    """Serve one ``Case`` to one client connection. Use as a context manager::

        with FuzzServer(case) as server:
            start_client(server.url)
            server.wait(case.time_limit + 5)
        verdict = judge(case, server.record)
    """

    def __init__(self, case: Case, host: str = "127.0.0.1") -> None:
        self.case = case
        self.record = Record(case.id)
        self.finished = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._sock: socket.socket | None = None
        self._cond = threading.Condition()  # guards the protocol state below
        self._state = _CONNECTING
        self._closing_since: float | None = None
        self._closed = threading.Event()  # protocol state reached CLOSED
        self._tcp_down = False  # the server shut down / aborted the TCP connection
        self._reader_done = threading.Event()
        # writer queue: ("data", bytes, delay, opcode-count dict or None) | ("shutdown",)
        self._wq: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wcond = threading.Condition()
        self._writer_stop = False
        self._send_lock = threading.RLock()  # makes a batch of steps atomic vs. the reader
        self._pending = bytearray()
        self._deflate: DeflateSession | None = None  # permessage-deflate, once negotiated
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(
            target=self._run, name=f"fuzzserver-{case.id}", daemon=True
        )

    # -- public -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/runCase?case={self.case.id}&agent=testee"

    def start(self) -> FuzzServer:
        self._main.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the case is over (connection closed, record final)."""
        return self.finished.wait(timeout)

    def close(self) -> None:
        """Abort whatever is still running and release the sockets."""
        with self._cond:
            self.record.timed_out = self.record.timed_out or not self.finished.is_set()
        self._abort("server")
        try:
            self._listener.close()
        except OSError:
            pass
        self._main.join(10)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FuzzServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- main thread ------------------------------------------------------------------

    def _run(self) -> None:
        rec = self.record
        t_begin = time.monotonic()
        try:
            self._listener.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                rec.handshake_error = f"no connection from the client ({exc!r})"
                return
            finally:
                try:
                    self._listener.close()
                except OSError:
                    pass
            rec.connected = True
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = conn
            leftover = self._handshake(conn)
            if leftover is None:
                self._abort("server")
                return
            with self._cond:
                self._state = _OPEN
                rec.opened = True
                rec.started = time.monotonic()
            rec.note("open", rec.request_line)
            for target, name in ((self._reader, "reader"), (self._writer, "writer")):
                t = threading.Thread(
                    target=target,
                    args=(leftover,) if name == "reader" else (),
                    name=f"fuzzserver-{self.case.id}-{name}",
                    daemon=True,
                )
                self._threads.append(t)
                t.start()
            deadlines = self._play()
            self._wait_until_closed(deadlines)
            # linger: let the client close its side after our FIN
            if not self._reader_done.wait(LINGER_TIMEOUT):
                rec.note("linger timeout", "client did not close its side of TCP")
        except Exception as exc:  # a bug in the fuzzer: make it visible in the verdict
            rec.violations.append(f"fuzzserver internal error: {exc!r}")
            raise
        finally:
            self._abort("server")
            with self._wcond:
                self._writer_stop = True
                self._wcond.notify_all()
            for t in self._threads:
                t.join(5)
            if self._sock is not None:
                try:
                    self._sock.close()
                except OSError:
                    pass
            rec.duration = time.monotonic() - t_begin
            self.finished.set()

    def _handshake(self, conn: socket.socket) -> bytes | None:
        rec = self.record
        conn.settimeout(HANDSHAKE_TIMEOUT)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    rec.handshake_error = "client closed the connection during the handshake"
                    return None
                buf += chunk
                if len(buf) > 65536:
                    rec.handshake_error = "handshake request too large"
                    return None
        except OSError as exc:
            rec.handshake_error = f"handshake read failed: {exc!r}"
            return None
        conn.settimeout(None)
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        rec.request_line = lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                rec.handshake_error = f"malformed header line {line!r}"
                break
            rec.request_headers.append((name.strip(), value.strip()))
            key = name.strip().lower()
            headers[key] = (headers[key] + ", " if key in headers else "") + value.strip()
        problems = []
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
            problems.append(f"bad request line {lines[0]!r}")
        if "websocket" not in [t.strip().lower() for t in headers.get("upgrade", "").split(",")]:
            problems.append("missing Upgrade: websocket")
        if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
            problems.append("missing Connection: Upgrade")
        if headers.get("sec-websocket-version", "").strip() != "13":
            problems.append("Sec-WebSocket-Version is not 13")
        if "host" not in headers:
            problems.append("missing Host header")
        key = headers.get("sec-websocket-key", "").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                problems.append("Sec-WebSocket-Key is not 16 octets")
        except ValueError:
            problems.append("Sec-WebSocket-Key is not base64")
        # permessage-deflate: autobahn parses every offer (an invalid one fails the
        # handshake), then asks the case's accept policy (none: ignore the offers)
        rec.extensions_offered = headers.get("sec-websocket-extensions")
        offers: list[DeflateOffer] = []
        try:
            for name, params in parse_extensions(rec.extensions_offered or ""):
                if name == "permessage-deflate":
                    offers.append(DeflateOffer.parse(params))
        except ValueError as exc:
            problems.append(f"invalid permessage-deflate offer: {exc}")
        if problems or rec.handshake_error:
            rec.handshake_error = rec.handshake_error or "; ".join(problems)
            try:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            return None
        extra = b""
        chosen = self.case.deflate.choose(offers) if self.case.deflate is not None else None
        if chosen is not None:
            self._deflate = DeflateSession(chosen)
            rec.deflate = self._deflate.agreed()
            rec.extensions_response = chosen.extension_string()
            extra = b"Sec-WebSocket-Extensions: " + rec.extensions_response.encode() + b"\r\n"
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest())
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra
            + b"Server: blockws-fuzzserver\r\n\r\n"
        )
        try:
            conn.sendall(response)
        except OSError as exc:
            rec.handshake_error = f"could not send the 101 response: {exc!r}"
            return None
        return rest

    def _play(self) -> list[tuple[float, str]]:
        """Run the steps; return the killAfter / closeAfter timers (delay, kind)."""
        timers: list[tuple[float, str]] = []
        rec = self.record
        stopped = False
        steps = self.case.steps
        if self.case.deflate is not None and self._deflate is None:
            # Autobahn's case 12/13 onOpen: behaviour UNIMPLEMENTED, sendClose(1000)
            rec.unimplemented = True
            rec.note("unimplemented", "permessage-deflate not negotiated: close")
            steps = (Close(NORMAL),)
        for step in steps:
            if self._closed.is_set():
                stopped = True
                break
            if isinstance(step, Wait):
                self._flush()
                self._drain()
                if self._closed.wait(step.seconds):
                    stopped = True
                    break
                with self._cond:
                    state = self._state
                if state == _CLOSED or (step.require_open and state != _OPEN):
                    rec.note("wait", f"connection not open after {step.seconds}s: stop")
                    stopped = True
                    break
                if step.tag is not None:
                    self._event(("timeout", step.tag), f"tag {step.tag}")
            elif isinstance(step, KillAfter):
                timers.append((step.seconds, "kill"))
            elif isinstance(step, CloseAfter):
                timers.append((step.seconds, "closeAfter"))
            else:
                with self._send_lock:
                    self._do_send(step)
        self._flush()
        rec.steps_completed = not stopped
        self._drain()
        rec.steps_done_at = time.monotonic() - rec.started
        rec.note("steps done", "all steps played" if not stopped else "stopped early")
        return timers

    def _do_send(self, step: Step) -> None:
        if isinstance(step, Frame):
            payload = repeat_to(step.payload, step.payload_len)
            data = build_frame(step.opcode, payload, step.fin, step.rsv, step.mask)
            self._count_tx(step.opcode)
            self.record.note(
                "send frame",
                f"op={step.opcode} fin={int(step.fin)} rsv={step.rsv} {_short(payload)}"
                + (f" chop={step.chopsize}" if step.chopsize else "")
                + (" sync" if step.sync else ""),
            )
            self._send(data, step.chopsize, step.sync)
        elif isinstance(step, Raw):
            self.record.note("send raw", _short(step.data))
            self._send(step.data, step.chopsize, step.sync)
        elif isinstance(step, Message):
            payload = repeat_to(step.payload, step.payload_len)
            data = self._message_frames(payload, step.binary, step.fragment_size)
            self._send(data, step.chopsize, step.sync)
        elif isinstance(step, StartRoundtrip):
            rt = self.case.roundtrip
            assert rt is not None, "StartRoundtrip needs a Case.roundtrip"
            self._send(self._message_frames(rt.payload(0), rt.binary, rt.fragment_size, "#1"),
                       None, False)
        elif isinstance(step, Close):
            self._start_close(step.code, step.reason, via_pending=True)

    def _message_frames(
        self, payload: bytes, binary: bool, fragment_size: int | None, tag: str = ""
    ) -> bytes:
        """Autobahn's ``sendMessage``: compress (when permessage-deflate is in use), then
        split into frames of ``fragment_size`` octets; RSV1 on the first frame only."""
        rec = self.record
        opcode = OP_BINARY if binary else OP_TEXT
        wire, rsv = payload, 0
        if self._deflate is not None:
            wire, rsv = self._deflate.compress(payload), RSV1
            rec.tx_compressed += 1
            rec.tx_octets += len(payload)
            rec.tx_wire_octets += len(wire)
        size = fragment_size or max(len(wire), 1)
        pieces = [wire[i : i + size] for i in range(0, len(wire), size)] or [b""]
        out = []
        for i, piece in enumerate(pieces):
            op = opcode if i == 0 else OP_CONT
            self._count_tx(op)
            out.append(build_frame(op, piece, fin=i == len(pieces) - 1, rsv=rsv if i == 0 else 0))
        rec.note(
            "send message",
            f"{tag + ' ' if tag else ''}{'binary' if binary else 'text'} {_short(payload)}"
            f" in {len(pieces)} frame(s)" + (f", deflated to {len(wire)}" if rsv else ""),
        )
        return b"".join(out)

    def _count_tx(self, opcode: int) -> None:
        d = self.record.tx_data_frames
        d[opcode] = d.get(opcode, 0) + 1

    def _wait_until_closed(self, timers: list[tuple[float, str]]) -> None:
        rec = self.record
        base = time.monotonic()
        pending = sorted((base + delay, kind) for delay, kind in timers)
        hard = rec.started + self.case.time_limit
        while True:
            action = None
            with self._cond:
                if self._state == _CLOSED:
                    return
                now = time.monotonic()
                candidates = list(pending[:1])
                if self._state == _CLOSING and self._closing_since is not None:
                    candidates.append((self._closing_since + CLOSE_HANDSHAKE_TIMEOUT, "close"))
                candidates.append((hard, "hard"))
                when, kind = min(candidates)
                if when > now:
                    self._cond.wait(when - now)
                    continue
                if pending and (when, kind) == pending[0]:
                    pending.pop(0)
                action = kind
                state = self._state
            if action == "kill":
                rec.kill_fired = True
                rec.note("killAfter fired", f"state {state}")
                if state == _OPEN:
                    with self._send_lock:
                        self._start_close(GOING_AWAY, b"Going Away")
                else:
                    self._abort("server")
            elif action == "closeAfter":
                if state == _OPEN:
                    rec.close_after_fired = True
                    rec.note("closeAfter fired")
                    with self._send_lock:
                        self._start_close(None)
            elif action == "close":
                rec.close_timeout_fired = True
                rec.note("close timeout", "no close frame from the client: drop TCP")
                self._abort("server")
            elif action == "hard":
                rec.timed_out = True
                rec.note("time limit", f"case not finished after {self.case.time_limit}s")
                self._abort("server")

    # -- sending ----------------------------------------------------------------------

    def _send(self, data: bytes, chopsize: int | None, sync: bool) -> None:
        if chopsize:
            self._flush()
            chops = [data[i : i + chopsize] for i in range(0, len(data), chopsize)]
            delay = CHOP_DELAY if len(chops) <= CHOP_DELAY_MAX_CHOPS else 0.0
            with self._wcond:
                self._wq.extend(("data", c, delay) for c in chops)
                self._wcond.notify_all()
        elif sync:
            self._flush()
            self._enqueue(data, SYNC_DELAY)
        else:
            self._pending += data

    def _flush(self) -> None:
        with self._send_lock:
            if self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                self._enqueue(data, 0.0)

    def _enqueue(self, data: bytes, delay: float = 0.0) -> None:
        with self._wcond:
            self._wq.append(("data", data, delay))
            self._wcond.notify_all()

    def _drain(self) -> None:
        """Wait until the writer handed everything queued to the kernel (or TCP is down)."""
        deadline = (self.record.started or time.monotonic()) + self.case.time_limit
        with self._wcond:
            while (self._wq or self._writing) and not self._tcp_down:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wcond.wait(min(left, 0.1))

    _writing = False

    def _writer(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            with self._wcond:
                while not self._wq and not self._writer_stop:
                    self._wcond.wait()
                if not self._wq:
                    return
                item = self._wq.popleft()
                self._writing = True
            try:
                if item[0] == "data":
                    if self._tcp_down:
                        self.record.discarded_writes += 1
                        continue
                    try:
                        sock.sendall(item[1])
                    except OSError as exc:
                        self.record.note("send failed", repr(exc))
                        self._abort("client" if self.record.tcp_closed_by is None else "server")
                        continue
                    if item[2]:
                        time.sleep(item[2])
                elif item[0] == "shutdown":
                    self._shutdown_graceful()
            finally:
                with self._wcond:
                    self._writing = False
                    self._wcond.notify_all()

    def _start_close(
        self, code: int | None, reason: bytes = b"", via_pending: bool = False
    ) -> None:
        """Send the first close frame (the fuzzer starts the closing handshake)."""
        with self._cond:
            if self._state != _OPEN:
                return
            self._state = _CLOSING
            self._closing_since = time.monotonic()
            self.record.closed_by_me = True
            self.record.local_close_code = code
            self.record.local_close_at = time.monotonic() - self.record.started
            self._cond.notify_all()
        payload = close_payload(code, reason)
        self.record.note("send close", f"code={code} {_short(reason)}")
        data = build_frame(OP_CLOSE, payload)
        if via_pending:
            self._pending += data
        else:
            with self._send_lock:
                self._flush()
                self._enqueue(data)

    def _finish_after_reply(self, reply: bytes | None) -> None:
        """Drop queued data, send ``reply`` (a close frame) if given, then close TCP."""
        with self._wcond:
            self.record.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
            self._wq.clear()
            if reply is not None:
                self._wq.append(("data", reply, 0.0))
            self._wq.append(("shutdown",))
            self._wcond.notify_all()

    def _set_closed(self) -> None:
        with self._cond:
            if self._state != _CLOSED:
                self._state = _CLOSED
                self._closed.set()
                self._cond.notify_all()

    def _shutdown_graceful(self) -> None:
        """Server closes TCP after the closing handshake: FIN after the queued octets."""
        rec = self.record
        with self._cond:
            if self._tcp_down:
                return
            self._tcp_down = True
            if rec.tcp_closed_by is None:
                rec.tcp_closed_by = "server"
                rec.tcp_closed_at = time.monotonic() - rec.started
        rec.note("tcp shutdown", "server closes its side")
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._set_closed()

    def _abort(self, by: str) -> None:
        """Drop the TCP connection now (both directions)."""
        rec = self.record
        with self._cond:
            first = not self._tcp_down
            self._tcp_down = True
            if rec.tcp_closed_by is None and rec.opened:
                rec.tcp_closed_by = by
                rec.tcp_closed_at = time.monotonic() - rec.started
        if first and rec.opened:
            rec.note("tcp abort", f"by {by}")
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._set_closed()
        with self._wcond:
            rec.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
            self._wq.clear()
            self._wcond.notify_all()

    # -- receiving --------------------------------------------------------------------

    def _event(self, ev: Event, detail: str = "") -> None:
        with self._cond:
            self.record.received.append(ev)
            self.record.received_at.append(time.monotonic() - self.record.started)
        self.record.note(f"recv {ev[0]}" if ev[0] != "timeout" else "timeout", detail)

    def _violation(self, what: str, code: int = PROTOCOL_ERROR) -> None:
        """The client broke the protocol: record it and fail the connection."""
        self.record.violations.append(what)
        self.record.note("VIOLATION", what)
        with self._cond:
            state = self._state
        if state == _OPEN:
            with self._send_lock:
                self._start_close(code, b"")
        # a violation while closing: just wait for the close / the timeout

    def _reader(self, leftover: bytes) -> None:
        sock = self._sock
        assert sock is not None
        buf = bytearray(leftover)
        msg_opcode: int | None = None
        msg_parts: list[bytes] = []
        msg_compressed = False
        client_closed = False
        try:
            while True:
                # parse as many complete frames as the buffer holds
                pos = 0
                while True:
                    parsed = _parse_frame(buf, pos)
                    if parsed is None:
                        break
                    fin, rsv, opcode, mask, payload, pos = parsed
                    if client_closed:
                        self.record.violations.append(
                            f"frame (opcode {opcode}) after the client's close frame"
                        )
                        continue
                    if self._closed.is_set() and self._tcp_down:
                        continue
                    if mask is None:
                        self._violation("unmasked frame from the client")
                    else:
                        payload = xor_mask(payload, mask)
                    if rsv:
                        if self._deflate is None:
                            self._violation(f"frame with RSV={rsv} (no extension negotiated)")
                        elif rsv != RSV1:
                            self._violation(f"frame with RSV={rsv} (permessage-deflate owns "
                                            "RSV1 only)")
                        elif opcode not in (OP_TEXT, OP_BINARY):
                            self._violation(f"RSV1 on a frame with opcode {opcode} (only the "
                                            "first frame of a data message may have it)")
                    if opcode >= 8:
                        if not fin:
                            self._violation(f"fragmented control frame (opcode {opcode})")
                        if len(payload) > 125:
                            self._violation(f"control frame payload of {len(payload)} octets")
                        if opcode == OP_PING:
                            self._event(("ping", payload), _short(payload))
                            with self._cond:
                                can_reply = self._state == _OPEN
                            if can_reply:
                                with self._send_lock:
                                    self._flush()
                                    self._enqueue(build_frame(OP_PONG, payload))
                            self._finish_when_done()
                        elif opcode == OP_PONG:
                            self._event(("pong", payload), _short(payload))
                            self._finish_when_done()
                        elif opcode == OP_CLOSE:
                            client_closed = True
                            self._on_close(payload)
                        else:
                            self._violation(f"reserved control opcode {opcode}")
                    elif opcode in (OP_TEXT, OP_BINARY):
                        if msg_opcode is not None:
                            self._violation("new data frame while a message is in progress")
                        msg_opcode, msg_parts = opcode, [payload]
                        msg_compressed = bool(rsv & RSV1) and self._deflate is not None
                    elif opcode == OP_CONT:
                        if msg_opcode is None:
                            self._violation("continuation frame without a message")
                        else:
                            msg_parts.append(payload)
                    else:
                        self._violation(f"reserved data opcode {opcode}")
                    if opcode in (OP_TEXT, OP_BINARY, OP_CONT) and fin and msg_opcode is not None:
                        data = msg_parts[0] if len(msg_parts) == 1 else b"".join(msg_parts)
                        is_binary = msg_opcode == OP_BINARY
                        msg_opcode, msg_parts = None, []
                        if self._deflate is not None:
                            inflated = self._inflate(data, msg_compressed)
                            if inflated is None:
                                continue
                            data = inflated
                        self._on_message(data, is_binary)
                if pos:
                    del buf[:pos]
                try:
                    chunk = sock.recv(1 << 18)
                except OSError as exc:
                    self.record.note("recv error", repr(exc))
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
        finally:
            rec = self.record
            with self._cond:
                if rec.tcp_closed_by is None:
                    rec.tcp_closed_by = "client"
                    rec.tcp_closed_at = time.monotonic() - rec.started
                    rec.note("tcp closed", "by the client")
                self._tcp_down = True
            self._set_closed()
            with self._wcond:
                rec.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
                self._wq.clear()
                self._wcond.notify_all()
            self._reader_done.set()

    def _inflate(self, data: bytes, compressed: bool) -> bytes | None:
        """A client message with permessage-deflate in use: inflate it if RSV1 was set
        (None after a violation)."""
        rec = self.record
        deflate = self._deflate
        assert deflate is not None
        rec.rx_wire_octets += len(data)
        if not compressed:
            rec.rx_uncompressed += 1
            rec.rx_octets += len(data)
            return data
        rec.rx_compressed += 1
        problem = deflate.check_window(data)
        if problem is None:
            try:
                data = deflate.inflate(data)
            except (zlib.error, ValueError) as exc:
                problem = f"compressed message does not inflate: {exc}"
        if problem is not None:
            self._violation(problem)
            return None
        rec.rx_octets += len(data)
        return data

    def _on_message(self, data: bytes, is_binary: bool) -> None:
        rec = self.record
        case = self.case
        if not is_binary:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self._violation("text message with invalid UTF-8 from the client", INVALID_PAYLOAD)
                return
        if case.echo is not None:
            self._event(("message", len(data), is_binary), f"{'binary' if is_binary else 'text'} "
                        f"{len(data)} octets")
            if rec.echo_ok is None:
                exp = case.echo
                if is_binary != exp.binary:
                    rec.echo_ok = False
                    rec.echo_result = f"expected a {'binary' if exp.binary else 'text'} message"
                elif len(data) != exp.length:
                    rec.echo_ok = False
                    rec.echo_result = f"expected {exp.length} octets, got {len(data)}"
                elif data != exp.expected_payload():
                    rec.echo_ok = False
                    rec.echo_result = "echoed payload differs from what was sent"
                else:
                    rec.echo_ok = True
                    rec.echo_result = f"received the echo of {len(data)} octets"
                self._start_close(NORMAL)
            return
        if case.roundtrip is not None:
            rt = case.roundtrip
            self._event(("message", len(data), is_binary), f"#{rec.roundtrips + 1}")
            expected = rt.payload(rec.roundtrips)
            if is_binary != rt.binary or data != expected:
                rec.echo_ok = False
                if is_binary != rt.binary:
                    what = f"is {'binary' if is_binary else 'text'}"
                elif len(data) != len(expected):
                    what = f"has {len(data)} octets instead of {len(expected)}"
                else:
                    what = "differs from what was sent"
                rec.echo_result = f"echo #{rec.roundtrips + 1} {what}"
                self._start_close(NORMAL)
                return
            rec.roundtrips += 1
            if rec.roundtrips < rt.count:
                with self._cond:
                    still_open = self._state == _OPEN
                if still_open:
                    with self._send_lock:
                        self._enqueue(self._message_frames(
                            rt.payload(rec.roundtrips), rt.binary, rt.fragment_size,
                            f"#{rec.roundtrips + 1}"))
            else:
                rec.echo_ok = True
                rec.echo_result = f"received all {rt.count} echoes"
                self._start_close(NORMAL)
            return
        self._event(("message", data, is_binary), _short(data))
        self._finish_when_done()

    def _finish_when_done(self) -> None:
        """Autobahn's ``Case.finishWhenDone``: once the observed events equal every expected
        list, the fuzzer starts the closing handshake (when it is supposed to)."""
        case = self.case
        with self._cond:
            received = list(self.record.received)
        if not case.expected or any(received != exp for exp in case.expected.values()):
            return
        if case.closed_by_me and not case.suppress_close:
            self._start_close(case.close_codes[0])

    def _on_close(self, payload: bytes) -> None:
        rec = self.record
        rec.client_close_payload = payload
        rec.client_close_at = time.monotonic() - rec.started
        code: int | None = None
        problem = None
        if len(payload) == 1:
            problem = "client close frame with a 1-octet payload"
        elif len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            try:
                rec.remote_close_reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                problem = "client close reason is not valid UTF-8"
            if code not in VALID_CLOSE_CODES:
                problem = f"client sent invalid close code {code}"
            elif problem is None:
                rec.remote_close_code = code
        rec.note("recv close", f"code={code} {_short(payload[2:])}")
        if problem:
            rec.violations.append(problem)
            rec.note("VIOLATION", problem)
        with self._cond:
            state = self._state
            if state == _OPEN:
                # the client starts the closing handshake: reply (echo the code) and close TCP
                rec.was_clean = problem is None
            elif state == _CLOSING:
                # the client's reply to our close
                rec.was_clean = problem is None
        if state == _OPEN:
            if problem:
                reply = build_frame(OP_CLOSE, close_payload(PROTOCOL_ERROR))
            else:
                reply = build_frame(OP_CLOSE, close_payload(code))
            with self._cond:
                self._state = _CLOSING  # no more steps; the writer closes TCP after the reply
                self._cond.notify_all()
            self._finish_after_reply(reply)
        elif state == _CLOSING:
            self._finish_after_reply(None)


def _parse_frame(
    buf: bytearray, pos: int
) -> tuple[bool, int, int, bytes | None, bytes, int] | None:
    """Parse one frame at ``buf[pos:]``: (fin, rsv, opcode, mask, payload, next_pos)."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    fin = bool(b0 & 0x80)
    rsv = (b0 >> 4) & 0x7
    opcode = b0 & 0xF
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    i = pos + 2
    if length == 126:
        if avail < 4:
            return None
        (length,) = struct.unpack_from("!H", buf, i)
        i += 2
    elif length == 127:
        if avail < 10:
            return None
        (length,) = struct.unpack_from("!Q", buf, i)
        i += 8
    mask = None
    if masked:
        if len(buf) < i + 4:
            return None
        mask = bytes(buf[i : i + 4])
        i += 4
    if len(buf) < i + length:
        return None
    payload = bytes(buf[i : i + length])
    return fin, rsv, opcode, mask, payload, i + length


# --------------------------------------------------------------------------------------
# Judging


@dataclass
class Verdict:
    verdict: str  # OK / NON-STRICT / FAILED / INFORMATIONAL / UNIMPLEMENTED
    behavior: str
    behavior_close: str
    reasons: list[str]
    record: Record

    def __str__(self) -> str:
        return f"{self.verdict} (behavior {self.behavior}, close {self.behavior_close})"

    def explain(self, case: Case) -> str:
        rec = self.record
        lines = [
            f"case {case.id}: {case.description}",
            f"expectation: {case.expectation}",
            f"verdict: {self}",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        if case.expected:
            for name, exp in case.expected.items():
                lines.append(f"expected {name}: {events_repr(exp)}")
        lines.append(f"observed: {events_repr(rec.received)}")
        lines.append(
            f"closed_by_me={rec.closed_by_me} (expected {case.closed_by_me}), "
            f"was_clean={rec.was_clean}, client close code={rec.remote_close_code} "
            f"payload={rec.client_close_payload!r:.60}, tcp closed by {rec.tcp_closed_by}"
        )
        lines.append(
            f"client close at {rec.client_close_at}s, steps done at {rec.steps_done_at}s, "
            f"all steps played: {rec.steps_completed}, writes discarded: {rec.discarded_writes}"
        )
        if rec.extensions_offered is not None or case.deflate is not None:
            lines.append(f"extensions offered: {rec.extensions_offered!r}, answered: "
                         f"{rec.extensions_response!r}")
        if rec.deflate is not None:
            lines.append(
                f"deflate {rec.deflate}: sent {rec.tx_compressed} compressed messages "
                f"({rec.tx_octets} -> {rec.tx_wire_octets} octets); received "
                f"{rec.rx_compressed} compressed + {rec.rx_uncompressed} plain messages "
                f"({rec.rx_wire_octets} octets on the wire, {rec.rx_octets} inflated); "
                f"{rec.roundtrips} round trips"
            )
        lines.append("timeline:\n" + rec.format_timeline())
        return "\n".join(lines)


def judge(case: Case, rec: Record) -> Verdict:
    """Rate a run like Autobahn (see the module docstring for the folding into one verdict)."""
    reasons: list[str] = []
    if not rec.opened:
        reasons.append(f"WebSocket connection never opened: {rec.handshake_error}")
        return Verdict(FAILED, FAILED, FAILED, reasons, rec)

    # behaviour: the observed events against the expected lists
    behavior = FAILED
    if rec.unimplemented:
        behavior = UNIMPLEMENTED
        reasons.append("permessage-deflate was not negotiated: "
                       f"offer {rec.extensions_offered!r}")
    elif case.echo is not None or case.roundtrip is not None:
        if rec.echo_ok:
            behavior = OK
        elif rec.echo_result:
            reasons.append(rec.echo_result)
        elif case.roundtrip is not None:
            reasons.append(f"received {rec.roundtrips} of {case.roundtrip.count} echoes "
                           "before the connection ended")
        else:
            reasons.append("no echo before the connection ended")
    else:
        for name, exp in case.expected.items():
            if rec.received == exp:
                behavior = name
                break
        if behavior == FAILED:
            reasons.append("observed events differ from every expected list")
        elif behavior == NON_STRICT:
            reasons.append("observed events match the NON-STRICT list only")

    # closing behaviour (Autobahn's order of checks)
    if rec.closed_by_me != case.closed_by_me:
        behavior_close = FAILED
        reasons.append(
            "the connection was failed by the wrong endpoint: "
            + ("the fuzzer had to close it" if rec.closed_by_me else "the client closed it")
        )
    elif case.require_clean and not rec.was_clean:
        behavior_close = UNCLEAN
        reasons.append("the closing handshake did not complete (close frames both ways)")
    elif rec.remote_close_code is not None and rec.remote_close_code not in case.close_codes:
        behavior_close = WRONG_CODE
        reasons.append(
            f"client close code {rec.remote_close_code}, expected one of {case.close_codes} "
            "or none"
        )
    else:
        behavior_close = OK

    if case.closed_by_wrong_endpoint_is_fatal and rec.closed_by_me != case.closed_by_me:
        behavior = FAILED
    if case.wrong_code_is_fatal and behavior_close == WRONG_CODE:
        behavior = FAILED
    if case.check is not None:
        problem = case.check(rec)
        if problem:
            behavior = FAILED
            reasons.append(problem)
    if rec.violations:
        behavior = FAILED
        reasons += [f"client protocol violation: {v}" for v in rec.violations]
    if rec.timed_out:
        reasons.append(f"case hit its time limit of {case.time_limit}s")
        behavior = FAILED

    if case.informational:
        verdict = FAILED if rec.violations or rec.timed_out else INFORMATIONAL
    elif behavior == UNIMPLEMENTED and behavior_close == OK:
        verdict = UNIMPLEMENTED
    elif behavior == FAILED or behavior_close in (FAILED, UNCLEAN):
        verdict = FAILED
    elif behavior == NON_STRICT or behavior_close == WRONG_CODE:
        verdict = NON_STRICT
    else:
        verdict = OK
    return Verdict(verdict, behavior, behavior_close, reasons, rec)


def run_case(
    case: Case,
    start_client: Callable[[str], Any],
    extra_wait: float = 5.0,
) -> Verdict:
    """Serve ``case``, call ``start_client(url)`` (must not block), wait, judge."""
    with FuzzServer(case) as server:
        start_client(server.url)
        server.wait(case.time_limit + extra_wait)
    return judge(case, server.record)
