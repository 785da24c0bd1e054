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

Two things serve loops that do not poll every frame, or cannot afford to run
everything at once:

* **The wake-up hook** (``on_pending``, per socket, or :func:`set_on_pending`
  for all). It is called when a socket's queue goes from empty to non-empty,
  once per such transition, so it costs nothing per message. A flag
  (``_armed``) is set by ``run()`` once it has emptied the queue and cleared
  by the post that fills it again; the poster appends *then* tests the flag,
  ``run()`` sets the flag *then* tests the queue, so at least one of them
  sees the other (no lost wake-up) and the test-and-clear is under a lock
  (no double one). When ``run()`` returns leaving callbacks pending (a budget
  ran out, a callback raised), it calls the hook again itself: the loop was
  told to come back, and must be told again.
* **Budgets** (:class:`Budget`): ``run(budget)`` stops once ``max_callbacks``
  callbacks have run or ``max_time`` has passed, checked after each callback,
  and leaves the rest queued in order. An item that holds several messages
  (the messages of one read) charges the budget itself, in chunks, and puts
  back what it did not deliver, through :attr:`Dispatcher.budget` (see
  :meth:`blockws.delivery.Delivery.messages`).

Interrupts (issue 11, probe "data loss on Ctrl-C"). A ``KeyboardInterrupt``
-- any exception a Python signal handler raises -- is raised only at the
interpreter's eval-breaker checks. In CPython 3.11 (``Python/ceval.c``) they
are: ``RESUME`` at a function's entry; the backward jumps
(``JUMP_BACKWARD_QUICK``, ``POP_JUMP_BACKWARD_IF_*`` when they jump); and
after a call to anything but a Python function returns (``CALL``'s
non-inlined branch, ``CALL_FUNCTION_EX`` and most ``PRECALL_*``
specializations; a Python function called from Python is inlined and checks
at its own ``RESUME`` instead). Loads, stores, ``del x[i]``, unpacking and
arithmetic on built-in types never check (nor do they run Python code,
which would). So two statements with no call, no loop back-edge and no
entry between them are atomic with respect to Ctrl-C. ``run()`` relies on
exactly that:

* An item stays on the queue until it is taken *and entered* in one step:
  ``item = pending[0]; self.held = item; del pending[0]; fn(arg)`` has no
  check between the ``del`` and the call. Until the item commits it is
  :attr:`Dispatcher.held`, and an exception that leaves ``run()`` puts it
  back at the front (again with no check before the ``appendleft``).
* An item queued with :meth:`Dispatcher.post` commits on entry: an
  interrupt at its function's first instruction counts as raised by it.
  An item queued with :meth:`Dispatcher.post_held` (blockws's own: the
  messages of a read, ``on_open``, ``on_closed``, ``on_reconnecting``)
  commits where it enters user code, by clearing ``held``, again with no
  check in between; what it does before that is safe to do twice. The
  messages of a read then put back, themselves, what they did not deliver
  (see :meth:`blockws.delivery.Delivery.messages`).
* The run's own bookkeeping (``running_in``, the nesting count, the ready
  queue) changes only where no check can split it from the ``try`` that
  undoes it.

What the user sees: a callback that was entered has had its event (like any
exception from a callback, an interrupt inside it does not run it again), and
everything after it stays queued, in order, for the next ``update()``. The
tests in ``tests/test_interrupts.py`` raise an interrupt at every one of
these points in turn and check exactly that.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable, Protocol

from .deadline import Deadline
from .exceptions import InvalidState
from .log import logger

__all__ = [
    "Budget",
    "Dispatcher",
    "OnPending",
    "set_on_pending",
    "live_count",
    "live_sockets",
    "wait",
    "register",
    "update_all",
    "wait_any",
    "ReadSource",
    "claim_bell",
    "release_bell",
    "wait_readable",
    "notify_global",
    "live_dispatchers",
    "in_callback",
    "check_not_in_callback",
]

