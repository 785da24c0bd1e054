"""A socket's send queue and the state ``send()`` decides on, in one object.

:class:`~blockws.sender.Sender` keeps its messages, its ``buffered_amount``
and the flags a ``send()`` reads (is the socket open, may this message be
written directly, must the writer be woken) in a :class:`SendQueue`, so that
the commonest call of all, a ``send()`` that queues a message, is one call
into it: :meth:`PySendQueue.push`. ``blockws._speedups.SendQueue`` is its C
version; this pure-Python class is the reference, and the two must behave
alike (``tests/test_sendqueue.py`` runs every test on both).

What is shared with the Sender, the queue's ``owner``: the socket's lock
(every member is read and set with it held, and :meth:`~PySendQueue.push`
takes it itself), its ``control`` list (kept in place: the same list for the
queue's life) and its ``rest`` (a list or, when empty, a tuple: rebound by
the Sender as it likes). The queue
calls ``owner.kick_locked()`` (with the lock held) to wake or start the
writer, and ``owner.direct_write(opcode, payload, segment)`` (without it) to
write a message on the caller's thread (and, after a small direct write of
its own, ``owner.direct_part(rest, written)`` for what the kernel cut and
``owner.close_late()`` once the socket has stopped: see
:meth:`PySendQueue.set_fast`); ``refused()`` (the Connection's
``_state_error_locked``, with the lock held) says why a socket that is not
open refuses a message.

Queue items are ``(opcode, payload, segment, size)`` tuples; a negative
opcode marks a pre-encoded frame (our close frame), which ends what may be
written after it.

Across threads: any thread may push; one writer takes. ``push`` never waits
for the network; it waits for the lock only as long as another thread holds
it (never across a write). An exception from ``kick_locked`` or ``refused``
propagates with the lock released; a message that ``kick_locked`` failed to wake
the writer for stays queued (the socket is being torn down then).
"""

from __future__ import annotations

import operator
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any, Callable

from .frames import shared_mask_keys

__all__ = ["PySendQueue", "SendQueue", "c_SendQueue"]

Item = tuple[int, Any, Any, int]

#: The largest payload :meth:`PySendQueue.set_fast`'s path writes: one frame
#: with a 2-byte header (``blockws.sender.FAST_MAX``, and the C queue's).
FAST_MAX = 125
# send(2)'s flags for it (both Linux's; without MSG_DONTWAIT there is no such path).
_FAST_FLAGS = (getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0),)
_HAS_FAST = hasattr(socket, "MSG_DONTWAIT")
_draw_key = shared_mask_keys.draw
_from_bytes = int.from_bytes
# Masking a payload of n bytes as one integer XOR: the key repeated over n
# bytes is ``key * _REPEAT[n] & _LOW[n]`` (little-endian: the key's bytes
# stay in place in every 4 bytes, and the product has no carries).
_REPEAT = [sum(1 << (32 * i) for i in range((n + 3) >> 2)) for n in range(FAST_MAX + 1)]
_LOW = [(1 << (8 * n)) - 1 for n in range(FAST_MAX + 1)]


