"""Reconnection: the :class:`Reconnect` policy and one socket's :class:`Backoff`.

A socket made with ``reconnect=True`` (or a :class:`Reconnect`) survives the
loss of its connection: once a connection that had opened ends by anything
other than the application's own ``close()``, the engine
(:mod:`blockws.connection`) waits out a backoff delay on the shared timer and
opens a new connection, again and again while attempts remain. This module
holds the arithmetic and the rules; the engine holds the lifecycle.

What counts as an end worth reconnecting after (:meth:`Reconnect.retries_after`):

* no close frame either way (network failure, reset, timeout, a ping left
  unanswered): yes;
* blockws failed the connection (1002, 1007, 1009): yes;
* the server sent a close frame: yes, unless its code says the close was
  meant -- 1000 (normal), 1001 (going away) or none at all (1005, a close
  frame without a code) -- and ``on_clean_close`` is False;
* the application called ``close()``: never.

The delays grow exponentially from ``min_delay`` by ``factor`` up to
``max_delay``, and ``jitter`` takes a random part off each, so that many
clients dropped by one server restart do not all come back at once
(with the default ``jitter=0.5`` this is the "equal jitter" of AWS's
architecture blog, "Exponential Backoff And Jitter", 2015).

Nothing here touches a socket, a thread or a clock (the random source is a
parameter), so it is unit-tested on its own (``tests/test_reconnect.py``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

__all__ = ["Reconnect", "Backoff", "CLEAN_CLOSE_CODES", "reconnect_option"]

#: Close codes from the server that mean the close was intended: normal
#: closure, going away, and a close frame without a code (RFC 6455 7.1.5, 7.4.1).
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1005})


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Reconnect {name} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"Reconnect {name} must be a finite number of seconds >= 0, not {value!r}")
    return number


@dataclass(frozen=True)
class Reconnect:
    """When a socket reconnects, and how long it waits before each attempt.

    A frozen value (compare, hash, share between sockets). Pass it as the
    ``reconnect=`` option of :class:`~blockws.WebSocket`; ``reconnect=True``
    means ``Reconnect()``.

    * ``max_attempts``: attempts in a row before giving up (``None``: never
      give up). The count starts again once a connection opens.
    * ``min_delay``, ``factor``, ``max_delay`` (seconds): attempt *n* waits
      ``min(max_delay, min_delay * factor ** (n - 1))`` ...
    * ``jitter`` (0 to 1): ... less a random fraction of it, up to ``jitter``:
      the delay is drawn uniformly from ``[(1 - jitter) * base, base]``.
      ``max_delay`` is thus a true upper bound.
    * ``on_clean_close``: also reconnect when the server closes with 1000
      (normal), 1001 (going away) or a close frame without a code.

    Without jitter the delays are plain exponential backoff:

    >>> policy = Reconnect(min_delay=1.0, max_delay=10.0, jitter=0)
    >>> [policy.delay(n) for n in range(1, 7)]
    [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    With the default ``jitter=0.5`` each delay lies between half its base and
    its base; the random source may be given (here: always the middle):

    >>> [Reconnect().delay(n, random=lambda: 0.5) for n in range(1, 5)]
    [0.375, 0.75, 1.5, 3.0]

    Three attempts at most, one second apart, and after any close:

    >>> Reconnect(max_attempts=3, min_delay=1, factor=1, jitter=0, on_clean_close=True)
    Reconnect(max_attempts=3, min_delay=1.0, max_delay=30.0, factor=1.0, jitter=0.0, \
on_clean_close=True)

    In a game, show the outage and refresh a login token on each attempt::

        def reconnecting(ws, attempt, delay):
            hud.show(f"connection lost ({ws.error}); retry {attempt} in {delay:.1f} s")

        def fresh_token(ws, request):  # runs for every handshake request
            request.headers["Authorization"] = "Bearer " + auth.token()

        ws = blockws.WebSocket(url, reconnect=blockws.Reconnect(max_attempts=20),
                               on_reconnecting=reconnecting,
                               on_internal_request_created=fresh_token,
                               on_open=send_login)  # runs again after each reconnection

    Values are checked when made (``TypeError``/``ValueError`` naming the field):

    >>> Reconnect(factor=0.5)
    Traceback (most recent call last):
    ValueError: Reconnect factor must be a number >= 1, not 0.5
    """

    max_attempts: int | None = None
    min_delay: float = 0.5
    max_delay: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    on_clean_close: bool = False

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if attempts is not None:
            if isinstance(attempts, bool) or not isinstance(attempts, int):
                raise TypeError(
                    f"Reconnect max_attempts must be an int or None, not {type(attempts).__name__}"
                )
            if attempts < 0:
                raise ValueError(f"Reconnect max_attempts must be >= 0 or None, not {attempts}")
        low = _seconds("min_delay", self.min_delay)
        high = _seconds("max_delay", self.max_delay)
        if high < low:
            raise ValueError(f"Reconnect max_delay ({high}) is below min_delay ({low})")
        factor, jitter = self.factor, self.jitter
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"Reconnect factor must be a number, not {type(factor).__name__}")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"Reconnect factor must be a number >= 1, not {factor!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"Reconnect jitter must be a number, not {type(jitter).__name__}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"Reconnect jitter must be between 0 and 1, not {jitter!r}")
        if not isinstance(self.on_clean_close, bool):
            raise TypeError(
                f"Reconnect on_clean_close must be a bool, not {type(self.on_clean_close).__name__}"
            )
        # Normalized to floats, as the options of a socket are.
        for name, value in (("min_delay", low), ("max_delay", high), ("factor", float(factor)),
                            ("jitter", float(jitter))):
            object.__setattr__(self, name, value)

    def base_delay(self, attempt: int) -> float:
        """The delay before attempt ``attempt`` (1 is the first), without jitter."""
        if attempt < 1:
            raise ValueError(f"attempts count from 1, not {attempt}")
        try:
            base = self.min_delay * self.factor ** (attempt - 1)
        except OverflowError:  # a huge attempt number: the cap applies
            return self.max_delay
        return min(self.max_delay, base)

    def delay(self, attempt: int, random: Callable[[], float] = random.random) -> float:
        """The delay before attempt ``attempt``, jitter included.

        ``random()`` returns a float in ``[0, 1)`` (default: :func:`random.random`;
        a seeded ``random.Random(...).random`` makes the delays reproducible).
        """
        base = self.base_delay(attempt)
        return base - base * self.jitter * random()

    def retries_after(self, server_close_code: int | None) -> bool:
        """Whether a connection that ended this way is worth reconnecting.

        ``server_close_code`` is the code of the server's close frame, or
        ``None`` when none came (a network failure, a timeout, or blockws
        failed the connection). The application's own ``close()`` never
        reconnects; the engine checks that before asking.
        """
        if server_close_code is None:
            return True
        return self.on_clean_close or server_close_code not in CLEAN_CLOSE_CODES


def reconnect_option(value: object) -> Reconnect | None:
    """The ``reconnect=`` option: ``False``/``None`` (off), ``True`` or a :class:`Reconnect`."""
    if value is None or value is False:
        return None
    if value is True:
        return Reconnect()
    if not isinstance(value, Reconnect):
        raise TypeError(f"reconnect must be a bool or a Reconnect, not {type(value).__name__}")
    return value


class Backoff:
    """One socket's count of attempts in its current outage.

    Owned by the engine and used under its lock: :meth:`next_delay` when a
    connection (or an attempt) ends, :meth:`opened` when one opens.
    """

    __slots__ = ("policy", "attempt", "_random")

    def __init__(self, policy: Reconnect, random: Callable[[], float] = random.random) -> None:
        self.policy = policy
        #: The attempt last announced (1-based); 0 while connected.
        self.attempt = 0
        self._random = random

    def next_delay(self) -> float | None:
        """Count the next attempt and return its delay, or ``None`` to give up."""
        limit = self.policy.max_attempts
        attempt = self.attempt + 1
        if limit is not None and attempt > limit:
            return None
        self.attempt = attempt
        return self.policy.delay(attempt, self._random)

    def opened(self) -> None:
        """A connection opened: the next outage starts from the first attempt."""
        self.attempt = 0
