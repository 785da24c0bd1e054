"""The sans-I/O WebSocket protocol (RFC 6455 sections 5-7), for either role.

No sockets, threads or clocks live here: bytes go in through
:meth:`Protocol.receive_data` and come out as events; messages go in through
the ``encode_*`` methods and come out as bytes for the caller to write.

State rules (RFC 6455 section 7), kept in one table, :data:`TRANSITIONS`::

    OPEN ──send close──▶ CLOSE_SENT ──receive close──▶ CLOSED
      │                                                  ▲
      └──receive close──▶ CLOSE_RECEIVED ──send close────┘

* "We sent close" and "they sent close" are separate states. Receiving a
  close in ``OPEN`` queues the reply in :meth:`data_to_send` at once, so the
  state passes through ``CLOSE_RECEIVED`` to ``CLOSED`` within one call
  unless the caller asked to reply itself (``auto_close_reply=False``).
* *Failing* the connection (a protocol error from the peer) queues a close
  frame with the error's code, moves to ``CLOSE_SENT`` (or ``CLOSED``),
  stops parsing, and reports a :class:`Failure` event after the events that
  came before the bad bytes. Checks run as early as the bytes allow: RSV
  bits, opcodes and lengths when the header arrives, UTF-8 as each chunk of a
  text frame arrives, so a bad message fails before its end is received.
* Data frames received after a close frame are discarded.

Threading contract (the caller's, since there are no locks here):
:meth:`receive_data` runs on one thread (the reader), :meth:`encode_data`
may run concurrently on another (the writer) because it reads only
configuration and the extensions' sending state, and every call that changes
the close state (``encode_close``, ``receive_data``, ``data_to_send``) is
serialized by the caller.
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, Callable, Union

from . import frames as _frames
from .exceptions import InvalidPayload, InvalidState, MessageTooBig, ProtocolError
from .extensions import Extension
from .frames import (
    CLOSE_NO_STATUS,
    FIN,
    RSV1,
    BytesAssembly,
    MaskKeys,
    Opcode,
    apply_mask,
    encode_frame,
    encode_header,
    encode_messages,
    pack_close,
    parse_close,
    parse_header,
    shared_mask_keys,
)

__all__ = [
    "Role",
    "State",
    "TRANSITIONS",
    "Protocol",
    "Event",
    "Received",
    "TextMessage",
    "BinaryMessage",
    "Ping",
    "Pong",
    "CloseReceived",
    "Failure",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_FRAGMENT_SIZE",
]

BytesLike = Union[bytes, bytearray, memoryview]

#: Default bound on one incoming message, in bytes (16 MiB). A larger message
#: fails the connection with 1009 as soon as a frame header announces it.
#: Large enough for game assets and snapshots, small enough that a hostile
#: server cannot make a client allocate without limit.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Largest first buffer for a message assembled in pieces: the size of the
#: last one, up to this (a single huge message does not make every later one big).
_HINT_CAP = 4 * 1024 * 1024
#: Default size above which outgoing messages are split into frames.
DEFAULT_MAX_FRAGMENT_SIZE = 32768
#: Pieces of a message in progress smaller than this are joined in groups
#: (see _Pieces), so that a message in tiny fragments costs about its size.
_SMALL_PIECE = 4096
#: ... in groups of at most this many pieces.
_GROUP = 512
#: Pieces of a binary message from this size on are passed on as views of the
#: read, not sliced out of it (see Protocol._piece).
_VIEW_FROM = 4096
#: The rest of a frame's payload from this size on may be read straight into
#: its message's buffer (see Protocol.payload_target).
_INTO_FROM = 64 * 1024
#: A fragmented binary message whose first frame is this long or longer may be
#: read with one read scattered over its next frames (see Protocol.payload_target),
#: at most this many frames and bytes at a time.
_SCATTER_FROM = 8 * 1024
_SCATTER_FRAMES = 31  # with their headers, 62 buffers: within _IOV_MAX's 64
_SCATTER_BYTES = 1024 * 1024


class Role(enum.Enum):
    CLIENT = "client"  # masks what it sends, requires unmasked frames
    SERVER = "server"  # sends unmasked frames, requires masked frames


class State(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close_sent"
    CLOSE_RECEIVED = "close_received"
    CLOSED = "closed"


#: ``(state, what happened) -> next state``; anything missing is not allowed.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.OPEN, "send_close"): State.CLOSE_SENT,
    (State.OPEN, "receive_close"): State.CLOSE_RECEIVED,
    (State.CLOSE_SENT, "receive_close"): State.CLOSED,
    (State.CLOSE_RECEIVED, "send_close"): State.CLOSED,
}


# -- events -------------------------------------------------------------------


class Event:
    """Base class of what :meth:`Protocol.receive_data` reports."""

    __slots__ = ()


class TextMessage(Event):
    """A whole text message, decoded."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"TextMessage({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


class BinaryMessage(Event):
    """A whole binary message: the first ``length`` bytes of ``data``.

    ``data`` is a ``bytes`` object exactly ``length`` long when the message
    came in one frame of one read (the fast path), or else a bytearray from
    the protocol's ``allocate`` function -- pooled memory, maybe larger.
    """

    __slots__ = ("data", "length")

    def __init__(self, data: bytes | bytearray, length: int) -> None:
        self.data = data
        self.length = length

    def __bytes__(self) -> bytes:
        return bytes(self.data[: self.length])

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"BinaryMessage(<{self.length} bytes>)"


class Ping(Event):
    """A ping arrived; the pong is already queued in ``data_to_send``."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Pong(Event):
    """A pong arrived."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class CloseReceived(Event):
    """The peer sent a close frame: ``code`` is 1005 when it carried none."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"CloseReceived({self.code}, {self.reason!r})"


class Failure(Event):
    """The peer broke the protocol; a close with ``error.close_code`` is queued."""

    __slots__ = ("error",)

    def __init__(self, error: ProtocolError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failure({self.error!r})"


#: What :meth:`Protocol.receive_data` returns items of: events, and with
#: ``compact_messages`` whole messages as plain ``str`` or ``bytes``.
Received = Union[Event, str, bytes]


# -- the protocol ---------------------------------------------------------------


_HEADER, _PAYLOAD, _DONE = 0, 1, 2
_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _take_each(keys: Callable[[], bytes], count: int) -> bytes:
    """``count`` keys from a source that gives one a call (a test's keys)."""
    return b"".join([keys() for _ in range(count)])


def _default_allocate(size: int) -> bytearray:
    return bytearray(size)


#: How many bytes messages :func:`_take` had to copy out of their bytes buffer
#: because a view of it was still alive (the tests check that the parser's
#: own paths never do).
copied_out = 0


def _take(buf: BytesAssembly, total: int) -> bytes:
    """The first ``total`` bytes of a bytes buffer, as the bytes object it holds;
    a copy of them if a view of it is still alive somewhere (a read target a
    reader kept), which must not see the ``bytes`` change."""
    global copied_out
    try:
        return buf.take(total)
    except BufferError:
        copied_out += 1
        return bytes(memoryview(buf)[:total])


class _Pieces:
    """The pieces of a message in progress (``bytes`` or ``str``), joined as they come.

    Keeping every piece as it came cost ~50 bytes of object header and list
    slot per piece: a legal 16 MiB message in 2-byte fragments held 470-600 MB
    (issue 11, "fragment bookkeeping"). Pieces of :data:`_SMALL_PIECE` or more
    are kept as they are (no copy); smaller ones wait in a group that is
    joined into one piece once it holds :data:`_GROUP` pieces or
    :data:`_SMALL_PIECE` bytes. A message in progress thus costs its size plus
    a few percent, and its join at the end a second copy: about 2x at the peak.
    Empty pieces are not kept at all.
    """

    __slots__ = ("empty", "parts", "small", "small_size")

    def __init__(self, empty: Any) -> None:
        self.empty = empty  # b"" or ""
        # Made with the first piece of each kind: most messages come whole,
        # and an idle socket keeps two of these.
        self.parts: list[Any] | None = None
        self.small: list[Any] | None = None
        self.small_size = 0

    def __bool__(self) -> bool:
        return bool(self.parts or self.small)

    def add(self, piece: Any) -> None:
        n = len(piece)
        if n >= _SMALL_PIECE:
            if self.small:
                self._group()
            if self.parts is None:
                self.parts = [piece]
            else:
                self.parts.append(piece)
        elif n:
            small = self.small
            if small is None:
                small = self.small = [piece]
            else:
                small.append(piece)
            self.small_size += n
            if len(small) >= _GROUP or self.small_size >= _SMALL_PIECE:
                self._group()

    def _group(self) -> None:
        assert self.small is not None
        grouped = self.empty.join(self.small)
        if self.parts is None:
            self.parts = [grouped]
        else:
            self.parts.append(grouped)
        self.small = None
        self.small_size = 0

    def join(self, last: Any) -> Any:
        """Every piece and then ``last``, joined; empties the pieces."""
        parts = self.parts
        if parts is None:
            parts = self.small or []
        elif self.small:
            parts.extend(self.small)
        parts.append(last)
        out = self.empty.join(parts)
        self.parts = None
        self.small = None
        self.small_size = 0
        return out


def batch_room(budget: int, limit: int) -> int:
    """The most bytes one of a client's batches of ``budget`` bytes, in frames
    of ``limit`` bytes of payload, can take: frames are added until the batch
    holds ``budget`` bytes, so the last may pass it by a whole frame."""
    return budget + limit + 14


def _continuation_header(length: int, fin: bool) -> bytes:
    """The header of an unmasked continuation frame of ``length`` bytes."""
    first = 0x80 if fin else 0
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def _joined(views: list[memoryview], i: int, n: int) -> bytes:
    """The first ``n`` bytes of ``views[i:]``, as one ``bytes``."""
    pieces = []
    for view in views[i:]:
        if n <= len(view):
            pieces.append(view[:n])
            break
        pieces.append(view)
        n -= len(view)
    return b"".join(pieces)


class Protocol:
    """One WebSocket connection's protocol state, after the opening handshake.

    ``max_message_size`` bounds incoming messages (``None`` for no bound).
    ``extensions`` are the negotiated ones, in the order of the server's
    answer. ``allocate(n)`` returns a bytearray of at least ``n`` bytes for an
    incoming binary message (a buffer pool plugs in here), and ``release(buf)``
    takes back one the parser outgrew. ``mask_keys`` supplies 4-byte masking
    keys (tests pass a fixed one).
    """

    # Slots: one per open socket, and no per-instance dict (1.5 kB each).
    __slots__ = (
        "_allocate",
        "_allowed_rsv",
        "_buf",
        "_cont_run",
        "_control",
        "_expect_mask",
        "_f_fin",
        "_f_key",
        "_f_key_pos",
        "_f_opcode",
        "_f_remaining",
        "_fast",
        "_whole_decode",
        "_whole_run",
        "_inflated",
        "_m_buf",
        "_m_decoder",
        "_m_ext",
        "_m_frames",
        "_m_first",
        "_m_hint",
        "_m_len",
        "_m_opcode",
        "_m_parts",
        "_m_text",
        "_key_source",
        "_mask_keys",
        "_outgoing",
        "_phase",
        "_plan",
        "_release",
        "auto_close_reply",
        "binary_as_bytes",
        "close_received",
        "close_sent",
        "compact_messages",
        "extensions",
        "failure",
        "inflate_budget",
        "max_fragment_size",
        "max_message_size",
        "more",
        "other_events",
        "role",
        "state",
    )

    def __init__(
        self,
        role: Role = Role.CLIENT,
        *,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        max_fragment_size: int = DEFAULT_MAX_FRAGMENT_SIZE,
        extensions: Sequence[Extension] = (),
        allocate: Callable[[int], bytearray] | None = None,
        release: Callable[[bytearray], None] | None = None,
        mask_keys: Callable[[], bytes] | None = None,
        auto_close_reply: bool = True,
    ) -> None:
        self.role = role
        self.state = State.OPEN
        if max_fragment_size < 1:
            raise ValueError("max_fragment_size must be at least 1")
        self.max_message_size = max_message_size
        self.max_fragment_size = max_fragment_size
        # A tuple: never changed, and without extensions the shared empty one.
        self.extensions = tuple(extensions)
        self.auto_close_reply = auto_close_reply
        #: The close the peer sent, once it arrived: ``(code, reason)``.
        self.close_received: tuple[int, str] | None = None
        #: The close this side sent or queued: ``(code or None, reason)``.
        self.close_sent: tuple[int | None, str] | None = None
        #: The error that failed the connection, if one did.
        self.failure: ProtocolError | None = None

        self._allocate = allocate or _default_allocate
        self._release = release
        keys = (mask_keys or shared_mask_keys) if role is Role.CLIENT else None
        # A MaskKeys' bound __call__: cheaper to call than the instance itself.
        self._mask_keys = keys.draw if isinstance(keys, MaskKeys) else keys
        self._key_source = keys  # for encode_messages' keys, a run at a time
        # Client receives unmasked frames; server requires masked ones.
        self._expect_mask = 0x80 if role is Role.SERVER else 0
        # The parser's fast path applies (see _parse): no masks, no extensions.
        self._fast = not self._expect_mask and not self.extensions
        # The fast path for a fragmented binary message's continuation frames
        # (see _binary_run): a client's (unmasked frames), with or without
        # extensions (it takes only frames no extension claimed).
        self._cont_run = not self._expect_mask
        # The fast path for compressed messages (see _split_deflated): a client
        # with one extension, which claims a frame by its RSV bits
        # (permessage-deflate).
        only = self.extensions[0] if len(self.extensions) == 1 else None
        self._whole_decode: Callable[[bytes, bool, int], bytes] | None = (
            only.decode
            if only is not None and only.claims_by_rsv and only.rsv_bits == RSV1
            and not self._expect_mask
            else None
        )  # fmt: skip
        # Its own loop over such frames, if it has one (Extension.decode_run).
        self._whole_run: Callable[..., tuple[int, int]] | None = (
            only.decode_run if only is not None and self._whole_decode is not None else None
        )
        self._allowed_rsv = 0
        for ext in self.extensions:
            self._allowed_rsv |= ext.rsv_bits
        self._outgoing: list[bytes] = []

        # Receive state: unconsumed bytes, the frame being read, the message.
        self._buf = b""
        self._phase = _HEADER
        self._f_opcode = 0
        self._f_fin = False
        self._f_remaining = 0
        self._f_key: bytes | None = None
        self._f_key_pos = 0
        self._control = b""
        self._m_opcode = 0  # 0: no data message in progress
        self._m_parts = _Pieces(b"")
        # A binary message that spans reads or frames, assembled as it comes
        # (see _binary_data) in allocate's memory, or, for binary_as_bytes, in
        # the bytes object it becomes (frames.bytes_buffer); and the size of
        # the last one.
        self._m_buf: bytearray | BytesAssembly | None = None
        self._m_hint = 0
        self._m_first = 0  # the length of the message's first frame
        # payload_target's scatter plan for payload_received (see there).
        self._plan: tuple[list[memoryview], int, int, bytearray, int] | None = None
        #: Deliver every binary message as exact ``bytes``, rather than in
        #: memory from ``allocate``. For consumers that want bytes. A message
        #: that arrived in several reads or frames is assembled in the
        #: ``bytes`` it becomes (``frames.bytes_buffer``, with the C speedups),
        #: or else as pieces joined at its end (one copy).
        self.binary_as_bytes = False
        #: Report a whole message as its ``str`` (text) or ``bytes`` (binary,
        #: when exact bytes) instead of a TextMessage/BinaryMessage event: one
        #: object fewer per message, for consumers that count every one (the
        #: WebSocket). A binary message in ``allocate``'s memory stays a
        #: BinaryMessage, which carries its length.
        self.compact_messages = False
        #: Most inflated (extension-decoded) bytes one :meth:`receive_data`
        #: call produces: past it, parsing stops at the next frame boundary,
        #: keeps the rest and sets :attr:`more` (``None``: no bound). A read
        #: of compressed data can inflate a thousandfold; a consumer that
        #: applies backpressure parses such a read in installments.
        self.inflate_budget: int | None = None
        #: The last :meth:`receive_data` stopped at ``inflate_budget`` with
        #: bytes left: call ``receive_data(b"")`` to go on.
        self.more = False
        #: How many of the events the last :meth:`receive_data` returned are
        #: not messages (pings, pongs, the peer's close, a failure): with 0,
        #: a consumer takes the list as messages without looking at each.
        self.other_events = 0
        self._inflated = 0
        self._m_len = 0
        self._m_frames = 0  # frames of the message so far: see _start_data_frame
        self._m_text = _Pieces("")
        self._m_decoder: codecs.IncrementalDecoder | None = None
        self._m_ext: Sequence[Extension] = ()  # the extensions that claimed it

    # -- state ------------------------------------------------------------------

    def _transition(self, what: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, what)]
        except KeyError:
            raise InvalidState(
                f"cannot {what.replace('_', ' ')} in state {self.state.value}"
            ) from None

    @property
    def default_keys(self) -> bool:
        """Whether a client's frames are masked with keys from the shared
        source (:data:`blockws.frames.shared_mask_keys`), as every socket's
        are, rather than a source of its own (a test's fixed keys). Where it
        is, any other source of unpredictable keys will do as well (see
        :meth:`blockws.sendqueue.PySendQueue.set_fast`)."""
        return self._key_source is shared_mask_keys

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` has frames waiting (a cheap test)."""
        return bool(self._outgoing)

    def data_to_send(self) -> list[bytes]:
        """Frames the protocol produced itself (pongs, close replies); drains them."""
        out, self._outgoing = self._outgoing, []
        return out

    # -- sending ------------------------------------------------------------------

    def encode_data(self, opcode: int, payload: BytesLike, *, compress: bool = True) -> list[bytes]:
        """Frames for one data message (``Opcode.TEXT`` or ``Opcode.BINARY``).

        Runs the extensions' ``encode`` (unless ``compress`` is False), then
        splits the result into frames of at most ``max_fragment_size`` bytes
        of payload, masking each in the client role. Does not check the state:
        the caller stops sending data once it has sent a close.
        """
        if compress and self.extensions:
            first, payload = self._encode_payload(opcode, payload, compress)
        else:
            first = opcode  # no extension at work: no call (every send passes here)
        size = len(payload)
        keys = self._mask_keys
        if size < 126 and keys is not None and size <= self.max_fragment_size:
            # A small message from a client: one frame with a 2-byte header.
            return [encode_frame(FIN | first, payload, keys())]
        return list(self._frames(first, payload))

    def encode_messages(
        self, items: list[tuple[Any, ...]], start: int = 0
    ) -> tuple[list[bytes], int]:
        """Frames for a run of whole data messages, at once: a writer's batch.

        ``items[start:]`` are tuples whose first two items are an opcode and
        a payload (a writer's queue entries pass as they are; further items
        are ignored). Each is encoded as ``encode_data(opcode & 0xF,
        payload, compress=False)`` would, one frame each, until the first
        item whose opcode is negative (a writer's close frame) or whose
        payload is longer than ``max_fragment_size`` (it needs fragments):
        the caller encodes that one on its own. Returns the frames and the
        index of the first item not encoded. A client's run is one call of
        :func:`blockws.frames.encode_messages`, its frames joined in one
        ``bytes``; a server's run is a header and a payload a message.
        """
        if not 0 <= start <= len(items):
            raise ValueError("start must be in range(len(items) + 1)")
        source = self._key_source
        if source is None:
            out: list[bytes] = []
            limit, size, end = self.max_fragment_size, len(items), start
            while end < size and items[end][0] >= 0 and len(items[end][1]) <= limit:
                opcode, payload = items[end][0] & 0x0F, items[end][1]
                out += (encode_header(FIN | opcode, len(payload), None), bytes(payload))
                end += 1
            return out, end
        take = source.take if isinstance(source, MaskKeys) else partial(_take_each, source)
        data, end = encode_messages(items, start, self.max_fragment_size, take)
        return ([data] if data else []), end

    def data_batches(
        self,
        opcode: int,
        payload: BytesLike,
        budget: int,
        *,
        compress: bool = True,
        into: bytearray | None = None,
    ) -> Iterator[tuple[list[BytesLike], bool, int]]:
        """:meth:`encode_data` in batches: lists of frames of ``budget`` bytes
        or more each (the last one maybe less), each with whether it is the
        message's last and how much of the (encoded) payload the batches so
        far hold, made as each batch is asked for: a large message's frames
        need not all exist at once, and a writer can send control frames
        between two batches -- where a batch ends at a frame's end (the
        payload's position a multiple of ``max_fragment_size``, or the last
        batch). A client's batch is one call of
        :func:`blockws.frames.encode_frames`.

        With ``into`` and the C speedups, a client's batches are written there
        instead, each as one view of it (a message of one fragment too): the
        caller must be done with a batch (written it) before it asks for the
        next, which overwrites it. With ``into`` of at least
        :func:`batch_room` bytes, each batch is whole frames; with a smaller
        one (at least ``budget`` + 14 bytes), for fragments larger than
        ``budget``, each batch is a piece of one frame
        (:func:`blockws.frames.encode_piece_into`), and a frame may end
        only after several batches: nothing may be written between them."""
        first, payload = self._encode_payload(opcode, payload, compress)
        keys = self._mask_keys
        size = len(payload)
        limit = self.max_fragment_size
        if keys is None or (size <= limit and into is None) or not size:
            # (A server's frames come as header and payload: a batch ends
            # after a payload, never between the two.)
            step = 1 if keys is not None else 2
            batch: list[BytesLike] = []
            total = 0
            pos = 0
            for i, frame in enumerate(self._frames(first, payload)):
                if total >= budget and not len(batch) % step:
                    yield batch, False, pos
                    batch = []
                    total = 0
                batch.append(frame)
                total += len(frame)
                if keys is not None:
                    pos = min(pos + limit, size)
                elif i % 2:
                    pos += len(frame)
            yield batch, True, size
            return
        encode = _frames.encode_frames  # (looked up here: tests swap it)
        source = self._key_source
        take = source.take if isinstance(source, MaskKeys) else partial(_take_each, keys)
        start = 0
        if into is not None:
            encode_into = _frames.encode_frames_into
            piece = _frames.encode_piece_into
            if encode_into is not None and len(into) >= batch_room(budget, limit):
                out = memoryview(into)
                while start < size:
                    n, start = encode_into(first, payload, start, limit, take, budget, into)
                    yield [out[:n]], start >= size, start
                return
            if piece is not None and limit > budget and size > budget and len(into) >= budget + 14:
                out = memoryview(into)
                key = b""
                while start < size:
                    if not start % limit:
                        key = take(1)  # the next frame's
                    n, start = piece(first, payload, start, limit, key, budget, into)
                    yield [out[:n]], start >= size, start
                return
        while start < size:
            frames, start = encode(first, payload, start, limit, take, budget)
            yield frames, start >= size, start  # type: ignore[misc]  # (list[bytes]: read only)

    def _encode_payload(
        self, opcode: int, payload: BytesLike, compress: bool
    ) -> tuple[int, BytesLike]:
        """The extensions' encoding: returns the RSV bits and opcode, and the payload."""
        rsv = 0
        if compress and self.extensions:
            data = bytes(payload)
            for ext in self.extensions:
                data, bits = ext.encode(opcode, data)
                rsv |= bits
            payload = data
        return rsv | opcode, payload

    def _frames(self, first: int, payload: BytesLike) -> Iterator[bytes]:
        size = len(payload)
        limit = self.max_fragment_size
        keys = self._mask_keys
        if size <= limit:
            if keys is None:
                yield encode_header(FIN | first, size, None)
                yield bytes(payload)
            else:
                yield encode_frame(FIN | first, payload, keys())
            return
        view = memoryview(payload)
        for start in range(0, size, limit):
            chunk = view[start : start + limit]
            fin = FIN if start + limit >= size else 0
            if keys is None:
                yield encode_header(fin | first, len(chunk), None)
                yield bytes(chunk)
            else:
                yield encode_frame(fin | first, chunk, keys())
            first = Opcode.CONT

    def encode_control(self, opcode: int, payload: BytesLike = b"") -> bytes:
        """A ping or pong frame; the payload is at most 125 bytes."""
        if opcode not in (Opcode.PING, Opcode.PONG):
            raise ValueError("encode_control takes Opcode.PING or Opcode.PONG")
        if len(payload) > 125:
            raise ValueError("control frame payload longer than 125 bytes")
        return self._frame(opcode, payload)

    def encode_close(self, code: int | None = 1000, reason: str = "") -> bytes:
        """The close frame to send, and the move to ``CLOSE_SENT``/``CLOSED``.

        Raises ``ValueError`` for a code or reason RFC 6455 forbids, and
        ``InvalidState`` when a close was already sent.
        """
        payload = pack_close(code, reason)
        self._transition("send_close")
        self.close_sent = (code, reason)
        return self._frame(Opcode.CLOSE, payload)

    def _frame(self, opcode: int, payload: BytesLike) -> bytes:
        if self._mask_keys is None:
            return encode_header(FIN | opcode, len(payload), None) + bytes(payload)
        return encode_frame(FIN | opcode, payload, self._mask_keys())

    # -- receiving ------------------------------------------------------------------

    def receive_data(self, data: BytesLike) -> list[Received]:
        """Feed bytes from the peer; returns the events they complete, in order
        (whole messages as ``str``/``bytes`` with ``compact_messages``).

        After a :class:`Failure` or once the peer's close frame arrived,
        further data is ignored.
        """
        events: list[Received] = []
        self.other_events = 0
        if self._phase == _DONE or not (data or self._buf):
            return events
        self.more = False
        self._inflated = 0
        pos = 0
        if (
            not self._buf
            and self._fast
            and self._phase == _HEADER
            and not self._m_opcode
            and self.compact_messages
            and self._whole_decode is None
            and type(data) is bytes
        ):
            # _parse's first step, without its set-up: a read of whole small
            # messages (a request/response exchange's every read) ends here.
            limit = self.max_message_size
            pos = _frames.split_messages(
                data, 0, 65535 if limit is None or limit > 65535 else limit, events, None, None
            )
            if pos == len(data):
                return events
        buf = self._buf + data if self._buf else data if type(data) is bytes else bytes(data)
        try:
            pos = self._parse(buf, events, pos)
        except ProtocolError as exc:
            self._fail(exc, events)
            self._buf = b""
            return events
        self._buf = buf[pos:] if pos < len(buf) else b""
        return events

    def receive_one(self, data: bytes) -> str | bytes | None:
        """:meth:`receive_data` for ``data`` that is exactly one whole small
        (up to 125 bytes) unmasked text or binary frame, arriving between
        messages with nothing held, without extensions and with
        ``compact_messages``: its message. ``None``, with nothing changed,
        for anything else, or for a frame the general parser would fail on
        (invalid UTF-8, over ``max_message_size``): then call
        :meth:`receive_data`."""
        n = len(data) - 2
        if (
            not 0 <= n <= 125  # (126 and 127 announce a longer length)
            or data[1] != n  # (so does the MASK bit, set: 128 or more)
            or self._buf
            or not self._fast
            or self._phase  # (not _HEADER, 0)
            or self._m_opcode
            or not self.compact_messages
            or self._whole_decode is not None
            or self._outgoing
        ):
            return None
        limit = self.max_message_size
        if limit is not None and n > limit:
            return None
        first = data[0]
        if first == 0x81:
            try:
                message: str | bytes = data[2:].decode()
            except UnicodeDecodeError:
                return None
        elif first == 0x82:
            message = data[2:]
        else:
            return None
        self.other_events = 0
        self.more = False
        self._inflated = 0
        return message

    def payload_target(self, scatter: bool = False) -> memoryview | list[memoryview] | None:
        """Where the next bytes read may go directly, if anywhere: a view of the
        message's buffer, from the message's end so far, for the rest of the
        current frame's payload (``None`` when what comes next must go through
        :meth:`receive_data`).

        Only for a large rest (:data:`_INTO_FROM`) of an unmasked, uncompressed
        binary message assembled in its buffer (pooled, for ``on_binary``; the
        ``bytes`` it becomes, for ``binary_as_bytes``), with nothing unparsed
        held: a 1 MiB message then skips a ``bytes`` per read
        and the copy out of it, and is read in as few calls as the kernel
        allows. The view never reaches past what the frame announces, nor past
        the buffer, which grows as :meth:`receive_data` grows it (doubling,
        never by the announced length alone). Read into it, then report the
        count with :meth:`payload_received`, with nothing parsed in between.
        A target is never empty: a read of 0 bytes means the end of the stream.

        With ``scatter`` (a reader that can scatter one read over several
        buffers: ``recvmsg_into``), a message that comes in frames of
        :data:`_SCATTER_FROM` bytes or more may get a list: the rest of the
        current frame (if any), then, taking the next frames to be
        continuations as long as the message's first (what a sender that
        fragments at a fixed size sends), a small buffer for each one's header
        and the place in the message's buffer for its payload, up to the size
        of the last such message (ending with a shorter final frame where
        that size is not a multiple of the first frame's). :meth:`payload_received` checks every
        header against that guess; from the first one that differs (a
        control frame, another length, the next message), the bytes read are
        copied out and parsed as :meth:`receive_data` parses them, so the
        events, and their order and errors, are the same either way.
        """
        self._plan = None
        buf = self._m_buf
        if (
            buf is None
            or self._buf
            or self._m_opcode != Opcode.BINARY
            or self._m_ext
            or not (self.state is State.OPEN or self.state is State.CLOSE_SENT)
        ):
            return None
        phase = self._phase
        if phase == _PAYLOAD:
            if self._f_opcode >= 8 or self._f_key is not None:
                return None
            rest = self._f_remaining
            if scatter and not self._f_fin:
                return self._scatter_plan(buf, rest) or self._into(buf, rest)
            return self._into(buf, rest)
        if scatter and phase == _HEADER:
            return self._scatter_plan(buf, 0)
        return None

    def _into(self, buf: bytearray | BytesAssembly, rest: int) -> memoryview | None:
        """payload_target's view for the ``rest`` of the current frame."""
        if rest < _INTO_FROM:
            return None
        start = self._m_len
        if start == len(buf):
            # (At least _INTO_FROM: a frame's first read may have brought its
            # header alone, and an empty buffer doubled is still empty. An empty
            # view would read 0 bytes, which means the end of the stream.)
            buf = self._grow(buf, max(2 * len(buf), _INTO_FROM), start)
        return memoryview(buf)[start : min(len(buf), start + rest)]

    def _grow(
        self, buf: bytearray | BytesAssembly, size: int, keep: int
    ) -> bytearray | BytesAssembly:
        """A larger buffer of the same kind for the message, with the first
        ``keep`` bytes of ``buf`` (a pooled one goes back to its pool)."""
        pooled = type(buf) is bytearray
        if pooled:
            grown: bytearray | BytesAssembly = self._allocate(size)
        else:
            make = _frames.c_BytesBuffer
            assert make is not None  # (buf is one)
            grown = make(size)
        memoryview(grown)[:keep] = memoryview(buf)[:keep]
        # The new buffer in place first: this runs on a reading caller's
        # thread, outside parsing, where an interrupt may land.
        self._m_buf = grown
        if pooled and self._release is not None:
            self._release(buf)  # type: ignore[arg-type]  # (pooled: a bytearray)
        return grown

    def _scatter_plan(
        self, buf: bytearray | BytesAssembly, rest: int
    ) -> list[memoryview] | None:
        """payload_target's list (see there), or ``None`` when no next frame
        of the message's first frame's length fits the guess.

        The guess runs to where the last such message ended: whole frames of
        the first frame's length, then, where that message's size is not a
        multiple of it, a shorter final frame (the tail) for the rest."""
        length = self._m_first
        if length < _SCATTER_FROM:
            return None
        base = self._m_len + rest
        frames = _SCATTER_FRAMES
        limit = self.max_message_size
        if limit is not None:
            frames = min(frames, (limit - base) // length, limit - self._m_frames)
        # Up to the size of the last such message: what a steady stream sends.
        hint = self._m_hint
        whole, tail = divmod(hint - base, length) if hint > base else (0, 0)
        frames = min(frames, max(1, (_SCATTER_BYTES - rest) // length))
        if frames < 1:
            return None  # (max_message_size: not one more frame)
        if whole > frames:
            whole, tail = frames, 0  # (the plan ends before the message does)
        elif not whole and not tail:
            whole = 1  # no guess: one frame, as a steady stream sends
        if rest + length > _SCATTER_BYTES:
            return None
        if whole and base + length > len(buf):
            # Doubled, as receive_data would grow it; never by the guess alone,
            # nor where the last such message ended inside the guessed frame.
            if base + length > 2 * len(buf) or base < hint < base + length:
                return None
            buf = self._grow(buf, 2 * len(buf), self._m_len)
        if whole > (len(buf) - base) // length:
            whole, tail = (len(buf) - base) // length, 0
        end = base + whole * length
        if tail and (
            whole + 1 > _SCATTER_FRAMES
            or end + tail > len(buf)
            or end + tail - self._m_len > _SCATTER_BYTES
            or (limit is not None and (end + tail > limit or self._m_frames + whole >= limit))
        ):
            tail = 0
        if not whole and not tail:
            return None
        head = len(_continuation_header(length, False))
        last = _continuation_header(tail, True) if tail else b""
        headers = bytearray(whole * head + len(last))
        into = memoryview(buf)
        views = _frames.scatter_views(
            into, memoryview(headers), self._m_len, base, length, whole, head
        )
        if tail:
            # The guessed last frame: its header's place, then its payload's.
            views.append(memoryview(headers)[whole * head :])
            views.append(into[end : end + tail])
        self._plan = (views, rest, length, headers, tail)
        return views

    def payload_received(self, n: int) -> list[Received]:
        """``n`` bytes were read into what :meth:`payload_target` returned (a
        list: filled in order); returns the events they complete (the message,
        at its last frame's end, and whatever follows it in a scattered read),
        as :meth:`receive_data` does."""
        events: list[Received] = []
        self.other_events = 0
        self.more = False
        self._inflated = 0
        plan = self._plan
        self._plan = None
        if self._phase == _DONE or not n:
            return events
        buf = self._m_buf
        if plan is not None:
            if buf is None or n > sum(map(len, plan[0])):
                raise ValueError(f"{n} bytes reported outside the payload target")
            self._scattered(buf, plan, n, events)
            return events
        if (
            buf is None
            or self._phase != _PAYLOAD
            or n > self._f_remaining
            or self._m_len + n > len(buf)
        ):
            raise ValueError(f"{n} bytes reported outside the payload target")
        total = self._m_len = self._m_len + n
        self._f_remaining -= n
        if self._f_remaining:
            return events
        self._phase = _HEADER
        if not self._f_fin:
            return events
        self._m_opcode = 0
        self._assembled(buf, total, events)
        return events

    def _scattered(
        self,
        buf: bytearray | BytesAssembly,
        plan: tuple[list[memoryview], int, int, bytearray, int],
        n: int,
        events: list[Received],
    ) -> None:
        """payload_received for a scatter plan: take the frames whose headers
        match the guess, then parse the rest (copied out) as receive_data would."""
        views, rest, length, headers, tail = plan
        i = 0
        if rest:
            take = min(n, rest)
            n -= take
            self._m_len += take
            self._f_remaining -= take
            if self._f_remaining:
                return
            self._phase = _HEADER
            i = 1
        more = _continuation_header(length, False)
        last = _continuation_header(length, True)
        head = len(more)
        whole = (len(views) - i) // 2 - (1 if tail else 0)
        # The frames whose headers match the guess, in one call (C when built).
        # (The plan stays within max_message_size, in bytes and in frames: a
        # frame past it is no guess, and fails in receive_data below.)
        matched, n, take, fin, stop = _frames.scan_scattered(
            headers, head, more, last, n, length, whole
        )
        counted = self.max_message_size is not None
        if matched:
            if counted:
                self._m_frames += matched
            self._m_len += (matched - 1) * length + take  # (all but the last whole)
            self._f_opcode = 0
            self._f_fin = fin
            self._f_key = None
            self._f_key_pos = 0
            i += 2 * matched
        if stop == _frames.SCAN_PARTIAL:  # the read ended in this frame
            self._f_remaining = length - take
            self._phase = _PAYLOAD
            return
        if stop == _frames.SCAN_FIN:
            self._scatter_end(buf, views, i, n, events)
            return
        if tail and matched == whole:
            # The guessed last frame, shorter than the others (what a message
            # whose size the frames do not divide ends with).
            final = _continuation_header(tail, True)
            if n >= len(final) and headers[whole * head :] == final:
                if counted:
                    self._m_frames += 1
                n -= len(final)
                take = min(n, tail)
                n -= take
                self._m_len += take
                self._f_opcode = 0
                self._f_fin = True
                self._f_key = None
                self._f_key_pos = 0
                i += 2
                if take < tail:
                    self._f_remaining = tail - take
                    self._phase = _PAYLOAD
                    return
                self._scatter_end(buf, views, i, n, events)
                return
        if n:  # (a header that is not the guess, or past the plan: parsed as ever)
            rest_of_read = _joined(views, i, n)
            views.clear()  # (as below: the message may end in what follows)
            events += self.receive_data(rest_of_read)

    def _scatter_end(
        self,
        buf: bytearray | BytesAssembly,
        views: list[memoryview],
        i: int,
        n: int,
        events: list[Received],
    ) -> None:
        """A scattered read completed the message: hand it on, then parse the
        ``n`` bytes the read brought after it (from ``views[i]`` on)."""
        # What came after the message (copied out first: _assembled hands the
        # buffer on, or back to its pool). The views go first: a bytes buffer
        # is handed out only once none is left.
        after = _joined(views, i, n) if n else b""
        views.clear()
        self._m_opcode = 0
        self._assembled(buf, self._m_len, events)
        if after:
            events += self.receive_data(after)

    def fail(self, error: ProtocolError) -> list[Received]:
        """Fail the connection because of ``error`` found outside the parser."""
        events: list[Received] = []
        self._fail(error, events)
        return events

    def _fail(self, exc: ProtocolError, events: list[Received]) -> None:
        self.failure = exc
        self._phase = _DONE
        self._m_parts = _Pieces(b"")
        self._m_buf = None
        self._m_text = _Pieces("")
        if self.state in (State.OPEN, State.CLOSE_RECEIVED):
            self._outgoing.append(self.encode_close(exc.close_code, ""))
        events.append(Failure(exc))
        self.other_events += 1

    def _parse(self, buf: bytes, events: list[Received], pos: int = 0) -> int:
        """Consume frames from ``buf[pos:]``; returns the end of what was used."""
        end = len(buf)
        # The fast path: whole, unfragmented, unmasked, uncompressed text and
        # binary frames, which is what a client mostly receives. It makes no
        # check the general path would not also pass: FIN set, RSV clear,
        # opcode 1 or 2, MASK clear, no fragmented message in progress, and a
        # length within max_message_size.
        fast = self._fast
        limit = self.max_message_size
        small = 65535 if limit is None or limit > 65535 else limit
        wrap_binary = wrap_text = None
        if not self.compact_messages:
            wrap_binary, wrap_text = BinaryMessage, TextMessage
        # The C version when built (see blockws.frames.split_messages): looked
        # up per call, so that tests can run the parser on either.
        split = _frames.split_messages
        whole_decode = self._whole_decode
        cont_run = self._cont_run
        while pos < end:
            if (
                whole_decode is not None
                and self._phase == _HEADER
                and not self._m_opcode
                and (buf[pos] == 0xC1 or buf[pos] == 0xC2)
                and self.state is State.OPEN
            ):
                pos = self._split_deflated(buf, pos, end, events, whole_decode)
                if pos >= end:
                    break
            if fast and self._phase == _HEADER and not self._m_opcode:
                # Frame after frame, with nothing looked up but the bytes;
                # anything else (or a frame cut short, or text that is not
                # UTF-8) is left for the general path, which fails on it.
                pos = split(buf, pos, small, events, wrap_binary, wrap_text)
                if pos >= end:
                    break
            if (
                cont_run
                and self._m_opcode == Opcode.BINARY
                and not self._m_ext
                and not self._inflated
            ):
                done = self._binary_run(buf, pos, end, events)
                if done != pos:
                    pos = done
                    continue
            if self._phase == _HEADER:
                if self._inflated:
                    budget = self.inflate_budget
                    if budget is not None and self._inflated >= budget:
                        self.more = True
                        break
                hdr = self._read_header(buf, pos, end)
                if hdr < 0:
                    break
                pos = hdr
                if end - pos >= self._f_remaining:
                    # The whole payload is here: the common, fast case.
                    n = self._f_remaining
                    self._f_remaining = 0
                    self._frame_data(self._piece(buf, pos, n), events, True)
                    pos += n
                    continue
                self._phase = _PAYLOAD
            if self._phase == _PAYLOAD:
                n = min(self._f_remaining, end - pos)
                if self._f_opcode >= 8 and n < self._f_remaining:
                    break  # control frames are handled whole (at most 125 bytes)
                self._f_remaining -= n
                frame_end = self._f_remaining == 0
                if frame_end:
                    # Before _frame_data, which may move to _DONE (a close frame).
                    self._phase = _HEADER
                self._frame_data(self._piece(buf, pos, n), events, frame_end)
                pos += n
            if self._phase == _DONE:
                return end
        return pos

    def _piece(self, buf: bytes, pos: int, n: int) -> bytes | memoryview:
        """``buf[pos:pos + n]``, a piece of the current frame's payload: a
        memoryview, not a copy, when it is a large piece of a binary message
        that is copied at once into the message's pooled buffer (for
        ``on_binary``; unmasked, not compressed). A 1 MiB message sent in
        32 KiB frames was otherwise copied twice: sliced out of the read, then
        into its buffer. For ``binary_as_bytes`` too, where the message is
        assembled in a bytes buffer (``frames.bytes_buffer``), unless the
        piece is the whole message (which is then itself the ``bytes``).
        Pieces kept until the message ends (``bytes`` for ``receive()``
        without that buffer) stay copies: a view would pin its whole read."""
        if (
            n >= _VIEW_FROM
            and (
                not self.binary_as_bytes
                or (
                    _frames.bytes_buffer is not None
                    and not self._m_parts
                    and (self._m_buf is not None or self._f_remaining or not self._f_fin)
                )
            )
            and self._m_opcode == Opcode.BINARY
            and self._f_opcode < 8
            and self._f_key is None
            and not self._m_ext
            and (pos or n != len(buf))  # the whole read: no copy either way
            and (self.state is State.OPEN or self.state is State.CLOSE_SENT)
        ):
            return memoryview(buf)[pos : pos + n]
        return buf[pos : pos + n]

    def _binary_run(self, buf: bytes, pos: int, end: int, events: list[Received]) -> int:
        """The fast path for the rest of a fragmented binary message: the rest
        of its current frame, then continuation frames, unmasked, RSV clear,
        within ``max_message_size``, taken one after the other without the
        general path's per-frame calls (a 1 MiB message sent in the default
        32 KiB fragments is 31 of them, and one is cut by nearly every read).
        Returns where it stopped: after the message's last frame, at the end of
        ``buf`` (a frame cut short waits in ``_PAYLOAD`` for the rest, as the
        general path leaves it), or at the first frame it does not take (a
        control frame, a header cut short, one breaking a rule), which the
        general path then reads, and fails on, as it would have. Called only
        for a binary message with no extension claiming it, in the client
        role, with no inflated bytes to count.

        Pieces go to the message's pooled buffer (copied there at once; with
        the C speedups, each read's whole non-final frames that fit in it in
        one call, ``frames.copy_continuations``). For
        ``binary_as_bytes`` they are kept until the message ends: as views of
        the read when they are :data:`_SMALL_PIECE` or more and together at
        least half of it (a view keeps its whole read alive, so a message in
        progress never holds more than about twice its size), else as copies;
        the join at the end is then the only copy of most bytes.
        """
        if not (self.state is State.OPEN or self.state is State.CLOSE_SENT):
            return pos  # the general path discards data after a close
        as_parts = self._m_buf is None
        if as_parts and not (
            self._m_parts or (self.binary_as_bytes and _frames.bytes_buffer is None)
        ):
            return pos  # (no buffer yet: the general path makes one)
        limit = self.max_message_size
        view = memoryview(buf)
        target = None if as_parts else memoryview(self._m_buf)  # type: ignore[arg-type]
        kept: list[bytes | memoryview] = []
        kept_size = 0
        # The C loop for the run of whole non-final frames that fit in the
        # pooled buffer (see blockws.frames.py_copy_continuations): looked up
        # per call, so that tests can run the parser with and without it.
        copy_run = _frames.copy_continuations if target is not None else None
        while pos < end:
            if copy_run is not None and target is not None and self._phase != _PAYLOAD:
                c_limit = -1 if limit is None else limit
                done, m_len, m_frames = copy_run(
                    buf, pos, end, target, self._m_len, c_limit, self._m_frames
                )
                if done != pos:  # then on to the frame it stopped at, below
                    pos = done
                    self._m_len = m_len
                    self._m_frames = m_frames
            if self._phase == _PAYLOAD:  # the rest of a frame the last read cut
                if self._f_opcode >= 8:
                    break  # a control frame's: handled whole, by the general path
                p = pos
                n = min(self._f_remaining, end - p)
                stop = p + n
                self._f_remaining -= n
                fin = False
                if not self._f_remaining:
                    self._phase = _HEADER
                    fin = self._f_fin
            else:
                if end - pos < 2:
                    break
                b0 = buf[pos]
                if b0 & 0x7F:
                    break  # not a continuation frame, or RSV bits set
                n = buf[pos + 1]
                p = pos + 2
                if n >= 126:
                    if n == 126:
                        if end - p < 2:
                            break
                        n = (buf[p] << 8) | buf[p + 1]
                        p += 2
                    elif n == 127:
                        if end - p < 8:
                            break
                        n = int.from_bytes(buf[p : p + 8], "big")
                        if n >> 63:
                            break
                        p += 8
                    else:
                        break  # masked (from a server)
                if limit is not None:
                    if self._m_len + n > limit or self._m_frames >= limit:
                        break
                    self._m_frames += 1
                stop = p + n
                fin = b0 == 0x80
                if stop > end:  # cut short: the rest comes in a later read
                    self._f_opcode = 0
                    self._f_fin = fin
                    self._f_key = None
                    self._f_key_pos = 0
                    self._f_remaining = stop - end
                    self._phase = _PAYLOAD
                    stop = end
                    fin = False
            pos = stop
            if target is not None and not fin:
                total = self._m_len + stop - p
                if total <= len(target):  # room in the pooled buffer: copy it there
                    target[self._m_len : total] = view[p:stop]
                    self._m_len = total
                    continue
            if fin or not as_parts:
                if kept:  # joined now: views of this read hold nothing past its end
                    parts = self._m_parts
                    for piece in kept:
                        parts.add(piece)
                    kept = []
                # (_binary_data joins a bytes message's pieces: a view is then
                # copied by the join; alone, as the whole message, it must be bytes)
                piece = view[p:stop] if not as_parts or self._m_parts else buf[p:stop]
                target = None  # (a bytes buffer is handed out only once no view is left)
                self._binary_data(piece, fin, events)
                if fin:
                    self._m_opcode = 0
                    break
                mbuf = self._m_buf  # (grown, maybe)
                target = memoryview(mbuf) if mbuf is not None else None
                continue
            self._m_len += stop - p
            if stop - p >= _SMALL_PIECE:
                kept.append(view[p:stop])
                kept_size += stop - p
            else:
                kept.append(buf[p:stop])
        if kept:
            parts = self._m_parts
            pin = kept_size * 2 >= len(buf)
            for piece in kept:
                parts.add(piece if pin or type(piece) is bytes else bytes(piece))
        return pos

    def _split_deflated(
        self,
        buf: bytes,
        pos: int,
        end: int,
        events: list[Received],
        decode: Callable[[bytes, bool, int], bytes],
    ) -> int:
        """The fast path for compressed messages: whole, unfragmented, unmasked
        text and binary frames with RSV1 set (first byte 0xC1 or 0xC2), each
        decoded by the one extension (``decode(payload, True, limit)``), text
        as UTF-8, with the general path's checks in its order; returns where
        it stopped. Binary comes out as ``bytes`` (or a ``BinaryMessage`` over
        them), as the fast path for uncompressed frames gives it. A frame cut
        short, any other frame, a 64-bit length or the inflate budget spent
        stops it, and the general path takes over there.
        """
        limit = self.max_message_size
        if limit is not None and limit < 1:
            return pos  # a frame counts as a byte: the general path refuses it
        room = limit if limit is not None else 1 << 62
        budget = self.inflate_budget
        wrap = wrap_binary = None
        if not self.compact_messages:
            wrap, wrap_binary = TextMessage, BinaryMessage
        append = events.append
        run = self._whole_run
        while end - pos >= 2:
            b0 = buf[pos]
            if b0 != 0xC1 and b0 != 0xC2:
                break
            if run is not None:
                # The extension's own loop (PerMessageDeflate's, in C), which
                # does what this one does; it stops at what it does not take.
                pos, self._inflated = run(
                    buf, pos, room, limit, budget, self._inflated, events, wrap, wrap_binary
                )
                if end - pos < 2:
                    break
                b0 = buf[pos]
                if b0 != 0xC1 and b0 != 0xC2:
                    break
            if budget is not None and self._inflated and self._inflated >= budget:
                break  # the general path sets ``more``
            n = buf[pos + 1]
            start = pos + 2
            if n >= 126:
                if n != 126 or end - pos < 4:
                    break  # a mask bit, a 64-bit length, or cut short
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            if n > end - start:
                break
            chunk = decode(buf[start : start + n], True, room)
            self._inflated += len(chunk)
            if limit is not None and len(chunk) > limit:
                raise MessageTooBig(f"decoded message exceeds max_message_size={limit}")
            if b0 == 0xC2:
                append(chunk if wrap_binary is None else wrap_binary(chunk, len(chunk)))
            else:
                try:
                    text = chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidPayload(f"text message is not valid UTF-8: {exc.reason}") from None
                append(text if wrap is None else wrap(text))
            pos = start + n
        return pos

    def _read_header(self, buf: bytes, pos: int, end: int) -> int:
        """Parse and check a header at ``pos``; returns its end, or -1 if incomplete."""
        if end - pos < 2:
            return -1
        opcode = buf[pos] & 0x0F
        # The checks that need this connection's state; parse_header makes
        # the rest. Data and reserved opcodes never overlap, so the order in
        # which errors are found is the frame's, whichever runs first.
        if opcode == 0:
            if not self._m_opcode:
                raise ProtocolError("continuation frame with no message to continue")
        elif opcode < 3 and self._m_opcode:
            raise ProtocolError("new data frame while a fragmented message is in progress")
        header = parse_header(
            buf, pos, allowed_rsv=self._allowed_rsv, masked=bool(self._expect_mask)
        )
        if header is None:
            return -1
        length = header.length
        rsv = header.rsv
        self._f_key = header.mask_key
        self._f_key_pos = 0
        self._f_opcode = opcode
        self._f_fin = header.fin
        self._f_remaining = length
        if opcode < 8:
            self._start_data_frame(opcode, rsv, length)
        else:
            self._control = b""
        return header.end

    def _start_data_frame(self, opcode: int, rsv: int, length: int) -> None:
        if opcode:  # first frame of a message
            self._m_opcode = opcode
            self._m_len = 0
            self._m_frames = 0
            self._m_first = length
            self._m_ext = (
                [e for e in self.extensions if e.begin_message(opcode, rsv)]
                if self.extensions
                else ()
            )
            if rsv and not self._m_ext:
                raise ProtocolError("RSV bits set but no extension claimed the message")
            # (Pieces are emptied by the join that ends a message.)
            if opcode == Opcode.TEXT:
                self._m_decoder = None
            else:
                self._m_buf = None
        elif rsv:
            raise ProtocolError("RSV bits set on a continuation frame")
        limit = self.max_message_size
        if limit is not None:
            if not self._m_ext and self._m_len + length > limit:
                raise MessageTooBig(
                    f"message of at least {self._m_len + length} bytes "
                    f"exceeds max_message_size={limit}"
                )
            # Every frame counts as at least one byte: endless empty
            # continuation frames (or compressed ones that inflate to nothing)
            # would otherwise keep a message in progress for ever.
            self._m_frames += 1
            if self._m_frames > limit:
                raise MessageTooBig(
                    f"message of more than {limit} frames exceeds max_message_size={limit}"
                )

    def _frame_data(
        self, chunk: bytes | memoryview, events: list[Received], frame_end: bool
    ) -> None:
        """Handle a chunk of the current frame's payload (the whole rest if ``frame_end``)."""
        if type(chunk) is memoryview:
            # A view from _piece: binary data, unmasked and not compressed,
            # with no close received.
            message_end = frame_end and self._f_fin
            self._binary_data(chunk, message_end, events)
            if message_end:
                self._m_opcode = 0
            return
        if self._f_key is not None and chunk:
            # Unmask in the server role, continuing the key where the last chunk ended.
            k = self._f_key_pos
            key = self._f_key[k:] + self._f_key[:k]
            self._f_key_pos = (k + len(chunk)) & 3
            chunk = apply_mask(chunk, key)
        opcode = self._f_opcode
        if opcode >= 8:
            self._control_frame(opcode, chunk, events)
            return
        message_end = frame_end and self._f_fin
        if self.state is State.CLOSE_RECEIVED or self.state is State.CLOSED:
            if message_end:
                self._m_opcode = 0
            return  # data after the peer's close is discarded (RFC 6455 5.5.1)
        if self._m_ext:
            limit = self.max_message_size
            room = (limit - self._m_len) if limit is not None else 1 << 62
            for ext in reversed(self._m_ext):
                chunk = ext.decode(chunk, message_end, room)
            self._inflated += len(chunk)
            if limit is not None and self._m_len + len(chunk) > limit:
                raise MessageTooBig(f"decoded message exceeds max_message_size={limit}")
        if self._m_opcode == Opcode.TEXT:
            self._text_data(chunk, message_end, events)
        else:
            self._binary_data(chunk, message_end, events)
        if message_end:
            self._m_opcode = 0

    def _text_data(self, chunk: bytes, message_end: bool, events: list[Received]) -> None:
        if message_end and self._m_decoder is None:
            # The whole message is in one chunk: decode it in one call.
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidPayload(f"text message is not valid UTF-8: {exc.reason}") from None
            events.append(text if self.compact_messages else TextMessage(text))
            return
        decoder = self._m_decoder
        if decoder is None:
            decoder = self._m_decoder = _new_utf8_decoder()
        try:
            part = decoder.decode(chunk, message_end)
        except UnicodeDecodeError as exc:
            raise InvalidPayload(f"text message is not valid UTF-8: {exc.reason}") from None
        self._m_len += len(chunk)
        if message_end:
            text = self._m_text.join(part)
            events.append(text if self.compact_messages else TextMessage(text))
            self._m_decoder = None
        elif part:
            self._m_text.add(part)

    def _binary_data(
        self, chunk: bytes | memoryview, message_end: bool, events: list[Received]
    ) -> None:
        # A message that spans frames or reads is assembled as its pieces
        # come: into ``allocate``'s (pooled) memory, or, for ``bytes``
        # consumers, as pieces joined once at its end. Keeping the pieces of a
        # pooled message until its end instead held a message's worth of
        # transient heap blocks that were freed together at its end: glibc then
        # trimmed its heap and faulted the pages in again for the next message
        # (15-25 k page faults per benchmark run against 6 k). The pooled buffer
        # starts at the size of the last such message (so a steady stream never
        # grows one) and doubles, when it must, within the pool.
        # Copies go through a memoryview of the target: ``bytearray[a:b] = x``
        # first copies any ``x`` that is not a bytearray into a new one (CPython's
        # bytearray_ass_subscript), a second copy of every byte of the message.
        start = self._m_len
        total = self._m_len = start + len(chunk)
        buf = self._m_buf
        parts = self._m_parts
        as_bytes = self.binary_as_bytes
        if buf is None and (
            parts or (as_bytes and (message_end or _frames.bytes_buffer is None))
        ):
            if not message_end:
                parts.add(chunk)
                return
            if parts:
                chunk = parts.join(chunk)
            if self.binary_as_bytes:
                # (never a view: _piece makes none for binary_as_bytes)
                assert type(chunk) is bytes
                events.append(chunk if self.compact_messages else BinaryMessage(chunk, total))
                return
            buf = self._allocate(total)
            memoryview(buf)[:total] = chunk  # (see _binary_data on copies)
            events.append(BinaryMessage(buf, total))
            return
        if buf is None:
            if message_end:  # the whole message in one piece: one copy
                buf = self._allocate(total)
                memoryview(buf)[:total] = chunk  # (see _binary_data on copies)
                events.append(BinaryMessage(buf, total))
                return
            # Room for what came, and as much again of what the frame still
            # announces (never by the announced length alone: a peer may announce
            # far more than it sends), or the size of the last such message.
            need = total + min(self._f_remaining, total)
            size = max(need, min(self._m_hint, _HINT_CAP))
            make = _frames.bytes_buffer if as_bytes else None
            buf = self._m_buf = make(size) if make is not None else self._allocate(size)
        elif total > len(buf):
            buf = self._grow(buf, max(total + min(self._f_remaining, total), 2 * len(buf)), start)
        memoryview(buf)[start:total] = chunk
        if message_end:
            self._assembled(buf, total, events)

    def _assembled(
        self, buf: bytearray | BytesAssembly, total: int, events: list[Received]
    ) -> None:
        """A message assembled in its buffer ``buf`` is complete (``total`` bytes)."""
        self._m_buf = None
        self._m_hint = total
        if not isinstance(buf, bytearray):
            # Its bytes buffer (binary_as_bytes when it began): the bytes
            # object itself, whatever binary_as_bytes says now (a BinaryMessage
            # of bytes is copied into pooled memory for on_binary).
            self._plan = None  # (an unused plan's views would keep it exported)
            data = _take(buf, total)
            events.append(data if self.compact_messages else BinaryMessage(data, total))
        elif self.binary_as_bytes:  # on_binary was cleared meanwhile
            data = bytes(memoryview(buf)[:total])
            if self._release is not None:
                self._release(buf)
            events.append(data if self.compact_messages else BinaryMessage(data, total))
        else:
            events.append(BinaryMessage(buf, total))

    def _control_frame(self, opcode: int, payload: bytes, events: list[Received]) -> None:
        if opcode == Opcode.PING:
            # RFC 6455 5.5.2: answer every ping until the peer's close arrives,
            # including after our own close was sent.
            if self.state is State.OPEN or self.state is State.CLOSE_SENT:
                self._outgoing.append(self._frame(Opcode.PONG, payload))
            events.append(Ping(payload))
            self.other_events += 1
        elif opcode == Opcode.PONG:
            events.append(Pong(payload))
            self.other_events += 1
        else:
            code, reason = parse_close(payload)
            self.close_received = (code, reason)
            self._transition("receive_close")
            events.append(CloseReceived(code, reason))
            self.other_events += 1
            # Nothing may follow the peer's close frame (RFC 6455 5.5.1): stop
            # parsing, also while the caller has yet to reply itself.
            self._phase = _DONE
            if self.state is State.CLOSE_RECEIVED and self.auto_close_reply:
                # Echo the code (RFC 6455 5.5.1); an empty close gets an empty reply.
                reply = None if code == CLOSE_NO_STATUS else code
                self._outgoing.append(self.encode_close(reply, ""))
