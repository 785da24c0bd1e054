"""Frame tracing: :func:`enable_trace`, or ``BLOCKWS_TRACE=1`` in the environment.

With tracing on, every socket that opens afterwards logs to the
``blockws.trace`` logger, at ``DEBUG``, with its context (``record.ws_context``,
as every blockws record; see :mod:`blockws.log`):

* each frame in (``<``) and out (``>``): opcode, FIN, RSV bits, MASK, payload
  length and the first ``payload_bytes`` bytes of the payload as on the wire
  (unmasked; still compressed when RSV1 is set), escaped; a close frame's code
  and reason;
* the handshake: the request and response headers (HTTP/1.1 upgrade or
  HTTP/2 extended CONNECT), with the values of ``Authorization``,
  ``Proxy-Authorization``, ``Cookie`` and ``Set-Cookie`` and the URL's
  userinfo redacted;
* each pong that answers a ping this socket sent, with the round trip;
* the socket's lifecycle changes (``CONNECTING -> OPEN`` ...).

Every message starts with ``#<id>``, the socket's ``ws.id``, so a plain
handler tells the sockets apart. Sample (the echo of "hi" then a close)::

    #1 state NEW -> CONNECTING
    #1 > GET /chat HTTP/1.1 ...request headers, one per line...
    #1 < HTTP/1.1 101 Switching Protocols ...response headers...
    #1 state CONNECTING -> OPEN
    #1 > TEXT fin=1 rsv=000 mask=1 len=2 b'hi'
    #1 < TEXT fin=1 rsv=000 mask=0 len=2 b'hi'
    #1 > CLOSE fin=1 rsv=000 mask=1 len=2 code=1000 reason=''

Cost: a socket opened while tracing is off is not touched at all. Its
transport is the plain one, so the send and receive paths hold no trace
check; the only checks are one per socket opening and one per lifecycle
change. A socket opened while tracing is on gets a wrapped transport that
parses the byte stream again for the log. So :func:`enable_trace` applies to
sockets opened after the call, while ``enable_trace(False)`` silences every
socket at once. ``python -m benchmarks.trace`` measures both.

Threads: the records are written on the thread that moved the bytes (a
socket's reader or writer, a caller of ``send()`` writing directly, an HTTP/2
connection's reader) and, for lifecycle changes, while the socket's lock is
held: a handler of ``blockws.trace`` records must not call into blockws.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any, Union

from .handshake import SENSITIVE_HEADERS, Headers, redact_url
from .log import ContextAdapter

__all__ = ["enable_trace", "trace_logger", "Tracer", "TracingTransport", "is_enabled"]

BytesLike = Union[bytes, bytearray, memoryview]

#: The logger every trace record goes to (a child of ``blockws``).
trace_logger = logging.getLogger("blockws.trace")

#: Whether sockets opening now are traced. Read (never written) outside
#: this module, as ``trace.enabled``, only where a socket opens or changes phase.
enabled = False
#: Payload bytes shown per frame.
payload_bytes = 64
#: The stderr handler enable_trace added when logging had none, to remove later.
_own_handler: logging.Handler | None = None

_OPCODES = {0: "CONT", 1: "TEXT", 2: "BINARY", 8: "CLOSE", 9: "PING", 10: "PONG"}


def enable_trace(enabled: bool = True, *, payload_bytes: int = 64) -> None:
    """Turn frame tracing on (or off) for the whole process.

    Sockets opened after ``enable_trace()`` log every frame, the handshake
    headers (secrets redacted), pongs with their round trip and their state
    changes to the ``blockws.trace`` logger at ``DEBUG``; ``payload_bytes``
    (default 64, 0 for none) is how much of each payload is shown.
    ``enable_trace(False)`` stops the records of every socket at once.

    The logger's level is set to ``DEBUG`` while tracing is on (and reset when
    it is turned off). When logging is not configured at all (no handler on
    the root logger or on ``blockws``), a handler writing to ``sys.stderr`` is
    added to ``blockws.trace``, so that ``enable_trace()`` alone shows the
    frames; configure logging first to send them elsewhere.

    ``BLOCKWS_TRACE=1`` in the environment calls ``enable_trace()`` when
    blockws is imported. Safe to call from any thread.
    """
    global _own_handler
    if not isinstance(payload_bytes, int) or isinstance(payload_bytes, bool):
        raise TypeError(f"payload_bytes must be an int, not {type(payload_bytes).__name__}")
    if payload_bytes < 0:
        raise ValueError("payload_bytes must be 0 or more")
    globals()["payload_bytes"] = payload_bytes
    if enabled:
        trace_logger.setLevel(logging.DEBUG)
        if not trace_logger.hasHandlers() and _own_handler is None:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            trace_logger.addHandler(handler)
            _own_handler = handler
    else:
        trace_logger.setLevel(logging.NOTSET)
        if _own_handler is not None:
            trace_logger.removeHandler(_own_handler)
            _own_handler = None
    globals()["enabled"] = bool(enabled)


def is_enabled() -> bool:
    """Whether sockets opening now are traced."""
    return enabled


def _on() -> bool:
    return enabled and trace_logger.isEnabledFor(logging.DEBUG)


def _adapter(context: MutableMapping[str, Any]) -> ContextAdapter:
    return ContextAdapter(context, trace_logger)


def _tag(context: MutableMapping[str, Any]) -> str:
    return f"#{context.get('id', '?')}"


def _preview(data: bytes, total: int) -> str:
    shown = repr(bytes(data))
    return shown + ("..." if total > len(data) else "")


def _header_lines(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f"\n    {name}: {'<redacted>' if name.lower() in SENSITIVE_HEADERS else value}"
        for name, value in pairs
    )


# -- lifecycle and handshake (called where a socket opens or changes phase) ------------


def phase(context: MutableMapping[str, Any], old: str, new: str) -> None:
    """Log a lifecycle change (the caller checked ``enabled``)."""
    if _on():
        _adapter(context).debug("%s state %s -> %s", _tag(context), old, new)


def request_http1(context: MutableMapping[str, Any], raw: bytes) -> None:
    """Log an HTTP/1.1 upgrade request as written (credentials redacted)."""
    if not _on():
        return
    head = raw.decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")
    pairs = [tuple(s.strip() for s in line.split(":", 1)) for line in head[1:] if ":" in line]
    _adapter(context).debug(
        "%s > %s%s", _tag(context), head[0], _header_lines(pairs)  # type: ignore[arg-type]
    )


def request_http2(
    context: MutableMapping[str, Any], url: str, pairs: Sequence[tuple[str, str]]
) -> None:
    """Log an RFC 8441 extended CONNECT's headers (credentials redacted)."""
    if _on():
        _adapter(context).debug(
            "%s > CONNECT %s HTTP/2 :protocol websocket%s",
            _tag(context),
            redact_url(url),
            _header_lines(pairs),
        )


