"""blockws.sendqueue: the send queue, its C version checked against the reference.

Every test runs on both ``PySendQueue`` (the reference) and the C
``_speedups.SendQueue`` when it is built; a hypothesis property runs the same
operations on both and compares every result.
"""

from __future__ import annotations

import gc
import socket
import threading
import tracemalloc
import weakref
from collections import deque
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockws.sendqueue import PySendQueue, c_SendQueue

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

IMPLS = [pytest.param(PySendQueue, id="py")]
if c_SendQueue is not None:
    IMPLS.append(pytest.param(c_SendQueue, id="c"))

UNCOMPRESSED = 0x100
DIRECT_MAX = 1000
BATCH = 100


class Refused(Exception):
    pass


class Host:
    """The queue's owner (the sender's side): what kick_locked() and
    direct_write() saw."""

    def __init__(self, impl: Any, **queue: Any) -> None:
        self.lock = threading.Lock()
        self.kicks = 0
        self.written: list[tuple[int, Any, Any]] = []
        self.locked_in_write: list[bool] = []
        self.control: list[bytes] = []
        self.q = impl(
            self.lock,
            self,
            lambda: Refused("not open"),
            self.control,
            [],
            DIRECT_MAX,
            BATCH,
            UNCOMPRESSED,
        )
        self.q.open = True
        for name, value in queue.items():
            setattr(self.q, name, value)

    def kick_locked(self) -> None:
        assert self.lock.locked()
        self.kicks += 1

    def direct_write(self, opcode: int, payload: Any, segment: Any) -> None:
        self.locked_in_write.append(self.lock.locked())
        self.written.append((opcode, payload, segment))


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_a_new_queue_is_closed_idle_and_empty(impl: Any) -> None:
    q = impl(threading.Lock(), None, Exception, [], [], 1, 1, 0)
    assert len(q) == 0 and not q
    assert (q.open, q.direct, q.direct_ok, q.writing, q.waiting, q.running) == (
        False,
        False,
        True,
        False,
        False,
        False,
    )
    assert q.buffered == 0 and q.large_direct is False
    assert q.take(10) == ([], 0, False, False)
    assert q.drain() == []


def test_push_on_a_closed_queue_raises_what_refused_returns_and_queues_nothing(
    impl: Any,
) -> None:
    host = Host(impl, open=False)
    with pytest.raises(Refused, match="not open"):
        host.q.push(2, b"x", None, 1)
    assert len(host.q) == 0 and host.q.buffered == 0 and host.kicks == 0
    assert not host.lock.locked()


def test_push_raises_what_refused_raises_and_a_non_exception_is_a_type_error(
    impl: Any,
) -> None:
    def boom() -> BaseException:
        raise KeyError("from refused")

    lock = threading.Lock()
    q = impl(lock, None, boom, [], [], 1, 1, 0)
    with pytest.raises(KeyError, match="from refused"):
        q.push(2, b"x", None, 1)
    assert not lock.locked()
    q = impl(lock, None, lambda: "not an exception", [], [], 1, 1, 0)
    with pytest.raises(TypeError):
        q.push(2, b"x", None, 1)
    assert not lock.locked()


def test_push_writes_directly_without_the_lock_when_all_is_idle(impl: Any) -> None:
    host = Host(impl, direct=True, running=True)
    segment = object()
    host.q.push(2, b"abc", segment, 3)
    assert host.written == [(2, b"abc", segment)]
    assert host.locked_in_write == [False]
    assert host.q.writing is True and host.q.direct_ok is False
    assert len(host.q) == 0 and host.q.buffered == 0 and host.kicks == 0


def test_set_fast_says_whether_small_direct_writes_bypass_direct_write(impl: Any) -> None:
    """On with a transport and a descriptor where send(2) has MSG_DONTWAIT;
    turned off (None, or no descriptor), every direct write goes to
    owner.direct_write. (The path's own tests, over a real socket, are in
    test_sender.py, on both queues.)"""
    host = Host(impl, direct=True, running=True)
    assert host.q.set_fast(object(), 5) is hasattr(socket, "MSG_DONTWAIT")
    assert host.q.set_fast(object(), -1) is False
    host.q.push(2, b"abc", None, 3)
    assert host.written == [(2, b"abc", None)]
    assert host.q.set_fast(None, -1) is False
    with pytest.raises(TypeError):
        host.q.set_fast(None, "not a descriptor")


