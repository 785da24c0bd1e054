"""The right to read a socket's transport, held by one thread at a time.

A thread blocked in ``ws.receive()`` or ``ws.wait()`` would otherwise be
woken by the reader thread for every message: a thread hand-off that costs
more than the message itself when messages are small, and all of a round
trip's latency when one is in flight. So the right to read can pass from the
reader thread to a waiting caller, and back:

* the caller asks (:meth:`ReadToken.read_here` returns False and notes the
  wish, with a function to wake the caller when the right is granted);
* the reader thread, between two reads, sees the wish (:attr:`wanted`) and
  grants it (:meth:`ReadToken.lend`), then waits;
* while the caller holds the right, each :meth:`read_here` reads once
  (bounded by the caller's timeout) and parses what came on the caller's
  thread;
* a thread waiting on many sockets at once (``blockws.wait()``, see
  :mod:`blockws.multiwait`) polls them rather than reading one: it
  :meth:`ReadToken.watch`-es each token, which asks for the right as above
  and, once the right is lent, keeps it lent until a time it names, reads or
  no reads (the reader thread then reads at most that long after the waiter
  last looked: the wait bounds it to :data:`BUSY_RECHECK` plus a lease);
* the right goes back to the reader when a :data:`READ_LEASE` passes
  without a read by the caller (and past any watch), when the caller met the end of the stream
  (which the reader thread then reports, so the end is always reported from
  one place), or at once on :meth:`cancel` (the socket is being aborted).

Ctrl-C (issue 11, "data loss on Ctrl-C"): a ``KeyboardInterrupt`` reaches
the main thread at any bytecode boundary, so one that lands just after a read
returned could throw away the bytes read. So a caller's bytes live in a
*held* list from the moment they are read (the transport appends them in one
C-level step, see ``TCPTransport.read``) until they are parsed, and each one
leaves it only once parsed. An interrupt before parsing begins leaves them
there, and whoever reads next -- the reader thread or the next caller --
parses them first: nothing is lost and the socket goes on. An interrupt
*during* parsing cannot be undone (part of the bytes changed the protocol's
state): the socket then fails loudly, ``ConnectionLost`` (1006) with the
interrupt as its cause, never carrying on out of step.

Every field is guarded by one lock; nothing here touches a socket, so this
is unit-tested without one (``tests/test_readtoken.py``).
"""

from __future__ import annotations

import os
import threading
from time import monotonic as _monotonic
from typing import Callable, Optional, Protocol

from .exceptions import ConnectionLost

__all__ = ["ReadToken", "READ_LEASE", "Ended", "read_here"]

#: The right lent to a caller lapses once this many seconds pass without a
#: read by it (between one and two leases after its last read, or up to
#: :data:`BUSY_RECHECK` more after a long blocking read). Long enough to cover
#: a callback and a send between two reads, short enough that pings, pongs and
#: the closing handshake are still read promptly when the caller has gone off
#: to do something else.
READ_LEASE = 0.005
#: While the caller is inside a (bounded) read, the reader looks again after
#: this long, not every lease: a thread idling in receive() should not wake
#: the reader 200 times a second. Callers bound each read to this much.
BUSY_RECHECK = 0.05

#: What a caller met that ended the stream: ``(None,)`` for end of stream,
#: ``(exception,)`` for a failure.
Ended = tuple[Optional[BaseException]]


class Sink(Protocol):
    """Where what the caller reads goes (the connection): bytes, or the count
    of those a read put straight into their message (see
    ``Transport.read_target``)."""

    def data_received(self, data: bytes | int) -> None: ...


