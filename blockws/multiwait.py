"""``blockws.wait()``: one thread waiting on every socket, reading them itself.

A game loop with several sockets waits for its next frame in
``blockws.wait()``. Woken by the reader threads' deliveries, it would leave
every socket's parsing to its reader thread -- which then competes with the
game for the GIL during the frames (8 sockets sharing 100 k msgs/s: 1.48 ms
stolen per frame at p99, ``python -m benchmarks.gameloop``). So, as
``ws.wait()`` does for one socket (:mod:`blockws.readtoken`), the waiting
thread takes over the reading of the sockets it can, and polls them:

* each turn, every socket's read token is *watched*
  (:meth:`ReadToken.watch <blockws.readtoken.ReadToken.watch>`): a socket
  whose reading is lent stays lent for :data:`~blockws.readtoken.BUSY_RECHECK`
  plus a lease after this turn began, read or not; one whose reading is not
  lent is asked for it, and its reader thread grants it between two reads and
  rings the waiter awake;
* a socket that may hold bytes a poll cannot see -- one just granted, or one
  whose last read brought something (a TLS transport decrypts a bounded
  number of records a read) -- is read once without waiting first;
* then one ``poll()`` waits for any of the held sockets to become readable,
  for a callback posted by any socket (a reader thread, a timer), or for a
  grant (:func:`blockws.dispatcher.wait_readable`: a pipe rung by posts
  while the waiter polls); each readable socket is read once, on this thread;
* it returns True as soon as any socket has a callback pending.

Each turn starts from the live sockets of the moment, so a socket opened
during the wait (by another thread) is polled from the next turn on, and
its posts wake the wait at once either way.

The reading of a socket stays with this thread until the watch it was last
given runs out (at most :data:`~blockws.readtoken.BUSY_RECHECK` plus a
:data:`~blockws.readtoken.READ_LEASE` after the wait looked at it), and
then goes back to its reader thread. So a loop that calls ``blockws.wait()``
every frame keeps its reader threads parked during its frames; a script that
waits once and goes off for a while has its sockets read again by their
reader threads within that time.

Sockets whose reading is never lent (HTTP/2 streams, TLS inside a TLS
tunnel, a socket still opening) are left to their reader threads and wake
the waiter by their posts. Only one thread at a time polls (the pipe has one
reader); another thread calling ``blockws.wait()`` meanwhile, or a process
with more than :data:`MAX_POLLED` live sockets, waits for posts only, as
before. Interrupts: watches end by themselves, reads go through
:meth:`ReadToken.read_here <blockws.readtoken.ReadToken.read_here>` (nothing
read is lost), and the poll restores its state in a ``finally``.
"""

from __future__ import annotations

from time import monotonic as _monotonic
from typing import Any

from . import dispatcher as _dispatcher
from .deadline import Deadline
from .readtoken import BUSY_RECHECK, READ_LEASE

__all__ = ["wait_any", "MAX_POLLED"]

#: Above this many live sockets, ``blockws.wait()`` leaves the reading to the
#: reader threads: watching every token each turn would cost more than the
#: hand-offs it saves.
MAX_POLLED = 64


def wait_any(timeout: float | None = None) -> bool:
    """Block until any socket has a pending callback (True) or ``timeout`` passes.

    While it waits, the calling thread reads and parses the sockets whose
    reading it can take over (see the module docstring); callbacks still run
    only in ``update()`` / :func:`blockws.update_all`. Raises
    :class:`~blockws.exceptions.InvalidState` when called from a callback.
    """
    _dispatcher.check_not_in_callback("blockws.wait()")
    dispatchers = _dispatcher.live_dispatchers()
    for d in dispatchers:
        if d.pending:
            return True
    if not _pollable(dispatchers) or (timeout is not None and timeout <= 0):
        return _dispatcher.wait(_dispatcher.live_dispatchers, timeout)
    deadline = Deadline(timeout)
    if not _dispatcher.claim_bell():
        return _dispatcher.wait(_dispatcher.live_dispatchers, timeout)
    try:
        if _wait_reading(deadline):
            return True
    finally:
        _dispatcher.release_bell()
    # More sockets opened meanwhile than are polled: wait for posts for the rest.
    left = deadline.left()
    return left != 0 and _dispatcher.wait(_dispatcher.live_dispatchers, left)


def _pollable(dispatchers: Any) -> bool:
    return 0 < len(dispatchers) <= MAX_POLLED


def _wait_reading(deadline: Deadline) -> bool:
    """The polling wait: True when a callback is pending, False when the
    deadline passed (``deadline.left() == 0``) or when more sockets than
    :data:`MAX_POLLED` came to be live meanwhile."""
    wake = _dispatcher.notify_global
    dispatchers: Any = None
    sources: list[Any] = []
    # The sources whose last read (without waiting) found nothing: only a poll
    # can tell that more has come. The others are read before any poll.
    drained: set[int] = set()
    while True:
        left = deadline.left()
        if left == 0:
            return False
        live = _dispatcher.live_dispatchers()
        if live is not dispatchers:  # a socket opened or ended (a new snapshot)
            if not _pollable(live):
                return any(d.pending for d in live)
            dispatchers = live
            sources = [d.source for d in live if d.source is not None]
            drained = set()
        bound = BUSY_RECHECK if left is None else min(left, BUSY_RECHECK)
        # The watch does not shrink with the timeout: a loop waiting out the
        # few ms left of its frame keeps its readers parked through the next.
        until = _monotonic() + BUSY_RECHECK + READ_LEASE
        socks: list[Any] = []
        polled: list[int] = []
        again = False
        for i, source in enumerate(sources):
            sock = source.watch(wake, until)
            if sock is None:
                drained.discard(i)  # its reader thread reads: it may leave records buffered
                continue
            if i not in drained:
                if source.read_now():
                    again = True  # more may be buffered: read it again before polling
                    continue
                drained.add(i)
            socks.append(sock)
            polled.append(i)
        for d in dispatchers:
            if d.pending:
                return True
        if again:
            continue
        ready = _dispatcher.wait_readable(dispatchers, socks, bound)
        if ready:
            for k in ready:
                i = polled[k]
                if sources[i].read_now():
                    drained.discard(i)
        # (None: a post or a grant; []: the bound passed. Either way, look again.)
        for d in dispatchers:
            if d.pending:
                return True
