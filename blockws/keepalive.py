"""Keepalive: pings every ``ping_frequency``, latency from the pongs, and
closing a socket that stays silent after a ping.

With ``send_pings`` on, the process-wide timer thread sends a ping (payload:
a sequence number) every ``ping_frequency`` seconds while the socket is open.
Its pong gives ``ws.latency``. If no frame at all -- pong or anything else --
arrives within ``close_after_no_message`` seconds of a ping, the socket is
dropped: ``on_closed`` with 1006 and a :class:`~blockws.exceptions.PingTimeout`
in ``ws.error``. Any frame counts, so a chatty server that never answers pings
keeps the socket open.

The timer jobs live in the socket's job table, so the socket's teardown
cancels them with the rest.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from .exceptions import PingTimeout
from .frames import Opcode
from .timer import timer

if TYPE_CHECKING:  # pragma: no cover
    from .websocket import WebSocket

__all__ = ["Keepalive"]

_ping_struct = struct.Struct("!Q")
_PING = int(Opcode.PING)
#: Pings older than this are forgotten (their pong will not come).
_PING_MEMORY = 60.0


class Keepalive:
    """The ping schedule and pong bookkeeping of one socket."""

    __slots__ = ("ws", "_seq", "_pings")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._seq = 0
        self._pings: dict[bytes, float] = {}  # payload -> when it was sent

    def schedule_locked(self) -> None:
        """Arm the next ping if pings are on and none is armed (socket lock held)."""
        ws = self.ws
        if "ping" not in ws._jobs and ws.send_pings:
            ws._jobs["ping"] = timer.call_later(ws.ping_frequency, self._ping_due)

    def _ping_due(self) -> None:
        ws = self.ws
        now = time.monotonic()
        with ws._lock:
            ws._jobs.pop("ping", None)
            proto = ws._proto
            if not ws._pinging_locked() or proto is None or ws._deferred_close is not None:
                return
            self._seq += 1
            payload = _ping_struct.pack(self._seq)
            self._pings = {k: v for k, v in self._pings.items() if now - v < _PING_MEMORY}
            self._pings[payload] = now
            ws._sender.control_locked([proto.encode_control(_PING, payload)])
            ws._jobs["ping"] = timer.call_later(ws.ping_frequency, self._ping_due)
            key = f"pong-{self._seq}"
            ws._jobs[key] = timer.call_later(
                ws.close_after_no_message, lambda: self._pong_due(key, now)
            )

    def _pong_due(self, key: str, ping_time: float) -> None:
        ws = self.ws
        with ws._lock:
            ws._jobs.pop(key, None)
            if not ws._pinging_locked():
                return
        last = ws.last_message_received
        if last is None or last < ping_time:
            ws._set_error(PingTimeout(f"no frame within {ws.close_after_no_message} s of a ping"))
            ws.log.info("no message after a ping: closing")
            ws.abort()

    def pong_received(self, payload: bytes) -> None:
        """A pong arrived (reader side): the latency, if it answers one of ours."""
        sent = self._pings.pop(payload, None)
        if sent is not None:
            self.ws.latency = time.monotonic() - sent