#: ``(function, argument)``: the function returns how many events it handled
#: (``None`` counts as one), which is what ``update()`` reports.
Item = tuple[Callable[[Any], Any], Any]


class _Plain(tuple):  # type: ignore[type-arg]
    """An item queued by :meth:`Dispatcher.post`: it commits when its function
    is entered (a plain tuple item commits itself, see :meth:`Dispatcher.post_held`)."""

    __slots__ = ()


#: ``fn(ws)``: told that a socket has callbacks pending (see the module docstring).
OnPending = Callable[[Any], Any]

_perf = time.perf_counter

#: ``run()`` without a budget in C (``blockws._speedups.run_pending``), when
#: built; the loop in :meth:`Dispatcher.run` is its reference. Looked up per
#: call, so that tests run either.
_run_pending: Callable[[Any, Any, Any, dict[int, int], type], int] | None
try:
    from ._speedups import run_pending as _run_pending
except ImportError:  # pragma: no cover - depends on the install
    _run_pending = None
if os.environ.get("BLOCKWS_PURE_PYTHON"):
    _run_pending = None

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


class Budget:
    """How much one budgeted ``update()`` may still run.

    ``left`` callbacks, until ``deadline`` (a ``time.perf_counter()`` value, or
    ``None``); :meth:`charge` is called after each callback (or chunk of
    messages) and tells when it is spent. The budget is never checked before the first callback of a
    call, so a call with ``max_time=0`` still runs one.
    """

    __slots__ = ("left", "deadline", "used", "spent")

    def __init__(self, left: int | None, deadline: float | None) -> None:
        self.left = sys.maxsize if left is None else left
        self.deadline = deadline
        #: Callbacks charged so far.
        self.used = 0
        self.spent = self.left <= 0

    @classmethod
    def of(cls, max_callbacks: int | None, max_time: float | None) -> Budget:
        """Check ``update()``'s arguments and make the budget (the clock starts now).

        Raises ``TypeError`` for a wrong type, ``ValueError`` for a negative value.
        """
        if max_callbacks is not None:
            if type(max_callbacks) is bool or not isinstance(max_callbacks, int):
                raise TypeError(
                    f"max_callbacks must be an int or None, not {type(max_callbacks).__name__}"
                )
            if max_callbacks < 0:
                raise ValueError(f"max_callbacks must be >= 0, not {max_callbacks}")
        deadline = None
        if max_time is not None:
            if type(max_time) is bool or not isinstance(max_time, (int, float)):
                raise TypeError(f"max_time must be seconds or None, not {type(max_time).__name__}")
            if not max_time >= 0:  # NaN too
                raise ValueError(f"max_time must be >= 0 seconds, not {max_time}")
            deadline = _perf() + max_time
        return cls(max_callbacks, deadline)

    def charge(self, n: int = 1) -> bool:
        """Count ``n`` callbacks that ran; True once the budget is spent."""
        self.used += n
        left = self.left = self.left - n
        deadline = self.deadline
        if left <= 0 or (deadline is not None and _perf() >= deadline):
            self.spent = True
        return self.spent


# The hook for sockets without one of their own (blockws.set_on_pending).
_global_on_pending: OnPending | None = None
# Dispatcher._announce's test-and-clear of _armed, for every socket.
_hook_lock = threading.Lock()


