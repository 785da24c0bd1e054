"""Delivery: one read's messages to on_message / on_binary or to the inbox, the
scratch and pooled segments, and what happens when a handler raises."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import pytest

import blockws.delivery as delivery_module
from blockws.buffers import BufferPool, BufferSegment, ScratchSegment
from blockws.delivery import SCRATCH, Delivery
from blockws.dispatcher import Dispatcher
from blockws.log import ContextAdapter
from blockws.protocol import BinaryMessage

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


@pytest.fixture(autouse=True, params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both loops for runs of small binary messages: the C one
    (blockws._speedups.lend_each) and the pure-Python reference."""
    if request.param == "python":
        monkeypatch.setattr(delivery_module, "_lend_each", None)
    elif delivery_module._lend_each is None:
        if os.environ.get("BLOCKWS_PURE_PYTHON"):
            pytest.skip("the C loop is off (BLOCKWS_PURE_PYTHON)")
        pytest.fail("the C speedups are not built")
    return str(request.param)


class Handlers:
    """The socket as Delivery sees it."""

    def __init__(
        self,
        on_message: Callable[[Any, str], Any] | None = None,
        on_binary: Callable[[Any, BufferSegment], Any] | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_binary = on_binary


class Recorder:
    """on_binary that keeps each segment, what it held and whether it was live."""

    def __init__(self, release: bool = False) -> None:
        self.release = release
        self.segments: list[BufferSegment] = []
        self.contents: list[bytes] = []
        self.live: list[bool] = []

    def __call__(self, ws: Any, segment: BufferSegment) -> None:
        self.segments.append(segment)
        self.contents.append(bytes(segment))
        self.live.append(not segment.released)
        if self.release:
            segment.release()


def make(
    handlers: Handlers, pool: BufferPool | None = None
) -> tuple[Delivery, Dispatcher, BufferPool]:
    pool = pool or BufferPool()
    dispatcher = Dispatcher()
    return Delivery(handlers, dispatcher, pool), dispatcher, pool


def pooled(pool: BufferPool, payload: bytes) -> BinaryMessage:
    """A binary message as the parser assembles it in pooled memory."""
    buf = pool.allocate(len(payload))
    buf[: len(payload)] = payload
    buf[len(payload) :] = b"\xee" * (len(buf) - len(payload))  # stale bytes past the end
    return BinaryMessage(buf, len(payload))


def test_text_goes_to_on_message() -> None:
    seen: list[tuple[Any, str]] = []
    ws = Handlers(on_message=lambda ws, text: seen.append((ws, text)))
    delivery, dispatcher, _ = make(ws)
    dispatcher.post(delivery.messages, ["hello", "wörld"])
    assert dispatcher.run() == 2
    assert seen == [(ws, "hello"), (ws, "wörld")]
    assert not delivery.inbox


def test_small_binary_uses_the_scratch_segment() -> None:
    rec = Recorder()
    delivery, dispatcher, pool = make(Handlers(on_binary=rec))
    small = [b"\x00\x01\x02", bytes(range(256)) * 16]  # the second is exactly SCRATCH
    assert len(small[1]) == SCRATCH
    dispatcher.post(delivery.messages, small)
    assert dispatcher.run() == 2
    assert rec.contents == small
    assert rec.live == [True, True]  # valid during the callback
    assert all(s.released for s in rec.segments)  # marked released after it
    assert [len(s) for s in rec.segments] == [3, SCRATCH]
    assert rec.segments[0].data is rec.segments[1].data  # one scratch buffer per socket
    assert all(s.pool is None for s in rec.segments)
    assert pool.pooled_bytes == 0  # the pool was not involved


def test_scratch_segment_released_by_the_callback_is_fine() -> None:
    rec = Recorder(release=True)
    delivery, dispatcher, _ = make(Handlers(on_binary=rec))
    assert delivery.messages([b"abc", b"def"]) == 2
    assert rec.contents == [b"abc", b"def"]
    assert all(s.released for s in rec.segments)


def test_the_scratch_segment_is_lent_again_while_no_callback_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []

    class Counted(delivery_module.ScratchSegment):
        __slots__ = ()

        def __init__(self, data: bytearray) -> None:
            made.append(1)
            super().__init__(data)

    monkeypatch.setattr(delivery_module, "ScratchSegment", Counted)
    ids: list[int] = []
    contents: list[bytes] = []
    live: list[bool] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        ids.append(id(segment))
        contents.append(bytes(segment))
        live.append(not segment.released)
        if len(segment) == 2:
            segment.release()  # released by the callback, and not kept

    delivery, dispatcher, _ = make(Handlers(on_binary=on_binary))
    messages = [b"a", b"bb", b"ccc", b"dddd"]
    assert delivery.messages(messages) == 4
    assert contents == messages
    assert live == [True] * 4  # lent unreleased, even after a callback released it
    if hasattr(sys, "getrefcount"):
        assert len(made) == 1  # one object, lent four times: nothing made per message
        assert len(set(ids)) == 1


def test_a_segment_a_callback_keeps_is_released_and_never_lent_again() -> None:
    kept: list[BufferSegment] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        assert not segment.released
        assert all(segment is not k for k in kept)  # a kept one is never lent again
        if bytes(segment).startswith(b"keep"):
            kept.append(segment)

    delivery, dispatcher, _ = make(Handlers(on_binary=on_binary))
    assert delivery.messages([b"keep-1", b"x", b"keep-22", b"yy", b"zzz"]) == 5
    assert [k.released for k in kept] == [True, True]  # released as its callback returned
    assert [len(k) for k in kept] == [6, 7]  # and still the length of its own message
    with pytest.raises(ValueError):
        kept[0].release()  # released once already


def test_a_segment_held_by_a_raising_callback_is_released_and_not_lent_again() -> None:
    first: list[BufferSegment] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        if not first:
            first.append(segment)
            raise RuntimeError("boom")  # its traceback holds the segment too
        assert segment is not first[0]

    delivery, dispatcher, _ = make(Handlers(on_binary=on_binary))
    dispatcher.post(delivery.messages, [b"one", b"two"])
    with pytest.raises(RuntimeError):
        dispatcher.run()
    assert first[0].released
    assert dispatcher.run() == 1  # the message after it, on another segment


def test_larger_binary_goes_through_a_pooled_segment() -> None:
    rec = Recorder()
    delivery, dispatcher, pool = make(Handlers(on_binary=rec))
    big = bytes(range(251)) * 40  # 10040 bytes
    assert len(big) > SCRATCH
    before = pool.pooled_bytes
    assert delivery.messages([big, b"x" * (SCRATCH + 1)]) == 2
    assert rec.contents == [big, b"x" * (SCRATCH + 1)]
    assert rec.live == [True, True]
    assert all(s.released for s in rec.segments)
    assert all(s.pool is pool for s in rec.segments)
    # Both buffers (16 KiB and 8 KiB classes) went back to the pool.
    assert pool.pooled_bytes == before + 16384 + 8192


def test_pooled_segment_released_by_the_callback_goes_back_once() -> None:
    rec = Recorder(release=True)
    delivery, _, pool = make(Handlers(on_binary=rec))
    assert delivery.messages([b"y" * 5000]) == 1
    assert rec.segments[0].released
    assert pool.pooled_bytes == 8192  # once, not twice


def test_binary_message_in_pooled_memory_goes_to_on_binary_without_a_copy() -> None:
    rec = Recorder()
    pool = BufferPool()
    message = pooled(pool, b"pooled payload" * 100)
    delivery, _, _ = make(Handlers(on_binary=rec), pool)
    assert delivery.messages([message]) == 1
    assert rec.contents == [b"pooled payload" * 100]  # exactly length bytes, not the buffer
    assert rec.segments[0].data is message.data
    assert rec.segments[0].released
    assert pool.pooled_bytes == 2048


def test_binary_message_without_a_handler_is_queued_as_exact_bytes() -> None:
    pool = BufferPool()
    message = pooled(pool, b"q" * 3000)
    delivery, _, _ = make(Handlers(), pool)
    assert delivery.messages([message]) == 1
    assert list(delivery.inbox) == [b"q" * 3000]
    assert type(delivery.inbox[0]) is bytes
    assert pool.pooled_bytes == 4096  # the buffer was given back


def test_without_handlers_messages_queue_in_order() -> None:
    pool = BufferPool()
    delivery, dispatcher, _ = make(Handlers(), pool)
    big = b"B" * (SCRATCH * 3)
    dispatcher.post(delivery.messages, ["one", b"two", pooled(pool, b"three")])
    dispatcher.post(delivery.messages, [big, "five"])
    assert dispatcher.run() == 5
    assert list(delivery.inbox) == ["one", b"two", b"three", big, "five"]
    assert delivery.inbox[3] is big  # exact bytes are queued without a copy


def test_a_message_without_its_handler_is_dropped_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probe "no backpressure on receiving", the trap (issue 11, item 2): a socket
    with on_message but no on_binary kept binary messages for a receive() that a
    game never calls, for ever. The rule now: any callback set means callback mode;
    a message without a handler of its type is dropped, with one WARNING per socket,
    and counts as delivered."""
    texts: list[str] = []
    pool = BufferPool()
    delivery = Delivery(
        Handlers(on_message=lambda ws, t: texts.append(t)),
        Dispatcher(),
        pool,
        ContextAdapter({"id": 1}),
    )
    big = pooled(pool, b"B" * (SCRATCH * 2))
    assert delivery.received(1 + 1 + 1 + len(big) + len(b"e" * 10)) is False
    with caplog.at_level(logging.WARNING, logger="blockws"):
        assert delivery.messages(["a", b"b", "c", big, b"e" * 10]) == 5
    assert texts == ["a", "c"]
    assert list(delivery.inbox or ()) == []
    assert delivery.queued == 0
    assert pool.pooled_bytes >= SCRATCH * 2  # the pooled one went back to the pool
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on_binary" in warnings[0].getMessage()


def test_queued_counts_until_delivered_and_drains_at_half_the_limit() -> None:
    """Probe "no backpressure on receiving" (issue 11, item 2), the bookkeeping:
    ``queued`` counts posted and undelivered messages, inbox included until taken;
    reaching the limit pauses, and on_drained runs once half is left."""
    delivery, dispatcher, _ = make(Handlers())
    delivery.limit = 100
    drained: list[int] = []
    delivery.on_drained = lambda: drained.append(delivery.queued)
    assert delivery.received(60) is False
    dispatcher.post(delivery.messages, [b"x" * 30, "y" * 30])
    assert delivery.received(40) is True  # 100 queued: reading stops
    dispatcher.post(delivery.messages, [b"z" * 40])
    assert delivery.paused
    assert dispatcher.run() == 3
    assert delivery.queued == 100  # in the inbox: not delivered yet
    assert delivery.take() == b"x" * 30
    assert delivery.paused and drained == []
    assert delivery.take() == "y" * 30  # 40 left: at most half
    assert not delivery.paused and drained == [40]
    assert delivery.take() == b"z" * 40
    assert delivery.queued == 0 and drained == [40]


def test_handler_that_raises_leaves_the_rest_at_the_front_of_the_queue() -> None:
    seen: list[Any] = []

    def on_message(ws: Any, text: str) -> None:
        seen.append(text)
        if text == "boom":
            raise RuntimeError("handler failed")

    rec = Recorder()
    delivery, dispatcher, _ = make(Handlers(on_message=on_message, on_binary=rec))
    dispatcher.post(delivery.messages, ["first", "boom", b"third", "fourth"])
    dispatcher.post(seen.append, "posted later")
    with pytest.raises(RuntimeError, match="handler failed"):
        dispatcher.run()
    assert seen == ["first", "boom"]
    assert list(dispatcher.pending) == [
        (delivery.messages, [b"third", "fourth"]),
        (seen.append, "posted later"),
    ]
    assert dispatcher.run() == 3  # two messages, then the later item
    assert seen == ["first", "boom", "fourth", "posted later"]
    assert rec.contents == [b"third"]
    assert not dispatcher.pending


def test_a_reads_one_text_message_is_counted_once_whether_its_handler_returns_or_raises() -> None:
    """The path for a read of one text message with on_message (the commonest
    read of a request/response exchange): delivered once, counted off the
    queue (backpressure) either way, never put back when its handler raises;
    without on_message it takes the usual way (here: dropped, as a text
    message is on a socket with on_binary only)."""
    seen: list[str] = []

    def on_message(ws: Any, text: str) -> None:
        seen.append(text)
        if text == "boom":
            raise RuntimeError("handler failed")

    handlers = Handlers(on_message=on_message)
    delivery, dispatcher, _ = make(handlers)
    for text in ("one", "boom", "two"):
        delivery.received(len(text))
        dispatcher.post_held(delivery.messages, [text])
    assert delivery.queued == 10
    with pytest.raises(RuntimeError, match="handler failed"):
        dispatcher.run()
    assert seen == ["one", "boom"] and delivery.queued == 3
    assert list(dispatcher.pending) == [(delivery.messages, ["two"])]
    assert dispatcher.run() == 1
    assert seen == ["one", "boom", "two"] and delivery.queued == 0
    handlers.on_message = None
    handlers.on_binary = Recorder()
    delivery.received(4)
    dispatcher.post_held(delivery.messages, ["lost"])
    assert dispatcher.run() == 1
    assert seen == ["one", "boom", "two"] and delivery.queued == 0


def test_raising_binary_handler_still_releases_its_segment() -> None:
    segments: list[BufferSegment] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        segments.append(segment)
        raise ValueError("bad payload")

    delivery, dispatcher, pool = make(Handlers(on_binary=on_binary))
    dispatcher.post(delivery.messages, [b"s" * 10, b"L" * 9000])
    with pytest.raises(ValueError):
        dispatcher.run()
    assert segments[0].released
    assert list(dispatcher.pending) == [(delivery.messages, [b"L" * 9000])]
    with pytest.raises(ValueError):
        dispatcher.run()
    assert segments[1].released and segments[1].pool is pool
    assert pool.pooled_bytes == 16384
    assert not dispatcher.pending  # the last message raised: nothing left to requeue


def test_handlers_are_looked_up_per_message() -> None:
    first: list[str] = []
    second: list[str] = []
    binaries: list[bytes] = []
    ws = Handlers()

    def switch(ws: Handlers, text: str) -> None:
        first.append(text)
        ws.on_message = lambda ws, t: second.append(t)

    def once(ws: Handlers, segment: BufferSegment) -> None:
        binaries.append(bytes(segment))
        ws.on_binary = None  # later binaries have no handler: dropped (on_message is set)

    def last(ws: Handlers, text: str) -> None:
        second.append(text)
        ws.on_message = None  # no handler at all: later messages go to the inbox

    ws.on_message = switch
    ws.on_binary = once
    delivery, _, _ = make(ws)
    assert delivery.messages(["a", "b", b"x", "c", b"y", b"z" * 5000]) == 6
    assert first == ["a"]
    assert second == ["b", "c"]
    assert binaries == [b"x"]
    assert list(delivery.inbox or ()) == []
    ws.on_message = last
    assert delivery.messages(["d", b"y", b"z" * 5000]) == 3
    assert second == ["b", "c", "d"]
    assert list(delivery.inbox) == [b"y", b"z" * 5000]


def test_a_run_of_small_binaries_looks_handlers_up_per_message() -> None:
    """The run that starts a read (the C loop, when built) stops where a
    callback cleared on_binary: the rest go where the Python loop sends them."""
    seen: list[bytes] = []
    texts: list[str] = []
    ws = Handlers(on_message=lambda ws, t: texts.append(t))

    def on_binary(ws: Handlers, segment: BufferSegment) -> None:
        seen.append(bytes(segment))
        if bytes(segment) == b"second":
            ws.on_binary = None  # later binaries: dropped (on_message is set)

    ws.on_binary = on_binary
    delivery, _, _ = make(ws)
    messages: list[Any] = [b"first", b"second", b"third", "text", b"fourth"]
    delivery.received(sum(map(len, messages)))
    assert delivery.messages(messages) == 5
    assert seen == [b"first", b"second"]
    assert texts == ["text"]
    assert delivery.queued == 0


def test_a_segment_kept_mid_run_is_released_and_the_run_goes_on() -> None:
    kept: list[BufferSegment] = []
    contents: list[bytes] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        contents.append(bytes(segment))
        assert not segment.released and all(segment is not k for k in kept)
        if bytes(segment) == b"keep":
            kept.append(segment)

    delivery, dispatcher, _ = make(Handlers(on_binary=on_binary))
    messages = [b"one", b"keep", b"three", b"four", b"keep", b"six"]
    assert delivery.messages(messages) == 6
    assert contents == messages
    assert [(k.released, len(k)) for k in kept] == [(True, 4), (True, 4)]
    assert kept[0] is not kept[1]
    assert delivery.messages([b"seven", b"eight"]) == 2  # a fresh segment, lent again
    assert contents[-2:] == [b"seven", b"eight"]


@pytest.mark.parametrize("first", [False, True], ids=["run-first", "run-later"])
def test_a_raising_callback_mid_run_leaves_the_rest_queued_in_order(first: bool) -> None:
    """The run from the list's start, and a later run (after a message in
    pooled memory: the Python loop hands back to the C loop)."""
    seen: list[bytes] = []

    def on_binary(ws: Any, segment: BufferSegment) -> None:
        seen.append(bytes(segment))
        if bytes(segment) == b"boom":
            raise RuntimeError("handler failed")

    delivery, dispatcher, pool = make(Handlers(on_binary=on_binary))
    lead: list[Any] = [pooled(pool, b"first")] if first else []
    messages = [*lead, b"one", b"boom", b"three", b"four"]
    delivery.received(sum(map(len, messages)))
    dispatcher.post(delivery.messages, messages)
    with pytest.raises(RuntimeError, match="handler failed"):
        dispatcher.run()
    before = [b"first"] if first else []
    assert seen == [*before, b"one", b"boom"]
    assert list(dispatcher.pending) == [(delivery.messages, [b"three", b"four"])]
    assert dispatcher.run() == 2
    assert seen == [*before, b"one", b"boom", b"three", b"four"]
    assert delivery.queued == 0


@pytest.mark.parametrize("lead", [False, True], ids=["binary-first", "pooled-first"])
def test_runs_of_small_binaries_and_other_messages_arrive_in_order_through_the_c_loop(
    loop: str, lead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind in one read, in order. Probe "W4 callbacks": a read's
    messages often start with one that spanned two reads (pooled memory), and
    the C loop only ever started at a list's first message, so 97 % of a 64 B
    flood's messages went through the Python loop (1 M messages: 969,242 of
    them). Now the Python loop hands back to the C loop at every small binary
    message after others: with the C loop, none is lent from Python."""
    lends: list[bytes] = []
    real_lend = ScratchSegment.lend
    monkeypatch.setattr(
        ScratchSegment,
        "lend",
        lambda self, payload: lends.append(payload) or real_lend(self, payload),
    )
    order: list[Any] = []
    ws = Handlers(
        on_message=lambda ws, t: order.append(t),
        on_binary=lambda ws, seg: order.append(bytes(seg)),
    )
    delivery, dispatcher, pool = make(ws)
    big = b"L" * (SCRATCH + 1)
    first: list[Any] = [pooled(pool, b"p" * 300)] if lead else []
    rest = [b"a", b"bb", big, "t", b"c", pooled(pool, b"q"), b"", b"d" * SCRATCH]
    dispatcher.post(delivery.messages, [*first, *rest])
    assert dispatcher.run() == len(first) + len(rest)
    expected = [
        *([b"p" * 300] if lead else []),
        b"a",
        b"bb",
        big,
        "t",
        b"c",
        b"q",
        b"",
        b"d" * SCRATCH,
    ]
    assert order == expected
    small = [b"a", b"bb", b"c", b"", b"d" * SCRATCH]
    assert lends == ([] if loop == "c" else small)


