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
(callbacks never overlap, so one is enough, and nothing is allocated per
message); larger ones come from the socket's buffer pool, and go back to it
when the callback returns, unless it released the segment itself. Without a
handler, messages queue for ``receive()`` as ``str`` and ``bytes``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Protocol

from .buffers import BufferPool, BufferSegment
from .dispatcher import Budget, Dispatcher

__all__ = ["Delivery", "Handlers", "SCRATCH"]

_perf = time.perf_counter

#: Binary messages up to this size reach on_binary in the per-socket scratch buffer.
SCRATCH = 4096


class Handlers(Protocol):
    """The socket as the handlers see it: its callbacks, and the first argument
    they are called with."""

    on_message: Callable[[Any, str], Any] | None
    on_binary: Callable[[Any, BufferSegment], Any] | None


class Delivery:
    """Where one socket's messages go; :meth:`messages` runs inside ``update()``."""

    __slots__ = ("ws", "dispatcher", "pool", "inbox", "_scratch")

    def __init__(self, ws: Handlers, dispatcher: Dispatcher, pool: BufferPool) -> None:
        self.ws = ws
        self.dispatcher = dispatcher
        self.pool = pool
        #: Messages no handler took, for ``receive()``.
        self.inbox: deque[str | bytes] = deque()
        self._scratch: memoryview | None = None

    def messages(self, messages: list[Any], rest: tuple[list[Any], int] | None = None) -> int:
        """Hand the messages of one read to the handlers, or to the inbox.

        The handlers are looked up per message, so a callback that sets or
        clears one changes where the next message goes. If a callback raises,
        the messages after it go back to the front of the dispatcher's queue,
        for the next ``update()``. Under a budgeted ``update()``
        (:attr:`Dispatcher.budget <blockws.dispatcher.Dispatcher.budget>`) the
        messages are delivered in chunks charged to the budget (see
        :meth:`_within`), and those it has no room for go back to the front of
        the queue. ``rest`` (a list and a start index) is what follows a chunk,
        put back behind the chunk's own remainder if a callback raises.
        Returns how many messages were handled.
        """
        budget = self.dispatcher.budget
        if budget is not None and rest is None and len(messages) > 1:
            return self._within(budget, messages)
        ws = self.ws
        inbox = self.inbox
        scratch = self._scratch
        done = 0
        try:
            for message in messages:
                done += 1
                cls = type(message)
                if cls is bytes:  # a binary message, exactly
                    handler = ws.on_binary
                    n = len(message)
                    if handler is None:
                        inbox.append(message)  # no copy
                    elif n <= SCRATCH:
                        if scratch is None:
                            scratch = self._scratch = memoryview(bytearray(SCRATCH))
                        scratch[:n] = message
                        segment = BufferSegment(scratch.obj, 0, n)  # type: ignore[arg-type]
                        try:
                            handler(ws, segment)
                        finally:
                            if not segment.released:
                                segment.release()  # no pool: only marks it released
                    else:
                        self.binary(message, n)
                elif cls is str:
                    on_text = ws.on_message
                    if on_text is None:
                        inbox.append(message)
                    else:
                        on_text(ws, message)
                else:  # a BinaryMessage: in pooled memory, from the general path
                    self.binary(message.data, message.length)
        except BaseException:
            left = messages[done:]
            if rest is not None:
                left += rest[0][rest[1] :]
            if left:
                self.dispatcher.pending.appendleft((self.messages, left))
            raise
        return done

    def _within(self, budget: Budget, messages: list[Any]) -> int:
        """Deliver one read's messages under a budget, in chunks; the rest go
        back to the front of the queue, in order.

        Charging the budget after every message would cost a clock read and a
        call per message, several times the cost of delivering a small one.
        So a count-only budget takes its whole share in one chunk, and a time
        budget starts with one message and sizes each next chunk to fill at
        most half of the time left, from the time per message so far: the
        overrun stays about one callback's time, as when checking after each.
        """
        total = len(messages)
        done = 0
        timed = budget.deadline is not None
        chunk = 1 if timed else total
        clock = _perf
        start = clock() if timed else 0.0
        while done < total:
            n = min(chunk, total - done, budget.left)
            first = done
            done += n
            self.messages(messages[first:done], (messages, done))
            if budget.charge(n):
                break
            if timed:
                now = clock()
                per = (now - start) / done
                room = budget.deadline - now  # type: ignore[operator]
                chunk = max(1, min(2 * chunk, int(room / 2 / per) if per > 0 else 2 * chunk))
        if done < total:
            self.dispatcher.pending.appendleft((self.messages, messages[done:]))
        return done

    def binary(self, data: bytes | bytearray, n: int) -> None:
        """A binary message too large for the scratch buffer, or in pooled memory."""
        ws = self.ws
        handler = ws.on_binary
        pool = self.pool
        if handler is None:  # kept for receive()
            self.inbox.append(bytes(memoryview(data)[:n]))
            if type(data) is bytearray:
                pool.give_back(data)
            return
        if type(data) is bytes:  # larger than the scratch buffer: pooled memory
            segment = pool.get(n)
            segment.data[:n] = data
        else:
            segment = BufferSegment(data, 0, n, pool)  # type: ignore[arg-type]
        try:
            handler(ws, segment)
        finally:
            if not segment.released:
                segment.release()
