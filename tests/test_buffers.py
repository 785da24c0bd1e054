"""BufferPool and BufferSegment: size classes, reuse, bounds, double release."""

from __future__ import annotations

import threading

import pytest

from blockws.buffers import BufferPool, BufferSegment
from blockws.exceptions import SegmentReleasedTwice
from blockws.protocol import BinaryMessage, Protocol, Role

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "size, capacity",
    [
        (0, 256),
        (1, 256),
        (255, 256),
        (256, 256),
        (257, 512),
        (1000, 1024),
        (1024, 1024),
        (1025, 2048),
        (65536, 65536),
        (65537, 131072),
        (4 * 1024 * 1024, 4 * 1024 * 1024),
    ],
)
def test_get_sizes(size: int, capacity: int) -> None:
    pool = BufferPool()
    segment = pool.get(size)
    assert len(segment) == segment.count == size
    assert segment.offset == 0
    assert len(segment.data) == capacity
    assert segment.pool is pool
    assert not segment.released


def test_get_beyond_max_buffer_size_is_exact_and_not_pooled() -> None:
    pool = BufferPool(max_buffer_size=4096)
    segment = pool.get(5000)
    assert len(segment.data) == 5000
    segment.release()
    assert segment.released
    # Regression: a buffer between max_buffer_size and twice that was pooled.
    assert pool.pooled_bytes == 0
    big = pool.get(1 << 20)
    big.release()
    assert pool.pooled_bytes == 0


def test_get_negative_size() -> None:
    with pytest.raises(ValueError):
        BufferPool().get(-1)


def test_reuse_after_release() -> None:
    pool = BufferPool()
    first = pool.get(300)
    data = first.data
    first.release()
    assert pool.pooled_bytes == 512
    second = pool.get(400)  # same 512-byte class
    assert second.data is data
    assert pool.pooled_bytes == 0
    third = pool.get(400)  # the pool is empty again: a new buffer
    assert third.data is not data


def test_other_classes_do_not_share() -> None:
    pool = BufferPool()
    small = pool.get(100)
    small.release()
    big = pool.get(1000)
    assert big.data is not small.data
    assert pool.pooled_bytes == 256


def test_lifo_reuse_within_a_class() -> None:
    pool = BufferPool()
    a, b = pool.get(10), pool.get(10)
    a.release()
    b.release()
    assert pool.get(10).data is b.data
    assert pool.get(10).data is a.data


def test_release_twice_raises() -> None:
    pool = BufferPool()
    segment = pool.get(10)
    segment.release()
    with pytest.raises(SegmentReleasedTwice):
        segment.release()
    with pytest.raises(ValueError):
        segment.release()
    with pytest.raises(ValueError):
        pool.release(segment)
    assert pool.pooled_bytes == 256  # given back once only


def test_release_without_pool() -> None:
    segment = BufferSegment(bytearray(10))
    segment.release()
    assert segment.released
    with pytest.raises(SegmentReleasedTwice):
        segment.release()


def test_release_to_another_pool_is_refused() -> None:
    one, two = BufferPool(), BufferPool()
    segment = one.get(10)
    with pytest.raises(ValueError, match="another pool"):
        two.release(segment)
    assert not segment.released
    segment.release()
    assert one.pooled_bytes == 256 and two.pooled_bytes == 0


def test_max_pooled_bytes_bound() -> None:
    pool = BufferPool(max_pooled_bytes=1024)
    segments = [pool.get(512) for _ in range(5)]
    for segment in segments:
        segment.release()
        assert pool.pooled_bytes <= 1024
    assert pool.pooled_bytes == 1024
    kept = {id(pool.get(512).data), id(pool.get(512).data)}
    assert kept == {id(segments[0].data), id(segments[1].data)}
    assert pool.pooled_bytes == 0


def test_max_pooled_bytes_zero_pools_nothing() -> None:
    pool = BufferPool(max_pooled_bytes=0)
    segment = pool.get(10)
    segment.release()
    assert pool.pooled_bytes == 0


def test_wrap_and_give_back_a_foreign_buffer() -> None:
    pool = BufferPool()
    data = bytearray(300)  # not a power of two: serves the 256 class
    segment = pool.wrap(data, 100)
    assert len(segment) == 100 and segment.data is data
    segment.release()
    assert pool.pooled_bytes == 300
    assert pool.get(200).data is data
    tiny = pool.wrap(bytearray(100))  # too small for any class: dropped
    assert len(tiny) == 100
    tiny.release()
    assert pool.pooled_bytes == 0


def test_bytes_view_and_offsets() -> None:
    data = bytearray(b"hello world")
    whole = BufferSegment(data)
    assert (whole.offset, whole.count) == (0, 11)
    assert bytes(whole) == b"hello world"
    part = BufferSegment(data, 6, 5)
    assert len(part) == 5
    assert bytes(part) == b"world"
    assert part.view() == b"world"
    assert part.view().readonly is False
    part.view()[0:1] = b"W"  # the view writes through
    assert data == bytearray(b"hello World")
    tail = BufferSegment(data, 6)
    assert bytes(tail) == b"World"
    empty = BufferSegment(data, 11, 0)
    assert bytes(empty) == b"" and empty.view() == b""
    copy = bytes(part)
    data[6:7] = b"w"
    assert copy == b"World"  # bytes() copies


@pytest.mark.parametrize("offset, count", [(-1, 1), (0, 12), (5, 7), (12, None), (0, -1)])
def test_segment_bounds(offset: int, count: int | None) -> None:
    with pytest.raises(ValueError):
        BufferSegment(bytearray(11), offset, count)


def test_pooled_segment_is_exact_size() -> None:
    pool = BufferPool()
    segment = pool.get(5)
    segment.view()[:] = b"abcde"
    assert bytes(segment) == b"abcde"
    assert len(segment.view()) == 5


def test_repr() -> None:
    segment = BufferSegment(bytearray(8), 2, 3)
    assert repr(segment) == "<BufferSegment 3 bytes at 2>"
    segment.release()
    assert repr(segment) == "<BufferSegment 3 bytes at 2 released>"


def test_default_pool_exists() -> None:
    assert isinstance(BufferPool.default, BufferPool)


def test_protocol_allocates_from_the_pool() -> None:
    pool = BufferPool()
    recycled = pool.get(1000)
    data = recycled.data
    recycled.release()
    proto = Protocol(Role.CLIENT, allocate=pool.allocate)
    # Split across two reads, so the message is assembled in allocated memory
    # (a whole frame in one read takes the fast path and is exact bytes).
    assert proto.receive_data(b"\x82\x7e\x03\x20" + b"x" * 400) == []
    (event,) = proto.receive_data(b"x" * 400)
    assert isinstance(event, BinaryMessage)
    assert event.data is data and event.length == 800
    segment = pool.wrap(event.data, event.length)
    assert bytes(segment) == b"x" * 800
    segment.release()
    assert pool.pooled_bytes == 1024


def test_threads_share_a_pool() -> None:
    pool = BufferPool(max_pooled_bytes=64 * 1024)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def churn(size: int) -> None:
        try:
            start.wait()
            for _ in range(2000):
                segment = pool.get(size)
                segment.view()[:1] = b"x"
                segment.release()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(s,)) for s in (100, 100, 3000, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert 0 <= pool.pooled_bytes <= 64 * 1024
    # Whatever is pooled is accounted for exactly.
    assert pool.pooled_bytes == sum(len(b) for free in pool._free for b in free)