# -- races and interrupts, made deterministic --------------------------------------------


class RacingDelivery(Delivery):
    """A Delivery whose ``queued``, as re-read under the lock, follows a script:
    what another thread's ``receive()`` taking messages between the reader's
    reads looks like (the unlocked first check reads the counters themselves)."""

    def __init__(self, reads: list[int]) -> None:
        super().__init__(Handlers(), Dispatcher(), BufferPool())
        self.reads = reads

    @property
    def queued(self) -> int:
        if self.reads:
            return self.reads.pop(0)
        return Delivery.queued.fget(self)  # type: ignore[attr-defined,no-any-return]


def test_a_queue_drained_while_the_reader_took_the_lock_does_not_pause() -> None:
    """received() saw the limit reached without the lock, and receive() took
    messages before the reader got the lock: reading goes on."""
    delivery = RacingDelivery(reads=[50])
    delivery.limit = 100
    assert delivery.received(150) is False
    assert not delivery.paused and delivery.reads == []


def test_a_queue_drained_just_after_the_pause_was_set_resumes_at_once() -> None:
    """receive() took messages between the reader setting ``paused`` and its
    re-read: the reader clears the pause itself (no receive() will check it)."""
    delivery = RacingDelivery(reads=[150, 40])
    delivery.limit = 100
    assert delivery.received(150) is False
    assert not delivery.paused and delivery.reads == []
    delivery.wait_resumed()  # not paused: returns at once


