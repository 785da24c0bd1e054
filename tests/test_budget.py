"""Budgets (``update(max_callbacks=, max_time=)``, ``update_all(...)``) and the
``on_pending`` wake-up hook, at the dispatcher level: no sockets.

The clock a budget reads is replaced by a fake one that callbacks advance, so
``max_time`` is tested exactly, without sleeping.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from memory import server_frame, use_memory

import blockws
import blockws.delivery as delivery_module
import blockws.dispatcher as dispatcher_module
from blockws.buffers import BufferPool
from blockws.delivery import Delivery
from blockws.dispatcher import Budget, Dispatcher
from blockws.frames import Opcode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1024.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # Both clocks a budget reads: its deadline (dispatcher) and a read's chunk
    # sizing (delivery). With only the first faked, the chunks were sized from
    # the real clock against the fake deadline: right only on a machine up for
    # more than 1024 s.
    monkeypatch.setattr(dispatcher_module, "_perf", fake)
    monkeypatch.setattr(delivery_module, "_perf", fake)
    return fake


@pytest.fixture(autouse=True)
def no_global_hook() -> Iterator[None]:
    yield
    blockws.set_on_pending(None)


class Handlers:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.on_binary = None
        self.raise_on: str | None = None

    def on_message(self, ws: Any, text: str) -> None:
        self.seen.append(text)
        if text == self.raise_on:
            raise RuntimeError(f"callback failed on {text}")


def post_range(d: Dispatcher, seen: list[int], start: int, stop: int) -> None:
    for i in range(start, stop):
        d.post(seen.append, i)


# -- budgets -----------------------------------------------------------------------------


def test_max_callbacks_runs_that_many_and_keeps_the_rest_in_order() -> None:
    d = Dispatcher()
    seen: list[int] = []
    post_range(d, seen, 0, 10)
    assert d.run(Budget.of(3, None)) == 3
    assert seen == [0, 1, 2]
    assert len(d.pending) == 7
    post_range(d, seen, 10, 12)  # new ones queue behind what was left
    assert d.run(Budget.of(5, None)) == 5
    assert d.run() == 4
    assert seen == list(range(12))


def test_max_callbacks_zero_runs_nothing() -> None:
    d = Dispatcher()
    seen: list[int] = []
    post_range(d, seen, 0, 3)
    assert d.run(Budget.of(0, None)) == 0
    assert seen == [] and len(d.pending) == 3


def test_max_time_stops_after_the_callback_that_spends_it(clock: FakeClock) -> None:
    d = Dispatcher()
    seen: list[int] = []

    def slow(i: int) -> None:
        seen.append(i)
        clock.now += 0.001  # each callback takes 1 ms

    for i in range(10):
        d.post(slow, i)
    assert d.run(Budget.of(None, 0.0025)) == 3  # 1, 2 ms: go on; 3 ms: spent
    assert seen == [0, 1, 2]
    # Zero time still runs one callback: the budget is checked after each.
    assert d.run(Budget.of(None, 0.0)) == 1
    assert d.run() == 6
    assert seen == list(range(10))


def test_a_read_of_many_messages_is_split_by_the_budget(clock: FakeClock) -> None:
    d = Dispatcher()
    handlers = Handlers()
    delivery = Delivery(handlers, d, BufferPool())
    batch = [f"m{i}" for i in range(10)]
    d.post(delivery.messages, batch)  # one read: one item of ten messages
    d.post(handlers.seen.append, "after")
    assert d.run(Budget.of(4, None)) == 4
    assert handlers.seen == ["m0", "m1", "m2", "m3"]
    assert d.run(Budget.of(5, None)) == 5
    assert handlers.seen[-1] == "m8"
    assert d.run() == 2
    assert handlers.seen == batch + ["after"]


def test_a_read_of_many_messages_under_a_time_budget(clock: FakeClock) -> None:
    d = Dispatcher()
    handlers = Handlers()
    delivery = Delivery(handlers, d, BufferPool())

    def on_message(ws: Any, text: str) -> None:
        handlers.seen.append(text)
        clock.now += 0.0005

    handlers.on_message = on_message  # type: ignore[method-assign]
    d.post(delivery.messages, [f"m{i}" for i in range(20)])
    assert d.run(Budget.of(None, 0.002)) == 4
    assert d.run(Budget.of(None, 0.002)) == 4
    assert d.run() == 12
    assert handlers.seen == [f"m{i}" for i in range(20)]


def test_a_time_budget_over_a_large_read_stops_near_its_end(clock: FakeClock) -> None:
    """Chunked delivery (one clock read per chunk, not per message) still stops
    within about one callback of the budget, and keeps the order."""
    d = Dispatcher()
    handlers = Handlers()
    delivery = Delivery(handlers, d, BufferPool())
    step = 2.0**-16  # ~15 us per callback, exact in binary

    def on_message(ws: Any, text: str) -> None:
        handlers.seen.append(text)
        clock.now += step

    handlers.on_message = on_message  # type: ignore[method-assign]
    batch = [f"m{i}" for i in range(1000)]
    d.post(delivery.messages, batch)
    ran = d.run(Budget.of(None, 64 * step))
    assert 64 <= ran <= 65
    assert handlers.seen == batch[:ran]
    assert d.run() == 1000 - ran
    assert handlers.seen == batch


def test_a_time_budget_with_instant_callbacks_delivers_a_read_whole(clock: FakeClock) -> None:
    d = Dispatcher()
    handlers = Handlers()
    delivery = Delivery(handlers, d, BufferPool())
    d.post(delivery.messages, [f"m{i}" for i in range(1000)])
    assert d.run(Budget.of(None, 0.001)) == 1000  # the clock never moved


def test_a_raising_callback_under_a_time_budget_keeps_the_rest_in_order(
    clock: FakeClock,
) -> None:
    d = Dispatcher()
    handlers = Handlers()
    handlers.raise_on = "m40"
    delivery = Delivery(handlers, d, BufferPool())
    batch = [f"m{i}" for i in range(100)]
    d.post(delivery.messages, batch)  # chunks of 1, 2, 4, ...: m40 is inside one
    d.post(handlers.seen.append, "after")
    with pytest.raises(RuntimeError, match="m40"):
        d.run(Budget.of(None, 1.0))
    assert handlers.seen == batch[:41]
    assert d.run() == 60
    assert handlers.seen == batch + ["after"]


def test_a_raising_callback_under_a_budget_keeps_the_rest() -> None:
    d = Dispatcher()
    handlers = Handlers()
    handlers.raise_on = "m2"
    delivery = Delivery(handlers, d, BufferPool())
    d.post(delivery.messages, [f"m{i}" for i in range(6)])
    with pytest.raises(RuntimeError, match="m2"):
        d.run(Budget.of(5, None))
    assert handlers.seen == ["m0", "m1", "m2"]
    assert d.run(Budget.of(10, None)) == 3
    assert handlers.seen == [f"m{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("max_callbacks", "max_time", "error"),
    [
        ("3", None, TypeError),
        (True, None, TypeError),
        (2.0, None, TypeError),
        (-1, None, ValueError),
        (None, "0.1", TypeError),
        (None, -0.5, ValueError),
        (None, float("nan"), ValueError),
    ],
)
def test_wrong_budgets_are_refused(max_callbacks: Any, max_time: Any, error: type) -> None:
    with pytest.raises(error, match="max_callbacks|max_time"):
        Budget.of(max_callbacks, max_time)
    d = Dispatcher()
    dispatcher_module.register(d, True)
    try:
        d.post(lambda _: None, None)
        with pytest.raises(error):
            blockws.update_all(max_callbacks, max_time)
    finally:
        dispatcher_module.register(d, False)


def test_update_all_shares_the_budget_between_sockets(live: list[Dispatcher]) -> None:
    a, b, c = Dispatcher(), Dispatcher(), Dispatcher()
    seen: list[tuple[str, int]] = []
    for name, d in (("a", a), ("b", b), ("c", c)):
        live.append(d)
        dispatcher_module.register(d, True)
        for i in range(10):
            d.post(seen.append, (name, i))
    assert blockws.update_all(max_callbacks=9) == 9
    counts = {name: sum(1 for n, _ in seen if n == name) for name in "abc"}
    assert counts == {"a": 3, "b": 3, "c": 3}
    # A socket with little to do leaves its share to the others.
    a.run()
    seen.clear()
    assert blockws.update_all(max_callbacks=8) == 8
    assert {n for n, _ in seen} == {"b", "c"}
    assert blockws.update_all() == 6  # the rest
    for name in "bc":
        assert [i for n, i in seen if n == name] == list(range(3, 10))  # each socket in order


def test_update_all_time_budget(clock: FakeClock, live: list[Dispatcher]) -> None:
    seen: list[int] = []

    step = 2.0**-10  # about 1 ms, exact in binary: no rounding at the boundaries

    def slow(i: int) -> None:
        seen.append(i)
        clock.now += step

    for k in range(2):
        d = Dispatcher()
        live.append(d)
        dispatcher_module.register(d, True)
        for i in range(10):
            d.post(slow, k * 100 + i)
    assert blockws.update_all(max_time=4 * step) == 4
    assert sorted(seen) == [0, 1, 100, 101]  # two each: the time was shared
    assert blockws.update_all() == 16


def test_update_all_budget_with_nothing_pending_is_cheap_and_zero(live: list[Dispatcher]) -> None:
    d = Dispatcher()
    live.append(d)
    dispatcher_module.register(d, True)
    assert blockws.update_all(max_callbacks=5, max_time=0.01) == 0


# -- on_pending -------------------------------------------------------------------------


class Hook:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.threads: list[int] = []
        self.fired = threading.Event()

    def __call__(self, owner: Any) -> None:
        self.calls.append(owner)
        self.threads.append(threading.get_ident())
        self.fired.set()


def test_on_pending_fires_once_per_empty_to_non_empty_transition() -> None:
    d = Dispatcher(owner="the socket")
    hook = Hook()
    d.set_on_pending(hook)
    seen: list[int] = []
    post_range(d, seen, 0, 5)
    assert hook.calls == ["the socket"]  # five posts, one transition
    d.post_many([(seen.append, 5), (seen.append, 6)])
    assert len(hook.calls) == 1
    assert d.run() == 7
    assert len(hook.calls) == 1  # emptied: nothing to announce
    d.post_many([(seen.append, 7)])
    assert len(hook.calls) == 2


def test_posts_made_while_update_runs_are_announced_once_when_it_ends() -> None:
    d = Dispatcher()
    hook = Hook()
    d.set_on_pending(hook)
    seen: list[str] = []

    def callback(_: object) -> None:
        d.post(seen.append, "posted inside")
        d.post(seen.append, "and another")

    d.post(callback, None)
    assert len(hook.calls) == 1
    assert d.run() == 1  # what was pending when it started; the rest waits
    assert seen == [] and len(hook.calls) == 2  # told once, as the run ended
    assert d.run() == 2
    assert seen == ["posted inside", "and another"] and len(hook.calls) == 2


def test_on_pending_runs_on_the_posting_thread() -> None:
    d = Dispatcher()
    hook = Hook()
    d.set_on_pending(hook)
    t = threading.Thread(target=d.post, args=(print, None))
    t.start()
    t.join(5)
    assert hook.threads == [t.ident]


def test_a_budget_that_leaves_callbacks_announces_them_again() -> None:
    d = Dispatcher()
    hook = Hook()
    d.set_on_pending(hook)
    seen: list[int] = []
    post_range(d, seen, 0, 10)
    assert len(hook.calls) == 1
    d.run(Budget.of(4, None))
    assert len(hook.calls) == 2  # the loop must come back for the other six
    assert hook.threads[-1] == threading.get_ident()
    d.run(Budget.of(100, None))
    assert len(hook.calls) == 2  # all done: nothing to announce


def test_a_raising_callback_announces_what_is_left() -> None:
    d = Dispatcher()
    hook = Hook()
    d.set_on_pending(hook)

    def boom(_: object) -> None:
        raise RuntimeError("boom")

    d.post(boom, None)
    d.post(print, None)
    with pytest.raises(RuntimeError):
        d.run()
    assert len(hook.calls) == 2


def test_a_hook_may_call_update_when_update_announces_leftovers() -> None:
    """The hook runs after update() has let go of the socket: a hook that
    pumps the socket itself must not deadlock on it."""
    d = Dispatcher()
    seen: list[int] = []
    calls: list[int] = []
    inner: list[int] = []

    def hook(_: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the leftovers of the budgeted run below
            inner.append(d.run())

    d.set_on_pending(hook)
    post_range(d, seen, 0, 10)
    assert len(calls) == 1
    outer: list[int] = []
    t = threading.Thread(target=lambda: outer.append(d.run(Budget.of(4, None))), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "deadlock: the hook ran while update() held the socket"
    assert outer == [4] and inner == [6]
    assert seen == list(range(10))


def test_a_hook_that_raises_is_logged_not_propagated(caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher()

    def bad_hook(_: Any) -> None:
        raise ValueError("hook failed")

    d.set_on_pending(bad_hook)
    seen: list[int] = []
    with caplog.at_level(logging.ERROR, logger="blockws"):
        d.post(seen.append, 1)  # must not raise into the poster
    assert d.run() == 1 and seen == [1]
    assert any(
        "on_pending" in r.getMessage() and r.exc_info and "hook failed" in str(r.exc_info[1])
        for r in caplog.records
    )


def test_setting_a_hook_while_callbacks_are_pending_calls_it_at_once() -> None:
    d = Dispatcher()
    d.post(print, None)
    hook = Hook()
    d.set_on_pending(hook)
    assert len(hook.calls) == 1


def test_the_global_hook_serves_sockets_without_their_own(live: list[Dispatcher]) -> None:
    own, other = Dispatcher(owner="own"), Dispatcher(owner="other")
    for d in (own, other):
        live.append(d)
        dispatcher_module.register(d, True)
    mine, everyone = Hook(), Hook()
    own.set_on_pending(mine)
    other.post(print, None)  # pending before the global hook is set
    blockws.set_on_pending(everyone)
    assert everyone.calls == ["other"]  # announced at once
    own.post(print, None)
    assert mine.calls == ["own"] and everyone.calls == ["other"]
    with pytest.raises(TypeError, match="callable"):
        blockws.set_on_pending("not callable")  # type: ignore[arg-type]


def test_no_wake_up_is_lost_between_a_poster_and_the_loop() -> None:
    """A loop that runs update() only when the hook wakes it must see every post.

    Ping-pong: the poster posts the next item as soon as the loop's callback
    has taken the previous one, that is while ``run()`` is finishing and about
    to re-arm the hook: the window where a wake-up can be lost. A lost one
    leaves the item pending with the loop asleep, and the wait times out.
    """
    d = Dispatcher()
    wake = threading.Event()
    d.set_on_pending(lambda _: wake.set())
    total = 5000
    seen: list[int] = []
    taken = threading.Semaphore(0)

    def callback(i: int) -> None:
        seen.append(i)
        taken.release()

    def poster() -> None:
        for i in range(total):
            d.post(callback, i)
            if not taken.acquire(timeout=5):
                return

    t = threading.Thread(target=poster)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the two threads as finely as possible
    try:
        t.start()
        while len(seen) < total:
            if not wake.wait(2.0):
                break
            wake.clear()
            d.run()
    finally:
        sys.setswitchinterval(switch)
        t.join(10)
    assert seen == list(range(total)), f"lost wake-up after {len(seen)} of {total}"


# -- through a WebSocket (memory transport) ----------------------------------------------


def test_websocket_update_budget_and_on_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = Hook()
    seen: list[str] = []
    with use_memory(monkeypatch) as opener:
        ws = blockws.WebSocket(
            "ws://example.invalid/", on_message=lambda _, t: seen.append(t), on_pending=hook
        )
        assert ws.on_pending is hook
        ws.open()
        assert hook.fired.wait(5)  # on_open queued
        assert hook.calls == [ws]
        assert ws.update() == 1
        transport = opener.transports[0]
        flood = b"".join(server_frame(int(Opcode.TEXT), f"{i}".encode()) for i in range(500))
        hook.fired.clear()
        transport.feed(flood)  # one read: one item of 500 messages
        assert hook.fired.wait(5)
        assert ws.wait(5)
        with pytest.raises(ValueError):
            ws.update(max_callbacks=-1)
        assert ws.update(max_callbacks=100) == 100
        assert ws.update(max_callbacks=100, max_time=10.0) == 100
        assert ws.update() == 300
        assert seen == [str(i) for i in range(500)]
        ws.on_pending = None
        with pytest.raises(TypeError, match="on_pending"):
            ws.on_pending = 3  # type: ignore[assignment]
        ws.abort()
        ws.join(5)
        ws.update()
    with pytest.raises(TypeError, match="on_pending"):
        blockws.WebSocket("ws://example.invalid/", on_pending=42)  # type: ignore[arg-type]


# -- update_all() costs O(pending) and always ends --------------------------------------------


def test_a_callback_that_posts_again_cannot_keep_update_all_running(live: list[Dispatcher]) -> None:
    """A run takes what was pending when it started (a flood posting as fast as update_all()
    runs used to keep one call going for seconds at 2,000 sockets)."""
    d = Dispatcher()
    live.append(d)
    dispatcher_module.register(d, True)
    runs: list[int] = []

    def again(n: int) -> None:
        runs.append(n)
        d.post(again, n + 1)  # always one more

    d.post(again, 0)
    assert blockws.update_all() == 1
    assert blockws.update_all() == 1
    assert d.run() == 1
    assert runs == [0, 1, 2]


def test_update_all_runs_the_sockets_made_ready_in_order_and_skips_idle_ones(
    live: list[Dispatcher],
) -> None:
    idle = [Dispatcher() for _ in range(1000)]
    busy = [Dispatcher() for _ in range(3)]
    for d in idle + busy:
        live.append(d)
        dispatcher_module.register(d, True)
    seen: list[int] = []
    for i, d in enumerate(reversed(busy)):
        d.post(seen.append, i)
    busy[0].run()  # its own update(): a stale entry for update_all() costs nothing
    assert blockws.update_all() == 2
    assert seen == [2, 0, 1]
    assert blockws.update_all() == 0


def test_a_closed_socket_is_not_kept_by_update_all(live: list[Dispatcher]) -> None:
    """A socket whose on_closed ran leaves the queue of ready sockets at once, even if
    update_all() is never called (a script that pumps each socket with its own update())."""
    import gc
    import weakref

    class Owner:
        pass

    owner = Owner()
    d = Dispatcher(owner)
    dispatcher_module.register(d, True)
    d.post(print, None)
    d.pending.clear()  # as its own update() would have
    dispatcher_module.register(d, False)
    d.post(print, None)  # a late post after on_closed
    gone = weakref.ref(owner)
    del owner, d
    gc.collect()
    assert gone() is None