def test_push_queues_and_kicks_a_writer_that_waits_or_does_not_run(impl: Any) -> None:
    host = Host(impl, direct=True, direct_ok=False)
    host.q.push(1, b"one", None, 3)  # no writer: kicked
    assert host.kicks == 1 and len(host.q) == 1 and host.q.buffered == 3
    host.q.running = True
    host.q.push(2, b"two!", None, 4)  # a busy writer sees it: no kick
    assert host.kicks == 1 and host.q.buffered == 7
    host.q.waiting = True
    host.q.push(2, b"3", None, 1)  # a waiting writer: kicked
    assert host.kicks == 2
    assert host.written == [] and not host.lock.locked()
    assert host.q.take(1000) == (
        [(1, b"one", None, 3), (2, b"two!", None, 4), (2, b"3", None, 1)],
        8,
        False,
        False,
    )


@pytest.mark.parametrize(
    "state, opcode, size, direct",
    [
        ({}, 2, 10, True),
        ({"direct": False}, 2, 10, False),
        ({"direct_ok": False}, 2, 10, False),
        ({"writing": True}, 2, 10, False),
        ({"rest": [b"left"]}, 2, 10, False),
        ({}, 2, BATCH, True),
        ({}, 2, BATCH + 1, False),
        ({"large_direct": True}, 2, BATCH + 1, True),
        ({"large_direct": True}, 2, DIRECT_MAX, True),
        ({"large_direct": True}, 2, DIRECT_MAX + 1, False),
        ({"compress_from": 10}, 2, 9, True),
        ({"compress_from": 10}, 2, 10, False),
        ({"compress_from": 10}, 2 | UNCOMPRESSED, 10, True),
        ({"compress_from": 0}, 1, 0, False),
    ],
)
def test_what_may_be_written_directly(
    impl: Any, state: dict[str, Any], opcode: int, size: int, direct: bool
) -> None:
    host = Host(impl, **{"direct": True, "running": True, **state})
    with host.lock:
        assert host.q.push_locked(opcode, b"p", None, size) is direct
    assert len(host.q) == (0 if direct else 1)


def test_nothing_goes_directly_past_a_queued_message_or_a_control_frame(impl: Any) -> None:
    host = Host(impl, direct=True, running=True, direct_ok=False)
    host.q.push(2, b"first", None, 5)
    host.q.direct_ok = True
    host.q.push(2, b"second", None, 6)  # behind the first
    assert host.written == [] and len(host.q) == 2
    host.q.drain()
    host.control.append(b"\x8a\x00")
    host.q.push(2, b"third", None, 5)
    assert host.written == [] and len(host.q) == 1


def test_an_exception_from_kick_propagates_with_the_lock_released(impl: Any) -> None:
    lock = threading.Lock()

    class Owner:
        def kick_locked(self) -> None:
            raise KeyboardInterrupt

    q = impl(lock, Owner(), Exception, [], [], 1, 1, 0)
    q.open = True
    with pytest.raises(KeyboardInterrupt):
        q.push(2, b"x", None, 1)
    assert not lock.locked()
    assert len(q) == 1 and q.buffered == 1  # queued: the teardown drops it


def test_bad_arguments(impl: Any) -> None:
    host = Host(impl)
    with pytest.raises(TypeError):
        host.q.push(2, b"x", None)
    with pytest.raises(ValueError):
        host.q.push(2, b"x", None, -1)
    with pytest.raises(TypeError):
        host.q.append((1, 2, 3))
    with pytest.raises(TypeError):
        host.q.append([1, 2, 3, 4])
    assert not host.lock.locked() and len(host.q) == 0