def response(
    context: MutableMapping[str, Any], version: str, status: int, reason: str, headers: Headers
) -> None:
    """Log the handshake response's status and headers (credentials redacted)."""
    if _on():
        _adapter(context).debug(
            "%s < HTTP/%s %d %s%s",
            _tag(context),
            version,
            status,
            reason,
            _header_lines(headers.raw_items()),
        )


def event(context: MutableMapping[str, Any], text: str) -> None:
    """Log something else that happened to the socket (the caller checked ``enabled``)."""
    if _on():
        _adapter(context).debug("%s %s", _tag(context), text)


# -- frames ------------------------------------------------------------------------------


class _FrameReader:
    """Follows one direction's byte stream frame by frame, copying only what it shows."""

    __slots__ = ("direction", "tracer", "skip", "_head", "_need", "_frame", "_left", "_key", "_pos",
                 "_shown", "_broken")

    def __init__(self, direction: str, tracer: Tracer) -> None:
        self.direction = direction
        self.tracer = tracer
        self.skip = 0  # bytes to pass over before following the stream again
        self._head = b""  # header bytes gathered so far
        self._frame: tuple[int, int, bool, int] | None = None  # b0, length, masked, keep
        self._left = 0  # payload bytes of the current frame still to come
        self._key = b""
        self._pos = 0  # payload bytes seen of the current frame
        self._shown = bytearray()
        self._broken = False

    def feed(self, data: BytesLike) -> None:
        if self._broken:
            return
        view = memoryview(data).cast("B")
        if self.skip:
            n = min(self.skip, len(view))
            self.skip -= n
            view = view[n:]
        try:
            self._feed(view)
        except Exception as exc:  # noqa: BLE001 - a trace must never break the socket
            self._broken = True
            self.tracer.log.debug("%s %s cannot follow the frames: %r", self.tracer.tag,
                                  self.direction, exc)

    def _feed(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self._frame is None:
                take = min(end - pos, 14 - len(self._head))
                head = self._head + bytes(view[pos : pos + take])
                used = self._parse_head(head)
                if used < 0:
                    self._head = head
                    pos += take
                    continue
                pos += used - len(self._head)
                self._head = b""
                if self._left == 0:
                    self._emit()
                continue
            n = min(self._left, end - pos)
            frame = self._frame
            keep = frame[3]
            if len(self._shown) < keep:
                room = keep - len(self._shown)
                chunk = bytes(view[pos : pos + min(n, room)])
                if frame[2]:
                    chunk = _unmask(chunk, self._key, self._pos)
                self._shown += chunk
            self._pos += n
            self._left -= n
            pos += n
            if self._left == 0:
                self._emit()

    def _parse_head(self, head: bytes) -> int:
        """Start a frame from ``head``; returns the header's length, or -1 if cut short."""
        if len(head) < 2:
            return -1
        b0, b1 = head[0], head[1]
        masked = bool(b1 & 0x80)
        length = b1 & 0x7F
        at = 2
        if length == 126:
            if len(head) < 4:
                return -1
            length = int.from_bytes(head[2:4], "big")
            at = 4
        elif length == 127:
            if len(head) < 10:
                return -1
            length = int.from_bytes(head[2:10], "big")
            at = 10
        if masked:
            if len(head) < at + 4:
                return -1
            self._key = head[at : at + 4]
            at += 4
        control = b0 & 0x0F >= 8
        # A control frame is kept whole (at most 125 bytes): its payload says what it is.
        keep = min(length, 125) if control else min(length, payload_bytes)
        self._frame = (b0, length, masked, keep)
        self._left = length
        self._pos = 0
        self._shown = bytearray()
        return at

    def _emit(self) -> None:
        frame = self._frame
        assert frame is not None
        self._frame = None
        b0, length, masked, _keep = frame
        opcode = b0 & 0x0F
        payload = bytes(self._shown)
        self.tracer.frame(self.direction, b0, opcode, length, masked, payload)


def _unmask(chunk: bytes, key: bytes, offset: int) -> bytes:
    return bytes(b ^ key[(offset + i) & 3] for i, b in enumerate(chunk))


class Tracer:
    """One socket's trace: its frames both ways, and its pings' round trips."""

    def __init__(self, context: MutableMapping[str, Any]) -> None:
        self.log = _adapter(context)
        self.tag = _tag(context)
        self._in = _FrameReader("<", self)
        self._out = _FrameReader(">", self)
        self._pings: dict[bytes, float] = {}  # payload -> when our ping went out

    def incoming(self, data: BytesLike) -> None:
        if enabled:
            self._in.feed(data)

    def outgoing(self, chunks: Sequence[BytesLike]) -> None:
        """Chunks about to be written."""
        if enabled:
            for chunk in chunks:
                self._out.feed(chunk)

    def skip_outgoing(self, count: int) -> None:
        """The next ``count`` bytes written were traced already."""
        self._out.skip += count

    def frame(
        self, direction: str, b0: int, opcode: int, length: int, masked: bool, payload: bytes
    ) -> None:
        if not trace_logger.isEnabledFor(logging.DEBUG):
            return
        name = _OPCODES.get(opcode, f"OPCODE-{opcode}")
        rsv = f"{(b0 >> 6) & 1}{(b0 >> 5) & 1}{(b0 >> 4) & 1}"
        extra = ""
        if opcode == 8 and len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            extra = f" code={code} reason={payload[2:].decode('utf-8', 'replace')!r}"
        elif opcode == 9 and direction == ">":
            self._pings[payload] = time.monotonic()
            if len(self._pings) > 64:
                self._pings.pop(next(iter(self._pings)))
        elif opcode == 10 and direction == "<":
            sent = self._pings.pop(payload, None)
            if sent is not None:
                extra = f" round trip {(time.monotonic() - sent) * 1000:.2f} ms"
        shown = payload[:payload_bytes]
        self.log.debug(
            "%s %s %s fin=%d rsv=%s mask=%d len=%d%s %s",
            self.tag,
            direction,
            name,
            b0 >> 7,
            rsv,
            masked,
            length,
            extra,
            _preview(shown, length) if payload_bytes else "",
        )


class TracingTransport:
    """A transport that traces the bytes going through it, then passes them on.

    Only sockets opened while tracing is on get one (see the module
    docstring); everything it does not trace is the wrapped transport's.
    """

    def __init__(self, inner: Any, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # Frames are traced before they are written, so that a reply never shows
    # up in the trace ahead of what it answers. The sender lets one thread
    # write at a time, so the stream is seen in the order it goes out.

    def write(self, chunks: Sequence[BytesLike]) -> None:
        self._tracer.outgoing(chunks)
        self._inner.write(chunks)

    def try_write(self, chunks: Sequence[BytesLike]) -> int:
        self._tracer.outgoing(chunks)
        written: int = self._inner.try_write(chunks)
        left = sum(map(len, chunks)) - written
        if left > 0:
            # The writer writes the rest next, and the trace has seen it already.
            self._tracer.skip_outgoing(left)
        return written

    def read(self, timeout: float | None) -> bytes | None:
        data: bytes | None = self._inner.read(timeout)
        if data:
            self._tracer.incoming(data)
        return data

    def run(self, sink: Any, before_read: Any = None) -> None:
        self._inner.run(_TracingSink(sink, self._tracer), before_read)


class _TracingSink:
    """The socket's sink, seen through the trace."""

    def __init__(self, inner: Any, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    def data_received(self, data: bytes) -> None:
        self._tracer.incoming(data)
        self._inner.data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._inner.connection_lost(exc)


def _from_environment() -> None:
    if os.environ.get("BLOCKWS_TRACE", "").strip() not in ("", "0"):
        enable_trace()


_from_environment()
