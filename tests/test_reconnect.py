"""Reconnection without sockets: the Reconnect policy and its backoff arithmetic, and the
engine's reconnection over memory transports (tests/memory.py).

The real-server tests (a server restarted on the same port, refusals, clean closes, 50
reconnects) are in tests/test_reconnect_peers.py.
"""

from __future__ import annotations

import dataclasses
import doctest
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from memory import MemoryOpener, MemoryTransport, server_frame

import blockws
import blockws.connection
import blockws.reconnect
from blockws.connection import TRANSITIONS, Phase
from blockws.frames import Opcode, pack_close
from blockws.options import Options
from blockws.reconnect import Backoff, Reconnect, reconnect_option

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

URL = "ws://memory.invalid/game"
#: Short delays for the engine tests: the backoff is real time on the shared timer.
FAST = Reconnect(min_delay=0.01, max_delay=0.05, jitter=0)


# -- the policy ---------------------------------------------------------------------


def test_module_examples_hold() -> None:
    result = doctest.testmod(blockws.reconnect)
    assert result.attempted >= 4 and result.failed == 0


def test_reconnect_is_exported_and_frozen() -> None:
    assert blockws.Reconnect is Reconnect
    policy = Reconnect()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.min_delay = 1.0  # type: ignore[misc]
    assert policy == Reconnect(None, 0.5, 30.0, 2.0, 0.5, False)
    assert hash(policy) == hash(Reconnect())


def test_base_delays_grow_by_factor_and_stop_at_max() -> None:
    policy = Reconnect(min_delay=0.5, max_delay=30.0, factor=2.0, jitter=0)
    assert [policy.base_delay(n) for n in range(1, 10)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0
    ]
    assert [policy.delay(n) for n in range(1, 4)] == [0.5, 1.0, 2.0]  # no jitter: no randomness
    assert policy.base_delay(100_000) == 30.0  # 2.0 ** 99999 overflows: the cap applies
    assert Reconnect(factor=1, jitter=0).delay(50) == 0.5
    with pytest.raises(ValueError, match="count from 1"):
        policy.base_delay(0)


def test_jittered_delays_stay_within_their_bounds() -> None:
    """Seeded: each delay lies in [(1 - jitter) * base, base], and the draws cover that
    range (not stuck at one end)."""
    for jitter in (0.5, 0.25, 1.0):
        policy = Reconnect(min_delay=0.2, max_delay=5.0, factor=3.0, jitter=jitter)
        rng = random.Random(20261202)
        for attempt in range(1, 8):
            base = policy.base_delay(attempt)
            delays = [policy.delay(attempt, rng.random) for _ in range(500)]
            low = base * (1 - jitter)
            assert all(low <= d <= base for d in delays), (jitter, attempt)
            assert min(delays) < low + 0.05 * (base - low)
            assert max(delays) > base - 0.05 * (base - low)
            assert max(delays) <= policy.max_delay


def test_seeded_backoff_is_reproducible_and_counts_attempts() -> None:
    policy = Reconnect(max_attempts=4, min_delay=1.0, max_delay=60.0)
    one, two = Backoff(policy, random.Random(7).random), Backoff(policy, random.Random(7).random)
    first = [one.next_delay() for _ in range(5)]
    assert first == [two.next_delay() for _ in range(5)]
    assert first[4] is None and one.attempt == 4  # max_attempts: the fifth is refused
    assert all(d is not None and 0.5 * 2 ** n <= d <= 2 ** n for n, d in enumerate(first[:4]))
    one.opened()  # a connection opened: the next outage starts over
    assert one.attempt == 0 and one.next_delay() is not None and one.attempt == 1
    never = Backoff(Reconnect(max_attempts=0))
    assert never.next_delay() is None


