"""The send side of one socket: the queue, ``buffered_amount`` and the writer thread.

``send()`` on any thread either writes at once on the caller's thread -- when
nothing is queued or being written, the transport can take the bytes without
blocking, and the last direct write was followed by incoming data (a reply)
or a quiet spell -- or appends to the queue, which the writer thread drains.
Either way ``send()`` never waits for the network: a direct write is
non-blocking, and whatever the kernel does not take at once goes to the
writer, ahead of everything queued after it. A direct write is of one
message of up to :data:`DIRECT_MAX` bytes; one larger than
:data:`WRITE_BATCH` is encoded and offered a batch at a time, only while the
kernel takes each batch whole.

The writer thread (``blockws-<id>-writer``) starts when there is something to
write and ends after :data:`WRITER_IDLE` seconds with nothing to do, so an
idle socket costs one thread (its reader), not two. It writes control frames
first (pongs, a close reply), then messages in batches of up to
:data:`WRITE_BATCH` bytes with one system call per batch. A message larger
than that is framed one fragment at a time into a reusable buffer and
written a batch at a time, with control frames slipped in between; a
fragment larger than :data:`POOLED_FRAGMENT_MAX` goes in pieces of a batch,
and nothing is written between two pieces of one frame.

Control frames (pongs, pings, close replies) count in ``buffered_amount`` as
their bytes on the wire, from the moment they are queued until they are
written. Pongs are bounded (RFC 6455 5.5.3 lets an endpoint answer only the
most recent ping): while a write is under way -- the transport is not taking
bytes as fast as they come -- a new pong replaces every pong still waiting,
so a server that floods pings and never reads costs one pending pong, not
one per ping. Pongs that arrive while the writer is idle all go out together
(every ping answered, as Autobahn case 2.10 checks).

Every method whose name ends in ``_locked`` expects the socket's lock, which
the :class:`Sender` shares with its :class:`~blockws.websocket.WebSocket`:
one lock keeps "is the socket open?" and "append to the queue" atomic, so no
message can be queued behind the close frame.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union

from . import frames as _frames
from .buffers import BufferSegment
from .exceptions import InvalidState
from .log import ContextAdapter
from .protocol import Protocol, Role, batch_room
from .sendqueue import FAST_MAX, SendQueue
from .transport import TCPTransport, Transport

__all__ = [
    "Sender",
    "CLOSE_FRAME",
    "DIRECT_MAX",
    "GATHER_FROM",
    "UNCOMPRESSED",
    "WRITE_BATCH",
    "WRITER_IDLE",
]

#: Bytes encoded and written per batch before control frames get a turn.
WRITE_BATCH = 256 * 1024
#: Largest message written directly on the caller's thread; larger ones go
#: to the writer. It bounds the time ``send()`` spends masking and copying into
#: the kernel. A direct write of more than :data:`WRITE_BATCH` goes a batch at
#: a time while the kernel takes each batch whole (see
#: :meth:`Sender.direct_write`).
DIRECT_MAX = 1024 * 1024
#: A large message's frames go to a gathering transport as they are (see
#: Sender._write_large) when its fragments are at least this large; smaller
#: ones are copied into one buffer (a system call per few hundred bytes would
#: cost more than the copy).
GATHER_FROM = 8 * 1024
#: Seconds an idle writer thread waits for work before it ends.
WRITER_IDLE = 1.0
#: The queue item opcode of a pre-encoded close frame.
CLOSE_FRAME = -1
#: Set in a queued message's opcode when it must skip compression.
UNCOMPRESSED = 0x100
assert CLOSE_FRAME < 0  # (what blockws.sendqueue takes a pre-encoded frame by)
_CLOSE_OPCODE = 0x8
_PONG_OPCODE = 0xA
_PING_PONG = (0x9, _PONG_OPCODE)

# (opcode, payload, segment to release once written, size counted in buffered_amount)
Item = tuple[int, Any, "BufferSegment | None", int]
# (its remaining batches, its payload bytes not yet encoded, its segment, and
# whether what was written stops inside a frame: nothing may go out before the
# frame's rest then, not even a control frame)
Unfinished = tuple[
    Iterator[tuple[list["BytesLike"], bool, int]], int, "BufferSegment | None", bool
]
BytesLike = Union[bytes, bytearray, memoryview]


#: The largest ``max_fragment_size`` whose batches are whole fragments encoded
#: into a pooled buffer (see _batch_buffer); a larger fragment goes in pieces
#: of a batch through a pooled buffer of a batch (``encode_piece_into``).
#: Masking a large fragment into fresh memory instead made the heap give pages
#: back and fault them in again: a 1 MiB echo, 4 in flight through
#: ``receive()``, with 1 MiB fragments took 480 page faults and about 880 us of
#: CPU a message, against 5-24 faults and about 360-420 us pooled (``python -m
#: benchmarks.fragments``).
POOLED_FRAGMENT_MAX = 4 * WRITE_BATCH

#: Buffers a large message's batches are encoded into (see _batch_buffer),
#: shared by every socket of the process: at most this many are kept.
_POOL_MAX = 4
_pool: list[bytearray] = []


def _batch_buffer(proto: Protocol, transport: Transport) -> bytearray | None:
    """A buffer for :meth:`Protocol.data_batches`' ``into``, from the pool, or
    ``None`` where batches stay the frames it makes.

    A large message was otherwise encoded into fresh heap blocks, a batch at a
    time, and freed once written: glibc then trimmed the top of its heap and
    faulted the same pages in again for every batch (10 to 20 times a 1 MiB
    echo's usual page faults, by how the heap happened to lie). Every
    transport is done with what it was given when ``write()`` returns (plain
    TCP's kernel, TLS and HTTP/2 have copied it), and what ``try_write()``
    did not take stays in this buffer, which then goes with it (see
    :meth:`Sender.direct_write`). For a client's fragments of up to
    :data:`POOLED_FRAGMENT_MAX`, with the C speedups (above
    :data:`WRITE_BATCH`, a batch is one fragment: the pool then keeps at
    most :data:`_POOL_MAX` buffers of about the fragment size plus
    :data:`WRITE_BATCH`); for larger fragments, any pooled buffer of at least
    a batch and a header (each batch a piece of a fragment).
    ``list.pop()`` and ``append()`` are atomic: no lock.
    """
    if (
        proto.role is not Role.CLIENT  # (a server's frames are not masked: no batch to encode)
        or _frames.encode_frames_into is None  # (the pure path sends the frames as made)
    ):
        return None
    limit = proto.max_fragment_size
    if limit > POOLED_FRAGMENT_MAX:
        if _frames.encode_piece_into is None:
            return None
        need = WRITE_BATCH + 14  # a piece of a frame a batch (any pooled one will do)
    else:
        need = batch_room(WRITE_BATCH, limit)
    try:
        buf = _pool.pop()
    except IndexError:
        return bytearray(need)
    if len(buf) < need:
        return bytearray(need)  # (a smaller one, for smaller fragments: dropped)
    return buf


def _give_back(buf: bytearray | None) -> None:
    """A batch buffer whose every batch is written goes back to the pool."""
    if buf is not None and len(_pool) < _POOL_MAX:
        _pool.append(buf)


def _not_open() -> BaseException:
    """What ``push`` raises on a socket that is not open, by default (the
    Connection passes its own: the error says why)."""
    return InvalidState("the socket is not open")


def _remaining(chunks: Sequence[BytesLike], sent: int) -> list[BytesLike]:
    """What is left of ``chunks`` after their first ``sent`` bytes went out."""
    i = 0
    while sent >= len(chunks[i]):  # callers pass less than the total: this ends
        sent -= len(chunks[i])
        i += 1
    head: BytesLike = memoryview(chunks[i])[sent:] if sent else chunks[i]
    return [head, *chunks[i + 1 :]]


class Sender:
    """Queue, counters and writer thread of one socket (see the module docstring)."""

    # (Slots: an idle socket keeps one Sender; a dict would cost it more.)
    __slots__ = (
        "name",
        "lock",
        "log",
        "_on_failure",
        "_on_close_written",
        "_wake",
        "control",
        "queue",
        "unfinished",
        "_out",
        "proto",
        "transport",
        "_extensions",
        "_thread",
        "_stopped",
        "_late_close",
    )

    def __init__(
        self,
        name: str,
        lock: threading.Lock,
        log: ContextAdapter,
        on_failure: Callable[[Sender, BaseException], None],
        on_written: Callable[[Sender], None],
        refused: Callable[[], BaseException] = _not_open,
    ) -> None:
        self.name = name
        self.lock = lock
        self.log = log
        # Both are told which sender calls (bound methods, shared by every
        # link, rather than closures made for each: an idle socket keeps them).
        self._on_failure = on_failure  # a write failed: end the socket
        # Called after a batch that carried a close frame (ours, or our reply):
        # the point from which an HTTP/2 stream may be ended.
        self._on_close_written = on_written
        # Made with the first writer thread (an idle socket has none).
        self._wake: threading.Condition | None = None
        #: Control frames waiting for the writer (a few at most: a list).
        self.control: list[bytes] = []
        #: The messages waiting for the writer, ``buffered_amount`` and the
        #: flags ``send()`` decides on (see :mod:`blockws.sendqueue`):
        #: ``queue.writing`` (a thread writes to the transport now),
        #: ``queue.waiting`` (the writer thread is in ``_wake.wait``),
        #: ``queue.running`` (a writer thread exists), ``queue.direct_ok``
        #: (the next message may be written directly: a direct write clears
        #: it; data arriving, a reply, or the writer going idle sets it again,
        #: so request/response traffic skips the thread hand-off while a burst
        #: of sends goes through the writer, one system call per batch) and
        #: ``queue.rest`` (what the kernel did not take of a direct write,
        #: written first: a list, or ``()``). ``queue.push`` is ``send()``'s one call.
        self.queue = SendQueue(
            lock,
            self,  # (it calls kick_locked and direct_write)
            refused,
            self.control,
            (),  # (an empty rest is a tuple: an idle socket keeps no list)
            DIRECT_MAX,
            WRITE_BATCH,
            UNCOMPRESSED,
        )
        #: A large message a direct write began and left in ``rest``: its
        #: remaining batches, its payload bytes not yet encoded (counted in
        #: ``buffered``) and its segment. The writer finishes it after ``rest``
        #: (and the control frames queued meanwhile), before anything queued.
        self.unfinished: Unfinished | None = None
        self._out: memoryview | None = None  # the writer's buffer for large messages
        self.proto: Protocol | None = None
        self.transport: Transport | None = None
        self._extensions = False  # the protocol has extensions (compression, maybe)
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: A transport the teardown asked to close while a write was under
        #: way (see :meth:`close_transport`).
        self._late_close: Transport | None = None

    def attach(self, proto: Protocol, transport: Transport) -> None:
        """The socket is open: start sending through ``proto`` and ``transport``
        (with the lock held by the Connection; a test's rig may call it before
        any other thread uses the sender)."""
        self.proto, self.transport = proto, transport
        self._extensions = bool(proto.extensions)
        queue = self.queue
        queue.direct = transport.can_try_write
        # A client's batches without extensions are whole fragments of
        # max_fragment_size each (the last aside): their payload is known.
        queue.large_direct = proto.role is Role.CLIENT and not proto.extensions
        # Messages an extension compresses are never written directly.
        queue.compress_from = min(
            (getattr(e, "min_size", 0) for e in proto.extensions), default=sys.maxsize
        )
        # A small message to plain TCP from a client without extensions: the
        # queue frames and writes it itself (see SendQueue.set_fast).
        fast = (
            type(transport) is TCPTransport
            and transport.can_try_write
            and proto.role is Role.CLIENT
            and not proto.extensions
            and proto.default_keys
            and proto.max_fragment_size >= FAST_MAX
        )
        if fast:
            assert isinstance(transport, TCPTransport)
            queue.set_fast(transport, transport.sock.fileno())
        else:
            queue.set_fast(None, -1)

    @property
    def buffered(self) -> int:
        """Bytes accepted and not yet written (``buffered_amount``)."""
        return int(self.queue.buffered)

    @property
    def writing(self) -> bool:
        """Whether a thread writes to the transport now."""
        return bool(self.queue.writing)

    # -- queueing (lock held) ---------------------------------------------------------

    def close_frame_locked(self, frame: bytes) -> None:
        """Queue our close frame behind every message queued before it."""
        assert self.lock.locked()
        self.queue.append((CLOSE_FRAME, frame, None, 0))
        self.kick_locked()

    def control_locked(self, frames: list[bytes] | tuple[bytes, ...]) -> None:
        """Queue control frames (pongs, pings, a close reply) ahead of messages.

        They count in ``buffered`` until written. While a write is under way,
        only the newest pong is kept (see the module docstring).
        """
        assert self.lock.locked()
        control, queue = self.control, self.queue
        if (
            queue.direct
            and not queue.writing
            and not control
            and not queue
            and not queue.rest
            and not self._stopped
            and all(f[0] & 0x0F in _PING_PONG for f in frames)
            and self._write_control_now_locked(frames)
        ):
            return
        if queue.writing and any(f[0] & 0x0F == _PONG_OPCODE for f in frames):
            # Probe "pong queue without bound": answer only the most recent
            # ping while the transport is busy (RFC 6455 5.5.3).
            last = max(i for i, f in enumerate(frames) if f[0] & 0x0F == _PONG_OPCODE)
            frames = [f for i, f in enumerate(frames) if i == last or f[0] & 0x0F != _PONG_OPCODE]
            stale = [f for f in control if f[0] & 0x0F == _PONG_OPCODE]
            if stale:
                kept = [f for f in control if f[0] & 0x0F != _PONG_OPCODE]
                control.clear()
                control.extend(kept)
                queue.buffered -= sum(map(len, stale))
        control.extend(frames)
        queue.buffered += sum(map(len, frames))
        self.kick_locked()

    def _write_control_now_locked(self, frames: list[bytes] | tuple[bytes, ...]) -> bool:
        """Pings and pongs while nothing else is queued or being written: write
        them now, without blocking, on the calling thread (the timer's for
        pings, the reader's for pongs), so that a socket whose only writes are
        its keepalive and direct sends needs no writer thread. The lock stays
        held: the write cannot block, and no other write may start meanwhile.
        What the kernel does not take goes to the writer, first. Returns False
        (queue them as usual) if the write failed: the writer then meets and
        reports the failure."""
        transport = self.transport
        # Set until release_locked(), which comes after stop_locked(): the
        # caller checked _stopped under the lock.
        assert transport is not None
        try:
            written = transport.try_write(frames)
        except Exception:  # noqa: BLE001 - the writer meets it again and reports it
            return False
        total = sum(map(len, frames))
        if written < total:
            queue = self.queue
            queue.rest = _remaining(list(frames), written)
            queue.buffered += total - written
            self.kick_locked()
        return True

    def drop_locked(self) -> int:
        """Discard queued messages (releasing their segments); returns how many."""
        assert self.lock.locked()
        queue = self.queue
        items = queue.drain()
        for _o, _p, segment, n in items:
            queue.buffered -= n  # a batch being written is counted off by the writer
            if segment is not None and not segment.released:
                segment.release()
        return len(items)

    def kick_locked(self) -> None:
        """Wake the writer thread, starting one if none is running."""
        if self._stopped or self.transport is None:
            return
        queue = self.queue
        if self._thread is None:
            if self._wake is None:
                self._wake = threading.Condition(self.lock)
            thread = self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            queue.running = True
            try:
                thread.start()
            except BaseException:
                # Ctrl-C inside Thread.start() (on a thread sending, or closing
                # from update()): the writer may never run, and which it is
                # cannot be told safely. Fail loudly rather than leave frames
                # queued for no writer: drop the connection (never blocks); the
                # reader sees the end, and on_closed gets 1006.
                transport = self.transport
                if transport is not None:
                    transport.abort()
                raise
        elif queue.waiting:
            # Only a waiting writer needs waking: a busy one looks at the queue
            # again before it waits (Condition.notify costs more than send()).
            # And only once: cleared here, not just when its wait returns, or
            # every send until the woken writer gets the GIL (up to a switch
            # interval later) would notify it again -- 99 % of a flood's sends.
            queue.waiting = False
            assert self._wake is not None
            self._wake.notify()

    # -- the direct write (caller's thread, lock NOT held) ------------------------------

    def direct_write(self, opcode: int, payload: Any, segment: BufferSegment | None) -> None:
        """Write one message now without blocking; the rest goes to the writer.

        A message larger than :data:`WRITE_BATCH` is encoded and offered to
        the kernel a batch at a time, for as long as it takes each batch
        whole; the writer gets what is left of the batch it stopped in and
        the message's remaining batches (:attr:`unfinished`), and writes them
        with control frames between batches, as it writes a queued message.
        So the caller's thread does no more than the kernel takes at once,
        and a pong waits behind at most one batch.
        """
        proto, transport, queue = self.proto, self.transport, self.queue
        if proto is None or transport is None:  # the socket ended meanwhile
            with self.lock:
                queue.writing = False
            self.close_late()
            if segment is not None and not segment.released:
                segment.release()
            return
        frames: Sequence[BytesLike] = ()
        written = 0
        unfinished: Unfinished | None = None
        into: bytearray | None = None
        try:
            if len(payload) > WRITE_BATCH:
                into = _batch_buffer(proto, transport)
                frames, written, unfinished = self._direct_batches(
                    proto, transport, opcode, payload, segment, into
                )
            else:
                frames = proto.encode_data(
                    opcode & 0xF, payload, compress=not opcode & UNCOMPRESSED
                )
                written = transport.try_write(frames)
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            with self.lock:
                queue.writing = False
            if self._stopped:
                self.close_late()
            if segment is not None and not segment.released:
                segment.release()
            self._on_failure(self, exc)
            return
        if unfinished is None and segment is not None and not segment.released:
            segment.release()  # its bytes were copied into the frames
        total = len(frames[0]) if len(frames) == 1 else sum(map(len, frames))
        if written >= total and unfinished is None:
            _give_back(into)  # (else it goes on in rest and unfinished)
        with self.lock:
            queue.writing = False
            if written < total:
                # The kernel took part of it: the writer sends the rest first,
                # as the frames' remaining pieces (no copy of a large message).
                queue.rest = _remaining(frames, written)
                queue.buffered += total - written
                if unfinished is not None:
                    if self._stopped:  # the socket ended meanwhile: no writer will
                        if segment is not None and not segment.released:
                            segment.release()
                    else:
                        self.unfinished = unfinished
                        queue.buffered += unfinished[1]
                self.kick_locked()
            elif queue or self.control:
                self.kick_locked()  # others queued while we wrote
        if self._stopped:  # (set before a late close is asked for, under the lock)
            self.close_late()
        # A direct write is a data message: only the writer writes close frames.

    def direct_part(self, rest: bytes, written: int) -> None:
        """The end of a direct write the queue made itself (see
        :meth:`SendQueue.set_fast <blockws.sendqueue.PySendQueue.set_fast>`)
        when the kernel took ``written`` bytes of the frame and not ``rest``:
        as :meth:`direct_write` ends then, the writer sends ``rest`` first."""
        transport = self.transport
        if transport is not None:
            transport.bytes_written += written
        queue = self.queue
        with self.lock:
            queue.writing = False
            queue.rest = [rest]
            queue.buffered += len(rest)
            self.kick_locked()
        if self._stopped:
            self.close_late()

    def _direct_batches(
        self,
        proto: Protocol,
        transport: Transport,
        opcode: int,
        payload: Any,
        segment: BufferSegment | None,
        into: bytearray | None,
    ) -> tuple[list[BytesLike], int, Unfinished | None]:
        """A large direct write's batches (encoded ``into`` it, if given: see
        :meth:`Protocol.data_batches`), offered to the kernel one at a time
        until it takes one in part; returns that batch (or the last), how much
        of it was written, and the rest of the message if it did not end."""
        batches = proto.data_batches(
            opcode & 0xF, payload, WRITE_BATCH, compress=False, into=into
        )
        limit = proto.max_fragment_size
        for batch, last, pos in batches:
            written = transport.try_write(batch)
            if last:
                return batch, written, None
            if written < sum(map(len, batch)):
                return batch, written, (batches, len(payload) - pos, segment, pos % limit != 0)
        raise AssertionError("data_batches ends with a last batch")  # pragma: no cover

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        proto, transport = self.proto, self.transport
        if proto is None or transport is None:
            return  # released before this thread ran (start() interrupted: see kick_locked)
        lock, wake, queue, control = self.lock, self._wake, self.queue, self.control
        assert wake is not None  # made before the thread was started
        try:
            while True:
                with lock:
                    while True:
                        if self._stopped:
                            return
                        if (queue or control or queue.rest) and not queue.writing:
                            break
                        # Idle (or a direct write is under way): wait; end when idle long.
                        queue.waiting = True
                        try:
                            woken = wake.wait(WRITER_IDLE)
                        finally:
                            queue.waiting = False
                        if not woken and not queue.writing and not (queue or control or queue.rest):
                            self._thread = None  # the next send starts another
                            queue.running = False
                            queue.direct_ok = True
                            self._out = None  # an idle socket keeps no write buffer
                            return
                    queue.writing = True
                    chunks: list[BytesLike] = list(queue.rest)
                    queue.rest = ()
                    rest_size = sum(map(len, chunks))
                    unfinished = self.unfinished
                    self.unfinished = None
                    if unfinished is not None:
                        rest_size += unfinished[1]
                    replying = False
                    # (Inside a frame, the control frames wait for its end:
                    # _write_large writes them there.)
                    if control and not (unfinished is not None and unfinished[3]):
                        replying = any(frame[0] & 0x0F == _CLOSE_OPCODE for frame in control)
                        rest_size += sum(map(len, control))  # counted off once written
                        chunks.extend(control)
                        control.clear()
                    batch: list[Item]
                    batch, size, closing, segments = queue.take(WRITE_BATCH)
                try:
                    if unfinished is not None:
                        # The direct write's message first: the rest of its
                        # batch, the control frames, then its other batches --
                        # unless one of those was a close reply (no data frame
                        # may follow it: the message and the batch are dropped).
                        transport.write(chunks)
                        chunks = []
                        replying = replying or self._write_large(
                            unfinished[0], proto.max_fragment_size
                        )
                    if not (replying and unfinished is not None):
                        closing = self._write_batch(proto, transport, chunks, batch) or closing
                    closing = closing or replying
                finally:
                    with lock:
                        queue.writing = False
                        queue.buffered -= size + rest_size
                    if self._stopped:
                        self.close_late()
                    if segments:
                        for _o, _p, segment, _n in batch:  # written, or failed: done
                            if segment is not None and not segment.released:
                                segment.release()
                    if unfinished is not None:
                        segment = unfinished[2]
                        if segment is not None and not segment.released:
                            segment.release()
                if closing:
                    self._on_close_written(self)
        except BaseException as exc:  # noqa: BLE001 - reported through on_closed
            with lock:
                stopped = self._stopped
            if not stopped:
                self.log.debug("writer failed: %r", exc)
                self._on_failure(self, exc)

    def _write_batch(
        self, proto: Protocol, transport: Transport, chunks: list[BytesLike], batch: list[Item]
    ) -> bool:
        """Write ``chunks`` and then ``batch``; True if a close frame slipped in
        between the fragments of a large message (nothing follows it then).

        Without extensions, each run of messages of one frame each is encoded
        in one call (:meth:`Protocol.encode_messages`); what ends a run (our
        close frame, a message that needs fragments) goes on its own, as does
        every message when compression may apply.
        """
        runs = not self._extensions
        i, count = 0, len(batch)
        while i < count:
            if runs:
                frames, i = proto.encode_messages(batch, i)
                chunks += frames
                if i == count:
                    break
            opcode, payload, _segment, n = batch[i]
            i += 1
            if opcode == CLOSE_FRAME:
                chunks.append(payload)
                continue
            compress = not opcode & UNCOMPRESSED
            if n > WRITE_BATCH:
                if chunks:
                    transport.write(chunks)
                    chunks.clear()
                into = _batch_buffer(proto, transport)
                batches = proto.data_batches(
                    opcode & 0xF, payload, WRITE_BATCH, compress=compress, into=into
                )
                if self._write_large(batches, proto.max_fragment_size):
                    # A close went out mid-message: no data frame may follow it
                    # (RFC 6455 5.5.1), so the rest of the batch is dropped.
                    return True
                _give_back(into)  # every batch written
            else:
                chunks.extend(proto.encode_data(opcode & 0xF, payload, compress=compress))
        if chunks:
            transport.write(chunks)
        return False

    def _write_large(
        self, batches: Iterator[tuple[list[BytesLike], bool, int]], limit: int
    ) -> bool:
        """Write a large message's frames, in the batches of about
        :data:`WRITE_BATCH` bytes :meth:`Protocol.data_batches` makes them in,
        with control frames queued meanwhile between batches; when one of them
        is a close frame (a reply to the server's close), the message stops
        there and this returns True.

        A transport that :attr:`~blockws.transport.Transport.gathers` writes
        (plain TCP) gets each batch as its frames, one ``sendmsg`` for them
        all: no copy of the payload between the masking and the kernel. Each
        batch is let go of before the next is made, so the C allocator reuses
        the same memory (holding a whole message's frames, or joining them,
        made it trim its heap and fault fresh pages in again for every
        message). A batch encoded into a pooled buffer (:func:`_batch_buffer`)
        is one chunk already and goes as it is, to any transport. Otherwise any
        other transport (TLS, HTTP/2), and fragments smaller than
        :data:`GATHER_FROM`, get the frames copied into one reusable buffer,
        written as one chunk.
        """
        transport = self.transport
        assert transport is not None
        batch, last, pos = next(batches)
        # The first two frames tell the fragment size (a server's frames come
        # as header and payload): every fragment but the last has it.
        # (A batch encoded into a pooled buffer is one chunk already.)
        whole = transport.gathers or len(batch) == 1
        # (One chunk goes as it is, whatever its size: it may be a piece of
        # a frame, which the copying below could flush control frames after.)
        if whole and (len(batch) == 1 or max(map(len, batch[:2])) >= GATHER_FROM):
            while not last:
                # (Control frames only where a frame ends: a batch may be a
                # piece of one, see Protocol.data_batches.)
                if self._flush_large(transport, batch, not pos % limit):
                    return True
                del batch
                batch, last, pos = next(batches)
            transport.write(batch)
            return False
        out = self._out
        if out is None:
            out = self._out = memoryview(bytearray(WRITE_BATCH + 4096))
        room = len(out)
        pos = 0
        while True:
            for frame in batch:
                n = len(frame)
                if pos + n > room:
                    if pos:
                        if self._flush_large(transport, [out[:pos]]):
                            return True
                        pos = 0
                    if n > room:  # a frame larger than the buffer goes as it is
                        transport.write([frame])
                        continue
                out[pos : pos + n] = frame
                pos += n
            if last:
                break
            del batch
            batch, last, _ = next(batches)  # (whole frames here: see above)
        if pos:
            transport.write([out[:pos]])
        return False

    def _flush_large(
        self, transport: Transport, data: Sequence[BytesLike], between: bool = True
    ) -> bool:
        """Write a batch of fragments and, ``between`` two frames, the control
        frames queued meanwhile; True if one of those was a close frame."""
        if not between:
            transport.write(data)
            return False
        with self.lock:
            control = list(self.control)
            self.control.clear()
        if not control:
            transport.write(data)
            return False
        try:
            transport.write([*data, *control])  # control frames between fragments
        finally:
            with self.lock:
                self.queue.buffered -= sum(map(len, control))
        return any(frame[0] & 0x0F == _CLOSE_OPCODE for frame in control)

    # -- the end ----------------------------------------------------------------------

    def release_locked(self) -> None:
        """The socket has ended (after :meth:`stop_locked`): let go of the
        protocol, the transport and the write buffer. A writer still running
        keeps its own references until it returns."""
        assert self.lock.locked()
        self.proto = None
        self.transport = None
        self._out = None
        self.queue.set_fast(None, -1)

    def close_transport(self, transport: Transport) -> None:
        """Close ``transport`` (the teardown, after :meth:`stop_locked`) once no
        thread writes to it: now, or when the write under way ends, by the
        thread that made it -- a caller's direct write, or a writer the
        teardown did not join.

        Closing a descriptor while another thread is about to write to it
        could let that write reach whatever socket the process opens next
        under the same number. After ``abort()`` (a shutdown) such a write
        fails at once, so the close waits no longer than that. Never blocks.
        """
        with self.lock:
            if self.queue.writing:
                self._late_close = transport
                return
        transport.close()

    def close_late(self) -> None:
        """A write that ended after :meth:`stop_locked`: close the transport if
        the teardown left that to it (see :meth:`close_transport`)."""
        with self.lock:
            transport = self._late_close
            self._late_close = None
        if transport is not None:
            transport.close()

    @property
    def thread(self) -> threading.Thread | None:
        """The writer thread, while one runs."""
        return self._thread

    def stop_locked(self) -> threading.Thread | None:
        """Stop for good (the socket ended); returns the thread to join, if any."""
        assert self.lock.locked()
        self._stopped = True
        queue = self.queue
        queue.open = False
        self.drop_locked()
        queue.buffered -= sum(map(len, self.control)) + sum(map(len, queue.rest))
        self.control.clear()
        queue.rest = ()
        unfinished, self.unfinished = self.unfinished, None
        if unfinished is not None:
            queue.buffered -= unfinished[1]
            segment = unfinished[2]
            if segment is not None and not segment.released:
                segment.release()
        if self._wake is not None:
            self._wake.notify_all()
        return self._thread
