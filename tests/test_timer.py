"""The shared timer thread: order, cancellation, and the thread ending when idle.

Each test uses its own ``Timer`` (named ``blockws-timer`` like the global one) and
waits on events and ``Thread.join``, not on sleeps.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import blockws.timer
from blockws.timer import Timer, timer

pytestmark = pytest.mark.unit

pytestmark = pytest.mark.unit

WAIT = 5.0  # generous upper bound for events that should fire within milliseconds


@pytest.fixture
def tm() -> Iterator[Timer]:
    t = Timer()
    yield t
    thread = t.thread
    if thread is not None:  # a failing test may leave jobs: do not leak the thread
        for job in list(t._heap):
            job.cancel()
        thread.join(WAIT)


def join_idle(tm: Timer) -> None:
    """Wait for the timer thread to end; fail if it does not."""
    thread = tm.thread
    if thread is not None:
        thread.join(WAIT)
        assert not thread.is_alive(), "the timer thread did not end with no jobs left"
    assert tm.thread is None


class FrozenTime:
    """Stands in for the ``time`` module in blockws.timer: ``monotonic`` can be frozen."""

    def __init__(self) -> None:
        self.frozen: float | None = None

    def monotonic(self) -> float:
        return time.monotonic() if self.frozen is None else self.frozen


def record(log: list[Any], item: Any, done: threading.Event | None = None) -> None:
    """A job: append ``item`` to ``log``, then set ``done``."""
    log.append(item)
    if done is not None:
        done.set()


def test_jobs_run_in_due_order(tm: Timer, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FrozenTime()
    monkeypatch.setattr(blockws.timer, "time", clock)
    order: list[str] = []
    done = threading.Event()
    # With the clock frozen while scheduling, the due times are exactly ordered
    # by delay however slowly this thread runs.
    clock.frozen = time.monotonic()
    tm.call_later(0.03, lambda: record(order, "c", done))
    tm.call_later(0.01, lambda: record(order, "a"))
    tm.call_later(0.02, lambda: record(order, "b"))
    clock.frozen = None
    assert done.wait(WAIT)
    assert order == ["a", "b", "c"]
    join_idle(tm)


def test_jobs_due_together_run_in_scheduling_order(tm: Timer) -> None:
    gate = threading.Event()
    done = threading.Event()
    order: list[int] = []
    tm.call_later(0, lambda: record([], gate.wait(WAIT)))  # holds the thread while we schedule
    for i in range(20):
        tm.call_later(0, functools.partial(record, order, i))
    tm.call_later(0, done.set)
    gate.set()
    assert done.wait(WAIT)
    assert order == list(range(20))
    join_idle(tm)


def test_jobs_run_on_the_timer_thread(tm: Timer) -> None:
    seen: list[str] = []
    done = threading.Event()
    tm.call_later(0, lambda: record(seen, threading.current_thread().name, done))
    assert done.wait(WAIT)
    assert seen == ["blockws-timer"]
    assert threading.current_thread().name != "blockws-timer"


def test_cancel(tm: Timer) -> None:
    ran: list[str] = []
    done = threading.Event()
    job = tm.call_later(0.01, lambda: record(ran, "cancelled"))
    job.cancel()
    job.cancel()  # idempotent
    tm.call_later(0.05, lambda: record(ran, "kept", done))
    assert done.wait(WAIT)
    join_idle(tm)
    assert ran == ["kept"]


def test_cancel_after_run_is_a_no_op(tm: Timer) -> None:
    done = threading.Event()
    job = tm.call_later(0, done.set)
    assert done.wait(WAIT)
    join_idle(tm)
    job.cancel()
    assert tm._live == 0


def test_thread_ends_when_no_jobs_remain(tm: Timer) -> None:
    assert tm.thread is None
    done = threading.Event()
    tm.call_later(0, done.set)
    thread = tm.thread
    assert thread is not None and thread.name == "blockws-timer" and thread.daemon
    assert done.wait(WAIT)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert tm.thread is None
    # The next job starts a new thread.
    again = threading.Event()
    tm.call_later(0, again.set)
    second = tm.thread
    assert second is not None and second is not thread
    assert again.wait(WAIT)
    join_idle(tm)


def test_cancelling_the_only_job_ends_the_thread(tm: Timer) -> None:
    ran: list[int] = []
    job = tm.call_later(60, lambda: record(ran, 1))
    thread = tm.thread
    assert thread is not None and thread.is_alive()
    job.cancel()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert tm.thread is None
    assert ran == []


def test_earlier_job_wakes_a_thread_waiting_for_a_later_one(tm: Timer) -> None:
    late = tm.call_later(60, lambda: None)
    done = threading.Event()
    tm.call_later(0, done.set)  # must not wait behind the 60 s job
    assert done.wait(WAIT)
    late.cancel()
    join_idle(tm)


def test_cancelled_jobs_are_dropped_when_the_thread_ends(tm: Timer) -> None:
    # Regression: a cancelled job left in the heap kept its callback (and the
    # socket it references) alive after the thread ended.
    stale = tm.call_later(60, lambda: None)
    done = threading.Event()
    tm.call_later(0, done.set)
    stale.cancel()
    assert done.wait(WAIT)
    join_idle(tm)
    assert tm._heap == []


def test_exception_in_a_job_is_logged_and_the_timer_goes_on(
    tm: Timer, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("job failed on purpose")

    with caplog.at_level(logging.ERROR, logger="blockws"):
        tm.call_later(0, boom)
        tm.call_later(0, done.set)
        assert done.wait(WAIT)
        join_idle(tm)
    assert any("job failed on purpose" in (r.exc_text or "") for r in caplog.records)


def test_job_can_schedule_another(tm: Timer) -> None:
    done = threading.Event()
    tm.call_later(0, lambda: record([], tm.call_later(0, done.set)))
    assert done.wait(WAIT)
    join_idle(tm)


def test_cancel_from_another_thread_while_waiting(tm: Timer) -> None:
    ran: list[int] = []
    job = tm.call_later(60, lambda: record(ran, 1))
    canceller = threading.Thread(target=job.cancel)
    canceller.start()
    canceller.join(WAIT)
    join_idle(tm)
    assert ran == []


def test_global_timer_is_named_blockws_timer() -> None:
    assert isinstance(timer, Timer)
    assert timer.name == "blockws-timer"