class _Signal:
    """What :meth:`Dispatcher.wait` needs of a ``threading.Condition``
    (``notify_all()``, a timed wait) in about 200 bytes, not 950: a socket's
    dispatcher keeps its signal for life once anyone has waited on it (its
    ``connect()`` does), and a Condition's waiter deque alone is 760 bytes.

    Each waiter waits on a lock of its own, held, and listed in
    :attr:`waiting` from :meth:`add` to :meth:`remove`; :meth:`notify_all`
    releases every listed lock still held. A release can fall on a lock
    whose waiter has timed out and not yet unlisted it: harmless, nobody
    waits on it again. :meth:`remove` may be called whether or not
    :meth:`add` completed (an interrupt between the two), so a waiter never
    stays listed.
    """

    __slots__ = ("lock", "waiting")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: The waiters' locks (``_thread.LockType``). Notifiers read it without
        #: the lock (an empty list: nobody to wake).
        self.waiting: list[Any] = []

    @property
    def count(self) -> int:
        """How many threads are waiting (for tests and diagnostics)."""
        return len(self.waiting)

    def add(self, waiter: Any) -> None:
        """List ``waiter``, a lock its thread holds and will wait on."""
        with self.lock:
            self.waiting.append(waiter)

    @staticmethod
    def wait(waiter: Any, timeout: float | None) -> None:
        """Block until notified, or ``timeout`` (``None``: no limit) passes."""
        waiter.acquire(True, -1 if timeout is None else max(timeout, 0.0))

    def remove(self, waiter: Any) -> None:
        """Unlist ``waiter`` (woken, timed out or interrupted; listed or not)."""
        with self.lock:
            waiting = self.waiting
            if waiter in waiting:
                waiting.remove(waiter)

    def notify_all(self) -> None:
        """Wake every waiter listed now. Never blocks for long; any thread."""
        with self.lock:
            for waiter in self.waiting:
                if waiter.locked():  # not already released by an earlier notify
                    waiter.release()


# Global wake-up for blockws.wait(): any post on any dispatcher notifies it.
# Its lock is taken bare where an interrupt may land (a Condition's __enter__
# is Python code: an interrupt inside it can leave the lock held).
_global_lock = threading.Lock()
_global_cond = threading.Condition(_global_lock)
_global_waiters = 0


class ReadSource(Protocol):
    """What reads a socket for a thread waiting on many (``blockws.wait()``,
    :mod:`blockws.multiwait`): the connection, through its read token."""

    def watch(self, wake: Callable[[], None], until: float) -> Any:
        """The socket to poll while this thread may read it (its reading is
        lent and held until ``until``, monotonic), or ``None`` (not now; the
        reading is asked for, and ``wake()`` is called when it is granted)."""

    def read_now(self) -> bool:
        """One read without waiting, parsed on this thread; True if anything
        came (so more may be buffered where a poll does not see it)."""


class _Bell:
    """A pipe that wakes the one thread polling sockets in :func:`wait_readable`
    when a callback is posted (or a socket's reading is granted) meanwhile.

    ``armed`` is set by the poller before it looks at the queues one last
    time and cleared after its poll; a poster appends *then* rings if armed,
    so no post is missed. Ringing writes one byte (more than one at worst,
    when two posters race): the poller drains them.
    """

    __slots__ = ("read_fd", "write_fd", "armed")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.armed = False

    def ring(self) -> None:
        if self.armed:
            self.armed = False
            try:
                os.write(self.write_fd, b"\0")
            except OSError:  # full (it is rung already) or closed meanwhile: nothing to do
                pass

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 256):
                pass
        except OSError:  # empty: done
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


# The bell exists while some thread may poll with it: made by the first
# claim_bell(), closed when no socket is live and nobody holds it (so no file
# descriptor outlives the last socket). Guarded by _global_lock.
_bell: _Bell | None = None
_bell_owner: int | None = None  # the ident of the thread that claimed it


def claim_bell() -> bool:
    """Claim the right to poll sockets in :func:`wait_readable`: one thread at
    a time (the bell has one reader). False if another thread holds it. A
    thread may claim it again while it holds it (an interrupt can land
    between a claim and the ``try`` whose ``finally`` releases it: the next
    claim by the same thread then succeeds; by another, it degrades to
    waiting without polling, never to a hang)."""
    global _bell, _bell_owner
    me = threading.get_ident()
    with _global_lock:
        if _bell_owner is not None and _bell_owner != me:
            return False
        if _bell is None:
            _bell = _Bell()
        _bell_owner = me
        return True


