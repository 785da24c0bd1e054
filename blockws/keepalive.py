"""Keepalive: pings every ``ping_frequency``, latency from the pongs, and
closing a socket that stays silent after a ping.

With ``send_pings`` on, the process-wide timer thread sends a ping (payload:
a sequence number) every ``ping_frequency`` seconds while the socket is open.
If no frame at all -- pong or anything else -- arrives within
``close_after_no_message`` seconds of a ping, the socket is dropped:
``on_closed`` with 1006 and a :class:`~blockws.exceptions.PingTimeout` in
``ws.error``. Any frame counts, so a chatty server that never answers pings
keeps the socket open.

Every ping whose pong can be matched by payload -- ours and the ones sent with
``ws.ping()`` -- updates :attr:`Keepalive.latency` when its pong comes.

The keepalive reaches its socket only through the :class:`Host` interface
and keeps its own timer jobs, which :meth:`Keepalive.stop_locked` cancels.
Its jobs run on the timer thread and never block: they queue a frame or hand
a :class:`PingTimeout` to the host, which aborts the transport.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Protocol

from .exceptions import PingTimeout
from .options import check_ping_frequency, check_silence
from .timer import Job, timer

__all__ = ["Host", "Keepalive"]

_ping_struct = struct.Struct("!Q")
#: Pings older than this are forgotten (their pong will not come).
_PING_MEMORY = 60.0
#: Pings remembered at most (``ws.ping()`` in a loop must not grow memory).
_PINGS_KEPT = 64


class Host(Protocol):
    """What the keepalive needs from its socket."""

    #: The socket's lock; ``*_locked`` methods are called with it held.
    lock: threading.Lock

    def pinging_locked(self) -> bool:
        """Whether pings may be sent now (the socket is open and not failing)."""

    def send_ping_locked(self, payload: bytes) -> None:
        """Queue a ping frame with ``payload``."""

    def last_frame_at(self) -> float | None:
        """``time.monotonic()`` of the latest frame received, or ``None``."""

    def ping_timed_out(self, error: PingTimeout) -> None:
        """No frame came after a ping: end the socket (must not block)."""


class Keepalive:
    """The ping schedule and pong bookkeeping of one socket."""

    __slots__ = (
        "host",
        "enabled",
        "frequency",
        "silence",
        "latency",
        "_seq",
        "_pings",
        "_ping_job",
        "_pong_jobs",
        "_stopped",
    )

    def __init__(self, host: Host, enabled: bool, frequency: float, silence: float) -> None:
        self.host = host
        self.enabled = enabled
        self.frequency = frequency
        self.silence = silence
        #: Round-trip time of the latest matched ping/pong pair, or ``None``.
        self.latency: float | None = None
        self._seq = 0
        # Both made with their first entry (pings are off by default, and an
        # idle socket should not carry two empty dicts).
        self._pings: dict[bytes, float] | None = None  # payload -> when it was sent
        self._ping_job: Job | None = None
        self._pong_jobs: dict[int, Job] | None = None
        self._stopped = False

    # -- settings (any thread) ----------------------------------------------------

    def set_enabled_locked(self, enabled: bool) -> None:
        """Turn pings on or off; the next ping is armed at once when turned on."""
        self.enabled = enabled
        if enabled:
            self.start_locked()

    def set_frequency(self, seconds: float) -> None:
        """Seconds between pings; applies from the next ping armed."""
        self.frequency = check_ping_frequency(seconds)

    def set_silence(self, seconds: float) -> None:
        """Seconds a ping may go unanswered by any frame; applies to later pings."""
        self.silence = check_silence(seconds)

    # -- the schedule (lock held) ---------------------------------------------------

    def start_locked(self) -> None:
        """Arm the next ping if pings are on and none is armed."""
        if self.enabled and self._ping_job is None and not self._stopped:
            self._ping_job = timer.call_later(self.frequency, self._ping_due)

    def stop_locked(self) -> None:
        """The socket ended: cancel every job, for good."""
        self._stopped = True
        jobs = list(self._pong_jobs.values()) if self._pong_jobs else []
        if self._ping_job is not None:
            jobs.append(self._ping_job)
        self._ping_job = None
        self._pong_jobs = None
        for job in jobs:
            job.cancel()

    def resume_locked(self) -> None:
        """The socket reconnected: serve its new connection (call :meth:`start_locked`
        next). The old connection's pings are forgotten: their pongs will not come."""
        self._stopped = False
        self._pings = None

    def sent_locked(self, payload: bytes, when: float) -> None:
        """Remember a ping sent at ``when`` so that its pong gives the latency."""
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        oldest = next(iter(pings.values()), when)
        if len(pings) >= _PINGS_KEPT or when - oldest > _PING_MEMORY:
            for key in [k for k, v in pings.items() if when - v >= _PING_MEMORY]:
                del pings[key]
            while len(pings) >= _PINGS_KEPT:
                del pings[next(iter(pings))]
        pings.pop(payload, None)  # re-inserted last: the dict stays in sending order
        pings[payload] = when

    def _ping_due(self) -> None:
        host = self.host
        now = time.monotonic()
        with host.lock:
            self._ping_job = None
            if self._stopped or not self.enabled or not host.pinging_locked():
                return
            self._seq += 1
            seq = self._seq
            payload = _ping_struct.pack(seq)
            self.sent_locked(payload, now)
            host.send_ping_locked(payload)
            self._ping_job = timer.call_later(self.frequency, self._ping_due)
            if self._pong_jobs is None:
                self._pong_jobs = {}
            self._pong_jobs[seq] = timer.call_later(
                self.silence, lambda: self._pong_due(seq, now)
            )

    def _pong_due(self, seq: int, ping_time: float) -> None:
        host = self.host
        with host.lock:
            if self._pong_jobs is not None:
                self._pong_jobs.pop(seq, None)
            if self._stopped or not host.pinging_locked():
                return
        last = host.last_frame_at()
        if last is None or last < ping_time:
            host.ping_timed_out(PingTimeout(f"no frame within {self.silence} s of a ping"))

    # -- the reader side ---------------------------------------------------------------

    def pong_received(self, payload: bytes) -> None:
        """A pong arrived: the latency, if it answers a ping we remember."""
        now = time.monotonic()
        with self.host.lock:
            pings = self._pings
            sent = pings.pop(payload, None) if pings is not None else None
        if sent is not None:
            self.latency = now - sent
