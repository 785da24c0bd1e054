"""Dispatcher: FIFO callbacks run by the caller of run(), and the wait() wake-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import blockws.dispatcher as dispatcher_module
from blockws.dispatcher import Dispatcher

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("run_impl")]  # both loops

#: blockws._speedups.run_pending as imported (None without the C speedups).
_C_RUN = dispatcher_module._run_pending


WAIT = 5.0


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` briefly: no event says "a thread is now blocked in wait()"."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


@pytest.fixture
def post_later() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Run a function on another thread once something is waiting; joined at teardown."""
    threads: list[threading.Thread] = []

    def start(fn: Callable[[], None]) -> None:
        t = threading.Thread(target=fn)
        threads.append(t)
        t.start()

    yield start
    for t in threads:
        t.join(WAIT)


def test_fifo_order() -> None:
    d = Dispatcher()
    seen: list[Any] = []
    for i in range(10):
        d.post(seen.append, i)
    assert len(d.pending) == 10
    assert d.run() == 10
    assert seen == list(range(10))
    assert d.run() == 0
    assert not d.pending


def test_run_with_nothing_pending() -> None:
    assert Dispatcher().run() == 0


def test_callbacks_run_on_the_calling_thread() -> None:
    d = Dispatcher()
    seen: list[int] = []
    d.post(lambda _: seen.append(threading.get_ident()), None)
    d.run()
    assert seen == [threading.get_ident()]


def test_reentrant_run_returns_zero() -> None:
    d = Dispatcher()
    inner: list[int] = []
    seen: list[str] = []

    def callback(_: object) -> None:
        seen.append("outer")
        d.post(seen.append, "posted inside")
        inner.append(d.run())  # re-entrant: must not run anything

    d.post(callback, None)
    d.post(seen.append, "second")
    assert d.run() == 2
    assert inner == [0]
    # The item posted from inside the callback waits for the next run, after the
    # ones already queued: a run runs what was pending when it started.
    assert seen == ["outer", "second"]
    assert d.run() == 1
    assert seen == ["outer", "second", "posted inside"]


def test_exception_propagates_and_leaves_the_rest_queued() -> None:
    d = Dispatcher()
    seen: list[str] = []

    def boom(_: object) -> None:
        raise ValueError("callback failed")

    d.post(seen.append, "a")
    d.post(boom, None)
    d.post(seen.append, "c")
    d.post(seen.append, "d")
    with pytest.raises(ValueError, match="callback failed"):
        d.run()
    assert seen == ["a"]
    assert len(d.pending) == 2
    assert d.run() == 2
    assert seen == ["a", "c", "d"]
    assert d.running_in is None


def test_run_from_two_threads_never_runs_two_callbacks_at_once() -> None:
    d = Dispatcher()
    entered = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def slow(_: object) -> None:
        entered.set()
        release.wait(WAIT)
        seen.append("slow")

    d.post(slow, None)
    runner = threading.Thread(target=d.run)
    runner.start()
    assert entered.wait(WAIT)
    d.post(seen.append, "next")
    other_result: list[int] = []
    other = threading.Thread(target=lambda: other_result.append(d.run()))
    other.start()
    other.join(0.05)
    assert other.is_alive(), "a second run() must wait for the running one"
    assert seen == []
    release.set()
    runner.join(WAIT)
    other.join(WAIT)
    assert seen == ["slow", "next"]  # never "next" before "slow" finished
    assert other_result in ([0], [1])


def test_wait_returns_at_once_when_pending() -> None:
    d = Dispatcher()
    d.post(print, None)
    assert d.wait(0) is True
    assert d.wait(None) is True


def test_wait_times_out() -> None:
    d = Dispatcher()
    start = time.monotonic()
    assert d.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    assert d.waiters == 0