def release_bell() -> None:
    """Give back what :func:`claim_bell` claimed; the bell is closed if no
    socket is live any more."""
    global _bell, _bell_owner
    bell = None
    with _global_lock:
        if _bell_owner == threading.get_ident():
            _bell_owner = None
            if not _live_snapshot:
                bell, _bell = _bell, None
    if bell is not None:
        bell.close()


def notify_global() -> None:
    """Wake every thread in :func:`wait` and the thread in :func:`wait_readable`
    (a post, or a socket's reading granted to the polling thread)."""
    with _global_lock:
        _global_cond.notify_all()
        bell = _bell
        if bell is not None and bell.armed:
            bell.ring()


def wait_readable(
    dispatchers: Sequence[Dispatcher], socks: Sequence[Any], timeout: float
) -> list[int] | None:
    """Block until one of ``socks`` (objects with ``fileno()``) is readable (or
    at its end, or failed): returns their indexes; until a callback is posted
    to any of ``dispatchers`` or of the live sockets' (or
    :func:`notify_global` is called): ``None``;
    or until ``timeout`` seconds pass: ``[]``. Only for the thread that
    holds the claim (:func:`claim_bell`). On an interrupt the bell is
    disarmed and the waiter count restored."""
    global _global_waiters
    bell = _bell
    assert bell is not None and _bell_owner == threading.get_ident()
    counted = False
    try:
        with _global_lock:
            _global_waiters += 1  # posts now notify (and ring the bell when armed)
            counted = True
        bell.armed = True  # before the last look: a post after it rings
        live = _live_snapshot  # (and a socket made live since the caller looked)
        if any(d.pending for d in dispatchers) or (
            live is not dispatchers and any(d.pending for d in live)
        ):
            return None
        poller = select.poll()
        poller.register(bell.read_fd, select.POLLIN)
        fds: dict[int, int] = {}
        closed = []  # closed meanwhile (an abort): for the caller's read to find out
        for i, sock in enumerate(socks):
            fd = sock.fileno()
            if fd < 0:
                closed.append(i)
            else:
                fds[fd] = i
                poller.register(fd, select.POLLIN)
        events = poller.poll(0 if closed else max(timeout, 0.0) * 1000.0)
        bell.armed = False
        ready = closed
        rung = False
        for fd, _ in events:
            if fd == bell.read_fd:
                rung = True
            else:
                ready.append(fds[fd])
        if rung:
            bell.drain()
            if not ready:
                return None
        return ready
    finally:
        bell.armed = False
        if counted:
            with _global_lock:
                _global_waiters -= 1


def _forget_bell_in_child() -> None:
    # A forked child must not share the parent's pipe (each would drain the
    # other's wake-ups): it makes its own when it first needs one.
    global _bell, _bell_owner
    bell, _bell, _bell_owner = _bell, None, None
    if bell is not None:
        bell.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_bell_in_child)


