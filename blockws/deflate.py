"""permessage-deflate (RFC 7692): compression on the extension seam.

:class:`PerMessageDeflate` is offered by default. It compresses on the writer
thread and inflates on the reader thread, so ``send()`` stays non-blocking.

Negotiation follows RFC 7692 section 7.1. The client offers
``client_max_window_bits`` (without a value: "I can honour any limit you
set") and whatever else it was configured with; the server's answer is
checked strictly: each parameter at most once, no unknown parameters, window
bits 8-15 written as plain decimals, ``client_max_window_bits`` only if it was
offered and never above the offered value, ``server_max_window_bits`` never
above an offered value. A server may add ``server_no_context_takeover`` or
``client_no_context_takeover`` unasked, and the client then complies. A bad
answer raises :class:`~blockws.exceptions.NegotiationError`, which ends the
socket before it opens.

zlib cannot compress raw deflate with an 8-bit window (it silently uses 9).
When the server limits the client to 8 bits, blockws compresses with
``Z_HUFFMAN_ONLY``: Huffman coding with no back-references at all, which any
window size can decode, so the limit is honoured exactly. For inflating, a
9-bit window decodes anything an 8-bit compressor produced.

Memory, per socket, at the defaults (``compress_window_bits=12``,
``mem_level=5``): zlib's deflate state is about ``2**(wbits+2) + 2**(mem_level
+ 9)`` = 16 KiB + 16 KiB plus fixed state, and the inflate state holds the
server's window (up to 32 KiB). Measured with ``tracemalloc`` after a message
each way: **46 KiB per socket**, against 269 KiB at zlib's defaults (15 bits,
memLevel 8). These defaults were chosen for games and many-socket scripts:
small messages rarely reach back further than 4 KiB, so the smaller window
costs little ratio, and level 1 costs about half the CPU of level 6 for a few
per cent larger output on JSON. Incoming data is inflated with
``max_length``, step by step, so a
"zip bomb" stops at ``max_message_size`` (failing with 1009) instead of
growing memory by its inflated size.
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any, Callable

from .exceptions import InvalidPayload, MessageTooBig, NegotiationError, ProtocolError
from .extensions import Extension, ExtensionParams
from .frames import RSV1

__all__ = ["PerMessageDeflate"]

_TAIL = b"\x00\x00\xff\xff"
#: The last piece of a message is inflated together with the tail, in one call,
#: up to this size (joining copies the piece; beyond it, two calls cost less).
_JOIN_TAIL = 8192
#: The C loop for runs of whole compressed messages (blockws._speedups.
#: inflate_run; see PerMessageDeflate.decode_run), or None: without the C
#: speedups, or with ``BLOCKWS_PURE_PYTHON`` set, the parser decodes each
#: message with decode(), the reference. Looked up per call, so that tests can
#: run either.
_inflate_run: (
    Callable[
        [
            bytes,
            int,
            Any,
            int,
            int,
            int,
            int,
            list[Any],
            Callable[[str], Any] | None,
            Callable[[bytes, int], Any] | None,
            int,
        ],
        tuple[int, int, int, Any],
    ]
    | None
)
try:
    from ._speedups import inflate_run as _inflate_run
except ImportError:  # pragma: no cover - the C speedups are not built
    _inflate_run = None
if os.environ.get("BLOCKWS_PURE_PYTHON"):
    _inflate_run = None
_SYNC_FLUSH = zlib.Z_SYNC_FLUSH
_FULL_FLUSH = zlib.Z_FULL_FLUSH
_BITS = re.compile(r"[1-9][0-9]?\Z")
_PARAMS = (
    "server_no_context_takeover",
    "client_no_context_takeover",
    "server_max_window_bits",
    "client_max_window_bits",
)


def _check_bits(name: str, value: int | None) -> None:
    if value is not None and not 8 <= value <= 15:
        raise ValueError(f"{name} must be between 8 and 15, not {value}")


class PerMessageDeflate(Extension):
    """The permessage-deflate extension (RFC 7692), with its negotiation.

    Offer parameters (what the client asks of the server):

    * ``server_no_context_takeover`` -- ask the server to reset its
      compressor after each message (saves the server memory; costs ratio).
    * ``client_no_context_takeover`` -- announce that the client resets its
      own compressor after each message (saves nothing here; the server may
      impose it anyway).
    * ``server_max_window_bits`` -- ask the server to use at most this window
      (8-15); ``None`` leaves it to the server.
    * ``client_max_window_bits`` -- ``True`` (default) offers the parameter
      without a value, so the server may limit the client's window; an int
      (8-15) also tells the server the client will not exceed it; ``False``
      leaves it out (then the server cannot set it).

    Local settings: ``compress_level`` (zlib level 0-9, default 1),
    ``compress_window_bits`` (9-15, default 12; the negotiated limit lowers
    it further), ``mem_level`` (1-9, default 5), and ``min_size``: messages
    smaller than this many bytes are sent uncompressed, RSV1 clear (default
    128; 0 compresses everything).
    """

    name = "permessage-deflate"
    rsv_bits = RSV1
    claims_by_rsv = True

    def __init__(
        self,
        *,
        server_no_context_takeover: bool = False,
        client_no_context_takeover: bool = False,
        server_max_window_bits: int | None = None,
        client_max_window_bits: int | bool = True,
        compress_level: int = 1,
        compress_window_bits: int = 12,
        mem_level: int = 5,
        min_size: int = 128,
    ) -> None:
        _check_bits("server_max_window_bits", server_max_window_bits)
        if not isinstance(client_max_window_bits, bool):
            _check_bits("client_max_window_bits", client_max_window_bits)
        if not 9 <= compress_window_bits <= 15:
            raise ValueError("compress_window_bits must be between 9 and 15")
        if not 0 <= compress_level <= 9:
            raise ValueError("compress_level must be between 0 and 9")
        if not 1 <= mem_level <= 9:
            raise ValueError("mem_level must be between 1 and 9")
        if min_size < 0:
            raise ValueError("min_size must be >= 0")
        self.server_no_context_takeover = server_no_context_takeover
        self.client_no_context_takeover = client_no_context_takeover
        self.server_max_window_bits = server_max_window_bits
        self.client_max_window_bits = client_max_window_bits
        self.compress_level = compress_level
        self.compress_window_bits = compress_window_bits
        self.mem_level = mem_level
        self.min_size = min_size
        self._reset_state()

    def _reset_state(self) -> None:
        #: What the server's answer settled (``None`` before ``accept``).
        self.agreed: dict[str, Any] | None = None
        self._compressor: Any = None
        self._decompressor: Any = None
        self._send_takeover = True
        self._recv_takeover = True
        self._send_bits = self.compress_window_bits
        self._huffman_only = False
        self._recv_bits = 15
        self._inflating = False

    def fresh(self) -> PerMessageDeflate:
        cls = type(self)
        clone = cls.__new__(cls)
        clone.__dict__.update(self.__dict__)
        clone._reset_state()
        return clone

    def __repr__(self) -> str:
        agreed = f" agreed={self.agreed}" if self.agreed is not None else ""
        return f"<PerMessageDeflate level={self.compress_level} min_size={self.min_size}{agreed}>"

    # -- negotiation (RFC 7692 section 7.1) -----------------------------------------

    def offer(self) -> str:
        parts = [self.name]
        if self.server_no_context_takeover:
            parts.append("server_no_context_takeover")
        if self.client_no_context_takeover:
            parts.append("client_no_context_takeover")
        if self.server_max_window_bits is not None:
            parts.append(f"server_max_window_bits={self.server_max_window_bits}")
        if self.client_max_window_bits is True:
            parts.append("client_max_window_bits")
        elif self.client_max_window_bits is not False:
            parts.append(f"client_max_window_bits={self.client_max_window_bits}")
        return "; ".join(parts)

    def accept(self, params: ExtensionParams) -> None:
        seen: dict[str, str | None] = {}
        for name, value in params:
            if name not in _PARAMS:
                raise NegotiationError(f"permessage-deflate: unknown parameter {name!r}")
            if name in seen:
                raise NegotiationError(f"permessage-deflate: parameter {name!r} repeated")
            seen[name] = value
        for flag in ("server_no_context_takeover", "client_no_context_takeover"):
            if flag in seen and seen[flag] is not None:
                raise NegotiationError(f"permessage-deflate: {flag} takes no value")

        server_bits = self._bits(seen, "server_max_window_bits")
        if server_bits is not None and self.server_max_window_bits is not None:
            if server_bits > self.server_max_window_bits:
                raise NegotiationError(
                    f"permessage-deflate: server_max_window_bits={server_bits} exceeds "
                    f"the {self.server_max_window_bits} offered"
                )
        if "client_max_window_bits" in seen and self.client_max_window_bits is False:
            raise NegotiationError(
                "permessage-deflate: client_max_window_bits in the answer, but not offered"
            )
        client_bits = self._bits(seen, "client_max_window_bits")
        if client_bits is not None:
            offered = self.client_max_window_bits
            if offered is not True and client_bits > offered:
                raise NegotiationError(
                    f"permessage-deflate: client_max_window_bits={client_bits} exceeds "
                    f"the {offered} offered"
                )

        # Offering client_no_context_takeover is a promise (RFC 7692 7.1.1.2): keep it
        # even if the server's answer leaves the parameter out.
        self._send_takeover = not (
            self.client_no_context_takeover or "client_no_context_takeover" in seen
        )
        self._recv_takeover = "server_no_context_takeover" not in seen
        limit = client_bits
        if limit is None and not isinstance(self.client_max_window_bits, bool):
            limit = self.client_max_window_bits  # we promised not to exceed it
        bits = self.compress_window_bits if limit is None else min(limit, self.compress_window_bits)
        self._huffman_only = bits < 9  # see the module docstring
        self._send_bits = max(bits, 9)
        # A window of 9 bits decodes a stream made with 8 (zlib needs >= 9 raw).
        self._recv_bits = max(server_bits or 15, 9)
        self.agreed = {
            "server_no_context_takeover": not self._recv_takeover,
            "client_no_context_takeover": not self._send_takeover,
            "server_max_window_bits": server_bits,
            "client_max_window_bits": client_bits,
        }

    @staticmethod
    def _bits(seen: dict[str, str | None], name: str) -> int | None:
        if name not in seen:
            return None
        text = seen[name]
        if text is None:
            # Only an offer's client_max_window_bits may go without a value.
            raise NegotiationError(f"permessage-deflate: {name} in the answer needs a value")
        if not _BITS.match(text) or not 8 <= int(text) <= 15:
            raise NegotiationError(f"permessage-deflate: invalid {name}={text!r} (8-15)")
        return int(text)

    # -- frame path ---------------------------------------------------------------

    def encode(self, opcode: int, payload: bytes) -> tuple[bytes, int]:
        """Compress one message on the writer thread (RFC 7692 section 7.2.1)."""
        if len(payload) < self.min_size:
            return payload, 0
        comp = self._compressor
        if comp is None:
            comp = self._compressor = zlib.compressobj(
                self.compress_level,
                zlib.DEFLATED,
                -self._send_bits,
                self.mem_level,
                zlib.Z_HUFFMAN_ONLY if self._huffman_only else zlib.Z_DEFAULT_STRATEGY,
            )
        # Without context takeover a full flush empties the dictionary, so the
        # next message starts afresh, with no new compressor to allocate.
        data = comp.compress(payload)
        tail = comp.flush(_SYNC_FLUSH if self._send_takeover else _FULL_FLUSH)
        data = data + tail if data else tail
        # Both flushes end in the empty stored block 00 00 ff ff, which the
        # receiver puts back (RFC 7692 7.2.1).
        return (data[:-4] if data.endswith(_TAIL) else data), RSV1

    def begin_message(self, opcode: int, rsv: int) -> bool:
        # (claims_by_rsv: RSV1 set is a claim, whatever the opcode.)
        self._inflating = bool(rsv & RSV1)
        return self._inflating

    def decode(self, data: bytes, end: bool, limit: int) -> bytes:
        """Inflate message data as it arrives, never producing more than ``limit`` + 1 bytes."""
        decomp = self._decompressor
        if decomp is None:
            decomp = self._decompressor = zlib.decompressobj(-self._recv_bits)
        out: bytes
        try:
            if end and 0 < len(data) <= _JOIN_TAIL:
                # A small last piece (most messages come whole): inflate it with
                # the tail in one call. The tail inflates to nothing; after a
                # final block it is left in unused_data, and only it may be.
                out = decomp.decompress(data + _TAIL, limit + 1)
                if decomp.unconsumed_tail or len(out) > limit:
                    raise MessageTooBig(f"inflated message exceeds the {limit} bytes left")
                if decomp.eof and decomp.unused_data != _TAIL:
                    raise ProtocolError("permessage-deflate: data after the final deflate block")
            else:
                out = decomp.decompress(data, limit + 1) if data else b""
                if decomp.unconsumed_tail or len(out) > limit:
                    raise MessageTooBig(f"inflated message exceeds the {limit} bytes left")
                if decomp.eof:
                    # A block with BFINAL set ended the stream (RFC 7692 7.2.3.3). zlib
                    # would keep whatever follows in unused_data, without bound: refuse it.
                    if decomp.unused_data:
                        raise ProtocolError(
                            "permessage-deflate: data after the final deflate block"
                        )
                elif end:
                    room = limit - len(out)
                    tail = decomp.decompress(_TAIL, room + 1)
                    if decomp.unconsumed_tail or len(tail) > room:
                        raise MessageTooBig(f"inflated message exceeds the {limit} bytes left")
                    out += tail
        except zlib.error as exc:
            raise ProtocolError(f"permessage-deflate: invalid compressed data: {exc}") from None
        if end and (not self._recv_takeover or decomp.eof):
            # A finished stream inflates nothing more: the next message starts a new one.
            self._decompressor = None
        return out

    def decode_run(
        self,
        buf: bytes,
        pos: int,
        room: int,
        limit: int | None,
        budget: int | None,
        inflated: int,
        out: list[Any],
        wrap: Callable[[str], Any] | None,
        wrap_binary: Callable[[bytes, int], Any] | None,
    ) -> tuple[int, int]:
        """Inflate a run of whole compressed messages in C (see
        :meth:`Extension.decode_run`), when the C speedups are built and the
        server keeps its context between messages (each message then
        continues the one stream, which decode() shares); else nothing."""
        run = _inflate_run
        if run is None or not self._recv_takeover:
            return pos, inflated
        decomp = self._decompressor
        if decomp is None:
            decomp = self._decompressor = zlib.decompressobj(-self._recv_bits)
        pos, inflated, error, detail = run(
            buf,
            pos,
            decomp,
            room,
            -1 if limit is None else limit,
            -1 if budget is None else max(budget, 0),  # (-1: no budget)
            inflated,
            out,
            wrap,
            wrap_binary,
            _JOIN_TAIL,
        )
        if decomp.eof:
            # A finished stream inflates nothing more: the next message starts
            # a new one (as decode() does).
            self._decompressor = None
        if error:
            # decode()'s faults, then the parser's (Protocol._split_deflated).
            if error == 1:
                raise MessageTooBig(f"inflated message exceeds the {room} bytes left")
            if error == 2:
                raise ProtocolError("permessage-deflate: data after the final deflate block")
            if error == 3:
                raise ProtocolError(f"permessage-deflate: invalid compressed data: {detail}")
            if error == 4:
                raise MessageTooBig(f"decoded message exceeds max_message_size={limit}")
            raise InvalidPayload(f"text message is not valid UTF-8: {detail}")
        return pos, inflated

    def close(self) -> None:
        """Free the compressor and decompressor (tens of KiB) once the socket ended;
        the negotiated parameters (``agreed``) stay."""
        self._compressor = None
        self._decompressor = None
