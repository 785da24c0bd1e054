"""RFC 6455 frames as small value types, plus masking and close payloads.

Everything here is pure: bytes in, values out. The streaming parser that the
connection uses lives in :mod:`blockws.protocol`; :meth:`Frame.parse` here is
the simple whole-buffer parser for tests and tools, and both follow the same
rules (RFC 6455 section 5.2).

Wire layout of a frame header::

     0               1               2               3
     +-+-+-+-+-------+-+-------------+-------------------------------+
     |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
     |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
     |N|V|V|V|       |S|             |   (if payload len==126/127)   |
     +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
     |     Masking-key (0 or 4 bytes, present when MASK is set)      |
     +---------------------------------------------------------------+
"""

from __future__ import annotations

import enum
import itertools
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, TypeVar, Union

from .exceptions import InvalidPayload, ProtocolError

__all__ = [
    "Opcode",
    "Frame",
    "apply_mask",
    "py_apply_mask",
    "c_apply_mask",
    "encode_frame",
    "py_encode_frame",
    "c_encode_frame",
    "encode_frames",
    "py_encode_frames",
    "c_encode_frames",
    "encode_frames_into",
    "py_encode_frames_into",
    "c_encode_frames_into",
    "encode_piece_into",
    "py_encode_piece_into",
    "c_encode_piece_into",
    "encode_messages",
    "py_encode_messages",
    "c_encode_messages",
    "split_messages",
    "copy_continuations",
    "scan_scattered",
    "scatter_views",
    "py_scatter_views",
    "c_scatter_views",
    "py_scan_scattered",
    "c_scan_scattered",
    "SCAN_MORE",
    "SCAN_MISMATCH",
    "SCAN_PARTIAL",
    "SCAN_FIN",
    "py_copy_continuations",
    "BytesAssembly",
    "bytes_buffer",
    "c_BytesBuffer",
    "c_copy_continuations",
    "py_split_messages",
    "c_split_messages",
    "total_length",
    "py_total_length",
    "c_total_length",
    "encode_header",
    "MaskKeys",
    "shared_mask_keys",
    "pack_close",
    "parse_close",
    "is_valid_close_code",
    "CLOSE_NO_STATUS",
    "CLOSE_ABNORMAL",
    "FIN",
    "RSV1",
    "RSV2",
    "RSV3",
    "RSV_ALL",
    "Header",
    "parse_header",
]

BytesLike = Union[bytes, bytearray, memoryview]

FIN = 0x80
RSV1 = 0x40
RSV2 = 0x20
RSV3 = 0x10
MASK_BIT = 0x80

#: Reported when a close frame carried no status code (RFC 6455 7.1.5); never sent.
CLOSE_NO_STATUS = 1005
#: Reported when the connection ended without any close frame; never sent.
CLOSE_ABNORMAL = 1006

_pack_H = struct.Struct("!H").pack
_pack_Q = struct.Struct("!Q").pack


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 section 5.2); 3-7 and 11-15 are reserved."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class _XorTables(dict):  # type: ignore[type-arg]
    """``tables[k]``: the 256-byte ``bytes.translate`` table that XORs each byte
    with ``k``, made on first use (all 256 of them would be 64 KiB)."""

    def __missing__(self, k: int) -> bytes:
        table = self[k] = bytes(i ^ k for i in range(256))
        return table


_XOR_TABLES: dict[int, bytes] = _XorTables()
_from_bytes = int.from_bytes  # a global: no attribute lookup on int per call
#: From this size on, :func:`py_apply_mask` XORs with ``bytes.translate``; below
#: it, big integers (fewer steps, each dearer per byte). Measured with callgrind:
#: equal cost near 300 bytes; at 32 KiB the tables take half the instructions.
_TRANSLATE_FROM = 320