class Dispatcher:
    """A FIFO of pending callbacks, run by whichever thread calls :meth:`run`."""

    __slots__ = (
        "pending",
        "owner",
        "on_pending",
        "budget",
        "held",
        "_cond",
        "_run_lock",
        "running_in",
        "_armed",
        "_hook_lock",
        "_in_ready",
        "source",
    )

    def __init__(self, owner: Any = None) -> None:
        self.pending: deque[Item] = deque()
        #: What the ``on_pending`` hook is called with (the ``WebSocket``).
        self.owner = owner
        #: This socket's wake-up hook; ``None``: the global one, if any.
        self.on_pending: OnPending | None = None
        #: The budget of the run in progress, for items that charge it per
        #: message; ``None`` outside a budgeted run.
        self.budget: Budget | None = None
        #: The item being run, taken off the queue but not yet committed:
        #: ``run()`` puts it back at the front if an exception (an interrupt)
        #: leaves the run before it commits. An item posted with
        #: :meth:`post_held` commits by setting this to ``None`` where it
        #: enters user code; one posted with :meth:`post` commits on entry.
        self.held: Item | None = None
        # Made by the first wait() (an idle socket that nobody waits on has none).
        self._cond: _Signal | None = None
        self._run_lock = threading.Lock()
        #: The ident of the thread running this queue's callbacks now, or
        #: ``None`` (read without a lock by the receive() fast path in
        #: :meth:`blockws.connection.Connection.data_received`).
        self.running_in: int | None = None
        # Set when the queue was seen empty by run(); the post that fills the
        # queue again clears it and calls the hook (see the module docstring).
        self._armed = True
        # One lock for every socket: it only guards the test-and-clear of
        # _armed, never a call (an idle socket need not carry its own).
        self._hook_lock = _hook_lock
        # Whether this dispatcher is in the ready queue update_all() drains.
        self._in_ready = False
        #: What reads this socket for a thread waiting on many
        #: (:mod:`blockws.multiwait`), or ``None``.
        self.source: ReadSource | None = None

    def post(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Queue ``fn(arg)``; thread-safe, never blocks on the consumer.

        The call counts as run once ``fn`` is entered: an exception or an
        interrupt from inside it does not run it again.
        """
        self.pending.append(_Plain((fn, arg)))
        if self._armed:
            self._announce()
        self._wake()

    def post_held(self, fn: Callable[[Any], Any], arg: Any) -> None:
        """Queue ``fn(arg)`` as an item that commits itself: until ``fn`` sets
        :attr:`held` to ``None`` (where it enters user code, with no
        eval-breaker point in between), an exception leaving it puts the item
        back at the front of the queue, to be run again by the next
        ``run()``. What ``fn`` does before it commits must therefore be safe
        to do twice. Thread-safe, never blocks."""
        self.pending.append((fn, arg))
        # _announce() and _wake(), their common cases inline (once per read).
        if self._armed:
            if self._in_ready and self.on_pending is None and _global_on_pending is None:
                self._armed = False  # no hook: nothing to make exactly-once
            else:
                self._announce()
        cond = self._cond
        if cond is not None and cond.waiting:  # see _wake()
            cond.notify_all()
        if _global_waiters:
            notify_global()

    def post_many(self, items: list[Item]) -> None:
        """Queue several :meth:`post_held` items at once, with a single wake-up
        for a waiter."""
        if items:
            self.pending.extend(items)
            if self._armed:
                self._announce()
            self._wake()

    def _announce(self) -> None:
        """The queue has become non-empty: call the wake-up hook, once.

        Runs on the posting thread (or on the thread of ``run()``, see
        :meth:`_rearm`). An exception from the hook is logged, never raised:
        the poster is a reader thread that must go on reading.
        """
        if not self._in_ready:
            _make_ready(self)
        hook = self.on_pending or _global_on_pending
        if hook is None:
            self._armed = False  # no hook: nothing to make exactly-once
            return
        with self._hook_lock:
            if not self._armed:
                return  # another thread took this transition
            self._armed = False
        try:
            hook(self.owner)
        except Exception:  # noqa: BLE001 - the hook must not break the poster
            logger.exception("the on_pending hook %r raised (for %r)", hook, self.owner)

    def _rearm(self) -> None:
        """After a run: arm for the next transition; if callbacks are still
        pending (a budget, an exception, or a post racing with this), tell the
        hook now, on this thread."""
        self._armed = True
        if self.pending:
            self._announce()

    def set_on_pending(self, hook: OnPending | None) -> None:
        """Set this socket's hook; if callbacks are already pending, call it now."""
        if hook is not None and not callable(hook):
            raise TypeError(f"on_pending must be callable, not {type(hook).__name__}")
        self.on_pending = hook
        if hook is not None:
            self._rearm()

    def nudge(self) -> None:
        """Wake threads in :meth:`wait` with nothing posted: their wait may now
        be done differently (a socket's reading has become theirs to do)."""
        cond = self._cond
        if cond is not None and cond.waiting:
            cond.notify_all()

    def _wake(self) -> None:
        # A waiter registers itself before checking `pending`, so reading the
        # counters after the append cannot miss one (see wait()).
        cond = self._cond
        if cond is not None and cond.waiting:
            cond.notify_all()
        if _global_waiters:
            notify_global()

    def run(self, budget: Budget | None = None) -> int:
        """Run pending callbacks on this thread; returns how many ran.

        Without a budget, the callbacks pending when it starts (those posted
        meanwhile wait for the next call, so that a call always ends, however
        fast the network posts); with one, until it is spent (see :class:`Budget`), the rest
        staying queued in order. A callback that raises stops the run: the
        exception propagates to the caller, and the callbacks after it stay
        queued for the next call. A call from inside a callback (re-entrant)
        returns 0 at once; a call from another thread waits for the running
        one to finish. Either way, callbacks left pending are announced to the
        ``on_pending`` hook again before this returns.

        On Ctrl-C (a ``KeyboardInterrupt``, or any exception a signal handler
        raises, at whatever point of this call it lands): nothing queued is
        lost or run twice. A callback that was entered has had its event -- the
        interrupt counts as raised by it, like any exception from a callback --
        and every event after it stays queued, in order, for the next call; an
        interrupt that lands before a callback is entered leaves its event
        queued. ``on_closed`` still runs exactly once. See "Interrupts" in the
        module docstring for how.
        """
        if budget is not None:
            return self._run_budget(budget)
        pending = self.pending
        if not pending:
            return 0
        if _run_pending is not None:  # the same, in C
            return _run_pending(self, pending, self._run_lock, _running, _Plain)
        me = threading.get_ident()
        if self.running_in == me:
            return 0
        try:
            with self._run_lock:
                running = _running
                depth = running.get(me, 0)
                count = 0
                try:
                    # Both marks are set before the first eval-breaker point
                    # in this try (none between the try and them), so the
                    # finally always finds them.
                    self.running_in = me
                    running[me] = depth + 1
                    for _ in range(len(pending)):
                        # Take the item and enter it as one step: no
                        # eval-breaker point between the del and the call (see
                        # the module docstring). It stays held until it commits.
                        item = pending[0]
                        self.held = item
                        del pending[0]
                        fn, arg = item
                        handled = fn(arg)
                        self.held = None
                        count += 1 if handled is None else handled
                except BaseException:
                    # The item being run goes back to the front unless it
                    # committed (inline: no eval-breaker point before the
                    # appendleft; ``__class__`` is a C attribute).
                    held = self.held
                    if held is not None:
                        self.held = None
                        if held.__class__ is not _Plain:
                            pending.appendleft(held)
                    raise
                finally:
                    self.running_in = None
                    if depth:
                        running[me] = depth
                    else:
                        del running[me]
                return count
        finally:
            # _rearm(), inline (once per update()): outside the lock, as the
            # hook may call update() itself.
            self._armed = True
            if self.pending:
                self._announce()

    def _run_budget(self, budget: Budget) -> int:
        pending = self.pending
        if not pending or budget.spent:
            return 0
        me = threading.get_ident()
        if self.running_in == me:
            return 0
        try:
            with self._run_lock:
                running = _running
                depth = running.get(me, 0)
                count = 0
                try:
                    self.running_in = me
                    running[me] = depth + 1
                    self.budget = budget
                    while pending:  # bounded by the budget
                        used = budget.used
                        item = pending[0]
                        self.held = item
                        del pending[0]
                        fn, arg = item
                        handled = fn(arg)
                        self.held = None
                        n = 1 if handled is None else handled
                        count += n
                        # An item holding several messages charged them itself.
                        if budget.used == used:
                            budget.charge(n)
                        if budget.spent:
                            break
                except BaseException:
                    # The item being run goes back to the front unless it
                    # committed (inline: no eval-breaker point before the
                    # appendleft; ``__class__`` is a C attribute).
                    held = self.held
                    if held is not None:
                        self.held = None
                        if held.__class__ is not _Plain:
                            pending.appendleft(held)
                    raise
                finally:
                    self.budget = None
                    self.running_in = None
                    if depth:
                        running[me] = depth
                    else:
                        del running[me]
                return count
        finally:
            self._rearm()

    def wait(self, timeout: float | None = None, also: deque[Any] | None = None) -> bool:
        """Block until a callback is pending or ``timeout`` passes; True if pending.

        ``also``: a queue whose filling ends the wait too (``receive()``'s
        inbox, which its own fast path fills, then calls :meth:`nudge`: it
        appends *then* reads the waiter count, the waiter counts itself *then*
        looks, so no wake-up is lost). May return False early after :meth:`nudge`.
        """
        if self.pending or also:
            return True
        cond = self._cond
        if cond is None:
            with _global_cond:  # makes it once, however many threads come at once
                cond = self._cond
                if cond is None:
                    cond = self._cond = _Signal()
        waiter = _allocate_lock()
        waiter.acquire()
        try:
            # Listed before looking again: a post after this point sees the
            # waiter and wakes it (see _wake()).
            cond.add(waiter)
            if self.pending or also:
                return True
            cond.wait(waiter, timeout)
        finally:
            cond.remove(waiter)
        return bool(self.pending)

    @property
    def waiters(self) -> int:
        """Threads in :meth:`wait` now (for tests and diagnostics)."""
        cond = self._cond
        return 0 if cond is None else cond.count


def wait(dispatchers: Callable[[], Sequence[Dispatcher]], timeout: float | None = None) -> bool:
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


# Dispatchers whose queue went from empty to non-empty since update_all() last
# took them: what update_all() runs, so that it costs O(pending), not
# O(sockets). Each is in it at most once (Dispatcher._in_ready); an entry may
# be stale (its socket's own update() ran the callbacks meanwhile), which
# costs update_all() one empty run. update_all() takes them off it inline.
_ready: deque[Dispatcher] = deque()
_ready_lock = threading.Lock()


def _make_ready(dispatcher: Dispatcher) -> None:
    with _ready_lock:
        # Only a live socket's: update_all() runs those (and a post that comes
        # after on_closed must not keep a dead socket in the queue).
        if not dispatcher._in_ready and dispatcher in _live:
            dispatcher._in_ready = True
            _ready.append(dispatcher)


def register(dispatcher: Dispatcher, alive: bool) -> None:
    """Add a socket's dispatcher to the live set (``open()``) or remove it (``on_closed``)."""
    global _live_snapshot
    with _live_lock:
        if alive:
            _live.add(dispatcher)
        else:
            _live.discard(dispatcher)
        _live_snapshot = tuple(_live)
    if alive:
        if dispatcher.pending:  # posted before open() made it live
            _make_ready(dispatcher)
    else:
        with _ready_lock:  # a closed socket is not kept alive by the ready queue
            if dispatcher._in_ready:
                dispatcher._in_ready = False
                _ready.remove(dispatcher)
        if not _live_snapshot:
            _close_idle_bell()


def _close_idle_bell() -> None:
    """No socket is live: close the bell unless a thread is polling with it
    (that thread closes it when it lets go: see release_bell())."""
    global _bell
    bell = None
    with _global_lock:
        if _bell_owner is None:
            bell, _bell = _bell, None
    if bell is not None:
        bell.close()


def _live_dispatchers() -> list[Dispatcher]:
    return list(_live_snapshot)


def live_dispatchers() -> tuple[Dispatcher, ...]:
    """The dispatchers of the sockets :func:`update_all` pumps (a snapshot)."""
    return _live_snapshot


def live_count() -> int:
    """How many sockets are between ``open()`` and the end of their ``on_closed``."""
    return len(_live_snapshot)


def live_sockets() -> tuple[Any, ...]:
    """The sockets between ``open()`` and the end of their ``on_closed`` (a snapshot):
    what :func:`update_all` pumps. For diagnostics and tests."""
    return tuple(d.owner for d in _live_snapshot)


def update_all(max_callbacks: int | None = None, max_time: float | None = None) -> int:
    """Run pending callbacks of every open or opening socket; returns how many ran.

    With a budget (``max_callbacks``, ``max_time`` seconds), the budget is
    shared: each socket with callbacks pending gets an even share of what is
    left when its turn comes (what one does not use goes to the next), and
    rounds repeat while budget and callbacks remain. The rest stays pending,
    in order, for the next call. Raises ``TypeError``/``ValueError`` for a
    wrong budget. On Ctrl-C, as :meth:`Dispatcher.run`: nothing is lost or
    run twice, and a socket left with callbacks pending stays in the queue
    this pumps.
    """
    if not _ready:
        return 0  # the idle call, every frame: whatever the number of sockets
    if max_callbacks is not None or max_time is not None:
        return _update_all_within(max_callbacks, max_time)
    count = 0
    # The sockets ready when it starts: one made ready meanwhile (by a post
    # during its run, say) waits for the next call, so that a call always ends.
    for _ in range(len(_ready)):
        dispatcher = None
        try:
            # Taken off the ready queue inline, inside the try: an interrupt after the
            # dispatcher left the ready queue (the lock's release is a call)
            # must find it in the finally, to make it ready again.
            with _ready_lock:
                if not _ready:
                    break
                dispatcher = _ready[0]
                dispatcher._in_ready = False  # before it runs: a post makes it ready again
                del _ready[0]
            count += dispatcher.run()
        finally:
            # A callback raised (or an interrupt came), or a re-entrant call ran nothing.
            if dispatcher is not None and dispatcher.pending:
                _make_ready(dispatcher)
    return count


def _update_all_within(max_callbacks: int | None, max_time: float | None) -> int:
    total = Budget.of(max_callbacks, max_time)
    count = 0
    while not total.spent:
        busy: list[Dispatcher] = []
        ran = 0
        try:
            # Every ready dispatcher at once, inside the try (see update_all()):
            # flags first, then the queue, so that an interrupt between them
            # leaves a dispatcher in the queue twice at worst (one empty run).
            with _ready_lock:
                busy = list(_ready)
                for dispatcher in busy:
                    dispatcher._in_ready = False
                _ready.clear()
            busy = [dispatcher for dispatcher in busy if dispatcher.pending]
            if not busy:
                break
            for i, dispatcher in enumerate(busy):
                shares = len(busy) - i
                deadline = total.deadline
                if deadline is not None:
                    now = _perf()
                    deadline = now + max(0.0, deadline - now) / shares
                left = total.left
                share = Budget(None if max_callbacks is None else -(-left // shares), deadline)
                n = dispatcher.run(share)
                ran += n
                if total.charge(n):
                    break
        finally:
            for dispatcher in busy:  # those the budget did not reach, or left with work
                if dispatcher.pending:
                    _make_ready(dispatcher)
        count += ran
        if not ran:
            break  # only re-entrant or racing calls: nothing can run now
    return count


def set_on_pending(hook: OnPending | None) -> None:
    """Set the wake-up hook of every socket that has none of its own.

    ``hook(ws)`` runs when a socket's pending callbacks go from none to
    some (see :attr:`Dispatcher.on_pending`); ``None`` removes it. Sockets
    that already have callbacks pending are announced at once, on the
    calling thread.
    """
    global _global_on_pending
    if hook is not None and not callable(hook):
        raise TypeError(f"set_on_pending() takes a callable or None, not {type(hook).__name__}")
    _global_on_pending = hook
    if hook is not None:
        for dispatcher in _live_snapshot:
            if dispatcher.on_pending is None and dispatcher.pending:
                dispatcher._rearm()


def wait_any(timeout: float | None = None) -> bool:
    """Block until any socket has a pending callback (True) or ``timeout`` passes.

    Raises :class:`InvalidState` when called from a callback.
    """
    check_not_in_callback("blockws.wait()")
    return wait(_live_dispatchers, timeout)
