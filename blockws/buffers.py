"""Pooled memory for messages: :class:`BufferPool` and :class:`BufferSegment`.

Incoming binary messages are written straight into pooled bytearrays, and
``on_binary`` receives a segment over one; when the callback returns, the
memory goes back to the pool for the next message. A game receiving many
similar-sized messages per second then allocates almost nothing.

Buffers are kept in power-of-two size classes, from 256 B to
:attr:`BufferPool.max_buffer_size`; larger ones are not pooled. The pool keeps
at most ``max_pooled_bytes`` idle memory and drops what would exceed it, so
its footprint stays bounded however large a burst was. All methods are
thread-safe: the reader thread takes buffers, the thread that runs callbacks
gives them back.
"""

from __future__ import annotations

import threading
from typing import ClassVar

from .exceptions import SegmentReleasedTwice

__all__ = ["BufferPool", "BufferSegment", "ScratchSegment"]

_MIN_SHIFT = 8  # 256 bytes: smaller requests share that class


class BufferSegment:
    """A view of ``count`` bytes at ``offset`` in ``data``, a pooled bytearray.

    The memory belongs to the pool once released: copy what you keep
    (``bytes(segment)``). Releasing twice raises :class:`SegmentReleasedTwice`
    (a ``ValueError``).
    """

    __slots__ = ("data", "offset", "count", "pool", "_released")

    def __init__(
        self,
        data: bytearray,
        offset: int = 0,
        count: int | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        if count is None:
            count = len(data) - offset
        if offset < 0 or count < 0 or offset + count > len(data):
            raise ValueError(
                f"segment [{offset}:{offset + count}] outside a {len(data)}-byte buffer"
            )
        self.data = data
        self.offset = offset
        self.count = count
        self.pool = pool
        self._released = False

    def __len__(self) -> int:
        return self.count

    def __bytes__(self) -> bytes:
        if self.offset == 0 and self.count == len(self.data):
            return bytes(self.data)
        with memoryview(self.data) as mv:
            return bytes(mv[self.offset : self.offset + self.count])

    def view(self) -> memoryview:
        """A memoryview of the live bytes (valid until the segment is released)."""
        return memoryview(self.data)[self.offset : self.offset + self.count]

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the memory back to its pool (or drop it when it has none)."""
        if self.pool is not None:
            self.pool.release(self)
        else:
            self._mark_released()

    def _mark_released(self) -> None:
        if self._released:
            raise SegmentReleasedTwice("BufferSegment released twice")
        self._released = True

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<BufferSegment {self.count} bytes at {self.offset}{state}>"


class ScratchSegment(BufferSegment):
    """A segment over one socket's scratch buffer, lent to ``on_binary`` for each
    small message in turn (see :mod:`blockws.delivery`).

    It has no pool: releasing it only marks it released. The lender makes one,
    calls :meth:`lend` before each callback, and lends the same object again
    only while nothing outside the lender holds it; a segment a callback kept
    is released when the callback returns and is never lent again, so it never
    turns into a view of a later message. ``blockws._speedups.lend_each``, the
    C loop for runs of small messages, does what :meth:`lend` does (the
    reference) in C: the payload to the start of ``data``, ``count``, the
    released mark cleared.
    """

    __slots__ = ("_view",)

    def __init__(self, data: bytearray) -> None:
        super().__init__(data, 0, 0)
        self._view = memoryview(data)

    def lend(self, payload: bytes) -> None:
        """Copy ``payload`` to the start of the buffer and cover it, unreleased
        (the caller has checked that it fits)."""
        n = len(payload)
        # Through a memoryview: bytearray[:n] = bytes copies twice.
        self._view[:n] = payload
        self.count = n
        self._released = False


class BufferPool:
    """A thread-safe pool of bytearrays in power-of-two size classes.

    ``BufferPool.default`` is the pool every socket uses unless given another.
    """

    default: ClassVar[BufferPool]

    def __init__(
        self, max_pooled_bytes: int = 32 * 1024 * 1024, max_buffer_size: int = 4 * 1024 * 1024
    ):
        self.max_pooled_bytes = max_pooled_bytes
        self.max_buffer_size = max_buffer_size
        self._max_shift = max(_MIN_SHIFT, (max_buffer_size - 1).bit_length())
        self._free: list[list[bytearray]] = [[] for _ in range(self._max_shift + 1)]
        self._pooled = 0
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        """Bytes held idle in the pool right now."""
        return self._pooled

    def allocate(self, size: int) -> bytearray:
        """A bytearray of at least ``size`` bytes (pooled memory when possible).

        The contents are not zeroed: pooled memory holds old data.
        """
        shift = max(_MIN_SHIFT, (size - 1).bit_length())
        if shift > self._max_shift:
            return bytearray(size)
        free = self._free[shift]
        if free:
            with self._lock:
                if free:
                    buf = free.pop()
                    self._pooled -= len(buf)
                    return buf
        return bytearray(1 << shift)

    def get(self, size: int) -> BufferSegment:
        """A segment of exactly ``size`` bytes backed by pooled memory."""
        if size < 0:
            raise ValueError("size must be >= 0")
        return BufferSegment(self.allocate(size), 0, size, self)

    def wrap(self, data: bytearray, count: int | None = None) -> BufferSegment:
        """A segment over ``data`` that returns it to this pool when released."""
        return BufferSegment(data, 0, count, self)

    def release(self, segment: BufferSegment) -> None:
        """Take a segment's memory back; a second release raises ``ValueError``."""
        if segment.pool is not None and segment.pool is not self:
            raise ValueError("segment belongs to another pool")
        segment._mark_released()
        self.give_back(segment.data)

    def give_back(self, buf: bytearray) -> None:
        """Take back a bytearray that no segment refers to any more (from :meth:`allocate`)."""
        size = len(buf)
        shift = size.bit_length() - 1  # the class whose requests this buffer can serve
        if shift < _MIN_SHIFT or size > (1 << self._max_shift):
            return  # too small to serve a class, or one of the unpooled large buffers
        with self._lock:
            if self._pooled + size > self.max_pooled_bytes:
                return
            self._free[shift].append(buf)
            self._pooled += size


BufferPool.default = BufferPool()
