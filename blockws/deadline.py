"""One timeout spread over several steps (websockets' ``sync/utils.py`` idea).

A blocking helper that waits in a loop -- ``receive()``, ``wait()``,
``connect()``, the opening's DNS, TCP, TLS and handshake steps -- makes one
:class:`Deadline` from its timeout and asks it, before each step, how long
that step may take.
"""

from __future__ import annotations

import time

from .exceptions import OpenTimeout

__all__ = ["Deadline"]


class Deadline:
    """A point in time ``timeout`` seconds from now (``None``: no limit)."""

    __slots__ = ("timeout", "deadline")

    def __init__(self, timeout: float | None, start: float | None = None) -> None:
        """``start``: the ``time.monotonic()`` the timeout counts from (default: now)."""
        self.timeout = timeout
        if timeout is None:
            self.deadline: float | None = None
        else:
            self.deadline = (time.monotonic() if start is None else start) + timeout

    def left(self) -> float | None:
        """Seconds left, never below zero; ``None`` for no limit."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self) -> float | None:
        """Seconds left for an opening step; raises :class:`OpenTimeout` at zero."""
        left = self.left()
        if left is not None and left <= 0:
            raise OpenTimeout("timed out opening the WebSocket")
        return left
