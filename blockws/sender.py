"""The send side of one socket: the queue, ``buffered_amount`` and the writer thread.

``send()`` on any thread either writes at once on the caller's thread -- when
nothing is queued or being written, the transport can take the bytes without
blocking, and the last direct write was followed by incoming data (a reply)
or a quiet spell -- or appends to the queue, which the writer thread drains.
Either way ``send()`` never waits for the network: a direct write is
non-blocking, and whatever the kernel does not take at once goes to the
writer, ahead of everything queued after it.

The writer thread (``blockws-<id>-writer``) starts when there is something to
write and ends after :data:`WRITER_IDLE` seconds with nothing to do, so an
idle socket costs one thread (its reader), not two. It writes control frames
first (pongs, a close reply), then messages in batches of up to
:data:`WRITE_BATCH` bytes with one system call per batch, and slips control
frames in between the fragments of a large message.

Every method whose name ends in ``_locked`` expects the socket's lock, which
the :class:`Sender` shares with its :class:`~blockws.websocket.WebSocket`:
one lock keeps "is the socket open?" and "append to the queue" atomic, so no
message can be queued behind the close frame.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

from .buffers import BufferSegment
from .log import ContextAdapter
from .protocol import Protocol
from .transport import Transport

__all__ = ["Sender", "CLOSE_FRAME", "UNCOMPRESSED", "WRITE_BATCH", "WRITER_IDLE"]

#: Bytes encoded and written per batch before control frames get a turn.
WRITE_BATCH = 256 * 1024
#: Seconds an idle writer thread waits for work before it ends.
WRITER_IDLE = 1.0
#: The queue item opcode of a pre-encoded close frame.
CLOSE_FRAME = -1
#: Set in a queued message's opcode when it must skip compression.
UNCOMPRESSED = 0x100

# (opcode, payload, segment to release once written, size counted in buffered_amount)
Item = tuple[int, Any, "BufferSegment | None", int]


class Sender:
    """Queue, counters and writer thread of one socket (see the module docstring)."""

    def __init__(
        self,
        name: str,
        lock: threading.Lock,
        log: ContextAdapter,
        on_failure: Callable[[BaseException], None],
        on_written: Callable[[], None],
    ) -> None:
        self.name = name
        self.lock = lock
        self.log = log
        self._on_failure = on_failure  # a write failed: end the socket
        self._on_written = on_written  # called after each batch (HTTP/2 stream ending)
        self._wake = threading.Condition(lock)
        self.queue: deque[Item] = deque()
        self.control: deque[bytes] = deque()
        #: What the kernel did not take of a direct write; written first.
        self.rest = b""
        #: Bytes accepted and not yet written (``buffered_amount``).
        self.buffered = 0
        self.proto: Protocol | None = None
        self.transport: Transport | None = None
        self._direct = False  # the transport can take non-blocking writes
        self._extensions = False  # the protocol has extensions (compression, maybe)
        #: Whether the next message may be written directly. A direct write
        #: clears it; data arriving (a reply) or the writer going idle sets it
        #: again. Request/response traffic thus skips the thread hand-off, while
        #: a burst of sends goes through the writer, one system call per batch.
        self.direct_ok = True
        self._writing = False  # a thread is writing to the transport now
        self._thread: threading.Thread | None = None
        self._stopped = False

    def attach(self, proto: Protocol, transport: Transport) -> None:
        """The socket is open: start sending through ``proto`` and ``transport``."""
        self.proto, self.transport = proto, transport
        self._direct = transport.can_try_write
        self._extensions = bool(proto.extensions)

    # -- queueing (lock held) ---------------------------------------------------------

    def enqueue_locked(
        self, opcode: int, payload: Any, segment: BufferSegment | None, size: int
    ) -> bool:
        """Queue a message, or claim the transport for a direct write (returns True).

        Direct writes skip messages that will be compressed: compression runs on
        the writer thread, never on the caller's.
        """
        if (
            self._direct
            and self.direct_ok
            and not self._writing
            and not self.queue
            and not self.control
            and not self.rest
            and not (self._extensions and self._will_compress(opcode, size))
        ):
            self._writing = True
            self.direct_ok = False
            return True
        self.queue.append((opcode, payload, segment, size))
        self.buffered += size
        self._kick_locked()
        return False

    def _will_compress(self, opcode: int, size: int) -> bool:
        proto = self.proto
        if proto is None or not proto.extensions or opcode & UNCOMPRESSED:
            return False
        return any(getattr(e, "min_size", 0) <= size for e in proto.extensions)

    def close_frame_locked(self, frame: bytes) -> None:
        """Queue our close frame behind every message queued before it."""
        self.queue.append((CLOSE_FRAME, frame, None, 0))
        self._kick_locked()

    def control_locked(self, frames: list[bytes] | tuple[bytes, ...]) -> None:
        """Queue control frames (pongs, pings, a close reply) ahead of messages."""
        self.control.extend(frames)
        self._kick_locked()

    def drop_locked(self) -> int:
        """Discard queued messages (releasing their segments); returns how many."""
        dropped = len(self.queue)
        for _o, _p, segment, n in self.queue:
            self.buffered -= n  # a batch being written is counted off by the writer
            if segment is not None and not segment.released:
                segment.release()
        self.queue.clear()
        return dropped

    def _kick_locked(self) -> None:
        """Wake the writer thread, starting one if none is running."""
        if self._stopped or self.transport is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        else:
            self._wake.notify()

    # -- the direct write (caller's thread, lock NOT held) ------------------------------

    def direct_write(self, opcode: int, payload: Any, segment: BufferSegment | None) -> None:
        """Write one message now without blocking; the rest goes to the writer."""
        proto, transport = self.proto, self.transport
        assert proto is not None and transport is not None
        data = b""
        written = 0
        try:
            frames = proto.encode_data(opcode & 0xF, payload, compress=not opcode & UNCOMPRESSED)
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            written = transport.try_write(data)
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            with self.lock:
                self._writing = False
            if segment is not None and not segment.released:
                segment.release()
            self._on_failure(exc)
            return
        if segment is not None and not segment.released:
            segment.release()  # its bytes were copied into the frames
        with self.lock:
            self._writing = False
            if written < len(data):
                # The kernel took part of it: the writer sends the rest first.
                self.rest = data[written:]
                self.buffered += len(self.rest)
                self._kick_locked()
            elif self.queue or self.control:
                self._kick_locked()  # others queued while we wrote
        # No _on_written() here: a data message cannot end the stream, and a
        # close reply queued meanwhile is written (and followed up) by the writer.

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        proto, transport = self.proto, self.transport
        assert proto is not None and transport is not None
        lock, wake, queue, control = self.lock, self._wake, self.queue, self.control
        try:
            while True:
                with lock:
                    while True:
                        if self._stopped:
                            return
                        work = bool(queue or control or self.rest)
                        if work and not self._writing:
                            break
                        # Idle (or a direct write is under way): wait; end when idle long.
                        if not wake.wait(WRITER_IDLE) and not work and not self._writing:
                            if not (queue or control or self.rest):
                                self._thread = None  # the next send starts another
                                self.direct_ok = True
                                return
                    self._writing = True
                    rest, self.rest = self.rest, b""
                    chunks: list[bytes] = [rest] if rest else []
                    chunks.extend(control)
                    control.clear()
                    batch: list[Item] = []
                    size = 0
                    while queue and size < WRITE_BATCH:
                        item = queue.popleft()
                        batch.append(item)
                        size += item[3]
                try:
                    self._write_batch(proto, transport, chunks, batch)
                finally:
                    with lock:
                        self._writing = False
                        self.buffered -= size + len(rest)
                for _o, _p, segment, _n in batch:
                    if segment is not None and not segment.released:
                        segment.release()
                self._on_written()
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            with lock:
                stopped = self._stopped
            if not stopped:
                self.log.debug("writer failed: %r", exc)
                self._on_failure(exc)

    def _write_batch(
        self, proto: Protocol, transport: Transport, chunks: list[bytes], batch: list[Item]
    ) -> None:
        for opcode, payload, _segment, n in batch:
            if opcode == CLOSE_FRAME:
                chunks.append(payload)
                continue
            frames = proto.encode_data(opcode & 0xF, payload, compress=not opcode & UNCOMPRESSED)
            if n > WRITE_BATCH and len(frames) > 1:
                # A big message goes out in batches so that control frames
                # queued meanwhile can go out between its fragments.
                if chunks:
                    transport.write(chunks)
                    chunks.clear()
                self._write_interleaved(frames, transport)
            else:
                chunks.extend(frames)
        if chunks:
            transport.write(chunks)

    def _write_interleaved(self, frames: list[bytes], transport: Transport) -> None:
        pending: list[bytes] = []
        size = 0
        for frame in frames:
            pending.append(frame)
            size += len(frame)
            if size >= WRITE_BATCH:
                with self.lock:
                    if self.control:
                        pending.extend(self.control)  # control frames between fragments
                        self.control.clear()
                transport.write(pending)
                pending, size = [], 0
        if pending:
            transport.write(pending)

    # -- the end ----------------------------------------------------------------------

    def stop_locked(self) -> threading.Thread | None:
        """Stop for good (the socket ended); returns the thread to join, if any."""
        self._stopped = True
        self.drop_locked()
        self.control.clear()
        self.buffered -= len(self.rest)
        self.rest = b""
        self._wake.notify_all()
        return self._thread
