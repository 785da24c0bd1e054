"""Keepalive over a fake host: the ping schedule, latency from pongs, the bounded
ping memory, the silence timeout, stopping and the settings' checks."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import blockws.keepalive as keepalive_module
from blockws.exceptions import PingTimeout
from blockws.keepalive import Keepalive

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

WAIT = 5.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll briefly: some states have no event to wait on."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


FREQUENCY = 0.05  # below MIN_PING_FREQUENCY: the constructor does not check, set_frequency does
SILENCE = 0.08


class FakeHost:
    """A socket as the keepalive sees it (blockws.keepalive.Host)."""

    def __init__(
        self,
        last_frame: Callable[[], float | None] = lambda: None,
        pings_allowed: int | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.pinging = True
        self.last_frame = last_frame
        self.pings_allowed = pings_allowed  # pinging_locked turns False after that many
        self.cond = threading.Condition()
        self.pings: list[tuple[bytes, float]] = []  # payload, when it was queued
        self.pinging_checks = 0
        self.last_frame_calls = 0
        self.timeouts: list[tuple[PingTimeout, float]] = []

    def pinging_locked(self) -> bool:
        assert self.lock.locked()
        with self.cond:
            self.pinging_checks += 1
            self.cond.notify_all()
        return self.pinging

    def send_ping_locked(self, payload: bytes) -> None:
        assert self.lock.locked()
        with self.cond:
            self.pings.append((payload, time.monotonic()))
            if self.pings_allowed is not None and len(self.pings) >= self.pings_allowed:
                self.pinging = False  # say, the socket started closing
            self.cond.notify_all()

    def last_frame_at(self) -> float | None:
        with self.cond:
            self.last_frame_calls += 1
            self.cond.notify_all()
        return self.last_frame()

    def ping_timed_out(self, error: PingTimeout) -> None:
        with self.cond:
            self.timeouts.append((error, time.monotonic()))
            self.cond.notify_all()

    def wait_for(self, test: Callable[[], bool], timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(test, timeout), "condition not reached"

    def ping_count(self) -> int:
        with self.cond:
            return len(self.pings)


@pytest.fixture
def keepalives() -> Iterator[Callable[..., tuple[Keepalive, FakeHost]]]:
    """Make started keepalives; each is stopped at teardown (no timer job outlives a test)."""
    made: list[tuple[Keepalive, FakeHost]] = []

    def make(
        enabled: bool = True,
        frequency: float = FREQUENCY,
        silence: float = 30.0,
        start: bool = True,
        **host_options: Any,
    ) -> tuple[Keepalive, FakeHost]:
        host = FakeHost(**host_options)
        keepalive = Keepalive(host, enabled, frequency, silence)
        made.append((keepalive, host))
        if start:
            with host.lock:
                keepalive.start_locked()
        return keepalive, host

    yield make
    for keepalive, host in made:
        with host.lock:
            keepalive.stop_locked()


def test_pings_every_frequency_with_distinct_payloads(keepalives: Any) -> None:
    keepalive, host = keepalives(start=False)
    started = time.monotonic()
    with host.lock:
        keepalive.start_locked()
    host.wait_for(lambda: len(host.pings) >= 3)
    with host.lock:
        keepalive.stop_locked()
    payloads = [p for p, _ in host.pings]
    times = [t for _, t in host.pings]
    assert times[0] - started >= FREQUENCY
    assert len(set(payloads)) == len(payloads)
    assert [struct.unpack("!Q", p)[0] for p in payloads[:3]] == [1, 2, 3]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(gap >= FREQUENCY - 0.002 for gap in gaps), gaps


def test_no_pings_while_disabled_until_enabled(keepalives: Any) -> None:
    keepalive, host = keepalives(enabled=False)
    assert keepalive._ping_job is None  # nothing armed
    with host.lock:
        keepalive.set_enabled_locked(True)  # armed at once
    host.wait_for(lambda: len(host.pings) >= 1)


def test_set_enabled_false_stops_later_pings(keepalives: Any) -> None:
    keepalive, host = keepalives()
    host.wait_for(lambda: len(host.pings) >= 1)
    with host.lock:
        keepalive.set_enabled_locked(False)
        count = host.ping_count()
    # The armed ping runs, sees pings are off and arms no other.
    wait_until(lambda: keepalive._ping_job is None)
    assert host.ping_count() == count
    with host.lock:
        keepalive.set_enabled_locked(True)
    host.wait_for(lambda: len(host.pings) > count)


def test_host_not_pinging_skips_the_ping(keepalives: Any) -> None:
    keepalive, host = keepalives(start=False)
    host.pinging = False
    with host.lock:
        keepalive.start_locked()
    host.wait_for(lambda: host.pinging_checks >= 1)
    with host.lock:  # the job ran (it held the lock) and did not re-arm
        assert keepalive._ping_job is None
    assert host.pings == []


def test_latency_from_a_pong_to_an_automatic_ping(keepalives: Any) -> None:
    keepalive, host = keepalives(start=False)
    started = time.monotonic()
    with host.lock:
        keepalive.start_locked()
    host.wait_for(lambda: len(host.pings) >= 1)
    payload, _ = host.pings[0]
    assert keepalive.latency is None
    keepalive.pong_received(payload)
    assert keepalive.latency is not None
    # The ping was sent a frequency after the start: the round trip is shorter than that.
    assert 0 <= keepalive.latency <= time.monotonic() - started - FREQUENCY


def test_latency_from_a_manual_ping_and_unknown_pongs_ignored(keepalives: Any) -> None:
    keepalive, host = keepalives(enabled=False)
    keepalive.pong_received(b"never sent")
    assert keepalive.latency is None
    with host.lock:
        keepalive.sent_locked(b"manual", time.monotonic() - 0.25)
    keepalive.pong_received(b"other")
    assert keepalive.latency is None
    keepalive.pong_received(b"manual")
    assert keepalive.latency is not None and 0.25 <= keepalive.latency < 5
    first = keepalive.latency
    keepalive.pong_received(b"manual")  # answered already: forgotten
    assert keepalive.latency == first


def test_ping_memory_is_bounded(keepalives: Any) -> None:
    keepalive, host = keepalives(enabled=False)
    kept = keepalive_module._PINGS_KEPT
    now = time.monotonic()
    with host.lock:
        for i in range(kept * 3):
            keepalive.sent_locked(b"ping %d" % i, now)
            assert len(keepalive._pings) <= kept
    assert len(keepalive._pings) == kept
    keepalive.pong_received(b"ping 0")  # the oldest was forgotten
    assert keepalive.latency is None
    keepalive.pong_received(b"ping %d" % (kept * 3 - 1))  # the newest is remembered
    assert keepalive.latency is not None


def test_old_pings_are_forgotten(keepalives: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive_module, "_PING_MEMORY", 1.0)
    keepalive, host = keepalives(enabled=False)
    t0 = time.monotonic() - 10.0
    with host.lock:
        keepalive.sent_locked(b"old", t0)
        keepalive.sent_locked(b"middle", t0 + 0.5)
        assert set(keepalive._pings) == {b"old", b"middle"}  # not yet too old
        keepalive.sent_locked(b"new", t0 + 1.2)  # "old" is now 1.2 s old: forgotten
    assert set(keepalive._pings) == {b"middle", b"new"}
    keepalive.pong_received(b"old")
    assert keepalive.latency is None
    keepalive.pong_received(b"middle")
    assert keepalive.latency is not None and keepalive.latency >= 9.5


def test_silence_after_a_ping_times_out(keepalives: Any) -> None:
    silence = SILENCE
    before = time.monotonic() - 100.0  # the last frame came long before the ping
    keepalive, host = keepalives(silence=silence, last_frame=lambda: before)
    host.wait_for(lambda: bool(host.timeouts))
    error, when = host.timeouts[0]
    assert isinstance(error, PingTimeout)
    assert str(silence) in str(error)
    first_ping = host.pings[0][1]
    assert when - first_ping >= silence - 0.002


def test_silence_with_no_frame_ever_times_out(keepalives: Any) -> None:
    keepalive, host = keepalives(silence=SILENCE)
    host.wait_for(lambda: bool(host.timeouts))
    assert isinstance(host.timeouts[0][0], PingTimeout)


def test_frames_after_the_ping_prevent_the_timeout(keepalives: Any) -> None:
    # A frame (any frame) arrives all the time: last_frame_at is always "now".
    keepalive, host = keepalives(silence=SILENCE, last_frame=time.monotonic)
    host.wait_for(lambda: host.last_frame_calls >= 2)  # two pongs' deadlines passed
    assert host.timeouts == []
    assert len(host.pings) >= 2


def test_no_timeout_check_once_the_host_stops_pinging(keepalives: Any) -> None:
    # The socket stops pinging (it is closing) right after the first ping.
    keepalive, host = keepalives(silence=SILENCE, pings_allowed=1)
    # The first ping, the re-armed one (skipped) and the first ping's deadline ran.
    host.wait_for(lambda: host.pinging_checks >= 3)
    assert len(host.pings) == 1
    assert host.timeouts == []
    assert host.last_frame_calls == 0  # the deadline returned before looking
    with host.lock:
        assert keepalive._ping_job is None and not keepalive._pong_jobs


def test_stop_cancels_every_job(keepalives: Any) -> None:
    silence = 0.15  # the first ping's deadline is well after the stop below
    keepalive, host = keepalives(silence=silence)
    host.wait_for(lambda: len(host.pings) >= 1)
    with host.lock:
        jobs = [keepalive._ping_job, *keepalive._pong_jobs.values()]
        keepalive.stop_locked()
        count = host.ping_count()
        keepalive.start_locked()  # stopped for good: arms nothing
        keepalive.set_enabled_locked(True)
        assert keepalive._ping_job is None and not keepalive._pong_jobs
    assert jobs and all(job is not None and job.cancelled for job in jobs)
    time.sleep(silence)  # past the next ping and the deadline: nothing may happen
    assert host.ping_count() == count
    assert host.timeouts == []


def test_settings_are_checked() -> None:
    keepalive = Keepalive(FakeHost(), False, 1.0, 5.0)
    keepalive.set_frequency(2)
    keepalive.set_silence(0.5)
    assert keepalive.frequency == 2.0 and type(keepalive.frequency) is float
    assert keepalive.silence == 0.5
    for bad in (0, -1, 0.05):
        with pytest.raises(ValueError):
            keepalive.set_frequency(bad)
    for bad in (0, -0.5):
        with pytest.raises(ValueError):
            keepalive.set_silence(bad)
    wrongs: list[Any] = ["1", None, True, [1]]
    for wrong in wrongs:
        with pytest.raises(TypeError):
            keepalive.set_frequency(wrong)
        with pytest.raises(TypeError):
            keepalive.set_silence(wrong)
    assert keepalive.frequency == 2.0 and keepalive.silence == 0.5  # unchanged by failures