def test_wait_wakes_on_post_from_another_thread(
    post_later: Callable[[Callable[[], None]], None],
) -> None:
    d = Dispatcher()

    def poster() -> None:
        wait_for(lambda: d.waiters == 1)  # the main thread is blocked in wait()
        d.post(print, None)

    post_later(poster)
    start = time.monotonic()
    assert d.wait(WAIT * 2) is True
    assert time.monotonic() - start < WAIT
    assert d.waiters == 0


def test_wait_watches_a_second_queue_filled_then_nudged(
    post_later: Callable[[Callable[[], None]], None],
) -> None:
    """receive()'s wait: its inbox, filled without a post, ends the wait too,
    whether it was filled before the wait (seen at once) or during it (nudge)."""
    from collections import deque

    d = Dispatcher()
    inbox: deque[Any] = deque(["early"])
    assert d.wait(WAIT * 2, inbox) is True  # seen before waiting: no nudge needed
    inbox.clear()

    def filler() -> None:
        wait_for(lambda: d.waiters == 1)
        inbox.append("late")
        d.nudge()

    post_later(filler)
    start = time.monotonic()
    d.wait(WAIT * 2, inbox)
    assert time.monotonic() - start < WAIT
    assert list(inbox) == ["late"] and not d.pending


def test_global_wait_wakes_on_post_to_any_dispatcher(
    post_later: Callable[[Callable[[], None]], None],
) -> None:
    d1, d2 = Dispatcher(), Dispatcher()

    def poster() -> None:
        wait_for(lambda: dispatcher_module._global_waiters == 1)
        d2.post(print, None)

    post_later(poster)
    start = time.monotonic()
    assert dispatcher_module.wait(lambda: [d1, d2], WAIT * 2) is True
    assert time.monotonic() - start < WAIT
    assert dispatcher_module._global_waiters == 0
    assert not d1.pending and len(d2.pending) == 1


def test_global_wait_times_out() -> None:
    d = Dispatcher()
    start = time.monotonic()
    assert dispatcher_module.wait(lambda: [d], 0.05) is False
    assert time.monotonic() - start >= 0.04
    assert dispatcher_module._global_waiters == 0


def test_global_wait_returns_at_once_when_pending() -> None:
    d = Dispatcher()
    d.post(print, None)
    assert dispatcher_module.wait(lambda: [Dispatcher(), d], 0) is True
    assert dispatcher_module.wait(lambda: [d], None) is True


def test_global_wait_sees_dispatchers_added_while_waiting(
    post_later: Callable[[Callable[[], None]], None],
) -> None:
    live: list[Dispatcher] = []
    late = Dispatcher()

    def poster() -> None:
        wait_for(lambda: dispatcher_module._global_waiters == 1)
        live.append(late)  # a socket opened while the main thread waits
        late.post(print, None)

    post_later(poster)
    assert dispatcher_module.wait(lambda: list(live), WAIT * 2) is True


def test_condition_is_made_by_the_first_wait() -> None:
    d = Dispatcher()
    assert d._cond is None  # an idle socket carries no Condition (issue 14, W7)
    d.post(print, None)  # posting without waiters needs none either
    assert d._cond is None
    assert d.wait(0) is True  # something is pending: no Condition needed
    d.run()
    assert d.wait(0) is False
    assert d._cond is not None


def test_one_post_wakes_every_waiter() -> None:
    """Two threads in wait(): one post wakes both, and both unlist themselves."""
    d = Dispatcher()
    woke: list[bool] = []
    threads = [
        threading.Thread(target=lambda: woke.append(d.wait(WAIT * 2)), name=f"waiter-{i}")
        for i in range(2)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: d.waiters == 2)
    start = time.monotonic()
    d.post(print, None)
    for t in threads:
        t.join(WAIT)
    assert woke == [True, True]
    assert time.monotonic() - start < WAIT
    assert d.waiters == 0
    assert d._cond is not None and d._cond.count == 0