def test_take_makes_batches_under_the_limit_and_flags_close_frames_and_segments(
    impl: Any,
) -> None:
    host = Host(impl, running=True)
    segment = object()
    for n in (40, 40, 40, 10):
        host.q.push(2, b"m" * n, None, n)
    host.q.push(2, b"s", segment, 1)
    host.q.append((-1, b"\x88\x00", None, 0))
    assert host.q.buffered == 131
    batch, size, closing, segments = host.q.take(80)
    assert [item[3] for item in batch] == [40, 40] and size == 80
    assert (closing, segments) == (False, False)
    batch, size, closing, segments = host.q.take(1)  # at least one
    assert [item[3] for item in batch] == [40] and size == 40
    batch, size, closing, segments = host.q.take(1000)
    assert [item[3] for item in batch] == [10, 1, 0] and size == 11
    assert (closing, segments) == (True, True) and batch[1][2] is segment
    assert len(host.q) == 0
    assert host.q.buffered == 131  # counted off by the writer, once written


def test_drain_empties_the_queue_in_order(impl: Any) -> None:
    host = Host(impl, running=True)
    for i in range(20):
        host.q.push(2, b"%d" % i, None, 1)
    assert [item[1] for item in host.q.drain()] == [b"%d" % i for i in range(20)]
    assert len(host.q) == 0 and host.q.drain() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 300)),
            st.tuples(st.just("append"), st.just(0)),
            st.tuples(st.just("take"), st.integers(0, 500)),
            st.tuples(st.just("drain"), st.just(0)),
        ),
        max_size=200,
    )
)
def test_the_c_queue_agrees_with_the_reference(ops: list[tuple[str, int]]) -> None:
    """The same operations on both queues (and on a deque) give the same results."""
    if c_SendQueue is None:
        pytest.skip("without the C speedups there is one implementation")
    hosts = [Host(PySendQueue, running=True), Host(c_SendQueue, running=True)]
    model: deque[tuple[int, Any, Any, int]] = deque()
    for i, (op, n) in enumerate(ops):
        results = []
        for host in hosts:
            if op == "push":
                host.q.push(2, i, None, n)
                results.append(None)
            elif op == "append":
                host.q.append((-1, i, None, 0))
                results.append(None)
            elif op == "take":
                results.append(host.q.take(n))
            else:
                results.append(host.q.drain())
        if op == "push":
            model.append((2, i, None, n))
        elif op == "append":
            model.append((-1, i, None, 0))
        elif op == "drain":
            assert results[0] == list(model)
            model.clear()
        else:
            assert results[0][0] == [model.popleft() for _ in range(len(results[0][0]))]
        assert results[0] == results[1]
        assert [len(h.q) for h in hosts] == [len(model)] * 2
        assert hosts[0].q.buffered == hosts[1].q.buffered


def test_pushes_from_many_threads_keep_each_threads_order(impl: Any) -> None:
    host = Host(impl, running=True)
    count, threads = 5000, 4
    start = threading.Barrier(threads)

    def pusher(t: int) -> None:
        start.wait()
        for i in range(count):
            host.q.push(2, (t, i), None, 1)

    workers = [threading.Thread(target=pusher, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    items = host.q.drain()
    assert len(items) == count * threads and host.q.buffered == count * threads
    for t in range(threads):
        assert [p[1] for _o, p, _s, _n in items if p[0] == t] == list(range(count))


def test_a_flood_taken_leaves_no_memory_behind(impl: Any) -> None:
    host = Host(impl, running=True)
    payload = b"x" * 64
    tracemalloc.start()
    try:
        for _round in range(2):
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20000):
                host.q.push(2, payload, None, 64)
            assert tracemalloc.get_traced_memory()[0] - before > 20000 * 8
            while host.q.take(4096)[0]:
                pass
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            assert after - before < 4096, after - before
    finally:
        tracemalloc.stop()


def test_a_queue_in_a_reference_cycle_is_collected(impl: Any) -> None:
    class Owner:
        pass

    owner = Owner()
    payload = Owner()
    owner.q = impl(threading.Lock(), owner, Exception, [], [], 1, 1, 0)  # type: ignore[attr-defined]
    owner.q.append((2, payload, owner, 1))  # type: ignore[attr-defined]
    dead: list[Callable[[], object]] = [weakref.ref(owner), weakref.ref(payload)]
    del owner, payload
    gc.collect()
    assert [ref() for ref in dead] == [None, None]