def test_drained_without_on_drained_only_clears_the_pause() -> None:
    delivery, dispatcher, _ = make(Handlers())
    delivery.limit = 100
    assert delivery.received(100) is True
    dispatcher.post(delivery.messages, [b"a" * 60, b"b" * 40])
    assert dispatcher.run() == 2
    assert delivery.paused  # in the inbox, not yet taken
    assert delivery.take() == b"a" * 60
    assert not delivery.paused and delivery.queued == 40
    delivery.wait_resumed()


def test_on_drained_that_raises_leaves_the_pause_for_the_next_check() -> None:
    """An exception (an interrupt) in on_drained: the pause is set again, so
    the next check resumes; the messages are delivered once, none twice."""
    texts: list[str] = []
    calls: list[int] = []

    def on_drained() -> None:
        calls.append(delivery.queued)
        if len(calls) == 1:
            raise KeyboardInterrupt

    delivery, dispatcher, _ = make(Handlers(on_message=lambda ws, t: texts.append(t)))
    delivery.limit = 10
    delivery.on_drained = on_drained
    assert delivery.received(12) is True
    dispatcher.post(delivery.messages, ["abcdef", "ghijkl"])
    # The messages were handed over, then on_drained raised: messages() checks
    # again on its way out (the second call resumes), and re-raises.
    with pytest.raises(KeyboardInterrupt):
        dispatcher.run()
    assert texts == ["abcdef", "ghijkl"]
    assert calls == [0, 0]
    assert not delivery.paused and delivery.queued == 0
    assert not dispatcher.pending  # delivered: nothing put back
    assert dispatcher.run() == 0