def test_which_ends_are_retried() -> None:
    default, always = Reconnect(), Reconnect(on_clean_close=True)
    assert default.retries_after(None)  # no close frame: network failure, timeout
    for clean in (1000, 1001, 1005):
        assert not default.retries_after(clean) and always.retries_after(clean)
    for code in (1002, 1008, 1011, 1012, 1013, 4000):
        assert default.retries_after(code)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"max_attempts": -1}, ValueError, "max_attempts must be >= 0"),
        ({"max_attempts": 2.0}, TypeError, "max_attempts must be an int"),
        ({"max_attempts": True}, TypeError, "max_attempts must be an int"),
        ({"min_delay": -0.1}, ValueError, "min_delay must be a finite"),
        ({"min_delay": "1"}, TypeError, "min_delay must be a number"),
        ({"max_delay": float("inf")}, ValueError, "max_delay must be a finite"),
        ({"min_delay": 5, "max_delay": 1}, ValueError, "max_delay .1.0. is below min_delay"),
        ({"factor": 0.5}, ValueError, "factor must be a number >= 1"),
        ({"factor": None}, TypeError, "factor must be a number"),
        ({"jitter": 1.5}, ValueError, "jitter must be between 0 and 1"),
        ({"jitter": -0.1}, ValueError, "jitter must be between 0 and 1"),
        ({"on_clean_close": 1}, TypeError, "on_clean_close must be a bool"),
    ],
)
def test_bad_values_are_refused_when_made(kwargs: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        Reconnect(**kwargs)


def test_the_option_takes_bools_and_policies() -> None:
    assert reconnect_option(False) is None and reconnect_option(None) is None
    assert reconnect_option(True) == Reconnect()
    policy = Reconnect(max_attempts=3)
    assert reconnect_option(policy) is policy
    assert Options.build().reconnect is None
    assert Options.build(reconnect=True).reconnect == Reconnect()
    with pytest.raises(TypeError, match="reconnect must be a bool or a Reconnect, not str"):
        blockws.WebSocket(URL, reconnect="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_reconnecting must be callable"):
        blockws.WebSocket(URL, on_reconnecting=3)  # type: ignore[arg-type]
    ws = blockws.WebSocket(URL, reconnect=True)
    assert ws.reconnect == Reconnect()
    ws.reconnect = policy  # type: ignore[assignment]
    assert ws.reconnect is policy


def test_lifecycle_table_has_reconnecting() -> None:
    assert TRANSITIONS[Phase.RECONNECTING] == frozenset({Phase.CONNECTING, Phase.CLOSED})
    for phase in (Phase.CONNECTING, Phase.OPEN, Phase.CLOSING):
        assert Phase.RECONNECTING in TRANSITIONS[phase]
    assert Phase.RECONNECTING not in TRANSITIONS[Phase.NEW]  # only an open socket reconnects


# -- the engine over memory transports ---------------------------------------------------


class Script:
    """An opener whose attempts fail as told, recording every request it is given."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.inner = MemoryOpener(MemoryTransport)
        self.fail = fail or set()
        self.calls = 0

    @property
    def transports(self) -> list[MemoryTransport]:
        return self.inner.transports

    @property
    def requests(self) -> list[Any]:
        return self.inner.requests

    def __call__(self, request: Any, *args: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            self.inner.requests.append(request)
            raise blockws.ConnectError(f"attempt {self.calls} refused")
        return self.inner(request, *args)


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Iterator[Script]:
    opener = Script()
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    yield opener


class Events:
    """Every callback in the order it ran, with what ws.error and is_open said then."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_open": lambda ws: self.log.append(("open",)),
            "on_message": lambda ws, text: self.log.append(("text", text)),
            "on_reconnecting": lambda ws, attempt, delay: self.log.append(
                ("reconnecting", attempt, delay, ws.error, ws.is_open)
            ),
            "on_closed": lambda ws, code, reason: self.log.append(
                ("closed", code, reason, ws.error)
            ),
        }

    def count(self, kind: str) -> int:
        return sum(1 for e in self.log if e[0] == kind)

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == kind]

    def pump(self, ws: blockws.WebSocket, test: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline, f"condition not reached: {self.log}"
            ws.wait(0.05)
            ws.update()


def make(events: Events, policy: Reconnect | bool = FAST, **options: Any) -> blockws.WebSocket:
    options.setdefault("extensions", [])
    return blockws.WebSocket(URL, reconnect=policy, **events.callbacks(), **options)


def test_lost_connection_reconnects_and_on_open_runs_again(script: Script, no_leaks: None) -> None:
    events = Events()
    hooks: list[str] = []
    ws = make(events, on_internal_request_created=lambda ws, req: hooks.append(req.url))
    ws.internal_request.headers["X-Player"] = "p1"
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    first = script.transports[0]
    first.feed(server_frame(Opcode.TEXT, b"before"))
    first.feed_eof()  # the server vanished: no close frame
    events.pump(ws, lambda: events.count("open") == 2)
    assert [e[:2] for e in events.log] == [("open",), ("text", "before"), ("reconnecting", 1),
                                           ("open",)]
    _, attempt, delay, error, was_open = events.of("reconnecting")[0]
    assert delay == FAST.min_delay and not was_open
    assert isinstance(error, blockws.ConnectionLost)
    assert ws.is_open and ws.error is None  # the new connection's: none
    # A new request for the new connection, with the edits made before open(); the hook
    # ran for it too, on its own copy.
    assert len(script.requests) == 2 and script.requests[0] is not script.requests[1]
    assert script.requests[1].headers["X-Player"] == "p1"
    assert hooks == [URL, URL] and ws.internal_request is script.requests[1]
    ws.send("after")
    second = script.transports[1]
    frames = second.wait_for(lambda fs: len(fs) == 1)
    assert frames[0].payload == b"after"
    assert first.closed and not first.frames()  # nothing of the new link on the old one
    ws.close()
    second.wait_for(lambda fs: bool(fs) and fs[-1].opcode == Opcode.CLOSE)
    second.feed(server_frame(Opcode.CLOSE, pack_close(1000)))
    second.feed_eof()
    assert ws.join(5)
    ws.update()
    assert events.of("closed") == [("closed", 1000, "", None)]
    assert events.count("open") == 2 and events.count("reconnecting") == 1


def test_send_is_refused_while_reconnecting(script: Script) -> None:
    events = Events()
    ws = make(events, Reconnect(min_delay=30.0, max_delay=30.0))
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = script.transports[0]
    transport.feed_eof()
    events.pump(ws, lambda: events.count("reconnecting") == 1)
    assert ws.buffered_amount == 0 and not ws.is_open and not ws.closed
    assert "reconnecting" in repr(ws)
    with pytest.raises(blockws.InvalidState, match="reconnecting"):
        ws.send("lost?")
    with pytest.raises(blockws.InvalidState, match="reconnecting"):
        ws.ping()
    assert ws.buffered_amount == 0
    ws.close()
    assert ws.closed


def test_a_send_racing_a_reconnect_onto_the_ended_link_is_refused(script: Script) -> None:
    """``send()`` reads the link's queue, then pushes. One that read the ended
    link's queue and pushed once the next link is open (the race, made here
    by holding on to that queue's push) is refused with InvalidState: it is
    queued on neither link, and says so."""
    events = Events()
    ws = make(events)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    stale_push = ws._engine.queue.push  # what a racing send() read (the first link's)
    script.transports[0].feed_eof()
    events.pump(ws, lambda: events.count("open") == 2)
    assert ws.is_open
    with pytest.raises(blockws.InvalidState, match="reconnected while send"):
        stale_push(2, b"late", None, 4)
    assert ws.buffered_amount == 0
    ws.send("on time")
    frames = script.transports[1].wait_for(lambda fs: len(fs) == 1)
    assert frames[0].payload == b"on time"
    assert not script.transports[0].frames()
    ws.close()
    ws.join(5)


def test_failed_attempts_retry_each_error_in_ws_error(script: Script, no_leaks: None) -> None:
    """The first open succeeds, the connection drops, attempts 1 and 2 are refused and
    attempt 3 opens: on_reconnecting sees 1, 2, 3 with the error of what came before."""
    script.fail = {2, 3}
    events = Events()
    ws = make(events, Reconnect(min_delay=0.01, factor=2, max_delay=1, jitter=0))
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    script.transports[0].feed_eof()
    events.pump(ws, lambda: events.count("open") == 2)
    reconnecting = events.of("reconnecting")
    assert [(e[1], e[2]) for e in reconnecting] == [(1, 0.01), (2, 0.02), (3, 0.04)]
    assert isinstance(reconnecting[0][3], blockws.ConnectionLost)
    assert [str(e[3]) for e in reconnecting[1:]] == ["attempt 2 refused", "attempt 3 refused"]
    assert ws.error is None and ws.is_open and script.calls == 4
    # The count starts again after a success.
    script.transports[-1].feed_eof()
    events.pump(ws, lambda: events.count("open") == 3)
    assert [e[1] for e in events.of("reconnecting")] == [1, 2, 3, 1]
    ws.close()
    ws.abort()
    assert ws.join(5)
    ws.update()
    assert events.count("closed") == 1


def test_gives_up_after_max_attempts_with_on_closed_once(script: Script, no_leaks: None) -> None:
    script.fail = {2, 3, 4, 5}
    events = Events()
    ws = make(events, Reconnect(max_attempts=3, min_delay=0.01, max_delay=0.01))
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    script.transports[0].feed_eof()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert [e[1] for e in events.of("reconnecting")] == [1, 2, 3]
    assert script.calls == 4  # the first open and three attempts
    (_, code, reason, error), = events.of("closed")
    assert (code, reason) == (1006, "") and str(error) == "attempt 4 refused"
    assert ws.closed and ws.join(5)
    with pytest.raises(blockws.ConnectionClosedError):
        ws.receive(timeout=1)
    assert not ws.wait(0.05) and ws.update() == 0  # nothing after on_closed


def test_close_during_backoff_ends_at_once(script: Script, no_leaks: None) -> None:
    """The backoff runs on the shared timer: close() cancels it and the socket ends now,
    with nothing left to wait for (no_leaks: no thread, not even the timer's)."""
    events = Events()
    ws = make(events, Reconnect(min_delay=30.0, max_delay=30.0, jitter=0))
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    script.transports[0].feed_eof()
    events.pump(ws, lambda: events.count("reconnecting") == 1)
    started = time.monotonic()
    ws.close()
    assert ws.closed and ws.join(1.0)
    assert ws.update() == 1
    assert time.monotonic() - started < 1.0
    assert events.of("closed") == [("closed", 1006, "", None)]
    assert script.calls == 1  # no attempt was made
    with pytest.raises(blockws.ConnectionClosedOK):
        ws.receive(timeout=1)


def test_close_during_an_attempt_abandons_it(script: Script, no_leaks: None) -> None:
    """close() while an attempt's handshake is under way: that attempt is abandoned, no
    other follows, and on_closed reports the application's close (no error)."""
    script.fail = {2}
    events = Events()
    ws = make(events, Reconnect(min_delay=0.01, max_delay=0.01))
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    script.inner.gate = threading.Event()  # the next handshake hangs until aborted
    script.transports[0].feed_eof()
    events.pump(ws, lambda: events.count("reconnecting") == 2 and len(script.transports) == 2)
    assert not ws.is_open and "connecting" in repr(ws)
    ws.close()
    assert ws.join(5)
    ws.update()
    assert events.of("closed") == [("closed", 1006, "", None)]
    assert script.transports[1].aborted and script.calls == 3


def test_receive_keeps_waiting_across_a_reconnect(script: Script, no_leaks: None) -> None:
    ws = blockws.WebSocket(URL, reconnect=FAST, extensions=[])
    ws.open()
    got: list[Any] = []

    def reader() -> None:
        try:
            got.extend(ws)  # iteration ends when the socket closes cleanly
        except BaseException as exc:  # noqa: BLE001 - checked below
            got.append(exc)

    deadline = time.monotonic() + 5
    while not script.transports:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    thread = threading.Thread(target=reader)
    thread.start()
    first = script.transports[0]
    first.feed(server_frame(Opcode.TEXT, b"one"))
    first.feed_eof()
    while len(script.transports) < 2 or not ws.is_open:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    second = script.transports[1]
    second.feed(server_frame(Opcode.TEXT, b"two"))
    second.feed(server_frame(Opcode.CLOSE, pack_close(1000)))
    second.feed_eof()
    thread.join(5)
    assert not thread.is_alive()
    assert got == ["one", "two"]


def test_server_close_codes_decide(script: Script) -> None:
    """1000, 1001 and a close frame without a code end the socket unless on_clean_close;
    any other code from the server reconnects."""
    cases = [(pack_close(1000, "bye"), False, False), (pack_close(1001), False, False),
             (b"", False, False), (pack_close(1000, "bye"), True, True),
             (pack_close(1012, "restart"), False, True), (pack_close(4000), False, True)]
    for payload, on_clean_close, reconnects in cases:
        events = Events()
        policy = dataclasses.replace(FAST, on_clean_close=on_clean_close)
        ws = make(events, policy)
        ws.open()
        events.pump(ws, lambda: events.count("open") == 1)  # noqa: B023 - called at once
        transport = script.transports[-1]
        transport.feed(server_frame(Opcode.CLOSE, payload))
        transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
        transport.feed_eof()
        if reconnects:
            events.pump(ws, lambda: events.count("open") == 2)  # noqa: B023
            assert events.of("reconnecting")[0][1] == 1
            assert ws.close_code == (int.from_bytes(payload[:2], "big") if payload else 1005)
            ws.abort()
        events.pump(ws, lambda: events.count("closed") == 1)  # noqa: B023
        assert events.count("reconnecting") == (1 if reconnects else 0), (payload, events.log)


def test_application_close_and_failed_first_open_never_reconnect(script: Script) -> None:
    events = Events()
    ws = make(events)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    ws.close()
    transport = script.transports[0]
    transport.wait_for(lambda fs: bool(fs) and fs[-1].opcode == Opcode.CLOSE)
    transport.feed_eof()  # no close reply either: still the application's close
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.count("reconnecting") == 0 and script.calls == 1

    script.fail = {2}
    failed = Events()
    ws = make(failed)
    ws.open()
    failed.pump(ws, lambda: failed.count("closed") == 1)
    assert failed.count("reconnecting") == 0 and script.calls == 2
    assert isinstance(ws.error, blockws.ConnectError)


def test_protocol_error_by_the_server_reconnects(script: Script) -> None:
    events = Events()
    ws = make(events)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = script.transports[0]
    transport.feed(server_frame(0x3))  # a reserved opcode: blockws fails with 1002
    transport.wait_for(lambda fs: bool(fs) and fs[-1].opcode == Opcode.CLOSE)
    transport.feed_eof()
    events.pump(ws, lambda: events.count("open") == 2)
    (_, attempt, _d, error, _o), = events.of("reconnecting")
    assert attempt == 1 and isinstance(error, blockws.ProtocolError)
    assert ws.close_code == 1002  # how the lost connection ended
    ws.abort()
    events.pump(ws, lambda: events.count("closed") == 1)


def test_unsent_messages_are_dropped_when_the_link_is_lost(script: Script) -> None:
    script.inner.factory = lambda: MemoryTransport(block_writes=True)
    blocked = Events()
    ws = make(blocked, Reconnect(min_delay=30, max_delay=30))
    ws.open()
    blocked.pump(ws, lambda: blocked.count("open") == 1)
    transport = script.transports[-1]
    for _ in range(3):
        ws.send(b"x" * 1000)
    assert ws.buffered_amount >= 2000  # the first may be in a blocked write
    transport.feed_eof()
    blocked.pump(ws, lambda: blocked.count("reconnecting") == 1)
    assert ws.buffered_amount == 0
    ws.close()
    assert ws.join(5)


def test_ping_timeout_reconnects_and_pings_resume(script: Script) -> None:
    """A silent server (no pong) is dropped by the keepalive and the socket reconnects;
    the new connection is pinged too."""
    events = Events()
    ws = make(events, send_pings=True, ping_frequency=0.1, close_after_no_message=0.1)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    events.pump(ws, lambda: events.count("open") == 2)
    (_, _a, _d, error, _o), = events.of("reconnecting")[:1]
    assert isinstance(error, blockws.PingTimeout)
    script.transports[1].wait_for(lambda fs: any(f.opcode == Opcode.PING for f in fs))
    ws.close()
    ws.abort()
    assert ws.join(5)


def test_on_reconnecting_sees_the_error_it_follows_even_when_late(script: Script) -> None:
    """update() is not called while three attempts fail: each on_reconnecting, run late,
    still sees in ws.error the error that preceded its own attempt."""
    script.fail = {2, 3, 4}
    events = Events()
    ws = make(events)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    script.transports[0].feed_eof()
    deadline = time.monotonic() + 5
    while not ws.is_open:  # no update() meanwhile: the callbacks wait
        assert time.monotonic() < deadline
        time.sleep(0.005)
    events.pump(ws, lambda: events.count("open") == 2)
    errors = [e[3] for e in events.of("reconnecting")]
    assert isinstance(errors[0], blockws.ConnectionLost)
    assert [str(e) for e in errors[1:]] == [f"attempt {n} refused" for n in (2, 3, 4)]
    assert ws.error is None  # outside the callback: the live value
    ws.abort()
    events.pump(ws, lambda: events.count("closed") == 1)


def test_close_while_the_server_closes_does_not_reconnect(script: Script) -> None:
    """The server starts closing with 1012 (worth a reconnection), then the application
    calls close() before the connection has ended: its close wins."""
    events = Events()
    ws = make(events)
    ws.open()
    events.pump(ws, lambda: events.count("open") == 1)
    transport = script.transports[0]
    transport.feed(server_frame(Opcode.CLOSE, pack_close(1012, "restart")))
    transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))  # our reply
    assert not ws.is_open and not ws.closed
    ws.close()  # while CLOSING: a no-op for the handshake, but no reconnection follows
    transport.feed_eof()
    events.pump(ws, lambda: events.count("closed") == 1)
    assert events.count("reconnecting") == 0 and script.calls == 1
    assert events.of("closed") == [("closed", 1012, "restart", None)]