class PySendQueue:
    """The reference send queue (see the module docstring).

    Members, all read and set with the lock held: ``open`` (``send()`` is
    accepted), ``direct`` (the transport takes non-blocking writes),
    ``direct_ok`` (the next message may be written directly: cleared by a
    direct write, set again by incoming data or an idle writer), ``writing``
    (a thread writes to the transport now), ``waiting`` (the writer waits
    for work), ``running`` (a writer thread exists), ``large_direct``
    (messages above ``batch`` may be written directly), ``compress_from``
    (the smallest message an extension compresses: never written
    directly), ``buffered`` (bytes accepted and not yet written), and the
    ``control`` and ``rest`` sequences (control frames, and what a direct write
    left unwritten: both come before any message).
    """

    __slots__ = (
        "lock",
        "owner",
        "refused",
        "control",
        "rest",
        "open",
        "direct",
        "direct_ok",
        "writing",
        "waiting",
        "running",
        "large_direct",
        "buffered",
        "compress_from",
        "direct_max",
        "batch",
        "uncompressed",
        "_items",
        "_fast",
    )

    def __init__(
        self,
        lock: threading.Lock,
        owner: Any,
        refused: Callable[[], BaseException],
        control: list[Any],
        rest: Sequence[Any],
        direct_max: int,
        batch: int,
        uncompressed: int,
    ) -> None:
        self.lock = lock
        self.owner = owner
        self.refused = refused
        self.control = control
        self.rest = rest
        self.open = False
        self.direct = False
        self.direct_ok = True
        self.writing = False
        self.waiting = False
        self.running = False
        self.large_direct = False
        self.buffered = 0
        self.compress_from = sys.maxsize
        self.direct_max = direct_max
        self.batch = batch
        self.uncompressed = uncompressed
        # Made with the first item (an idle socket keeps none: a deque is 760
        # bytes before its first item).
        self._items: deque[Item] | None = None
        self._fast: Any = None  # set_fast's transport

    def __len__(self) -> int:
        items = self._items
        return 0 if items is None else len(items)

    def push(self, opcode: int, payload: Any, segment: Any, size: int) -> None:
        """Queue a message, or write it now on this thread, without the lock,
        when :meth:`push_locked` says so: a small ``bytes`` through
        :meth:`set_fast`'s path if it is on, else (or if the kernel takes
        none of it) ``owner.direct_write``. Raises what ``refused()`` returns
        when the socket is not open."""
        with self.lock:
            if not self.open:
                raise self.refused()
            if not self.push_locked(opcode, payload, segment, size):
                return  # queued
            fast = self._fast  # (set and cleared with the lock held)
        if (
            fast is None
            or size > FAST_MAX
            or segment is not None
            or type(payload) is not bytes
            or len(payload) != size
            or not self._write_small(fast, opcode, payload)
        ):
            self.owner.direct_write(opcode, payload, segment)

    def _write_small(self, transport: Any, opcode: int, payload: bytes) -> bool:
        """set_fast's path, for a claimed direct write of a small ``bytes``:
        frame and mask it, ``send()`` it without blocking, then end as
        ``Sender.direct_write`` ends (:meth:`_end_small`). False: nothing was
        written (the kernel's buffer is full, or the send failed), and the
        caller goes the usual way.

        An interrupt (Ctrl-C) that lands before the send leaves nothing
        written: the write is let go of, and the interrupt propagates from
        ``send()`` (as one that lands before the lock is taken). One that
        lands once the kernel took the frame propagates after the
        bookkeeping: the count reaches a list in the send's own C-level step,
        so it is never lost.
        """
        sent: list[int] = []
        try:
            n = len(payload)
            key = _draw_key()
            frame = (
                bytes((0x80 | (opcode & 0x0F), 0x80 | n))
                + key
                + (
                    _from_bytes(payload, "little")
                    ^ (_from_bytes(key, "little") * _REPEAT[n] & _LOW[n])
                ).to_bytes(n, "little")
            )
            sent.extend(map(transport.sock.send, (frame,), _FAST_FLAGS))
        except OSError:
            return False  # nothing written: direct_write writes it or meets the error
        except BaseException:
            if sent:  # written, then interrupted: the bookkeeping first
                self._end_small(transport, frame, sent[0])
            else:  # nothing written: the write is let go of
                self._let_go_surely()
            raise
        self._end_small(transport, frame, sent[0])
        return True

    def _end_small(self, transport: Any, frame: bytes, written: int) -> None:
        """The end of :meth:`_write_small` once the kernel took ``written``
        bytes of ``frame``, as ``Sender.direct_write`` ends: what it cut goes
        to ``owner.direct_part(rest, written)``; a whole frame is counted, the
        write let go of (:meth:`_let_go_locked`), and ``owner.close_late()``
        called if the socket stopped meanwhile. A Ctrl-C while it waits for
        the lock (contended) does not leave the write claimed: it takes the
        lock whatever lands (:meth:`_let_go_surely`), then lets it propagate."""
        if written < len(frame):
            self.owner.direct_part(frame[written:], written)
            return
        transport.bytes_written += written
        entered = False
        try:
            with self.lock:
                entered = True
                stopped = self._let_go_locked()
        except BaseException:
            if not entered:  # (else kick_locked's: it propagates as push()'s does)
                self._let_go_surely()
            raise
        if stopped:
            self.owner.close_late()

    def _let_go_locked(self) -> bool:
        """With the lock held, the end of a direct write: ``writing`` cleared
        and the writer kicked for what was queued meanwhile; returns whether
        the socket stopped meanwhile (the caller then calls
        ``owner.close_late()``)."""
        self.writing = False
        if self._items or self.control or self.rest:
            self.owner.kick_locked()
        return not self.open

    def _let_go_surely(self) -> None:
        """:meth:`_let_go_locked` after an interrupt: takes the lock whatever
        lands meanwhile (the first interrupt is the caller's to raise), and
        calls ``owner.close_late()`` if the socket stopped. The acquire's
        result reaches ``got`` in the call's own C-level step, so an
        interrupt that lands as it returns cannot hide that the lock is held."""
        lock = self.lock
        got: list[bool] = []
        while not got:
            try:
                got.extend(islice(iter(lock.acquire, None), 1))
            except BaseException:  # noqa: BLE001, S110 - the caller raises the first one
                pass
        try:
            stopped = self._let_go_locked()
        finally:
            lock.release()
        if stopped:
            self.owner.close_late()

    def push_locked(self, opcode: int, payload: Any, segment: Any, size: int) -> bool:
        """With the lock held: claim the transport for a direct write (True:
        the caller writes the message itself, ``writing`` is set and
        ``direct_ok`` cleared), or queue the message, count it in
        ``buffered`` and ``owner.kick_locked()`` a writer that waits or does
        not exist.

        A direct write needs a transport that takes non-blocking writes,
        ``direct_ok``, nothing written, queued, held back (``control``,
        ``rest``); a message of at most ``direct_max`` bytes, and of at most
        ``batch`` unless ``large_direct``; and one no extension will compress
        (compression runs on the writer, never on the caller's thread).
        """
        if size < 0:
            raise ValueError("a message's size must not be negative")
        items = self._items
        if (
            self.direct
            and self.direct_ok
            and not self.writing
            and not items
            and not self.control
            and not self.rest
            and size <= self.direct_max
            and (size <= self.batch or self.large_direct)
            and (opcode & self.uncompressed or size < self.compress_from)
        ):
            self.writing = True
            self.direct_ok = False
            return True
        if items is None:
            items = self._items = deque()
        items.append((opcode, payload, segment, size))
        self.buffered += size
        if self.waiting or not self.running:
            self.owner.kick_locked()
        return False

    def append(self, item: Item) -> None:
        """Queue ``item`` as it is (not counted in ``buffered``, no kick)."""
        if type(item) is not tuple or len(item) != 4:
            raise TypeError("append() takes an (opcode, payload, segment, size) tuple")
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)

    def take(self, limit: int) -> tuple[list[Item], int, bool, bool]:
        """The writer's next batch: items from the front while their sizes
        add up to less than ``limit`` (at least one, if any); returns them,
        their size, whether one is a pre-encoded close frame, and whether
        any has a segment to release."""
        batch: list[Item] = []
        size = 0
        closing = segments = False
        items = self._items
        while items and size < limit:
            item = items.popleft()
            batch.append(item)
            size += item[3]
            if item[0] < 0:
                closing = True
            if item[2] is not None:
                segments = True
        if items is not None and not items:
            self._items = None  # (a flood's deque would stay as large as the flood)
        return batch, size, closing, segments

    def set_fast(self, transport: Any, fd: int) -> bool:
        """Where small direct writes may go without ``owner.direct_write``:
        returns whether they will.

        Given a plain TCP transport and its descriptor, the queue writes a
        claimed direct message of up to :data:`FAST_MAX` bytes (``bytes``, no
        segment) itself: it frames and masks it, ``send()``-s it without
        blocking, adds it
        to ``transport.bytes_written`` and ends as ``direct_write`` ends
        (``writing`` cleared and the writer kicked for whatever was queued
        meanwhile, under the lock; ``owner.close_late()`` once the socket is
        no longer open). What the kernel takes part of goes to
        ``owner.direct_part(rest, written)``; what it takes nothing of (a full
        buffer, an error) goes to ``owner.direct_write`` as usual, which
        writes it or reports the error. The caller (``Sender.attach``) offers
        it only to a client without extensions masking with the shared keys.
        ``None`` turns it off (the socket ended).

        The C queue masks with keys it reads from the kernel (as
        ``os.urandom`` reads them) and writes to ``fd``; this one masks with
        keys from :data:`blockws.frames.shared_mask_keys` and writes through
        ``transport.sock`` (whose descriptor ``fd`` is). It skips
        ``direct_write``'s general steps (the protocol's encoder, the
        transport's ``try_write``). Neither has the path without ``MSG_DONTWAIT``
        (Windows): it then returns False. Raises ``TypeError`` if ``fd`` is
        not an integer.
        """
        fd = operator.index(fd)
        if transport is not None and fd >= 0 and _HAS_FAST:
            self._fast = transport
            return True
        self._fast = None
        return False

    def drain(self) -> list[Item]:
        """Every item, removed from the queue (not counted off ``buffered``)."""
        items = self._items
        self._items = None
        return [] if items is None else list(items)


c_SendQueue: type[PySendQueue] | None
try:  # the optional C version (setup.py builds it when a compiler is present)
    from ._speedups import SendQueue as _CSendQueue

    c_SendQueue = _CSendQueue  # type: ignore[assignment]  # (same members, duck-typed)
except ImportError:  # pragma: no cover - depends on the install
    c_SendQueue = None

if c_SendQueue is not None and hasattr(os, "register_at_fork"):
    from ._speedups import reset_keys as _reset_keys

    # A child must not reuse the mask keys its parent read ahead.
    os.register_at_fork(after_in_child=_reset_keys)

#: The send queue as used everywhere: the C version when built, else
#: :class:`PySendQueue`; ``BLOCKWS_PURE_PYTHON=1`` forces the pure-Python one.
SendQueue: type[PySendQueue] = (
    c_SendQueue
    if c_SendQueue is not None and not os.environ.get("BLOCKWS_PURE_PYTHON")
    else PySendQueue
)
