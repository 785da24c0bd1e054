"""The fuzz targets: one function per parser, ``target(data: bytes) -> None``.

Each target turns the fuzzer's bytes into calls on one part of blockws and
checks the rules every input must keep. A rule broken raises an exception
that is not in :data:`ALLOWED` (an ``AssertionError`` for a broken oracle):
that is a finding. The rules:

* **Exceptions.** Only the documented ones come out: :class:`ProtocolError`
  and its subclasses from the frame parsers (or none at all where the
  streaming parser turns them into a ``Failure`` event), the
  :class:`HandshakeError` family from the HTTP/1.1 reader and the
  negotiation, ``ValueError`` from :func:`parse_extension_header` (its
  docstring says so), and nothing at all escaping the HTTP/2 reader's
  catch-all (which would log "reader failed").
* **Split invariance.** Bytes fed in one call or cut into pieces (where the
  fuzzer chooses the cuts) give the same events, the same bytes to send and
  the same failure. A reader must not depend on how TCP cut the stream.
* **Pure and C agree.** The pure-Python masking and the C speedup give the
  same bytes, and the server role's parser gives the same events with each.
* **Memory.** No delivered message is over ``max_message_size`` (set small
  here so it trips), and inflation never returns more than its limit.
  The fuzzer's RSS limit (``-rss_limit_mb``) bounds the rest.

Nothing here is imported by blockws; ``python -m benchmarks.fuzz`` runs them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Callable

from blockws import deflate as deflate_mod
from blockws import frames as frames_mod
from blockws import protocol as protocol_mod
from blockws.deflate import PerMessageDeflate
from blockws.exceptions import (
    HandshakeError,
    MessageTooBig,
    NegotiationError,
    ProtocolError,
)
from blockws.extensions import Extension, parse_extension_header
from blockws.frames import Frame, Opcode, parse_close, parse_header, py_apply_mask
from blockws.handshake import (
    Headers,
    ResponseReader,
    accept_key,
    negotiate,
    validate_response,
)
from blockws.protocol import (
    BinaryMessage,
    CloseReceived,
    Failure,
    Ping,
    Pong,
    Protocol,
    Role,
    TextMessage,
)

from .h2 import http2_seeds, target_http2
from .inputs import Input, pieces, ws_frames

__all__ = ["TARGETS", "Input", "seeds"]


# -- frames.py: the header parser, Frame.parse, masking, close payloads ----------------


def target_frames(data: bytes) -> None:
    """The one header parser and the whole-buffer parser, in each MASK mode; pure and C
    masking; close payloads; serialize/parse round trips."""
    inp = Input(data)
    masked = (None, True, False)[inp.int(3)]
    allowed = inp.int(8) << 4
    rest = inp.rest()
    for pos in range(min(len(rest), 3)):
        try:
            header = parse_header(rest, pos, allowed_rsv=allowed, masked=masked)
        except ProtocolError:
            continue
        if header is None:
            continue
        assert header.end <= len(rest) and header.end - pos >= 2
        assert header.length >= 0 and header.length < 1 << 63
        assert header.rsv & ~allowed == 0
        assert masked is None or (header.mask_key is not None) == masked
        if header.opcode >= 8:
            assert header.fin and header.length <= 125 and not header.rsv
    try:
        parsed = Frame.parse(rest, masked=masked)
    except ProtocolError:
        parsed = None
    if parsed is not None:
        frame, used = parsed
        assert used <= len(rest)
        key = rest[used - len(frame.payload) - 4 : used - len(frame.payload)]
        again = frame.serialize(key if rest[1] & 0x80 else None)
        # Lengths may be encoded non-minimally on the wire; the re-encoding is minimal.
        assert Frame.parse(again, masked=masked) == (frame, len(again))
        if frame.opcode == Opcode.CLOSE:
            try:
                code, reason = parse_close(frame.payload)
            except ProtocolError:
                pass
            else:
                assert code == 1005 or frames_mod.is_valid_close_code(code)
                assert isinstance(reason, str)
    # Masking: pure and C agree, and masking twice gives the data back.
    key = (rest[:4] + b"\x00\x00\x00\x00")[:4]
    body = rest[4:]
    pure = py_apply_mask(body, key)
    assert py_apply_mask(pure, key) == body
    if frames_mod.c_apply_mask is not None:
        assert frames_mod.c_apply_mask(body, key) == pure
        assert frames_mod.c_apply_mask(memoryview(body), key) == pure
        assert frames_mod.c_apply_mask(bytearray(body), key) == pure


# -- protocol.py: the streaming parser in every reporting mode ---------------------------


class _CountingPool:
    """An ``allocate``/``release`` pair that checks releases are of its own buffers."""

    def __init__(self) -> None:
        self.out: set[int] = set()

    def allocate(self, size: int) -> bytearray:
        buf = bytearray(size + (size & 7))  # sometimes larger, as a pool's are
        self.out.add(id(buf))
        return buf

    def release(self, buf: bytearray) -> None:
        assert id(buf) in self.out, "release() of a buffer allocate() never gave"
        self.out.discard(id(buf))


def _fixed_keys() -> Callable[[], bytes]:
    keys = iter(range(1 << 30))
    return lambda: next(keys).to_bytes(4, "big")


def _deflate(params: int) -> PerMessageDeflate:
    ext = PerMessageDeflate(min_size=0)
    answer: list[tuple[str, str | None]] = []
    if params & 1:
        answer.append(("server_no_context_takeover", None))
    if params & 2:
        answer.append(("server_max_window_bits", str(8 + (params >> 2) % 8)))
    ext.accept(answer)
    return ext


def _normalize(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, str):
            out.append(("text", event))
        elif isinstance(event, bytes):
            out.append(("binary", event))
        elif isinstance(event, TextMessage):
            out.append(("text", event.text))
        elif isinstance(event, BinaryMessage):
            out.append(("binary", bytes(event)))
        elif isinstance(event, Ping):
            out.append(("ping", event.payload))
        elif isinstance(event, Pong):
            out.append(("pong", event.payload))
        elif isinstance(event, CloseReceived):
            out.append(("close", event.code, event.reason))
        elif isinstance(event, Failure):
            # Which error a message that is bad in two ways reports first (bad deflate
            # data that also inflates to bad UTF-8) depends on where the bytes were cut:
            # checks run as early as the bytes allow. That it fails, and where, may not.
            out.append(("failure",))
        else:
            raise AssertionError(f"unknown event {event!r}")
    return out


_MAX_MESSAGE = 4096


def _run_protocol(
    mode: int,
    pieces: Iterator[bytes],
    mask: Callable[..., bytes],
    general: bool = False,
    c_inflate: bool = True,
    cont_run: bool = True,
    into: bool = False,
    bytes_buffer: bool = True,
) -> tuple[list[tuple[Any, ...]], list[bytes], Any]:
    server = bool(mode & 1)
    pool = _CountingPool()
    exts: list[Extension] = [_deflate(mode >> 5)] if mode & 16 else []
    saved = protocol_mod.apply_mask
    saved_inflate = deflate_mod._inflate_run
    protocol_mod.apply_mask = mask
    saved_into = protocol_mod._INTO_FROM, protocol_mod._SCATTER_FROM
    if into:
        # Reads into targets and scattered over guessed frames, for frames small
        # enough to fit under _MAX_MESSAGE.
        protocol_mod._INTO_FROM, protocol_mod._SCATTER_FROM = 64, 16
    if not c_inflate:
        deflate_mod._inflate_run = None  # the fast path's pure loop: decode() per message
    saved_bytes_buffer = frames_mod.bytes_buffer
    if not bytes_buffer:
        frames_mod.bytes_buffer = None  # bytes messages as pieces, joined at their end
    copied = protocol_mod.copied_out
    try:
        proto = Protocol(
            Role.SERVER if server else Role.CLIENT,
            max_message_size=_MAX_MESSAGE,
            extensions=exts,
            allocate=pool.allocate if mode & 8 else None,
            release=pool.release if mode & 8 else None,
            mask_keys=_fixed_keys(),
            auto_close_reply=not mode & 128,
        )
        proto.compact_messages = bool(mode & 2)
        proto.binary_as_bytes = bool(mode & 4)
        if general:
            proto._whole_decode = None  # no fast path for compressed messages
        if not cont_run:
            proto._cont_run = False  # no fast run of continuation frames
        events: list[Any] = []
        sent: list[bytes] = []
        for piece in pieces:
            # Nothing escapes receive_data: a protocol error becomes a Failure event.
            while into and piece and (target := proto.payload_target(True)) is not None:
                # A read into the target (the piece's first bytes, as much as it holds).
                views = target if isinstance(target, list) else [target]
                n = at = 0
                for view in views:
                    take = min(len(view), len(piece) - at)
                    view[:take] = piece[at : at + take]
                    at += take
                    n += take
                del target, views, view  # (gone when a transport's read returns)
                events.extend(proto.payload_received(n))
                sent.extend(proto.data_to_send())
                piece = piece[n:]
            got = proto.receive_data(piece)
            events.extend(got)
            sent.extend(proto.data_to_send())
    finally:
        protocol_mod._INTO_FROM, protocol_mod._SCATTER_FROM = saved_into
        protocol_mod.apply_mask = saved
        deflate_mod._inflate_run = saved_inflate
        frames_mod.bytes_buffer = saved_bytes_buffer
    # A bytes message is handed out as the bytes it was assembled in, never
    # copied out of it (a view of it left alive).
    assert protocol_mod.copied_out == copied, "a bytes message was copied out of its buffer"
    for event in events:
        size = 0
        if isinstance(event, (str, bytes)):
            size = len(event.encode() if isinstance(event, str) else event)
        elif isinstance(event, TextMessage):
            size = len(event.text.encode("utf-8", "surrogatepass"))
        elif isinstance(event, BinaryMessage):
            size = event.length
            assert len(event.data) >= event.length
        assert size <= _MAX_MESSAGE, f"a message of {size} bytes passed max_message_size"
    failures = [e for e in events if isinstance(e, Failure)]
    assert len(failures) <= 1 and (not failures or events[-1] is failures[0])
    if failures and sent and sent[-1][0] == 0x88:
        # The close frame of the failure carries its code (see _normalize): check it
        # here, leave it out of the comparison.
        code = failures[0].error.close_code
        assert Frame.parse(sent[-1])[0].payload[:2] in (  # type: ignore[index]
            code.to_bytes(2, "big"),
            py_apply_mask(code.to_bytes(2, "big"), sent[-1][2:6]),
        ), (sent[-1], code)
        sent = sent[:-1]
    return _normalize(events), sent, proto.state


def target_protocol(data: bytes) -> None:
    """Protocol.receive_data: client and server roles, compact or event reporting,
    bytes or pooled binary, with and without permessage-deflate, automatic close reply
    or not; the same bytes whole and cut into pieces, with pure and C masking, and a
    deflate client's with and without the fast path for compressed messages, and on
    its C loop and its pure one, and a client's with and without the run of a
    fragmented binary message's continuation frames, and with reads into the
    message's buffer (``payload_target``, scattered too) wherever it offers one,
    and a client's bytes messages assembled in their bytes (``BytesBuffer``)
    and as pieces joined at their end."""
    inp = Input(data)
    mode = inp.byte()
    stream = inp.rest()
    cuts = Input(stream[-8:]).cuts(len(stream))
    whole = _run_protocol(mode, iter([stream]), py_apply_mask)
    cut = _run_protocol(mode, pieces(stream, cuts), py_apply_mask)
    assert whole == cut, f"cut at {cuts}: {whole} != {cut}"
    if frames_mod.c_apply_mask is not None and mode & 1:
        fast = _run_protocol(mode, pieces(stream, cuts), frames_mod.c_apply_mask)
        assert fast == whole, "C and pure masking disagree"
    if not mode & 1:  # a client: the run of continuation frames against the general path
        general = _run_protocol(mode, pieces(stream, cuts), py_apply_mask, cont_run=False)
        assert general == cut, "the continuation-frame run and the general path disagree"
        # ... and reads straight into a message's buffer, scattered over guessed frames.
        read_into = _run_protocol(mode, pieces(stream, cuts), py_apply_mask, into=True)
        assert read_into == cut, "reads into targets and receive_data disagree"
        if mode & 4 and frames_mod.bytes_buffer is not None:
            # bytes messages assembled in their bytes (C) or joined from pieces
            joined = _run_protocol(mode, pieces(stream, cuts), py_apply_mask, bytes_buffer=False)
            assert joined == cut, "bytes buffers and joined pieces disagree"
    if mode & 16 and not mode & 1:  # a client with permessage-deflate
        general = _run_protocol(mode, pieces(stream, cuts), py_apply_mask, general=True)
        assert general == cut, "the compressed-message fast path and the general path disagree"
        if deflate_mod._inflate_run is not None:
            pure = _run_protocol(mode, pieces(stream, cuts), py_apply_mask, c_inflate=False)
            assert pure == cut, "the C and pure-Python loops for compressed messages disagree"


# -- handshake.py: the HTTP/1.1 response reader and its validation ---------------------


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_ACCEPT = accept_key(_KEY)


def _read_response(pieces: list[bytes], limit: int) -> tuple[Any, ...]:
    reader = ResponseReader(limit)
    try:
        response = None
        used = 0
        while response is None and used < len(pieces):
            response = reader.feed(pieces[used])
            used += 1
        if response is None:
            return ("incomplete",)
        # What follows the head goes on to the WebSocket, in later reads too.
        extra = response.extra + b"".join(pieces[used:])
        head = (response.status, response.reason, response.headers.raw_items(), extra)
        try:
            protocol, accepted = validate_response(
                response, _KEY, ["chat", "superchat"], [PerMessageDeflate()]
            )
        except HandshakeError as exc:
            return ("invalid", head, type(exc))
        return ("ok", head, protocol, [e.name for e in accepted])
    except HandshakeError as exc:
        return ("error", type(exc))


def target_handshake(data: bytes) -> None:
    """ResponseReader.feed and validate_response: only HandshakeError subclasses, and
    the same outcome whole and cut into pieces."""
    inp = Input(data)
    limit = 64 + inp.int(2048)
    body = inp.rest().replace(b"@ACCEPT@", _ACCEPT.encode())
    whole = _read_response([body], limit)
    cut = _read_response(list(pieces(body, Input(body[-8:]).cuts(len(body)))), limit)
    assert cut == whole, (whole, cut)


# -- extensions.py and deflate.py: negotiation -------------------------------------------


def target_extensions(data: bytes) -> None:
    """parse_extension_header, negotiate() and PerMessageDeflate.accept on any answer."""
    inp = Input(data)
    config, server_bits, client_choice, client_bits = inp.bytes(4).ljust(4, b"\0")
    offered_server = 8 + server_bits % 8 if config & 1 else None
    offered_client: int | bool = (True, False, 8 + client_bits % 8)[client_choice % 3]
    deflate = PerMessageDeflate(
        server_no_context_takeover=bool(config & 2),
        client_no_context_takeover=bool(config & 4),
        server_max_window_bits=offered_server,
        client_max_window_bits=offered_client,
    )
    text = inp.rest().decode("latin-1")
    try:
        items = parse_extension_header(text)
    except ValueError:
        items = None
    else:
        for name, params in items:
            assert name and name == name.strip()
            assert all(key for key, _ in params)
    headers = Headers()
    for line in text.split("\n"):
        try:
            headers.add("Sec-WebSocket-Extensions", line)
        except ValueError:
            pass
    try:
        _, accepted = negotiate(headers, [], [deflate])
    except NegotiationError:
        return
    for ext in accepted:
        assert ext is deflate
        agreed = deflate.agreed
        assert agreed is not None
        server_bits = agreed["server_max_window_bits"]
        client_bits = agreed["client_max_window_bits"]
        if server_bits is not None:
            assert 8 <= server_bits <= 15
            assert offered_server is None or server_bits <= offered_server
        if client_bits is not None:
            assert offered_client is not False and 8 <= client_bits <= 15
            assert offered_client is True or client_bits <= offered_client
        if deflate.client_no_context_takeover:
            assert agreed["client_no_context_takeover"]
        # What was agreed works: a message goes through and back.
        message = text.encode("utf-8", "surrogatepass")[:512] * 3
        payload, rsv = deflate.encode(Opcode.TEXT, message)
        assert deflate.begin_message(Opcode.TEXT, rsv) == bool(rsv)
        if rsv:
            peer = zlib.decompressobj(-max(client_bits or 15, 9))
            assert peer.decompress(payload + b"\x00\x00\xff\xff") == message


# -- deflate.py: inflation ------------------------------------------------------------------


def target_inflate(data: bytes) -> None:
    """PerMessageDeflate.decode on arbitrary and on real compressed data, cut into
    chunks, with a small limit: output never over the limit, real data round-trips."""
    inp = Input(data)
    mode = inp.byte()
    limit = 1 + inp.int(8192)
    ext = _deflate(mode)
    agreed = ext.agreed or {}
    body = inp.rest()
    real = bool(mode & 64)  # the fuzzer's bytes compressed as a server would
    bits = max(agreed.get("server_max_window_bits") or 15, 9)
    comp = zlib.compressobj(1 + (mode >> 7) * 5, zlib.DEFLATED, -bits)
    for _ in range(2):  # a second message exercises context takeover
        if real:
            if agreed.get("server_no_context_takeover"):
                comp = zlib.compressobj(1 + (mode >> 7) * 5, zlib.DEFLATED, -bits)
            stream = comp.compress(body) + comp.flush(zlib.Z_SYNC_FLUSH)
            assert stream.endswith(b"\x00\x00\xff\xff")
            stream = stream[:-4]
        else:
            stream = body
        chunks = list(pieces(stream, Input(body[-8:]).cuts(len(stream))))
        out = bytearray()
        assert ext.begin_message(Opcode.BINARY, frames_mod.RSV1)
        try:
            for i, chunk in enumerate(chunks):
                room = limit - len(out)
                got = ext.decode(chunk, i == len(chunks) - 1, room)
                assert len(got) <= room, f"decode returned {len(got)} bytes past a limit of {room}"
                out += got
        except MessageTooBig:
            assert not real or len(body) > limit, "1009 for a message within the limit"
            return
        except ProtocolError:
            assert not real, "real deflate data refused"
            return
        if real:
            assert out == body, "inflated data differs"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": target_frames,
    "protocol": target_protocol,
    "handshake": target_handshake,
    "extensions": target_extensions,
    "inflate": target_inflate,
    "http2": target_http2,
}


# -- seeds: valid inputs the fuzzer starts from ----------------------------------------------


def seeds(target: str) -> list[bytes]:
    """A few valid inputs per target, in the form the target reads."""
    if target in ("frames", "protocol"):
        out = []
        for mode in (0, 1, 2, 3, 4, 6, 8, 16, 17, 18, 20, 24):
            frames = ws_frames(bool(mode & 1))
            out.append(bytes([mode]) + b"".join(frames))
            out.extend(bytes([mode]) + f for f in frames)
        return out
    if target == "handshake":
        ok = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: @ACCEPT@\r\nSec-WebSocket-Protocol: chat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12; "
            b"client_max_window_bits=12\r\n\r\n\x81\x02hi"
        )
        # Two bytes of limit first: 64 + 0x07ff % 2048 = 2111, and 64 + 0x0040 = 128.
        return [b"\x07\xff" + ok, b"\x00\x40" + ok,
                b"\x07\xffHTTP/1.1 404 Not Found\r\nX: y\r\n\r\nbody"]
    if target == "extensions":
        # config, server bits, client choice (True, False, bits), client bits; the answer.
        return [
            b"\x00\x00\x00\x00permessage-deflate",
            b"\x01\x04\x02\x03permessage-deflate; server_max_window_bits=10; "
            b"client_max_window_bits=9",
            b"\x06\x00\x00\x00permessage-deflate; server_no_context_takeover; "
            b"client_no_context_takeover",
            b"\x00\x00\x00\x00x-other, permessage-deflate; client_max_window_bits=\"15\"",
            b"\x00\x00\x02\x00permessage-deflate; client_max_window_bits=8",
        ]
    if target == "inflate":
        # mode (0x40: real data), two bytes of limit (1 + 0x1000 = 4097), the data.
        return [b"\x40\x10\x00" + b"hello " * 50, b"\x43\x10\x00" + bytes(range(256)),
                b"\xc2\x00\x80" + b"hello " * 50, b"\x00\x10\x00" + ws_frames(False)[4][2:]]
    if target == "http2":
        return http2_seeds()
    raise KeyError(target)
