"""blockws.readtoken: who reads a transport, without a socket.

A "reader" thread plays the engine's reader (``before_read`` between reads)
and the test's thread plays a caller waiting in ``receive()``; reads are
plain functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Callable

import pytest

from blockws.exceptions import ConnectionLost
from blockws.readtoken import Ended, ReadToken, _c_read_here

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


class CReadToken(ReadToken):
    """A token whose ``read_here`` is the C speedup's (``blockws._speedups.read_here``,
    what the connection calls when it is built): every test below runs on both."""

    __slots__ = ()

    def read_here(  # type: ignore[override]
        self,
        read: Callable[[float | None], bytes | int | None],
        sink: object,
        timeout: float | None,
        wake: Callable[[], None],
        held: list[bytes | int] | None = None,
    ) -> bool:
        return bool(_c_read_here(self, read, sink, timeout, wake, held))


class Sink:
    def __init__(self, raises: BaseException | None = None) -> None:
        self.data: list[tuple[bytes, str]] = []
        self.raises = raises

    def data_received(self, data: bytes) -> None:
        if self.raises is not None:
            raise self.raises
        self.data.append((data, threading.current_thread().name))


class Reader:
    """The reader thread's loop: ``before_read``, then a "read" that waits on
    ``self.more`` (as a blocked recv would), until the token returns an end."""

    def __init__(self, token: ReadToken) -> None:
        self.token = token
        self.ended: list[Ended] = []
        self.lends = 0
        self.more = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reader")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ended = self.token.before_read()
            if ended is not None:
                self.ended.append(ended)
                return
            self.more.wait(0.01)  # a read: returns when data "arrives" (or soon, idle)

    def finish(self) -> None:
        self.stop.set()
        self.token.cancel()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture(params=["python", "c"])
def token(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[ReadToken]:
    # A lease long enough for a test to read after the grant on a loaded machine
    # (5 ms lapsed there before a new thread or the test's next line ran); the
    # tests of the lapse set their own.
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 1.0)
    if request.param == "c":
        if _c_read_here is None:
            pytest.skip("blockws' C speedups are not built")
        yield CReadToken()
    else:
        yield ReadToken()


def grant(token: ReadToken) -> threading.Event:
    """Ask for the right to read and wait until the reader grants it."""
    granted = threading.Event()
    assert token.read_here(lambda t: b"never", Sink(), 1.0, granted.set) is False
    assert token.wanted
    assert granted.wait(5), "not granted"
    return granted


def reads(*results: bytes | None | BaseException) -> Callable[[float | None], bytes | None]:
    queue = list(results)

    def read(timeout: float | None) -> bytes | None:
        result = queue.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    return read


def test_the_reader_keeps_the_right_until_a_caller_asks(token: ReadToken) -> None:
    assert token.before_read() is None  # nobody asked: the reader reads on
    assert not token.lent and not token.wanted
    sink = Sink()
    assert token.read_here(reads(b"x"), sink, 0, lambda: None) is False
    assert not token.wanted  # a caller that will not wait (timeout 0) does not ask
    assert sink.data == []


def test_a_caller_granted_the_right_reads_on_its_own_thread(token: ReadToken) -> None:
    reader = Reader(token)
    try:
        grant(token)
        assert token.lent
        sink = Sink()
        assert token.read_here(reads(b"one"), sink, 1.0, lambda: None) is True
        assert token.read_here(reads(None), sink, 1.0, lambda: None) is True  # nothing came
        me = threading.current_thread().name
        assert sink.data == [(b"one", me)]
    finally:
        reader.finish()


def test_the_right_lapses_back_after_a_lease_without_a_read(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 0.01)
    reader = Reader(token)
    try:
        grant(token)
        wait_lapsed(token)
        assert reader.ended == []  # the reader reads on
        # Not lent: this caller asks again rather than reading.
        assert token.read_here(reads(b"x"), Sink(), 1.0, lambda: None) is False
    finally:
        reader.finish()


def test_a_busy_caller_keeps_the_right_past_the_lease(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 0.005)
    reader = Reader(token)
    try:
        grant(token)

        def slow(timeout: float | None) -> bytes | None:
            time.sleep(0.05)  # ten leases inside one read
            assert token.lent
            return b"slow"

        sink = Sink()
        assert token.read_here(slow, sink, 1.0, lambda: None) is True
        assert sink.data[0][0] == b"slow"
    finally:
        reader.finish()


@pytest.mark.parametrize(
    ("result", "expected"),
    [(b"", None), (OSError("reset"), OSError)],
    ids=["eof", "error"],
)
def test_an_end_met_by_the_caller_is_handed_to_the_reader(
    token: ReadToken, result: bytes | BaseException, expected: type | None
) -> None:
    reader = Reader(token)
    try:
        grant(token)
        assert token.read_here(reads(result), Sink(), 1.0, lambda: None) is True
        reader.thread.join(5)
        assert len(reader.ended) == 1
        (exc,) = reader.ended[0]
        assert exc is result if expected is not None else exc is None
        # Reading has ended for good: nobody is granted it again.
        assert token.read_here(reads(b"x"), Sink(), 1.0, lambda: None) is False
        assert not token.wanted
    finally:
        reader.finish()


def test_a_sink_error_on_the_caller_ends_the_stream_through_the_reader(
    token: ReadToken,
) -> None:
    reader = Reader(token)
    try:
        grant(token)
        error = ValueError("bad frame handling")
        assert token.read_here(reads(b"x"), Sink(raises=error), 1.0, lambda: None) is True
        reader.thread.join(5)
        assert reader.ended == [(error,)]
    finally:
        reader.finish()


def test_an_interrupt_while_parsing_reaches_the_caller_and_ends_the_stream(
    token: ReadToken,
) -> None:
    reader = Reader(token)
    try:
        grant(token)
        interrupt = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            token.read_here(reads(b"x"), Sink(raises=interrupt), 1.0, lambda: None)
        reader.thread.join(5)
        ((lost,),) = reader.ended
        assert isinstance(lost, ConnectionLost) and lost.__cause__ is interrupt
    finally:
        reader.finish()


def test_an_interrupt_while_waiting_leaves_the_stream_going(token: ReadToken) -> None:
    reader = Reader(token)
    try:
        grant(token)
        with pytest.raises(KeyboardInterrupt):
            token.read_here(reads(KeyboardInterrupt()), Sink(), 1.0, lambda: None)
        assert token.read_here(reads(b"after"), Sink(), 1.0, lambda: None) is True
        assert reader.ended == []
    finally:
        reader.finish()


@pytest.mark.parametrize("kind", [list, deque])  # the transport's; a stand-in (C: Python's)
def test_bytes_read_before_an_interrupt_are_parsed_by_the_next_reader(
    token: ReadToken, kind: type
) -> None:
    """Probe "data loss on Ctrl-C" (issue 11, item 1): a KeyboardInterrupt just after
    the read returned (before parsing) threw the bytes away. They are now held until
    parsed: the next read parses them first, in order, and the socket goes on."""
    held = kind()

    def read_then_interrupted(timeout: float | None) -> bytes | None:
        held.extend([b"first"])  # what TCPTransport.read does, in one C-level step
        raise KeyboardInterrupt  # lands between the read and the parse

    reader = Reader(token)
    try:
        grant(token)
        sink = Sink()
        with pytest.raises(KeyboardInterrupt):
            token.read_here(read_then_interrupted, sink, 1.0, lambda: None, held)
        assert sink.data == [] and list(held) == [b"first"]
        assert token.read_here(reads(b"second"), sink, 1.0, lambda: None, held) is True
        assert token.read_here(reads(b"second"), sink, 1.0, lambda: None, held) is True
        assert [d for d, _ in sink.data] == [b"first", b"second"]
        assert not held and reader.ended == []
    finally:
        reader.finish()


def wait_lapsed(token: ReadToken, within: float = 5.0) -> float:
    """Wait until the right is back with the reader thread; returns when, monotonic
    (the reading is handed back by the reader's own thread: there is no event)."""
    deadline = time.monotonic() + within
    while token.lent:
        assert time.monotonic() < deadline, f"still lent after {within} s"
        time.sleep(0.001)
    return time.monotonic()


@contextlib.contextmanager
def a_caller_inside_a_read(token: ReadToken) -> Iterator[Callable[[], None]]:
    """The right granted, and another thread inside a read_here() until the function
    this yields is called (or the block ends)."""
    reader = Reader(token)
    try:
        grant(token)
        inside, leave = threading.Event(), threading.Event()

        def blocking(timeout: float | None) -> bytes | None:
            inside.set()
            assert leave.wait(5)
            return b"first"

        first = threading.Thread(target=token.read_here, args=(blocking, Sink(), 1.0, print))
        first.start()
        assert inside.wait(5)

        def release() -> None:
            leave.set()
            first.join(5)

        try:
            yield release
        finally:
            release()
    finally:
        reader.finish()


def test_a_second_caller_is_refused_while_the_first_reads(token: ReadToken) -> None:
    with a_caller_inside_a_read(token):
        assert token.read_here(reads(b"x"), Sink(), 1.0, lambda: None) is False


def test_cancel_takes_the_right_back_without_waiting_for_the_lease(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 60.0)
    reader = Reader(token)
    try:
        grant(token)
        started = time.monotonic()
        token.cancel()
        assert wait_lapsed(token) - started < 1, "cancel waited for the lease"
        assert token.read_here(reads(b"x"), Sink(), 1.0, lambda: None) is False
        assert not token.wanted  # no wish is noted after cancel
    finally:
        reader.finish()


class _InterruptOnRelease:
    """The token's lock, with a Ctrl-C landing just after it is let go once
    (a lock's ``__exit__`` is a call, after which an interrupt can land)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock  # the token's own (its Condition is made on it)
        self.armed = False

    def __enter__(self) -> bool:
        return self.lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # (The C read_here takes and lets go of the lock by these, as a lock's
    # __enter__ and __exit__ do.)
    def acquire(self) -> bool:
        return self.lock.acquire()

    def release(self) -> None:
        self.lock.release()
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def locked(self) -> bool:
        return self.lock.locked()


def test_an_interrupt_as_the_right_is_taken_leaves_it_free(token: ReadToken) -> None:
    """Found by the Ctrl-C test over wss:// in CI: an interrupt as read_here()
    let go of the lock, after marking itself busy, left the token busy for
    good; neither the caller nor the reader thread read again (a stall)."""
    reader = Reader(token)
    try:
        grant(token)
        lock = _InterruptOnRelease(token._lock)
        token._lock = lock  # type: ignore[assignment]
        lock.armed = True
        with pytest.raises(KeyboardInterrupt):
            token.read_here(reads(b"never read"), Sink(), 1.0, lambda: None)
        assert not token.busy
        sink = Sink()
        assert token.read_here(reads(b"after"), sink, 1.0, lambda: None) is True
        assert [data for data, _ in sink.data] == [b"after"]
        assert reader.ended == []
    finally:
        reader.finish()


# -- watch(): a thread waiting on many sockets (blockws.multiwait) ----------------------


def test_a_watch_asks_for_the_right_and_is_woken_by_the_grant(token: ReadToken) -> None:
    granted = threading.Event()
    assert token.watch(granted.set, time.monotonic() + 1) is False  # not lent: asked for
    assert token.wanted
    reader = Reader(token)
    try:
        assert granted.wait(5), "not granted"
        assert token.watch(granted.set, time.monotonic() + 1) is True
    finally:
        reader.finish()


def test_a_watch_holds_the_right_past_the_lease_until_it_runs_out(
    token: ReadToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blockws.readtoken.READ_LEASE", 0.01)
    reader = Reader(token)
    try:
        grant(token)
        watched_for = 0.3  # thirty leases, without a read
        start = time.monotonic()
        assert token.watch(lambda: None, start + watched_for) is True
        lapsed = wait_lapsed(token) - start
        assert lapsed >= watched_for - 0.01, f"lapsed after {lapsed:.3f} s"
        assert reader.ended == []  # the reader reads on
        # A new lend starts without the old watch.
        grant(token)
        assert token.watch(lambda: None, time.monotonic() - 1) is True
        wait_lapsed(token)
    finally:
        reader.finish()


def test_a_watch_is_refused_while_another_caller_reads(token: ReadToken) -> None:
    with a_caller_inside_a_read(token) as release:
        assert token.watch(lambda: None, time.monotonic() + 1) is False
        assert not token.wanted  # lent already: nothing to ask for
        release()
        assert token.watch(lambda: None, time.monotonic() + 1) is True


@pytest.mark.parametrize("how", ["cancelled", "ended"])
def test_no_watch_after_the_stream_ended_or_was_cancelled(token: ReadToken, how: str) -> None:
    reader = Reader(token)
    try:
        grant(token)
        if how == "cancelled":
            token.cancel()
        else:
            assert token.read_here(reads(b""), Sink(), 1.0, lambda: None) is True  # EOF
            reader.thread.join(5)
            assert reader.ended == [(None,)]
        assert token.watch(lambda: None, time.monotonic() + 1) is False
        assert not token.wanted
    finally:
        reader.finish()


def test_cancel_ends_a_watch_at_once(token: ReadToken) -> None:
    reader = Reader(token)
    try:
        grant(token)
        assert token.watch(lambda: None, time.monotonic() + 60) is True
        token.cancel()
        wait_lapsed(token, within=1.0)  # not the watch's 60 s
    finally:
        reader.finish()


# -- the C read_here: what it holds and lets go -------------------------------------------


def test_the_c_read_here_leaks_no_references() -> None:
    """Every path of the C function (declined, read and parsed, nothing came, an
    error from the read, from the sink, an end of stream, an interrupt in the
    read and in the parse) leaves every object it touched with the references
    it had, but those the token keeps on purpose (what ended the stream)."""
    import gc
    import sys

    if _c_read_here is None:
        pytest.skip("blockws' C speedups are not built")

    def lent() -> ReadToken:
        token = CReadToken()
        token._lent = True
        token._cond = threading.Condition(token._lock)
        return token

    data, error, interrupt, bad = b"payload", OSError("down"), KeyboardInterrupt(), ValueError()
    sink, failing, stopping = Sink(), Sink(raises=bad), Sink(raises=interrupt)
    watched = [data, error, interrupt, sink, failing, stopping]

    def one_of_each() -> None:
        ReadToken().read_here(reads(data), sink, 0, print)  # declined: not lent
        _c_read_here(ReadToken(), reads(data), sink, 0, print, None)
        _c_read_here(lent(), reads(data), sink, 1.0, print, None)
        _c_read_here(lent(), reads(None), sink, 1.0, print, [])
        _c_read_here(lent(), reads(data), failing, 1.0, print, [])
        _c_read_here(lent(), reads(error), sink, 1.0, print, [])
        _c_read_here(lent(), reads(b""), sink, 1.0, print, None)
        with contextlib.suppress(KeyboardInterrupt):
            _c_read_here(lent(), reads(interrupt), sink, 1.0, print, [])
        with contextlib.suppress(KeyboardInterrupt):
            _c_read_here(lent(), reads(data), stopping, 1.0, print, [])
        sink.data.clear()

    def settle() -> list[int]:
        # (an exception raised again keeps every frame it passed in its traceback)
        for exc in (error, interrupt, bad):
            exc.__traceback__ = None
            exc.__context__ = None
        gc.collect()
        return [sys.getrefcount(x) for x in watched]

    one_of_each()  # (first calls: the module's cached names and classes)
    before = settle()
    for _ in range(50):
        one_of_each()
    assert settle() == before
