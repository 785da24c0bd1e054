"""blockws.readtoken: the lending paths tests/test_readtoken.py leaves out.

No socket: a thread plays the reader (``before_read`` between "reads"), the
test's thread a caller waiting in ``receive()``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Callable

import pytest

from blockws.readtoken import Ended, ReadToken

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(data)


class Reader:
    """The reader thread's loop until the token hands it an end (or ``finish``)."""

    def __init__(self, token: ReadToken) -> None:
        self.token = token
        self.ended: list[Ended] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reader")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ended = self.token.before_read()
            if ended is not None:
                self.ended.append(ended)
                return
            self.stop.wait(0.005)  # a read that finds nothing

    def finish(self) -> None:
        self.stop.set()
        self.token.cancel()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def token() -> Iterator[ReadToken]:
    yield ReadToken()


def never(timeout: float | None) -> bytes | None:
    raise AssertionError("a caller without the right read")


def wait_until(test: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``test`` (a lease lapsing is a non-event: nothing to wait on)."""
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def ask_and_wait_for_grant(token: ReadToken) -> None:
    granted = threading.Event()
    assert token.read_here(never, Sink(), 1.0, granted.set) is False
    assert granted.wait(5), "the reader did not grant the right"


def test_the_right_is_lent_again_after_it_lapsed(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader lends the right a second time (the token's condition is made by
    the first lend and reused), and the caller reads on its own thread again."""
    # Long enough for this thread to read after the grant on a loaded machine.
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 0.2)
    reader = Reader(token)
    try:
        sink = Sink()
        for n in range(2):
            ask_and_wait_for_grant(token)
            chunk = b"read %d" % n

            def read(timeout: float | None, chunk: bytes = chunk) -> bytes:
                assert token.lent and token.busy  # inside the caller's read
                return chunk

            assert not token.busy
            assert token.read_here(read, sink, 1.0, never) is True
            assert not token.busy
            # No more reads: the lease lapses and the right goes back to the reader.
            assert token.read_here(lambda t: None, Sink(), 1.0, never) is True
            assert wait_until(lambda: not token.lent), "the lease did not lapse"
        assert sink.data == [b"read 0", b"read 1"]
        assert reader.ended == []
    finally:
        reader.finish()


def test_a_lend_after_cancel_grants_nothing_and_returns_at_once(token: ReadToken) -> None:
    """The reader saw a wish (``wanted``), then the socket was aborted before it
    lent: ``lend()`` grants nothing, wakes nobody and lets the reader go on."""
    woken = threading.Event()
    assert token.read_here(never, Sink(), 1.0, woken.set) is False
    assert token.wanted
    token.cancel()
    assert not token.wanted
    assert token.lend() is None  # would wait a lease at least had it lent the right
    assert not token.lent and not woken.is_set()
    # Nor is the right lent to a later caller.
    assert token.read_here(never, Sink(), 1.0, woken.set) is False
    assert not token.wanted


def test_an_end_of_stream_left_held_by_an_interrupted_read_ends_the_next_read(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt landed after the transport's read kept an end of stream (b"")
    in ``held``: the next caller meets it there without reading, and the reader
    thread reports the end."""
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 5.0)  # no lapse between the reads
    held: deque[bytes] = deque()

    def eof_then_interrupted(timeout: float | None) -> bytes | None:
        held.extend([b""])  # what TCPTransport.read keeps at EOF, in one C-level step
        raise KeyboardInterrupt

    reader = Reader(token)
    try:
        ask_and_wait_for_grant(token)
        with pytest.raises(KeyboardInterrupt):
            token.read_here(eof_then_interrupted, Sink(), 1.0, never, held)
        assert reader.ended == [] and token.lent  # nothing ended yet
        sink = Sink()
        assert token.read_here(never, sink, 1.0, never, held) is True
        reader.thread.join(5)
        assert reader.ended == [(None,)] and sink.data == []
        assert not token.lent
    finally:
        reader.finish()
