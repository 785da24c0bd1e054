"""Marshalling callbacks onto the thread that calls ``update()``.

Background threads never call user code. They :meth:`Dispatcher.post`
``(function, argument)`` pairs onto a socket's dispatcher, and
:meth:`Dispatcher.run` -- behind ``ws.update()`` -- calls them on the calling
thread, in the order they were posted, never two at once.

Costs were the design constraint: a game calls ``update()`` every frame, so
with nothing pending it is one method call and an empty-deque test.
Posting is a ``deque.append`` (atomic under the GIL) plus a notify only when
a thread is actually waiting in :meth:`Dispatcher.wait` or in the global
:func:`wait`.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

from .deadline import Deadline
from .exceptions import InvalidState

__all__ = [
    "Dispatcher",
    "wait",
    "register",
    "update_all",
    "wait_any",
    "in_callback",
    "check_not_in_callback",
]

#: ``(function, argument)``: the function returns how many events it handled
#: (``None`` counts as one), which is what ``update()`` reports.
Item = tuple[Callable[[Any], Any], Any]

# How many dispatchers are running callbacks on this thread (nested when a
# callback pumps another socket). Blocking helpers refuse to run inside one.
_running: dict[int, int] = {}  # thread ident -> nesting depth; empty when no callback runs


def in_callback() -> bool:
    """Whether the calling thread is inside a callback run by ``update()``."""
    return bool(_running) and threading.get_ident() in _running


def check_not_in_callback(helper: str) -> None:
    """Raise :class:`InvalidState` when a blocking ``helper`` is called from a callback.

    Callbacks run inside ``update()``, which is what would deliver the thing
    the helper waits for: waiting there could never end (and re-entrant
    ``update()`` calls return 0), so it fails at once instead.
    """
    if _running and threading.get_ident() in _running:
        raise InvalidState(
            f"{helper} cannot be called from a callback: callbacks run inside update(), "
            f"which is what delivers what {helper} waits for. Use the callbacks "
            f"(on_message, on_open, ...) instead, or call {helper} outside update()"
        )


# Global wake-up for blockws.wait(): any post on any dispatcher notifies it.
_global_cond = threading.Condition(threading.Lock())
_global_waiters = 0


class Dispatcher:
    """A FIFO of pending callbacks, run by whichever thread calls :meth:`run`."""

    __slots__ = ("pending", "_cond", "_waiters", "_run_lock", "_running_in")

    def __init__(self) -> None:
        self.pending: deque[Item] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._run_lock = threading.Lock()
        self._running_in: int | None = None

    def post(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Queue ``fn(arg)``; thread-safe, never blocks on the consumer."""
        self.pending.append((fn, arg))
        self._wake()

    def post_many(self, items: list[Item]) -> None:
        """Queue several calls at once, with a single wake-up for a waiter."""
        if items:
            self.pending.extend(items)
            self._wake()

    def nudge(self) -> None:
        """Wake threads in :meth:`wait` with nothing posted: their wait may now
        be done differently (a socket's reading has become theirs to do)."""
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _wake(self) -> None:
        # A waiter registers itself before checking `pending`, so reading the
        # counters after the append cannot miss one (see wait()).
        if self._waiters:
            with self._cond:
                self._cond.notify_all()
        if _global_waiters:
            with _global_cond:
                _global_cond.notify_all()

    def run(self) -> int:
        """Run every pending callback on this thread; returns how many ran.

        A callback that raises stops the run: the exception propagates to the
        caller, and the callbacks after it stay queued for the next call. A
        call from inside a callback (re-entrant) returns 0 at once; a call
        from another thread waits for the running one to finish.
        """
        pending = self.pending
        if not pending:
            return 0
        me = threading.get_ident()
        if self._running_in == me:
            return 0
        with self._run_lock:
            self._running_in = me
            running = _running
            depth = running.get(me, 0)
            running[me] = depth + 1
            count = 0
            try:
                while pending:
                    fn, arg = pending.popleft()
                    handled = fn(arg)
                    count += 1 if handled is None else handled
            finally:
                self._running_in = None
                if depth:
                    running[me] = depth
                else:
                    del running[me]
            return count

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a callback is pending or ``timeout`` passes; True if pending.

        May return False early after :meth:`nudge`.
        """
        if self.pending:
            return True
        with self._cond:
            self._waiters += 1
            try:
                if self.pending:
                    return True
                self._cond.wait(timeout)
            finally:
                self._waiters -= 1
        return bool(self.pending)


def wait(dispatchers: Callable[[], list[Dispatcher]], timeout: float | None = None) -> bool:
    """Block until any dispatcher returned by ``dispatchers()`` has work."""
    global _global_waiters
    deadline = Deadline(timeout)
    with _global_cond:
        _global_waiters += 1
        try:
            while True:
                if any(d.pending for d in dispatchers()):
                    return True
                left = deadline.left()
                if left == 0:
                    return False
                _global_cond.wait(left)
        finally:
            _global_waiters -= 1


# -- every live socket: blockws.update_all() and blockws.wait() --------------------

# Dispatchers of sockets between open() and on_closed. The tuple is a snapshot
# rebuilt on every change, so update_all() iterates without taking a lock.
_live: set[Dispatcher] = set()
_live_snapshot: tuple[Dispatcher, ...] = ()
_live_lock = threading.Lock()


def register(dispatcher: Dispatcher, alive: bool) -> None:
    """Add a socket's dispatcher to the live set (``open()``) or remove it (``on_closed``)."""
    global _live_snapshot
    with _live_lock:
        if alive:
            _live.add(dispatcher)
        else:
            _live.discard(dispatcher)
        _live_snapshot = tuple(_live)


def _live_dispatchers() -> list[Dispatcher]:
    return list(_live_snapshot)


def update_all() -> int:
    """Run pending callbacks of every open or opening socket; returns how many ran."""
    count = 0
    for dispatcher in _live_snapshot:
        if dispatcher.pending:
            count += dispatcher.run()
    return count


def wait_any(timeout: float | None = None) -> bool:
    """Block until any socket has a pending callback (True) or ``timeout`` passes.

    Raises :class:`InvalidState` when called from a callback.
    """
    check_not_in_callback("blockws.wait()")
    return wait(_live_dispatchers, timeout)

