"""One timer thread for every socket in the process.

Pings, ping timeouts, open and close timeouts are all small jobs with a due
time. Rather than a thread (or a ``threading.Timer``) per socket, they share
one heap served by one daemon thread named ``blockws-timer``. The thread
starts when the first job is scheduled and ends as soon as no job is left, so
once every socket has closed no timer thread remains.

Jobs run on the timer thread and must be short and must not raise: they
usually just queue a frame or abort a transport. An exception from a job is
logged and swallowed so one socket cannot stop the others' timers.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

from .log import logger

__all__ = ["Job", "Timer", "timer"]


class Job:
    """A scheduled call; :meth:`cancel` it if it is no longer wanted."""

    __slots__ = ("due", "seq", "fn", "cancelled", "_timer")

    def __init__(self, due: float, seq: int, fn: Callable[[], None], timer: Timer) -> None:
        self.due = due
        self.seq = seq
        self.fn = fn
        self.cancelled = False
        self._timer = timer

    def __lt__(self, other: Job) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        """Make sure the job does not run (a no-op once it ran); thread-safe."""
        self._timer._cancel(self)


class Timer:
    """A heap of jobs and the thread that runs them when due."""

    def __init__(self, name: str = "blockws-timer") -> None:
        self.name = name
        # ``with self._lock``, not ``with self._cond``: a Condition's
        # __enter__/__exit__ are Python functions, and a Ctrl-C at the entry
        # of its __exit__ (on the thread calling call_later()/cancel() from
        # update()) would leave the lock held, every socket's timer stopped.
        # A Lock's are C: no eval-breaker point between acquiring and the
        # block, and the release happens before the one after the exit call.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[Job] = []
        self._live = 0  # jobs scheduled and not cancelled or run
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> Job:
        """Run ``fn`` on the timer thread after ``delay`` seconds."""
        with self._lock:
            job = Job(time.monotonic() + max(0.0, delay), next(self._seq), fn, self)
            # Counted before it is pushed: an interrupt in between leaves the
            # count high (the thread stays), never low (jobs dropped at 0).
            self._live += 1
            heapq.heappush(self._heap, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._heap[0] is job:
                self._cond.notify()
        return job

    def _cancel(self, job: Job) -> None:
        with self._lock:
            if job.cancelled:
                return
            job.cancelled = True
            self._live -= 1
            if self._live == 0:
                self._heap.clear()
                self._cond.notify()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with self._lock:
                while True:
                    if self._live == 0:
                        # Drop cancelled jobs left behind, or their callbacks
                        # (and the sockets they reference) stay alive.
                        self._heap.clear()
                        self._thread = None
                        return
                    job = self._heap[0]
                    if job.cancelled:
                        heapq.heappop(self._heap)
                        continue
                    delay = job.due - time.monotonic()
                    if delay <= 0:
                        heapq.heappop(self._heap)
                        job.cancelled = True  # ran: a later cancel() is a no-op
                        self._live -= 1
                        break
                    cond.wait(delay)
            try:
                job.fn()
            except Exception:  # noqa: BLE001 - one socket must not stop the others
                logger.exception("blockws timer job failed")

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread


#: The process-wide timer.
timer = Timer()