def test_signal_release_racing_a_timeout_is_harmless() -> None:
    """A waiter's wait ran out, and notify_all() releases its lock before the
    waiter unlists it, twice even: nothing raises, and a new waiter still waits."""
    signal = dispatcher_module._Signal()
    waiter = threading.Lock()
    waiter.acquire()
    signal.add(waiter)
    assert signal.count == 1
    signal.wait(waiter, 0)  # timed out: the lock is still held, still listed
    signal.notify_all()  # releases it anyway
    signal.notify_all()  # already released: left alone (a second release would raise)
    signal.remove(waiter)
    signal.remove(waiter)  # not listed any more: nothing happens
    assert signal.count == 0
    again = threading.Lock()
    again.acquire()
    signal.add(again)
    start = time.monotonic()
    signal.wait(again, 0.05)  # not released by the earlier notifies
    assert time.monotonic() - start >= 0.04
    signal.remove(again)
    assert signal.count == 0
    signal.notify_all()  # nobody listed: nothing to release


def test_an_interrupted_wait_unlists_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in wait(): the waiter is uncounted and unlisted (a later post
    then skips notifying), and the interrupt propagates."""
    d = Dispatcher()
    d.wait(0)  # makes the signal

    def interrupted(waiter: Any, timeout: float | None) -> None:
        raise KeyboardInterrupt

    assert d._cond is not None
    monkeypatch.setattr(dispatcher_module._Signal, "wait", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        d.wait(WAIT)
    assert d.waiters == 0
    d.post(print, None)  # nobody to wake: must not release a stale lock
    assert d.wait(0) is True


def test_an_interrupt_as_a_waiter_registers_leaves_it_unlisted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C lands inside add(), after the waiter was listed: wait()'s finally
    unlists it all the same, so no stale waiter makes every later post notify."""
    d = Dispatcher()
    d.wait(0)  # makes the signal
    original = dispatcher_module._Signal.add

    def add_then_interrupted(self: Any, waiter: Any) -> None:
        original(self, waiter)
        raise KeyboardInterrupt

    monkeypatch.setattr(dispatcher_module._Signal, "add", add_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        d.wait(WAIT)
    assert d.waiters == 0 and d._cond is not None and d._cond.waiting == []


def test_post_without_waiters_does_not_take_locks() -> None:
    d = Dispatcher()
    d.wait(0)  # makes the signal waiters wait on
    signal = d._cond
    assert signal is not None and signal.count == 0
    with signal.lock, dispatcher_module._global_cond:
        # Both locks are held here: post must still return (nobody waits).
        d.post(print, None)
    assert len(d.pending) == 1


# -- rare paths: interleavings made deterministic, nested and interrupted runs -------------


class Interleaved:
    """A lock that runs ``before()`` once, as it is next taken: what another
    thread did just before this one got the lock."""

    def __init__(self, before: Callable[[], None], lock: Any = None) -> None:
        self.before: Callable[[], None] | None = before
        self.lock = lock if lock is not None else threading.Lock()

    def __enter__(self) -> bool:
        before, self.before = self.before, None
        if before is not None:
            before()
        return bool(self.lock.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self.lock.__exit__(*exc)


def test_post_many_with_nothing_is_a_no_op() -> None:
    d = Dispatcher()
    calls: list[Any] = []
    d.on_pending = calls.append
    d.post_many([])
    assert not d.pending and calls == []
    d.post_many([(calls.append, "x")])
    assert calls == [d.owner] and len(d.pending) == 1


def test_the_hook_runs_once_when_another_poster_took_the_transition() -> None:
    """Two threads post to an empty queue at once: the one that gets the hook
    lock second finds the transition taken, and does not call the hook again."""
    d = Dispatcher()
    calls: list[Any] = []
    d.on_pending = calls.append
    d._hook_lock = Interleaved(lambda: setattr(d, "_armed", False))  # type: ignore[assignment]
    d.post(calls.append, "message")
    assert calls == []  # the other poster called it
    assert d.run() == 1 and calls == ["message"]


@pytest.mark.parametrize("budgeted", [False, True], ids=["run", "budget"])
def test_item_interrupted_before_it_commits_runs_again(budgeted: bool) -> None:
    """A post_held item that raises before it commits (an interrupt in the
    parsing, say) goes back to the front, and the next run runs it again."""
    d = Dispatcher()
    calls: list[str] = []

    def item(arg: str) -> None:
        calls.append(arg)
        if len(calls) == 1:
            raise KeyboardInterrupt
        d.held = None  # commits

    d.post_held(item, "read")
    d.post(calls.append, "after")

    def run() -> int:
        return d.run(dispatcher_module.Budget(10, None) if budgeted else None)

    with pytest.raises(KeyboardInterrupt):
        run()
    assert [entry[1] for entry in d.pending] == ["read", "after"]
    assert run() == 2
    assert calls == ["read", "read", "after"]


def test_a_callback_may_run_another_sockets_callbacks() -> None:
    """Nested runs of different dispatchers on one thread (a callback pumping
    another socket): both run, and the outer one's in-callback mark stays
    until it ends (a blocking helper inside it still refuses)."""
    outer, inner = Dispatcher(), Dispatcher()
    seen: list[str] = []

    def pump_inner(_: Any) -> None:
        assert inner.run(dispatcher_module.Budget(1, None)) == 1
        assert inner.run() == 1
        assert dispatcher_module.in_callback()
        seen.append("outer")

    inner.post(seen.append, "inner 1")
    inner.post(seen.append, "inner 2")
    outer.post(pump_inner, None)
    assert outer.run() == 1
    assert seen == ["inner 1", "inner 2", "outer"]
    assert not dispatcher_module.in_callback()


def test_budgeted_run_inside_its_own_callback_returns_zero(live: list[Dispatcher]) -> None:
    """update(max_callbacks=...) or update_all(max_callbacks=...) from inside a
    callback of the same socket runs nothing (the no-op re-entrant update())."""
    d = Dispatcher()
    dispatcher_module.register(d, True)
    live.append(d)
    counts: list[int] = []

    def reenter(_: Any) -> None:
        counts.append(d.run(dispatcher_module.Budget(5, None)))
        counts.append(dispatcher_module.update_all(max_callbacks=5))

    d.post(reenter, None)
    d.post(counts.append, -1)
    assert d.run(dispatcher_module.Budget(1, None)) == 1  # the ready queue keeps d
    assert counts == [0, 0]
    assert dispatcher_module.update_all() == 1 and counts == [0, 0, -1]


def test_wait_uses_the_condition_another_waiter_made_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = Dispatcher()
    made = dispatcher_module._Signal()
    monkeypatch.setattr(
        dispatcher_module, "_global_cond", Interleaved(lambda: setattr(d, "_cond", made))
    )
    assert d.wait(0) is False
    assert d._cond is made


def test_wait_sees_a_post_that_came_as_it_registered() -> None:
    """A post lands after wait() checked the queue and before it counted itself
    as a waiter: the check after registering sees it, no sleep."""
    d = Dispatcher()
    signal = dispatcher_module._Signal()
    signal.lock = Interleaved(lambda: d.pending.append((print, "x")))  # type: ignore[assignment]
    d._cond = signal
    started = time.monotonic()
    assert d.wait(WAIT) is True
    assert time.monotonic() - started < WAIT / 2
    assert d.waiters == 0


def test_socket_with_callbacks_queued_before_open_is_ready(live: list[Dispatcher]) -> None:
    d = Dispatcher()
    seen: list[str] = []
    d.post(seen.append, "before open")  # not live yet: not in the ready queue
    dispatcher_module.register(d, True)
    live.append(d)
    assert dispatcher_module.update_all() == 1
    assert seen == ["before open"]


def test_update_all_that_finds_the_ready_queue_taken_ends(
    live: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread's update_all() took every ready socket between this
    call's count and its lock: this one ends with 0, and the socket's callback
    runs once, on the other thread."""
    d = Dispatcher()
    dispatcher_module.register(d, True)
    live.append(d)
    seen: list[str] = []
    d.post(seen.append, "once")
    taken: list[Dispatcher] = []

    def other_thread() -> None:
        taken.extend(dispatcher_module._ready)
        for x in taken:
            x._in_ready = False
        dispatcher_module._ready.clear()

    monkeypatch.setattr(dispatcher_module, "_ready_lock", Interleaved(other_thread))
    assert dispatcher_module.update_all() == 0
    assert taken == [d] and seen == []
    assert d.run() == 1 and seen == ["once"]


def test_an_item_that_is_not_a_pair_fails_the_run_and_goes_back_to_the_front() -> None:
    """(Items are always pairs: posted by post() and post_held(). Either loop
    refuses another shape loudly, the item kept, the marks cleared.)"""
    d = Dispatcher()
    d.pending.append((print, None, "a third item"))  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        d.run()
    assert list(d.pending) == [(print, None, "a third item")]
    assert d.held is None and d.running_in is None and not dispatcher_module.in_callback()


def test_a_run_counts_what_each_item_says_it_handled() -> None:
    d = Dispatcher()
    seen: list[int] = []
    d.post_held(lambda n: seen.append(n) or 3, 1)
    d.post_held(seen.append, 2)  # None: one
    assert d.run() == 4 and seen == [1, 2]


@pytest.mark.skipif(_C_RUN is None, reason="the C speedups are not built")
def test_run_pending_checks_its_arguments() -> None:
    assert _C_RUN is not None
    d = Dispatcher()
    with pytest.raises(TypeError):
        _C_RUN(d, d.pending, threading.Lock(), {})  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _C_RUN(d, d.pending, threading.Lock(), [], tuple)  # type: ignore[arg-type]
    assert _C_RUN(d, d.pending, threading.Lock(), {}, tuple) == 0  # nothing pending


@pytest.mark.skipif(_C_RUN is None, reason="the C speedups are not built")
def test_run_pending_stores_through_setattr_on_another_type() -> None:
    """The C loop writes a Dispatcher's slots in place; on any other type (here
    a subclass whose ``held`` is a property) every store goes through setattr,
    in the same order: the item as it is taken, None once it has run."""
    assert _C_RUN is not None
    stores: list[Any] = []

    class Watched(Dispatcher):
        __slots__ = ("_held",)

        @property  # type: ignore[override]
        def held(self) -> Any:
            return self._held

        @held.setter
        def held(self, value: Any) -> None:
            stores.append(value)
            self._held = value

    for d in (Dispatcher(), Watched(), Dispatcher()):
        ran: list[int] = []
        d.post_held(ran.append, 1)
        d.post_held(ran.append, 2)
        assert _C_RUN(d, d.pending, threading.Lock(), {}, tuple) == 2 and ran == [1, 2]
        assert d.held is None and d.running_in is None and d._armed
    # (The first None is Dispatcher.__init__'s.)
    assert stores == [None, (stores[1][0], 1), None, (stores[3][0], 2), None]


def test_an_interrupted_wait_for_the_run_lock_runs_nothing_and_rearms() -> None:
    """Ctrl-C while another thread's run holds the lock: nothing taken, the
    marks untouched, and the hook told again of what is pending."""

    class Interrupted:
        def acquire(self) -> bool:
            raise KeyboardInterrupt

        def release(self) -> None:  # pragma: no cover - never acquired
            raise AssertionError

        def __enter__(self) -> bool:
            return self.acquire()

        def __exit__(self, *exc: object) -> None:  # pragma: no cover
            self.release()

    told: list[Any] = []
    d = Dispatcher(owner="ws")
    d.set_on_pending(told.append)
    d.post_held(print, "never")
    assert told == ["ws"]
    d._run_lock = Interrupted()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        d.run()
    assert len(d.pending) == 1 and d.held is None and d.running_in is None
    assert told == ["ws", "ws"]  # announced again by the run's end
