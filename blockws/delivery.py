"""Delivering messages to your code: the handlers, or ``receive()``'s queue.

The reader side (``WebSocket.data_received``, on the reader thread or on a
thread waiting in ``receive()``/``wait()``) posts the messages of one read to
the socket's dispatcher as one item; :meth:`Delivery.messages` runs it inside
``ws.update()``, on the thread that pumps the socket. Messages arrive from a
compact protocol (``Protocol.compact_messages``): a text message as its
``str``, a binary one as its exact ``bytes`` or, when the parser assembled it
in pooled memory, as a :class:`~blockws.protocol.BinaryMessage`.

``on_binary`` gets a :class:`~blockws.buffers.BufferSegment` that is valid
until the callback returns. Small messages share one scratch buffer per socket
(callbacks never overlap, so one is enough) and one
:class:`~blockws.buffers.ScratchSegment` over it, lent again for the next
message unless the callback kept a reference to it (CPython's reference count
tells): a kept segment is released as its callback returns and never lent
again, so it cannot turn into a view of a later message. Nothing is allocated
per message. Larger ones come from the socket's buffer pool, and go back to it
when the callback returns, unless it released the segment itself.

Which way messages go (one rule per socket, looked up per message): a socket
with neither ``on_message`` nor ``on_binary`` keeps every message for
``receive()``, as ``str`` and ``bytes``. A socket with either one is in
callback mode: a message whose own handler is missing (a binary message on a
socket with only ``on_message``, say) is dropped, with one WARNING per
socket, rather than kept for a ``receive()`` that a game never calls.

Backpressure (issue 11): :attr:`Delivery.queued` counts the messages posted
and not yet delivered -- handed to a handler, or taken from the inbox by
``receive()`` -- in bytes (binary) and characters (text). The reading side
adds a read's messages with :meth:`Delivery.received`, which returns True once
that count reaches ``limit``: the socket then stops reading (see
``Connection.data_received``). The count is taken down as messages are
delivered, on the thread that calls ``update()``/``receive()``, and once it
falls to half the limit ``on_drained`` is called there, and reading resumes.
Each counter has one writer -- the reading side (one reading thread at a
time), the delivering side (``update()``, serialized) and ``receive()`` --
which adds to it with a single ``+=`` and no lock; the lock is taken only
around a pause and a resume. The reader re-reads the counts after it sets
``paused`` (under the lock), and the delivering side and ``receive()`` read
``paused`` after their ``+=``: one of the two always sees the other, so a pause
is never left standing over a queue that drained meanwhile.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from .buffers import BufferPool, BufferSegment, ScratchSegment
from .dispatcher import Budget, Dispatcher
from .frames import total_length
from .log import ContextAdapter

__all__ = ["Delivery", "Handlers", "SCRATCH"]

#: Binary messages up to this size reach on_binary in the per-socket scratch buffer.
SCRATCH = 4096

_perf = time.perf_counter

#: References to an object, as CPython counts them; None where the
#: interpreter has no such count (then every message gets a new segment).
_refcount: Callable[[Any], int] | None = getattr(sys, "getrefcount", None)

#: The C loop for runs of small binary messages (blockws._speedups.lend_each),
#: when built; the loop in Delivery.messages is the reference.
_lend_each: Callable[[list[Any], Any, ScratchSegment, list[int]], int] | None
try:
    from ._speedups import lend_each as _lend_each
except ImportError:  # pragma: no cover - depends on the install
    _lend_each = None
if os.environ.get("BLOCKWS_PURE_PYTHON"):
    _lend_each = None


class Handlers(Protocol):
    """The socket as the handlers see it: its callbacks, and the first argument
    they are called with."""

    on_message: Callable[[Any, str], Any] | None
    on_binary: Callable[[Any, BufferSegment], Any] | None


class Delivery:
    """Where one socket's messages go; :meth:`messages` runs inside ``update()``."""

    __slots__ = (
        "ws",
        "dispatcher",
        "pool",
        "inbox",
        "_scratch",
        "_lent",
        "_lent_refs",
        "log",
        "limit",
        "on_drained",
        "paused",
        "_received",
        "_delivered",
        "taken",
        "_lock",
        "_cond",
        "_warned",
    )

    def __init__(
        self,
        ws: Handlers,
        dispatcher: Dispatcher,
        pool: BufferPool,
        log: ContextAdapter | None = None,
    ) -> None:
        self.ws = ws
        self.dispatcher = dispatcher
        self.pool = pool
        self.log = log
        #: Messages no handler took, for ``receive()``; made with the first one,
        #: or by the first ``receive()`` (:meth:`new_inbox`): a socket in
        #: callback mode keeps none (a deque is 760 bytes before its first item).
        #: Never ``None`` again once made, so a reference to it stays good.
        self.inbox: deque[str | bytes] | None = None
        self._scratch: bytearray | None = None
        # The segment over the scratch buffer, lent again for each small
        # message while no callback keeps it (see messages()), and the
        # reference count it has when only messages()'s local holds it.
        self._lent: ScratchSegment | None = None
        self._lent_refs = 0
        #: Undelivered bytes at which reading stops (``None``: never).
        self.limit: int | None = None
        #: Called (on the delivering thread, no lock held) when a paused
        #: socket's queue has fallen to half the limit.
        self.on_drained: Callable[[], None] | None = None
        #: Reading is stopped until the queue drains (guarded by the lock).
        self.paused = False
        self._received = 0  # posted: written by the reading side, under the lock
        self._delivered = 0  # delivered: written by the delivering side, under the lock
        #: Bytes ``receive()`` took from the inbox; only it adds to this, one
        #: ``+=`` per message, then calls :meth:`check_drained` if ``paused``
        #: (see the module docstring).
        self.taken = 0
        self._lock = threading.Lock()
        # The paused reader waits on this; made at the first pause (a socket
        # that never fills its queue does not pay for it).
        self._cond: threading.Condition | None = None
        self._warned = False

    # -- backpressure ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Bytes (characters for text) posted and not yet delivered."""
        return self._received - self._delivered - self.taken

    def received(self, size: int) -> bool:
        """The reading side posts ``size`` more; True if reading must now stop.

        Call it before posting the messages, so the delivering side never
        counts more delivered than received.
        """
        # Only the reading side writes _received (one reading thread at a
        # time), so the += needs no lock; nor does the test below the limit,
        # the common case, which reads the other sides' counters as they are.
        self._received += size
        limit = self.limit
        if limit is None or self._received - self._delivered - self.taken < limit:
            return False
        with self._lock:
            if self.queued < limit:
                return False
            self.paused = True
            if self.queued <= limit // 2:  # receive() took meanwhile (re-read after the flag)
                self.paused = False
                return False
            return True

    def wait_resumed(self) -> None:
        """Block the reading thread until reading may go on: the queue drained
        to half the limit, or :meth:`resume` was called."""
        with self._lock:
            cond = self._cond
            if cond is None:
                cond = self._cond = threading.Condition(self._lock)
            while self.paused:
                cond.wait()

    def resume(self) -> bool:
        """Let reading go on whatever the queue (the socket is closing or ending).
        Returns whether reading was paused (the caller then calls what
        ``on_drained`` would have)."""
        with self._lock:
            was = self.paused
            self.paused = False
            if self._cond is not None:
                self._cond.notify_all()
        return was

    def check_drained(self) -> None:
        """Reading is paused: resume it if the queue is down to half the limit.

        Interrupts: the test and clearing ``paused`` have no eval-breaker
        point between them. Waking the paused reader and ``on_drained`` may
        each be cut short by one; then ``paused`` is set again (no check
        before that either), so that the next check -- the caller makes it
        on its way out, see :meth:`messages` and :meth:`take` -- resumes
        again: both steps are harmless to repeat.
        """
        cleared = False
        try:
            with self._lock:
                limit = self.limit
                if not self.paused or (
                    limit is not None
                    and self._received - self._delivered - self.taken > limit // 2
                ):
                    return
                self.paused = False
                cleared = True
                cond = self._cond
                if cond is not None:
                    cond.notify_all()
            drained = self.on_drained
            if drained is not None:
                drained()
        except BaseException:
            if cleared:
                self.paused = True  # not fully resumed: the next check does it again
            raise

    def release(self) -> None:
        """The socket has ended: drop the scratch buffer (a message still to be
        delivered makes a new one)."""
        self._scratch = None
        self._lent = None

    def new_inbox(self) -> deque[str | bytes]:
        """The inbox, made now if it was not yet (by whichever thread comes
        first: under the lock, so that two never make one each)."""
        inbox = self.inbox
        if inbox is None:
            with self._lock:
                inbox = self.inbox
                if inbox is None:
                    inbox = self.inbox = deque()
        return inbox

    def take(self) -> str | bytes:
        """The oldest message kept for ``receive()`` (the inbox must not be empty).

        Interrupts: the message leaves the inbox with no eval-breaker point
        before it is returned, or goes back to its front.
        """
        inbox = self.inbox
        assert inbox is not None  # not empty, so made
        message = inbox[0]
        n = len(message)
        self.taken += n
        try:
            # popleft(), not del inbox[0] (twice the cost): an interrupt can
            # come right after it returns, and the except puts the message back.
            inbox.popleft()
            if self.paused:
                self.check_drained()
        except BaseException:
            self.taken -= n
            inbox.appendleft(message)  # the next take() checks again
            raise
        return message

    def _drop(self, message: Any) -> None:
        """A message without a handler of its type, on a socket in callback mode:
        dropped, with one WARNING per socket."""
        if not self._warned:
            self._warned = True
            kind = "text" if type(message) is str else "binary"
            missing = "on_message" if kind == "text" else "on_binary"
            if self.log is not None:
                self.log.warning(
                    "a %s message arrived on a socket with callbacks but no %s: "
                    "dropped (and so will be any other without a handler); "
                    "receive() gets messages only on a socket with no on_message "
                    "and no on_binary",
                    kind,
                    missing,
                )

    def messages(self, messages: list[Any], chunk: bool = False) -> int:
        """Hand the messages of one read to the handlers, or to the inbox.

        The handlers are looked up per message, so a callback that sets or
        clears one changes where the next message goes. If a callback raises,
        the messages after it go back to the front of the dispatcher's queue,
        for the next ``update()``. Under a budgeted ``update()``
        (:attr:`Dispatcher.budget <blockws.dispatcher.Dispatcher.budget>`) the
        messages are delivered in chunks charged to the budget (see
        :meth:`_within`), and those it has no room for stay at the front of
        the queue. ``chunk``: called by :meth:`_within` for one chunk (no
        budget of its own). Returns how many messages were handled.

        Interrupts (see "Interrupts" in :mod:`blockws.dispatcher`): it runs
        as the dispatcher's held item, put back whole by ``run()`` if an
        interrupt lands before it commits. It commits (clears
        ``dispatcher.held``) as the first statement of the ``try`` whose
        ``except`` puts back what was not delivered, so exactly one of the two
        holds the messages at every eval-breaker point. ``done`` counts a
        message just before it is handed over -- the handler entered, the
        inbox appended to -- with no eval-breaker point in between, so the
        put-back starts at the first message not handed over.
        """
        dispatcher = self.dispatcher
        ws = self.ws
        on_text = ws.on_message
        if on_text is not None and len(messages) == 1 and type(messages[0]) is str:
            # The commonest read of a request/response exchange: one text
            # message for on_message, without the loop's set-up. It commits
            # as the loop below does, and its handler is entered with no
            # eval-breaker point in between: from the commit on, the message
            # has been handed over, whatever lands; nothing is put back.
            message = messages[0]
            counted = False
            try:
                dispatcher.held = None  # committed
                on_text(ws, message)
                self._delivered += len(message)
                counted = True
                if self.paused:
                    self.check_drained()
            except BaseException:
                if not counted:
                    self._delivered += len(message)
                if self.paused:
                    self.check_drained()
                raise
            return 1
        budget = dispatcher.budget
        if budget is not None and not chunk and len(messages) > 1:
            return self._within(budget, messages)
        inbox = self.inbox
        scratch = self._scratch
        lent = self._lent
        refs = self._lent_refs
        done = 0
        kept = 0  # bytes gone to the inbox: still queued, until receive() takes them
        try:
            dispatcher.held = None  # committed: from here on, the except below puts back
            # Runs of small binary messages go through the C loop
            # (_lend_each), the rest through the loop below, which goes back
            # to the C loop at the next small binary message (a read's
            # messages often start with one that spanned two reads, in pooled
            # memory). The segment is out of its slot while lent (see below).
            c_loop = _lend_each is not None and ws.on_binary is not None
            c_from = -1  # where the C loop last started: it took at least that one
            while True:
                if (
                    c_loop
                    and done < len(messages)
                    and type(messages[done]) is bytes
                    and len(messages[done]) <= SCRATCH
                ):
                    assert _lend_each is not None
                    if lent is None:
                        if scratch is None:
                            scratch = self._scratch = bytearray(SCRATCH)
                        lent = ScratchSegment(scratch)
                        refs = self._lent_refs = _refcount(lent) if _refcount else 0
                    self._lent = None
                    progress = [0]
                    c_from = done
                    run = messages[done:] if done else messages
                    try:
                        done += _lend_each(run, ws, lent, progress)
                    except BaseException:
                        # handed over, the failing callback's included
                        done = c_from + progress[0]
                        if not lent.released:  # dropped: maybe held by the traceback
                            lent.release()
                        raise
                    if _refcount is not None and _refcount(lent) == refs:
                        self._lent = lent
                    else:  # kept by a callback: see below
                        if not lent.released:
                            lent.release()
                        lent = None
                    if done == len(messages):
                        break
                rest: list[Any] = messages[done:] if done else messages
                for message in rest:
                    cls = type(message)
                    if cls is bytes:  # a binary message, exactly
                        handler = ws.on_binary
                        n = len(message)
                        if handler is None:
                            if ws.on_message is None:  # no callbacks at all: for receive()
                                if inbox is None:
                                    inbox = self.new_inbox()
                                kept += n
                                done += 1
                                inbox.append(message)  # no copy
                            else:
                                done += 1
                                self._drop(message)
                        else:
                            if n <= SCRATCH:
                                if c_loop and done != c_from:
                                    break  # back to the C loop, from this message
                                # The socket's one scratch segment, lent again
                                # unless a callback kept it: making one per message
                                # was a third of a small message's delivery. While
                                # lent it is out of its slot, so that an interrupt
                                # anywhere from here on leaves it dropped (never
                                # lent again), however far this got.
                                if lent is None:
                                    if scratch is None:
                                        scratch = self._scratch = bytearray(SCRATCH)
                                    lent = ScratchSegment(scratch)
                                    # Held by this local only (the same expression
                                    # as below): the count to find after a callback.
                                    refs = self._lent_refs = _refcount(lent) if _refcount else 0
                                lent.lend(message)
                                self._lent = None
                                done += 1
                                try:
                                    handler(ws, lent)
                                finally:
                                    if _refcount is not None and _refcount(lent) == refs:
                                        self._lent = lent  # nothing kept it: lend it again
                                    else:
                                        # Kept (stored, captured, or held by a
                                        # traceback), or no way to know: released
                                        # now, and never lent again.
                                        if not lent.released:
                                            lent.release()  # no pool: only marks it
                                        lent = None
                                continue
                            # larger than the scratch buffer: pooled memory
                            segment = self.pool.get(n)
                            # Through a memoryview: bytearray[:n] = bytes copies twice.
                            memoryview(segment.data)[:n] = message
                            done += 1
                            try:
                                handler(ws, segment)
                            finally:
                                if not segment.released:
                                    segment.release()
                    elif cls is str:
                        on_text = ws.on_message
                        if on_text is None:
                            if ws.on_binary is None:
                                if inbox is None:
                                    inbox = self.new_inbox()
                                n = len(message)
                                kept += n
                                done += 1
                                inbox.append(message)
                            else:
                                done += 1
                                self._drop(message)
                        else:
                            done += 1
                            on_text(ws, message)
                    else:  # a BinaryMessage: in pooled memory, from the general path
                        data = message.data
                        n = message.length
                        handler = ws.on_binary
                        if handler is None:
                            if ws.on_message is None:  # for receive()
                                if inbox is None:
                                    inbox = self.new_inbox()
                                copy = bytes(memoryview(data)[:n])
                                kept += n
                                done += 1
                                inbox.append(copy)
                            else:
                                done += 1
                                self._drop(b"")
                            # Only once handed over: until then the message owns it.
                            if type(data) is bytearray:
                                self.pool.give_back(data)
                        else:
                            if type(data) is bytes:
                                segment = self.pool.get(n)
                                memoryview(segment.data)[:n] = memoryview(data)[:n]
                            else:
                                segment = BufferSegment(data, 0, n, self.pool)
                            done += 1
                            try:
                                handler(ws, segment)
                            finally:
                                if not segment.released:
                                    segment.release()
                else:
                    break  # every message handed over
            # Counted as delivered; ``done = -1`` tells the except below so,
            # with no eval-breaker point between the two (an interrupt before
            # them is counted there instead).
            self._delivered += total_length(messages) - kept
            done = -1
            if self.paused:
                self.check_drained()
        except BaseException:
            if done >= 0:
                left = messages[done:]
                if left:  # no eval-breaker point from here to the appendleft
                    dispatcher.pending.appendleft((self.messages, left))
                self._delivered += sum(map(len, messages[:done])) - kept
            if self.paused:
                self.check_drained()
            raise
        return len(messages)

    def _within(self, budget: Budget, messages: list[Any]) -> int:
        """Deliver one read's messages under a budget, in chunks; the rest stay
        at the front of the queue, in order.

        Charging the budget after every message would cost a clock read and a
        call per message, several times the cost of delivering a small one.
        So a count-only budget takes its whole share in one chunk, and a time
        budget starts with one message and sizes each next chunk to fill at
        most half of the time left, from the time per message so far: the
        overrun stays about one callback's time, as when checking after each.
        Each chunk counts as delivered (for backpressure) as it goes.

        Interrupts: before each chunk the rest is queued at the front and the
        chunk becomes the dispatcher's held item (one step, no eval-breaker
        point between); the chunk then commits as :meth:`messages` does. After
        it, the rest is taken back as the held item, again in one step. So at
        every point the undelivered messages are either queued in order or held.
        """
        dispatcher = self.dispatcher
        pending = dispatcher.pending
        deliver = self.messages
        total = len(messages)
        done = 0
        timed = budget.deadline is not None
        chunk = 1 if timed else total
        clock = _perf
        start = clock() if timed else 0.0
        while True:
            n = min(chunk, total - done, budget.left)
            first = done
            done += n
            head = messages[first:done]
            if done < total:
                rest = (deliver, messages[done:])
                dispatcher.held = (deliver, head)
                pending.appendleft(rest)
            deliver(head, True)
            if budget.charge(n) or done >= total:  # every chunk is charged, the last one too
                break
            # Only a time budget comes here: a count-only one took its whole
            # share in the first chunk (all of it, or all the budget had).
            now = clock()
            per = (now - start) / done
            room = budget.deadline - now  # type: ignore[operator]
            chunk = max(1, min(2 * chunk, int(room / 2 / per) if per > 0 else 2 * chunk))
            dispatcher.held = rest  # taken back, held until the next chunk commits
            del pending[0]
        return done