class ReadToken:
    """Who reads: the reader thread (the default) or one waiting caller."""

    __slots__ = (
        "_lock",
        "_cond",
        "_lent",
        "_busy",
        "_reads",
        "_ended",
        "_wake",
        "_cancelled",
        "_held",
        "_watched_until",
        "wanted",
    )

    def __init__(self) -> None:
        # The caller's side takes the bare lock (a C-level context manager: it
        # runs twice per message); the reader waits on a Condition over it.
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None  # made by the first lend()
        self._lent = False  # a caller holds the right
        self._busy = False  # ... and is inside a read right now
        self._reads = 0  # reads the caller has done: the lease lapses when it stops
        self._ended: Ended | None = None  # what the caller met, for the reader to report
        self._wake: Callable[[], None] | None = None
        self._cancelled = False
        self._held: list[bytes | int] | None = None  # see read_here's ``held`` (made lazily)
        self._watched_until = 0.0  # see watch(): the lease holds until then (monotonic)
        #: A caller asked for the right. The reader thread tests this without
        #: the lock between reads: a stale False only delays a grant by a read.
        self.wanted = False

    # -- the caller's side ------------------------------------------------------------

    def read_here(
        self,
        read: Callable[[float | None], bytes | int | None],
        sink: Sink,
        timeout: float | None,
        wake: Callable[[], None],
        held: list[bytes | int] | None = None,
    ) -> bool:
        """Read once on the calling thread, if it holds the right (or note the wish).

        Returns False when the caller may not read now: it then waits for the
        reader thread's delivery as usual, and ``wake()`` is called when the
        right is granted. Returns True after one ``read(timeout)`` (``None``:
        nothing came; ``b""``: end of stream) whose data went to
        ``sink.data_received`` on this thread. The end of the stream, a
        network error, or an exception from the sink are handed to the reader
        thread, which reports them.

        ``held`` holds bytes read and not yet parsed (the transport's, which
        its reader-thread reads drain first; by default the token's own).
        ``read`` may put what it reads there itself, in one step (so that an
        interrupt cannot come between the read and the keeping); what it
        returns and did not put there is put there. Bytes already held are
        parsed before anything new is read. A ``KeyboardInterrupt`` (see the
        module docstring) propagates: before parsing, the socket goes on with
        nothing lost; during parsing, the socket fails (``ConnectionLost``).
        """
        lock = self._lock
        ended: Ended | None = None
        parsing = False
        busy = False  # this call set _busy: its finally clears it
        try:
            with lock:  # this runs once per message: the bare lock, inline
                if not self._lent or self._busy or self._cancelled:
                    if (
                        timeout != 0
                        and not self._lent
                        and self._ended is None
                        and not self._cancelled
                    ):
                        self.wanted = True
                        self._wake = wake
                    return False
                # Inside the try: an interrupt can land as the lock is let go
                # (its __exit__ is a call), and a _busy left set for good would
                # keep both this caller and the reader thread from reading.
                busy = True
                self._busy = True
            if held is None:
                held = self._held
                if held is None:
                    held = self._held = []
            try:
                data = held[0] if held else read(timeout)
            except Exception as exc:  # noqa: BLE001 - the network failed: the reader reports it
                ended, data = (exc,), None
            # (A KeyboardInterrupt while waiting propagates; what was read stays held.)
            if data and (not held or (held[-1] is not data and held[0] is not data)):
                held.append(data)
            elif data is not None and not data and ended is None:
                ended = (None,)  # end of stream
            # ``held`` has one chunk at most here: a read happens only when it is
            # empty, and keeps what it read there once. (An end of stream kept
            # there by an interrupted read came back above as ``data``, b"".)
            if held and ended is None:
                parsing = True
                try:
                    sink.data_received(held[0])
                except Exception as exc:  # noqa: BLE001 - the reader thread reports it
                    ended = (exc,)
                del held[0]
                parsing = False
        except BaseException as exc:
            if parsing:
                # Interrupted inside the parser: the stream cannot be resumed.
                lost = ConnectionLost(
                    f"interrupted ({type(exc).__name__}) while parsing incoming data"
                )
                lost.__cause__ = exc
                ended = (lost,)
            raise
        finally:
            if not busy:
                pass  # not lent, or busy with another caller: nothing was read
            elif ended is None:
                # The common case, once per message, without the lock: only the
                # holder writes these two, and in this order, so lend() never sees
                # "idle" without the read counted (and polls: no notify needed).
                self._reads += 1
                self._busy = False
            else:
                with lock:  # handed to the reader thread, waiting in lend()
                    self._reads += 1
                    self._busy = False
                    self._ended = ended
                    self._lent = False
                    cond = self._cond
                    assert cond is not None  # lend() made it before lending the right
                    cond.notify_all()
        return True

    def watch(self, wake: Callable[[], None], until: float) -> bool:
        """For a thread waiting on many sockets: True if the right is lent and
        no caller is inside a read now, so that the caller may poll the socket
        and then :meth:`read_here` with a timeout of 0; the lease then holds
        until ``until`` (a ``time.monotonic()`` value) even without a read.
        Otherwise notes the wish as :meth:`read_here` does (``wake()`` is
        called when the right is granted) and returns False. Nothing to undo:
        the watch ends by itself, so an interrupt cannot leave it behind."""
        with self._lock:
            if self._cancelled or self._ended is not None:
                return False
            if not self._lent:
                self.wanted = True
                self._wake = wake
                return False
            if self._busy:
                return False  # another caller reads it now: its posts wake the waiter
            if until > self._watched_until:
                self._watched_until = until
            return True

    # -- the reader thread's side -------------------------------------------------------

    def before_read(self) -> Ended | None:
        """The reader thread, before each read: lend the right if a caller asked
        (see :meth:`lend`); ``None`` when the reader should read on."""
        if self.wanted:
            return self.lend()
        return None

    def lend(self) -> Ended | None:
        """Grant the right to the caller that asked, and wait until it comes back.

        Returns what the caller met that ended the stream, or ``None`` when
        the lease lapsed (or :meth:`cancel` was called) and the reader reads on.
        """
        with self._lock:
            cond = self._cond
            if cond is None:  # over the same lock, made before the right is first lent
                cond = self._cond = threading.Condition(self._lock)
        wake = None
        with cond:
            if self.wanted and not self._cancelled:
                self.wanted = False
                self._lent = True
                wake, self._wake = self._wake, None
        if wake is not None:
            wake()  # the caller may be waiting for a delivery that is not coming
        with cond:
            seen = -1
            while self._lent:
                if self._cancelled and not self._busy:
                    self._lent = False
                    break
                if not self._busy and self._reads == seen:
                    # No read for a whole lease: it lapses, unless a watch
                    # (see watch()) holds it until later.
                    left = self._watched_until - _monotonic()
                    if left <= 0:
                        self._lent = False
                        break
                    cond.wait(min(left, BUSY_RECHECK))
                    continue
                seen = self._reads
                cond.wait(BUSY_RECHECK if self._busy else READ_LEASE)
            self._watched_until = 0.0
            return self._ended

    def cancel(self) -> None:
        """The socket is ending: the right goes back to the reader thread for good
        (once a caller inside a read returns), and no wish is granted any more."""
        with self._lock:
            self._cancelled = True
            self.wanted = False
            if self._cond is not None:
                self._cond.notify_all()

    @property
    def lent(self) -> bool:
        """Whether a caller holds the right now."""
        return self._lent

    @property
    def busy(self) -> bool:
        """Whether the caller holding the right is inside a read now."""
        return self._busy


#: ``read_here(token, read, sink, timeout, wake, held)``: what the
#: connection calls for ``token.read_here(read, sink, timeout, wake, held)``,
#: once per message a caller reads. With the C speedups,
#: ``blockws._speedups.read_here``: the same steps without the bytecode
#: (:meth:`ReadToken.read_here` is its reference, and what it calls for a
#: token without these slots); else that method itself.
read_here: Callable[..., bool] = ReadToken.read_here
_c_read_here: Callable[..., bool] | None
try:
    from ._speedups import read_here as _c_read_here
except ImportError:  # pragma: no cover - depends on the install
    _c_read_here = None
if _c_read_here is not None and not os.environ.get("BLOCKWS_PURE_PYTHON"):
    read_here = _c_read_here