def test_interrupt_in_take_puts_the_message_back_at_the_front() -> None:
    """Ctrl-C while take() resumes a paused reader (in on_drained): the message
    goes back to the front of the inbox, uncounted, and the next take() gets it."""
    raised: list[bool] = []

    def on_drained() -> None:
        if not raised:
            raised.append(True)
            raise KeyboardInterrupt

    delivery, dispatcher, _ = make(Handlers())
    delivery.limit = 10
    delivery.on_drained = on_drained
    assert delivery.received(12) is True
    dispatcher.post(delivery.messages, [b"12345678", b"9012"])
    assert dispatcher.run() == 2
    with pytest.raises(KeyboardInterrupt):
        delivery.take()
    assert list(delivery.inbox) == [b"12345678", b"9012"]
    assert delivery.queued == 12 and delivery.paused
    assert delivery.take() == b"12345678"  # this time on_drained returns
    assert not delivery.paused
    assert delivery.take() == b"9012"
    assert delivery.queued == 0


def test_a_text_message_on_a_socket_with_only_on_binary_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    delivery = Delivery(Handlers(on_binary=rec), Dispatcher(), BufferPool(), ContextAdapter({}))
    assert delivery.received(12) is False
    with caplog.at_level(logging.WARNING, logger="blockws"):
        assert delivery.messages(["lost", b"kept", "lost"]) == 3
    assert rec.contents == [b"kept"]
    assert not delivery.inbox and delivery.queued == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on_message" in warnings[0].getMessage()


def test_binary_message_over_exact_bytes_goes_to_the_handler_and_to_receive() -> None:
    """A BinaryMessage can hold exact bytes, not pooled memory (the C parser
    makes those): the handler gets a pooled copy, receive() gets the bytes,
    and nothing is given back to the pool that did not come from it."""
    payload = b"exact bytes " * 500
    rec = Recorder(release=True)  # a handler that releases its segment itself
    delivery, _, pool = make(Handlers(on_binary=rec))
    assert delivery.messages([BinaryMessage(payload, len(payload) - 2)]) == 1
    assert rec.contents == [payload[:-2]]
    assert rec.segments[0].released and rec.segments[0].pool is pool
    assert pool.pooled_bytes == 8192  # the copy's buffer, given back once
    kept, _, kept_pool = make(Handlers())
    assert kept.messages([BinaryMessage(payload, len(payload))]) == 1
    assert list(kept.inbox) == [payload]
    assert kept_pool.pooled_bytes == 0