def py_apply_mask(data: BytesLike, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (RFC 6455 section 5.3).

    Masking is symmetric: applying it twice gives the data back. This is the
    hot path of every send, so no Python code runs per byte. Small payloads
    XOR two big integers in one C-level pass. Larger ones take every fourth
    byte at a time (an extended slice), map it through a 256-byte table that
    XORs it with its key byte (``bytes.translate``) and put it back: about
    20 machine instructions a byte against the big integers' 38 (which spend
    them converting bytes to and from integers), and a per-byte Python loop's
    thousands.
    """
    n = len(data)
    if n < _TRANSLATE_FROM:
        if n == 0:
            return b""
        keys = key * (n >> 2) if not n & 3 else (key * ((n >> 2) + 1))[:n]
        return (_from_bytes(data, "little") ^ _from_bytes(keys, "little")).to_bytes(n, "little")
    tables = _XOR_TABLES
    out = bytearray(data)
    out[0::4] = out[0::4].translate(tables[key[0]])
    out[1::4] = out[1::4].translate(tables[key[1]])
    out[2::4] = out[2::4].translate(tables[key[2]])
    out[3::4] = out[3::4].translate(tables[key[3]])
    return bytes(out)


#: ``BLOCKWS_PURE_PYTHON=1`` in the environment: the pure-Python twins run even
#: where the C speedups are built (.ci/run runs the core tests so).
PURE_PYTHON = bool(os.environ.get("BLOCKWS_PURE_PYTHON"))


def _compiled(name: str) -> Any:
    """``blockws._speedups.<name>``, or None where the C speedups are not built
    (setup.py builds them when a compiler is present) or are an older build
    without it: the ``c_*`` names below, which tests use whatever
    :data:`PURE_PYTHON` says."""
    try:
        from . import _speedups
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return getattr(_speedups, name, None)


_T = TypeVar("_T")


def _chosen(compiled: Any, reference: _T) -> _T:
    """What the library calls: ``compiled`` where it is built and
    :data:`PURE_PYTHON` is unset, else ``reference`` (the pure-Python twin,
    or None where the caller then does without)."""
    return compiled if compiled is not None and not PURE_PYTHON else reference


c_apply_mask: Callable[[BytesLike, bytes], bytes] | None = _compiled("apply_mask")

#: Masking as used everywhere: the C version when built, else the pure-Python one.
#: ``BLOCKWS_PURE_PYTHON=1`` in the environment forces the pure-Python one.
apply_mask: Callable[[BytesLike, bytes], bytes] = _chosen(c_apply_mask, py_apply_mask)


def py_split_messages(
    buf: BytesLike,
    pos: int,
    small: int,
    out: list[Any],
    wrap_binary: Callable[[bytes, int], Any] | None,
    wrap_text: Callable[[str], Any] | None,
) -> int:
    """The receive path's fast loop: whole small messages from ``buf[pos:]``.

    Takes frame after frame while each is whole, final (FIN), unmasked, free
    of RSV bits, text or binary, and at most ``small`` bytes long (``small``
    is at most 65535: no 64-bit lengths); appends each message to ``out`` --
    binary as ``bytes``, text as its decoded ``str``, through
    ``wrap_binary(data, length)`` / ``wrap_text(text)`` unless those are
    None -- and returns the offset where it stopped. Anything else (a frame
    cut short, a control frame, a fragment, a mask, RSV bits, a longer frame,
    text that is not valid UTF-8) stops it *before* that frame, for the
    general parser to handle or fail on, so this never raises a protocol
    error and cannot change the order in which errors are found.

    This is the reference; ``blockws._speedups.split_messages`` is the C
    version, and the two agree byte for byte (tests/test_frames.py).
    """
    if not pos and type(buf) is bytes:
        # One whole small frame from the start, every read of a
        # request/response exchange: the loop below without its set-up.
        end = len(buf)
        if 2 <= end <= 127 and buf[1] == end - 2 and end - 2 <= small:
            b0 = buf[0]
            if b0 == 0x82:
                out.append(buf[2:] if wrap_binary is None else wrap_binary(buf[2:], end - 2))
                return end
            if b0 == 0x81:
                try:
                    text = buf[2:].decode("utf-8")
                except UnicodeDecodeError:
                    return 0  # the general parser fails the connection on it
                out.append(text if wrap_text is None else wrap_text(text))
                return end
    view = buf if type(buf) is bytes else bytes(buf)
    end = len(view)
    if pos < 0 or pos > end:
        raise ValueError("pos out of range")
    append = out.append
    while end - pos >= 2:
        b0 = view[pos]
        if b0 != 0x82 and b0 != 0x81:
            break
        n = view[pos + 1]  # MASK clear means the byte is below 128
        start = pos + 2
        if n >= 126:
            if n != 126 or end - pos < 4:
                break  # MASK set, a 64-bit length, or a header cut short
            n = (view[start] << 8) | view[pos + 3]
            start = pos + 4
        stop = start + n
        if n > small or stop > end:
            break
        if b0 == 0x82:
            data = view[start:stop]
            append(data if wrap_binary is None else wrap_binary(data, n))
        else:
            try:
                text = view[start:stop].decode("utf-8")
            except UnicodeDecodeError:
                break  # the general parser fails the connection on it
            append(text if wrap_text is None else wrap_text(text))
        pos = stop
    return pos


SplitMessages = Callable[
    [BytesLike, int, int, "list[Any]", "Callable[[bytes, int], Any] | None",
     "Callable[[str], Any] | None"],
    int,
]
c_split_messages: SplitMessages | None = _compiled("split_messages")

#: The fast loop as used by the protocol: the C version when built, else the
#: pure-Python one; ``BLOCKWS_PURE_PYTHON=1`` forces the pure-Python one.
split_messages: SplitMessages = _chosen(c_split_messages, py_split_messages)


def py_copy_continuations(
    buf: BytesLike,
    pos: int,
    end: int,
    target: bytearray | memoryview,
    m_len: int,
    limit: int,
    m_frames: int,
) -> tuple[int, int, int]:
    """The continuation-frame loop of a fragmented binary message that goes to
    a pooled buffer (``Protocol._binary_run``), without the per-frame Python.

    Takes frame after frame from ``buf[pos:end]`` while each is whole, a
    continuation (opcode 0), not final (FIN clear), free of RSV bits,
    unmasked, within ``limit`` (the message's bytes so far, ``m_len``, plus
    this payload at most ``limit``, and fewer than ``limit`` frames so far,
    ``m_frames``; ``-1``: no limit, and frames are not counted), and fits in
    ``target`` after ``m_len``; copies each payload to ``target[m_len:]``.
    Returns ``(pos, m_len, m_frames)`` where it stopped: anything else (the
    final frame, a frame cut short, a control frame, a frame breaking a rule)
    stops it *before* that frame, for the caller's loop to handle or fail on,
    so it never raises a protocol error and cannot change the order in which
    errors are found.

    This is the reference; ``blockws._speedups.copy_continuations`` is the C
    version, and the two agree byte for byte (tests/test_frames.py). Without
    the C speedups the protocol does not call it: its own loop does the same.
    """
    view = memoryview(buf)
    if memoryview(target).readonly:
        raise BufferError("Object is not writable.")
    room = len(target)
    if pos < 0 or end < pos or end > len(view) or m_len < 0 or m_len > room:
        raise ValueError("pos, end or m_len out of range")
    while end - pos >= 2:
        n = view[pos + 1]
        start = pos + 2
        if view[pos] != 0x00:
            break  # not a non-final continuation frame with RSV clear
        if n >= 126:
            if n == 126:
                if end - start < 2:
                    break
                n = (view[start] << 8) | view[start + 1]
                start += 2
            elif n == 127:
                if end - start < 8:
                    break
                n = int.from_bytes(view[start : start + 8], "big")
                if n >> 63:
                    break
                start += 8
            else:
                break  # masked (from a server)
        if limit >= 0 and (n > limit - m_len or m_frames >= limit):
            break
        if n > end - start or n > room - m_len:
            break  # cut short, or no room
        target[m_len : m_len + n] = view[start : start + n]
        m_len += n
        if limit >= 0:
            m_frames += 1
        pos = start + n
    return pos, m_len, m_frames


CopyContinuations = Callable[
    [BytesLike, int, int, "bytearray | memoryview", int, int, int], "tuple[int, int, int]"
]
c_copy_continuations: CopyContinuations | None = _compiled("copy_continuations")

#: The continuation loop's C version as the protocol uses it, or None
#: (without the C speedups, or with ``BLOCKWS_PURE_PYTHON=1``: the protocol's
#: own loop then does the same, frame by frame).
copy_continuations: CopyContinuations | None = _chosen(c_copy_continuations, None)


def py_scatter_views(
    into: memoryview, spare: memoryview, start: int, base: int, length: int, frames: int, head: int
) -> list[memoryview]:
    """A scatter plan's places, in the order one read fills them: the rest of
    the current frame, ``into[start:base]`` (none when ``start == base``),
    then for each of ``frames`` frames a header's place in ``spare`` (``head``
    bytes each, in turn) and its payload's place in ``into`` (``length``
    bytes each, from ``base`` on). ``ValueError`` if they do not fit.

    This is the reference; ``blockws._speedups.scatter_views`` is the C
    version (see ``Protocol.payload_target``)."""
    if type(into) is not memoryview or type(spare) is not memoryview:
        raise TypeError("into and spare must be memoryviews")
    if not 0 <= start <= base or length < 1 or head < 1 or frames < 0:
        raise ValueError("start, base, length, frames or head out of range")
    if base + frames * length > len(into) or frames * head > len(spare):
        raise ValueError("the frames do not fit the buffers")
    views = [into[start:base]] if start < base else []
    for i in range(frames):
        views.append(spare[i * head : (i + 1) * head])
        views.append(into[base : base + length])
        base += length
    return views


ScatterViews = Callable[[memoryview, memoryview, int, int, int, int, int], "list[memoryview]"]
c_scatter_views: ScatterViews | None = _compiled("scatter_views")

#: :func:`py_scatter_views`'s C version when built (and ``BLOCKWS_PURE_PYTHON``
#: unset), else the reference.
scatter_views: ScatterViews = _chosen(c_scatter_views, py_scatter_views)


#: How :func:`py_scan_scattered` stopped: the read's bytes (or the planned
#: frames) ran out after whole frames; a header was not the guessed one; the
#: read ended inside a frame's payload; the message's final frame is whole.
SCAN_MORE, SCAN_MISMATCH, SCAN_PARTIAL, SCAN_FIN = 0, 1, 2, 3


def py_scan_scattered(
    headers: BytesLike,
    head: int,
    more: bytes,
    last: bytes,
    n: int,
    length: int,
    frames: int,
) -> tuple[int, int, int, bool, int]:
    """The frames a scattered read filled (``Protocol.payload_received`` after
    a scatter plan), without the per-frame Python: the read's ``n`` bytes
    went, in turn, to a header of ``head`` bytes (``headers[j * head:]`` for
    frame ``j``) and a payload place of ``length`` bytes, for at most
    ``frames`` frames. Takes frame after frame while its header is the
    guessed one, ``more`` (a continuation frame of ``length`` bytes) or
    ``last`` (the same, final). Returns ``(matched, n, take, fin, stop)``:
    the frames taken (the last one maybe in part), the bytes left after them,
    the payload bytes of the last one taken and whether it was final, and why
    it stopped (:data:`SCAN_MORE`, :data:`SCAN_MISMATCH` at frame
    ``matched``, :data:`SCAN_PARTIAL`, :data:`SCAN_FIN`).

    This is the reference; ``blockws._speedups.scan_scattered`` is the C
    version, and the two agree (tests/test_frames.py).
    """
    if head < 1 or length < 1 or frames < 0 or n < 0 or len(more) != head or len(last) != head:
        raise ValueError("head, length, frames or n out of range")
    view = memoryview(headers)
    if frames * head > len(view):
        raise ValueError("headers is shorter than the frames")
    matched = take = 0
    fin = False
    while n >= head and matched < frames:
        header = view[matched * head : (matched + 1) * head]
        if header == more:
            fin = False
        elif header == last:
            fin = True
        else:
            return matched, n, take, fin, SCAN_MISMATCH
        n -= head
        take = min(n, length)
        n -= take
        matched += 1
        if take < length:
            return matched, n, take, fin, SCAN_PARTIAL
        if fin:
            return matched, n, take, fin, SCAN_FIN
    return matched, n, take, fin, SCAN_MORE


ScanScattered = Callable[
    [BytesLike, int, bytes, bytes, int, int, int], "tuple[int, int, int, bool, int]"
]
c_scan_scattered: ScanScattered | None = _compiled("scan_scattered")

#: :func:`py_scan_scattered`'s C version when built (and ``BLOCKWS_PURE_PYTHON``
#: unset), else the reference.
scan_scattered: ScanScattered = _chosen(c_scan_scattered, py_scan_scattered)


class BytesAssembly(Protocol):
    """A ``bytes`` object under construction (``blockws._speedups.BytesBuffer``):
    written through ``memoryview(it)``, then handed out by ``take(n)`` as the
    very ``bytes`` object written, its first ``n`` bytes; empty after that.
    ``take`` raises ``BufferError`` while a view of it is alive."""

    def __len__(self) -> int: ...

    def __buffer__(self, flags: int) -> memoryview: ...

    def take(self, n: int) -> bytes: ...


c_BytesBuffer: Callable[[int], BytesAssembly] | None = _compiled("BytesBuffer")

#: What the protocol assembles a ``bytes`` message in (for ``receive()``):
#: the C ``BytesBuffer``, read into directly and handed out without a copy;
#: or None (without the C speedups, or with ``BLOCKWS_PURE_PYTHON=1``: the
#: message's pieces are then kept and joined at its end). Looked up per
#: message, so tests can run the parser with and without it.
bytes_buffer: Callable[[int], BytesAssembly] | None = _chosen(c_BytesBuffer, None)


def py_total_length(messages: list[Any]) -> int:
    """``sum(map(len, messages))``: what a read's messages count in a
    socket's queue (bytes, characters for text). The reference for the C
    version, which reads a ``bytes``' or a ``str``'s length without a call."""
    return sum(map(len, messages))


c_total_length: Callable[[list[Any]], int] | None = _compiled("total_length")

#: What a read's messages count (see :func:`py_total_length`): the C version
#: when built (and ``BLOCKWS_PURE_PYTHON`` unset).
total_length: Callable[[list[Any]], int] = _chosen(c_total_length, py_total_length)


class MaskKeys:
    """A source of masking keys from the OS's CSPRNG, fetched in batches.

    RFC 6455 section 5.3 requires an unpredictable key for every frame; one
    ``os.urandom`` call per frame would be a system call per frame, so keys
    are read in batches: 1 KiB (256 keys) first, then twice the last batch,
    up to 64 KiB at a time. Thread-safe: every socket's writer, reader
    (pongs), timer (pings) and ``ping()`` draw from one source
    (:data:`shared_mask_keys`, unless a protocol is given its own), and no two calls
    ever get the same slice of a batch. A batch and the counter that hands out
    its slices are swapped together as one tuple; ``next()`` on an
    ``itertools.count`` is a single atomic step, so the fast path takes no
    lock, and only a refill does.
    """

    __slots__ = ("_state", "_lock", "draw")

    # 64 KiB at most: os.urandom releases the GIL, and getting it back costs up
    # to the 5 ms switch interval when other threads are busy, so call it
    # rarely. But not 64 KiB at once: a socket that sends a few frames then
    # kept 64 KiB of keys for its lifetime (several times the rest of an open
    # socket) and spent ~0.3 ms reading them. Doubling from 1 KiB reaches
    # 64 KiB after 6 refills (16 000 frames).
    _FIRST_BATCH = 1024
    _BATCH = 65536

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: tuple[bytes, Iterator[int]] = (b"", itertools.count(0, 4))
        #: ``self.__call__``, bound once: what every socket's protocol calls
        #: (a bound method made per protocol was 64 bytes per socket).
        self.draw: Callable[[], bytes] = self.__call__

    def __call__(self) -> bytes:
        pool, counter = self._state
        pos = next(counter)
        if pos + 4 <= len(pool):
            return pool[pos : pos + 4]
        return self._refill(pool)

    def take(self, count: int) -> bytes:
        """``count`` keys at once, joined (``4 * count`` bytes): what
        :func:`encode_messages` masks a run of frames with. Each is a key no
        other call gets, as from ``count`` calls; the batch's slices are
        counted off in one step at C speed, so the keys come as one slice of
        the batch unless another thread drew in between (then one by one)."""
        out = b""
        while count > 0:
            pool, counter = self._state
            first = next(counter)
            # The count's next count - 1 values, consumed in C; the last one.
            last = next(itertools.islice(counter, count - 2, None)) if count > 1 else first
            if last != first + 4 * (count - 1):  # another thread drew meanwhile
                return out + b"".join([self() for _ in range(count)])
            have = max(0, min(count, (len(pool) - first) >> 2))
            out += pool[first : first + 4 * have]
            count -= have
            if count:  # the batch ran out: the rest from the next one
                out += self._refill(pool)
                count -= 1
        return out

    def _refill(self, spent: bytes) -> bytes:
        with self._lock:
            if self._state[0] is spent:  # not refilled by another thread meanwhile
                size = min(max(2 * len(spent), self._FIRST_BATCH), self._BATCH)
                self._state = (os.urandom(size), itertools.count(0, 4))
        return self()

    def reset(self) -> None:
        """Drop the keys read so far (the next call reads a fresh first batch)."""
        with self._lock:
            self._state = (b"", itertools.count(0, 4))


#: The source every client protocol draws its keys from unless it is given one:
#: one for the process, so its batch (up to 64 KiB) is paid once, not once per
#: socket (500 busy sockets each held up to 64 KiB of keys, and a soak's RSS
#: grew as their batches doubled). A forked child starts a batch of its own:
#: it must not hand out the keys its parent hands out.
shared_mask_keys = MaskKeys()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=shared_mask_keys.reset)


def encode_header(first_byte: int, length: int, mask_key: bytes | None) -> bytes:
    """Serialize a frame header: ``first_byte`` holds FIN, RSV and the opcode."""
    mask = MASK_BIT if mask_key is not None else 0
    if length < 126:
        header = bytes((first_byte, mask | length))
    elif length < 65536:
        header = bytes((first_byte, mask | 126)) + _pack_H(length)
    else:
        header = bytes((first_byte, mask | 127)) + _pack_Q(length)
    if mask_key is not None:
        header += mask_key
    return header



def py_encode_frame(first_byte: int, payload: BytesLike, mask_key: bytes) -> bytes:
    """One whole masked frame (a client's): the header for ``payload`` with
    ``mask_key``, then the payload masked with it. ``first_byte`` holds FIN,
    RSV and the opcode. The reference for the C version, which builds it in
    one allocation (``header + apply_mask(...)`` copies every byte twice)."""
    if not 0 <= first_byte <= 255:
        raise ValueError("first_byte must be in range(256)")
    if len(mask_key) != 4:
        raise ValueError("mask key must be 4 bytes")
    n = len(payload)
    if n < 126:  # a small frame, every send of a chat or a game: all inline
        if not n:
            return bytes((first_byte, 0x80)) + mask_key
        keys = mask_key * (n >> 2) if not n & 3 else (mask_key * ((n >> 2) + 1))[:n]
        masked = _from_bytes(payload, "little") ^ _from_bytes(keys, "little")
        return bytes((first_byte, 0x80 | n)) + mask_key + masked.to_bytes(n, "little")
    header = encode_header(first_byte, n, mask_key)
    if n < _TRANSLATE_FROM:
        return header + py_apply_mask(payload, mask_key)
    # py_apply_mask's tables, in a buffer that starts with the header: one copy
    # of the payload fewer than joining the header to its result.
    tables = _XOR_TABLES
    out = bytearray(header)
    out += payload
    h = len(header)
    out[h::4] = out[h::4].translate(tables[mask_key[0]])
    out[h + 1 :: 4] = out[h + 1 :: 4].translate(tables[mask_key[1]])
    out[h + 2 :: 4] = out[h + 2 :: 4].translate(tables[mask_key[2]])
    out[h + 3 :: 4] = out[h + 3 :: 4].translate(tables[mask_key[3]])
    return bytes(out)


c_encode_frame: Callable[[int, BytesLike, bytes], bytes] | None = _compiled("encode_frame")

#: A masked frame as every client frame is made: the C version when built
#: (and ``BLOCKWS_PURE_PYTHON`` unset), else the pure-Python one.
encode_frame: Callable[[int, BytesLike, bytes], bytes] = _chosen(c_encode_frame, py_encode_frame)


def py_encode_frames(
    first: int,
    payload: BytesLike,
    start: int,
    limit: int,
    take: Callable[[int], bytes],
    budget: int,
) -> tuple[list[bytes], int]:
    """A large message's masked frames, a batch at a time: from
    ``payload[start:]``, frames of at most ``limit`` bytes of payload, until
    they hold ``budget`` bytes or more or the payload ends (at least one
    frame), each :func:`encode_frame`'s with the next of the keys one
    ``take(count)`` gives for the batch (``4 * count`` bytes, as
    :meth:`MaskKeys.take`). The frame at offset 0 starts with ``first`` (RSV
    bits and opcode), the others with a continuation's 0; the last has FIN.
    Returns the frames and where the next batch starts (``len(payload)``
    after the last).

    This is the reference; ``blockws._speedups.encode_frames`` is the C
    version (one call a batch, where this makes a slice and a call a frame).
    """
    if not 0 <= first <= 0x7F:
        raise ValueError("first must be in range(128): RSV bits and opcode")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    view = memoryview(payload)
    size = len(view)
    if not 0 <= start <= size:
        raise ValueError("start must be in range(len(payload) + 1)")
    bounds = []  # the batch's frames, counted first: one take() for their keys
    total = 0
    while True:
        stop = min(start + limit, size)
        bounds.append((start, stop))
        total += _head_size(stop - start) + 4 + stop - start
        start = stop
        if start >= size or total >= budget:
            break
    keys = take(len(bounds))
    if len(keys) != 4 * len(bounds):
        raise ValueError("take(count) must give 4 * count bytes of mask keys")
    frames = [
        py_encode_frame(
            (FIN if stop >= size else 0) | (first if begin == 0 else 0),
            view[begin:stop],
            bytes(keys[4 * i : 4 * i + 4]),
        )
        for i, (begin, stop) in enumerate(bounds)
    ]
    return frames, start


def py_encode_frames_into(
    first: int,
    payload: BytesLike,
    start: int,
    limit: int,
    take: Callable[[int], bytes],
    budget: int,
    out: bytearray | memoryview,
) -> tuple[int, int]:
    """:func:`py_encode_frames`' batch written one frame after the other into
    ``out`` (``ValueError`` if it is shorter than the batch); returns how many
    bytes, and where the next batch starts.

    The reference for ``blockws._speedups.encode_frames_into``, which writes
    the frames there directly: a sender that reuses ``out`` then allocates
    nothing per batch (see ``Protocol.data_batches``). Without the C speedups
    the frames are sent as :func:`py_encode_frames` makes them.
    """
    frames, start = py_encode_frames(first, payload, start, limit, take, budget)
    n = sum(map(len, frames))
    if len(out) < n:
        raise ValueError("out is shorter than the batch")
    view = memoryview(out)
    pos = 0
    for frame in frames:
        view[pos : pos + len(frame)] = frame
        pos += len(frame)
    return n, start


def _head_size(n: int) -> int:
    """A masked frame's header length without its key, for a payload of ``n``."""
    return 2 if n < 126 else 4 if n < 65536 else 10


c_encode_frames: Callable[..., tuple[list[bytes], int]] | None = _compiled("encode_frames")

#: A large message's frames a batch at a time (see :func:`py_encode_frames`):
#: the C version when built (and ``BLOCKWS_PURE_PYTHON`` unset).
encode_frames: Callable[..., tuple[list[bytes], int]] = _chosen(c_encode_frames, py_encode_frames)

c_encode_frames_into: Callable[..., tuple[int, int]] | None = _compiled("encode_frames_into")

#: :func:`py_encode_frames_into`'s C version when built (and
#: ``BLOCKWS_PURE_PYTHON`` unset), else ``None``: a sender then sends the
#: frames :data:`encode_frames` makes (copying them would cost more).
encode_frames_into: Callable[..., tuple[int, int]] | None = _chosen(c_encode_frames_into, None)

def py_encode_piece_into(
    first: int,
    payload: BytesLike,
    start: int,
    limit: int,
    key: bytes,
    budget: int,
    out: bytearray | memoryview,
) -> tuple[int, int]:
    """One piece of a masked frame larger than a batch, written into ``out``;
    returns how many bytes, and where in ``payload`` the next piece starts.

    The message's frames are ``payload`` cut every ``limit`` bytes (as
    :func:`py_encode_frames` cuts it), and ``start`` lies in one of them. At
    a frame's start, the piece begins with the frame's header and ``key``
    (the caller draws a fresh key for each frame); then come at most
    ``budget`` bytes of the frame's payload from ``start``, masked with
    ``key`` at their offset in the frame, never past the frame's end. So a
    frame of any size goes out through a buffer of ``budget`` + 14 bytes, in
    pieces that join to the frame :func:`encode_frame` makes with that key.
    ``ValueError`` if ``out`` is too short, ``start`` is not in the payload or
    the key is not 4 bytes.

    The reference for ``blockws._speedups.encode_piece_into`` (see
    ``Protocol.data_batches``).
    """
    if not 0 <= first < 128:
        raise ValueError("first must be in range(128): RSV bits and opcode")
    if limit < 1 or budget < 1:
        raise ValueError("limit and budget must be at least 1")
    if len(key) != 4:
        raise ValueError("mask key must be 4 bytes")
    size = len(payload)
    if not 0 <= start < size:
        raise ValueError("start must be in range(len(payload))")
    off = start % limit
    frame_start = start - off
    frame_len = min(limit, size - frame_start)
    n = min(budget, frame_len - off)
    head = b""
    if not off:
        fin = FIN if frame_start + frame_len >= size else 0
        head = encode_header(fin | (first if frame_start == 0 else 0), frame_len, key)
    if len(out) < len(head) + n:
        raise ValueError("out is shorter than the piece")
    view = memoryview(out)
    view[: len(head)] = head
    turned = key[off % 4 :] + key[: off % 4]
    view[len(head) : len(head) + n] = py_apply_mask(memoryview(payload)[start : start + n], turned)
    return len(head) + n, start + n


c_encode_piece_into: Callable[..., tuple[int, int]] | None = _compiled("encode_piece_into")

#: :func:`py_encode_piece_into`'s C version when built (and
#: ``BLOCKWS_PURE_PYTHON`` unset), else ``None``: as :data:`encode_frames_into`.
encode_piece_into: Callable[..., tuple[int, int]] | None = _chosen(c_encode_piece_into, None)


#: A small frame's first two bytes, [opcode][payload length].
_SMALL_HEADERS = [tuple(bytes((FIN | op, MASK_BIT | n)) for n in range(126)) for op in range(16)]


def py_encode_messages(
    items: Sequence[tuple[Any, ...]],
    start: int,
    limit: int,
    take: Callable[[int], bytes],
) -> tuple[bytes, int]:
    """A run of whole messages as masked frames, joined: a writer's batch of
    small messages in one call.

    ``items[start:]`` are tuples whose first two items are an opcode and a
    payload; further items are ignored (a writer's queue entries pass as
    they are). Each becomes one frame with FIN, RSV clear and the opcode's
    low four bits (higher bits are the caller's flags), as
    :func:`encode_frame` makes it. The run stops before the first item
    whose opcode is negative (the writer's close frame) or whose payload is
    longer than ``limit`` bytes (it needs fragments). Once the run is known,
    ``take(count)`` gives its keys, 4 bytes a frame, in order (e.g.
    :meth:`MaskKeys.take`). Returns the frames joined and the index of the
    first item not encoded (``start`` for an empty run, with no call of
    ``take``).

    This is the reference; ``blockws._speedups.encode_messages`` is the C
    version. This one masks each stretch of small frames (under 126 bytes of
    payload) at once: the payloads, with zeros where each header and key go,
    XOR a stream of each frame's header and key followed by its key
    repeated, as two big integers. A larger payload is masked on its own, as
    :func:`py_encode_frame` does it (past a few hundred bytes, big integers
    cost more a byte than its tables).
    """
    size = len(items)
    if not 0 <= start <= size:
        raise ValueError("start must be in range(len(items) + 1)")
    end = start
    while end < size:
        item = items[end]
        if item[0] < 0 or len(item[1]) > limit:
            break
        end += 1
    count = end - start
    if not count:
        return b"", start
    keys = take(count)
    if len(keys) != 4 * count:
        raise ValueError("take(count) must return 4 * count bytes")
    out: list[bytes] = []
    payloads: list[BytesLike] = []
    stream: list[bytes] = []
    add, add_key = payloads.append, stream.append
    zeros, headers = bytes(6), _SMALL_HEADERS
    pos = 0
    for item in items[start:end]:
        opcode, payload = item[0] & 0x0F, item[1]
        n = len(payload)
        if n < 126:
            add_key(headers[opcode][n])
            add_key((keys[pos : pos + 4] * 33)[: n + 4])  # the key, then n bytes of it
            add(zeros)
            add(payload)
        else:
            if payloads:
                out.append(_mask_stretch(payloads, stream))
                payloads.clear()
                stream.clear()
            out.append(py_encode_frame(FIN | opcode, payload, keys[pos : pos + 4]))
        pos += 4
    if payloads:
        out.append(_mask_stretch(payloads, stream))
    return (out[0] if len(out) == 1 else b"".join(out)), end


def _mask_stretch(payloads: list[BytesLike], stream: list[bytes]) -> bytes:
    plain = b"".join(payloads)
    masked = _from_bytes(plain, "little") ^ _from_bytes(b"".join(stream), "little")
    return masked.to_bytes(len(plain), "little")


c_encode_messages: Callable[..., tuple[bytes, int]] | None = _compiled("encode_messages")

#: A run of small messages' frames in one call (see :func:`py_encode_messages`):
#: the C version when built (and ``BLOCKWS_PURE_PYTHON`` unset).
encode_messages: Callable[..., tuple[bytes, int]] = _chosen(c_encode_messages, py_encode_messages)

#: Every RSV bit (RFC 6455 5.2).
RSV_ALL = RSV1 | RSV2 | RSV3


class Header(NamedTuple):
    """A frame header, as :func:`parse_header` reads it."""

    opcode: int
    fin: bool
    rsv: int
    length: int
    mask_key: bytes | None
    #: Where the payload starts in the buffer.
    end: int


def parse_header(
    buf: BytesLike,
    pos: int = 0,
    *,
    allowed_rsv: int = RSV_ALL,
    masked: bool | None = None,
) -> Header | None:
    """Read and check the frame header at ``buf[pos:]`` (RFC 6455 5.2).

    The one header parser: the protocol's general path and :meth:`Frame.parse`
    both use it (the protocol's fast path for small unmasked data frames only
    accepts what this would). Returns ``None`` while the header is incomplete.
    Raises :class:`ProtocolError` as soon as the bytes allow, in this order:
    a reserved opcode, a fragmented control frame, RSV bits on a control frame
    or outside ``allowed_rsv``, a MASK bit other than ``masked`` requires
    (``None``: either), a control frame over 125 bytes, and a 64-bit length
    with its top bit set. Non-minimal length encodings are accepted.
    """
    end = len(buf)
    if end - pos < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    opcode = b0 & 0x0F
    fin = b0 & FIN
    rsv = b0 & RSV_ALL
    if opcode > 2:
        if opcode < 8 or opcode > 10:
            raise ProtocolError(f"reserved opcode {opcode:#x}")
        if not fin:
            raise ProtocolError("fragmented control frame")
        if rsv:
            raise ProtocolError("RSV bits set on a control frame")
    if rsv & ~allowed_rsv:
        raise ProtocolError(f"RSV bits {rsv >> 4:#05b} set without an extension that uses them")
    has_mask = b1 & MASK_BIT
    if masked is not None and bool(has_mask) != masked:
        if masked:
            raise ProtocolError("unmasked frame from a client")
        raise ProtocolError("masked frame from a server")
    length = b1 & 0x7F
    p = pos + 2
    if length >= 126:
        if opcode >= 8:
            raise ProtocolError("control frame payload longer than 125 bytes")
        if length == 126:
            if end - p < 2:
                return None
            length = (buf[p] << 8) | buf[p + 1]
            p += 2
        else:
            if end - p < 8:
                return None
            length = int.from_bytes(buf[p : p + 8], "big")
            if length >> 63:
                raise ProtocolError("64-bit payload length has its top bit set")
            p += 8
    key = None
    if has_mask:
        if end - p < 4:
            return None
        key = bytes(buf[p : p + 4])
        p += 4
    return Header(opcode, bool(fin), rsv, length, key, p)


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame. ``rsv`` holds the RSV bits in place (``RSV1`` = 0x40)."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0

    def serialize(self, mask_key: bytes | None = None) -> bytes:
        """The frame on the wire; masked when ``mask_key`` (4 bytes) is given."""
        first = (FIN if self.fin else 0) | self.rsv | self.opcode
        header = encode_header(first, len(self.payload), mask_key)
        if mask_key is None:
            return header + self.payload
        return header + apply_mask(self.payload, mask_key)

    @classmethod
    def parse(cls, data: BytesLike, *, masked: bool | None = None) -> tuple[Frame, int] | None:
        """Parse one frame from the start of ``data``.

        Returns ``(frame, bytes_consumed)``, or ``None`` when ``data`` holds
        only part of a frame. ``masked`` says what the MASK bit must be
        (``None`` accepts either). Raises :class:`ProtocolError` as
        :func:`parse_header` does; RSV bits are returned as they are: whether
        they are allowed depends on the negotiated extensions.
        """
        header = parse_header(data, 0, masked=masked)
        if header is None:
            return None
        start = header.end
        stop = start + header.length
        if len(data) < stop:
            return None
        payload = bytes(data[start:stop])
        if header.mask_key is not None:
            payload = apply_mask(payload, header.mask_key)
        return cls(header.opcode, payload, header.fin, header.rsv), stop


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame (RFC 6455 section 7.4).

    1000-1003 and 1007-1014 are defined (1012-1014 by the IANA registry),
    3000-3999 are for libraries and frameworks, 4000-4999 for private use.
    1004 is reserved, and 1005, 1006 and 1015 must never be sent.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def pack_close(code: int | None, reason: str = "") -> bytes:
    """The payload of a close frame; ``code=None`` gives the empty payload."""
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    if not is_valid_close_code(code):
        raise ValueError(f"invalid close code {code} (RFC 6455 section 7.4)")
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:
        raise ValueError("close reason longer than 123 bytes in UTF-8")
    return _pack_H(code) + encoded


def parse_close(payload: BytesLike) -> tuple[int, str]:
    """Code and reason of a received close frame (RFC 6455 section 5.5.1).

    An empty payload gives ``(1005, "")``. A 1-byte payload or an invalid code
    raises :class:`ProtocolError`; a reason that is not UTF-8 raises
    :class:`InvalidPayload`.
    """
    if len(payload) == 0:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of 1 byte")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload("close reason is not valid UTF-8") from exc
    return code, reason
