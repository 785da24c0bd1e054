"""One stuck HTTP/2 peer stalls only the sockets on its own connection.

Two independent RFC 8441 servers, each behind a :class:`h2peers.Relay`: nghttpx (with 16 MiB
windows, so that a writer blocks in the socket rather than on flow control) in front of the
`websockets` echo peer, and hypercorn. Socket A's relay stops reading from the client, so A's
writer blocks in a socket write in the middle of an 8 MiB message; then A's close timeout, ping
timeouts and its connection's idle close all run on the process-wide timer thread. Meanwhile
socket B, on the other server, keeps pinging on schedule; when B's server goes silent right
after a ping, B's close-after-silence fires on time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import Recorder
from h2peers import Gateway, Relay, nghttpx, port_of

import blockws
from blockws.http2 import HTTP2Settings

KiB = 1024
MiB = 1024 * KiB
WINDOW = 16 * MiB




@pytest.fixture(scope="module")
def big_window_nghttpx(tls_certs: Any, websockets_server: str) -> Iterator[Gateway]:
    with nghttpx(port_of(websockets_server), tls_certs.keyfile, tls_certs.certfile,
                 f"--frontend-http2-window-size={WINDOW}",
                 f"--frontend-http2-connection-window-size={WINDOW}") as gateway:
        yield gateway


class TimedRecorder(Recorder):
    closed_at: float | None = None

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        self.closed_at = time.monotonic()
        super().on_closed(ws, code, reason)


@pytest.mark.timeout(60)
def test_a_stuck_peer_stalls_no_other_socket(big_window_nghttpx: Gateway,
                                             hypercorn_h2_server: Any) -> None:
    silence = 0.6  # B's close_after_no_message
    with Relay(port_of(big_window_nghttpx.ws), rcvbuf=64 * KiB) as relay_a, \
            Relay(port_of(hypercorn_h2_server.ws)) as relay_b:
        rec_a, rec_b = TimedRecorder(), TimedRecorder()
        a = blockws.WebSocket(
            relay_a.url(), extensions=[], **rec_a.callbacks(),
            http2=HTTP2Settings(cleartext=True, fallback=False, idle_timeout=0.2),
            send_pings=True, ping_frequency=0.2, close_after_no_message=0.5, close_timeout=0.3,
        )
        b = blockws.WebSocket(
            relay_b.url(), extensions=[], **rec_b.callbacks(),
            http2=HTTP2Settings(cleartext=True, fallback=False),
            send_pings=True, ping_frequency=0.2, close_after_no_message=silence,
        )
        a.open()
        b.open()
        rec_a.wait_open(a)
        rec_b.wait_open(b)
        assert a.http_version == b.http_version == "2"

        # A's peer stops reading: A's writer blocks in a socket write, mid-message.
        relay_a.up.clear()
        a.send(bytes(8 * MiB))
        relay_a.wait_up_stalled()
        a.close()  # its close timeout, ping timeouts and idle close fire on the timer thread

        # B's pings go on, one every 0.2 s, and their pongs measure the latency.
        first = relay_b.pings
        latencies = set()
        for n in range(1, 9):
            assert relay_b.wait_pings(first + n, 1.0), (
                f"B's ping {n} did not go out: the timer thread is stalled")
            latencies.add(b.latency)
        assert len(latencies) >= 4, latencies
        assert b.is_open, repr(b.error)

        # B's server goes silent right after a ping: B gives up `silence` seconds later.
        relay_b.hold_down_at_next_ping()
        assert relay_b.held_at_ping.wait(2.0)
        rec_b.pump_until(b, lambda: bool(rec_b.closes), timeout=5.0)
        assert relay_b.ping_at is not None and rec_b.closed_at is not None
        late = rec_b.closed_at - (relay_b.ping_at + silence)
        assert abs(late) < 0.05, f"B's close-after-silence fired {late:+.3f} s from its due time"
        assert rec_b.closes == [("closed", 1006, "")]
        assert isinstance(b.error, blockws.PingTimeout), repr(b.error)

        # A ended too, abnormally: its message never got through.
        assert rec_a.wait_closed(a, timeout=10.0)[0] == 1006
        assert isinstance(a.error, (blockws.CloseTimeout, blockws.PingTimeout)), repr(a.error)
