"""Dispatcher: FIFO callbacks run by the caller of run(), and the wait() wake-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import blockws.dispatcher as dispatcher_module
from blockws.dispatcher import Dispatcher

pytestmark = pytest.mark.unit

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
    assert d._running_in is None


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
    assert d._waiters == 0


def test_wait_wakes_on_post_from_another_thread(
    post_later: Callable[[Callable[[], None]], None],
) -> None:
    d = Dispatcher()

    def poster() -> None:
        wait_for(lambda: d._waiters == 1)  # the main thread is blocked in wait()
        d.post(print, None)

    post_later(poster)
    start = time.monotonic()
    assert d.wait(WAIT * 2) is True
    assert time.monotonic() - start < WAIT
    assert d._waiters == 0


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


def test_post_without_waiters_does_not_take_locks() -> None:
    d = Dispatcher()
    d.wait(0)  # makes the Condition
    assert d._cond is not None
    with d._cond, dispatcher_module._global_cond:
        # Both locks are held here: post must still return (nobody waits).
        d.post(print, None)
    assert len(d.pending) == 1
