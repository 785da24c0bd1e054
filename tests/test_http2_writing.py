"""The HTTP/2 connection's locking and writing, without sockets.

An :class:`H2Connection` runs over :class:`FakeTransport`, an in-memory transport whose
server side is the ``h2`` package's server state machine. Its writes can be held (a peer that
stops reading: the write blocks until released or aborted) or slowed down, so these tests
can check, deterministically, that resetting a stream and closing an idle connection never
wait for a socket write, that only a write that is stuck (not a slow one) gets its connection
aborted, and when streams are reset after the closing handshake.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

import blockws.http2
from blockws.deadline import Deadline
from blockws.exceptions import ConnectionLost
from blockws.handshake import Request
from blockws.http2 import H2Connection, H2Stream, HTTP2Settings

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

KiB = 1024
MiB = 1024 * KiB
CANCEL = h2.errors.ErrorCodes.CANCEL


class FakeTransport:
    """An in-memory transport; its far end is an ``h2`` server that accepts every extended
    CONNECT and records the frames' events (``resets``: stream id -> error code)."""

    can_try_write = False
    aborted = False
    sock = None

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.server = h2.connection.H2Connection(config)
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 64 * MiB,
        })
        self.server.initiate_connection()
        self.server.increment_flow_control_window(64 * MiB)
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.inbox.put(self.server.data_to_send())
        self.cond = threading.Condition()
        self.flowing = True  # False: writes block, as on a peer that stopped reading
        self.delay = 0.0  # seconds each write takes
        self.blocked = 0  # writes blocked right now
        self.written = 0  # bytes the server received
        self.resets: dict[int, int] = {}
        self.ended: set[int] = set()  # streams the client ended (END_STREAM)

    # -- the transport ---------------------------------------------------------------

    def write(self, chunks: Any) -> None:
        data = b"".join(bytes(c) for c in chunks)
        with self.cond:
            self.blocked += 1
            self.cond.notify_all()
            while not self.flowing and not self.aborted:
                self.cond.wait()
            self.blocked -= 1
            if self.aborted:
                raise ConnectionLost("aborted")
        if self.delay:
            time.sleep(self.delay)
        with self.cond:
            self.written += len(data)
            for event in self.server.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.server.send_headers(event.stream_id, [(b":status", b"200")])
                elif isinstance(event, h2.events.StreamReset):
                    self.resets.setdefault(event.stream_id, event.error_code)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
            self.cond.notify_all()
            self.send_from_server()

    def send_from_server(self) -> None:
        out = self.server.data_to_send()
        if out:
            self.inbox.put(out)

    def recv(self, timeout: float | None = None) -> bytes:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionLost("recv timed out") from None

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        self.inbox.put(b"")

    def close(self) -> None:
        pass

    # -- test helpers ------------------------------------------------------------------

    def hold(self) -> None:
        with self.cond:
            self.flowing = False

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(condition, timeout)


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = threading.Event()
        self.lost_at = 0.0
        self.lost_exc: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_exc, self.lost_at = exc, time.monotonic()
        self.lost.set()


@pytest.fixture
def fake() -> Iterator[FakeTransport]:
    transport = FakeTransport()
    yield transport
    transport.abort()


def connect(fake: FakeTransport, streams: int = 2,
            settings: HTTP2Settings | None = None) -> tuple[H2Connection, list[H2Stream]]:
    conn = H2Connection(fake, ("test",), settings or HTTP2Settings(idle_timeout=100.0))  # type: ignore[arg-type]
    conn.handshake(Deadline(5.0))
    opened = []
    for _ in range(streams):
        request = Request("ws://example.com/")
        conn.reserved += 1
        stream = conn.open_stream(request.parsed_url, request, [], Deadline(5.0), lambda t: None)
        stream.run(Sink())  # type: ignore[arg-type]
        opened.append(stream)
    return conn, opened


class Background:
    """Runs ``fn`` on a thread; ``join`` says whether it ended, keeps what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.ended_at = 0.0

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                self.error = exc
            self.ended_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def quick(fn: Callable[[], Any], limit: float = 0.5) -> None:
    """``fn`` returns within ``limit`` seconds (run on a thread, so a test of code that
    blocks fails instead of hanging)."""
    started = time.monotonic()
    call = Background(fn)
    assert call.join(limit), f"{fn} blocked"
    assert call.error is None, repr(call.error)
    assert call.ended_at - started < limit


# -- resets never wait for a write -------------------------------------------------------------


def test_reset_does_not_wait_for_a_stuck_write(fake: FakeTransport,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One stream's write is stuck in the socket. Aborting other streams, or that one, from
    any thread (the timer's) returns at once; a writer waiting for its turn is released at
    once; the stuck write itself gets the connection aborted ``_STUCK_WRITE`` s later."""
    monkeypatch.setattr(blockws.http2, "_STUCK_WRITE", 0.3)
    conn, (one, two) = connect(fake)
    fake.hold()
    stuck = Background(lambda: one.write([bytes(MiB)]))
    assert fake.wait_for(lambda: fake.blocked == 1)
    waiting = Background(lambda: two.write([b"x" * 100]))  # waits for the write turn
    assert not waiting.join(0.1)
    quick(two.abort)
    assert waiting.join(0.5), "the waiting writer was not released by its stream's reset"
    assert isinstance(waiting.error, ConnectionLost)
    aborted_at = time.monotonic()
    quick(one.abort)
    assert not stuck.join(0.1)  # still in the socket: a frame cannot be taken back
    assert stuck.join(2.0), "the stuck write of an aborted stream was never given up"
    assert isinstance(stuck.error, ConnectionLost)
    assert fake.aborted and 0.25 < stuck.ended_at - aborted_at < 1.5
    assert fake.wait_for(lambda: conn.dead is not None)
    assert "stuck" in str(conn.dead)


def test_a_slow_write_is_not_taken_for_a_stuck_one(fake: FakeTransport,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream aborted in the middle of a long, progressing write stops after the current
    piece; the connection goes on, and its reset reaches the server."""
    monkeypatch.setattr(blockws.http2, "_STUCK_WRITE", 0.2)
    monkeypatch.setattr(blockws.http2, "_PIECE", 64 * KiB)
    conn, (one, two) = connect(fake)
    fake.delay = 0.05  # per write: 2 MiB would take 32 writes, 1.6 s
    writing = Background(lambda: one.write([bytes(2 * MiB)]))
    assert fake.wait_for(lambda: fake.written > 128 * KiB)
    quick(one.abort)
    assert writing.join(0.5)
    assert isinstance(writing.error, ConnectionLost)
    time.sleep(0.4)  # past _STUCK_WRITE: the connection must still be up
    assert not fake.aborted and conn.dead is None
    fake.delay = 0.0
    quick(lambda: two.write([b"still fine"]), limit=2.0)
    assert fake.wait_for(lambda: fake.resets.get(one.stream_id) == CANCEL)
    assert fake.written < 2 * MiB


def test_reset_of_an_idle_stream_is_written_at_once(fake: FakeTransport) -> None:
    """Nobody else writes: the reset queued by abort() still goes out (a flusher)."""
    conn, (one, _two) = connect(fake)
    quick(one.abort)
    assert fake.wait_for(lambda: fake.resets.get(one.stream_id) == CANCEL, 2.0)


def test_idle_close_never_blocks_the_timer(fake: FakeTransport,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle check (a timer job) hands the close over; with the socket stuck, the GOAWAY
    is given up after ``_LINGER`` and the connection ends, its reader thread too."""
    monkeypatch.setattr(blockws.http2, "_LINGER", 0.2)
    conn, streams = connect(fake)
    for stream in streams:
        stream.close()
    fake.hold()
    armed = conn._idle_job  # run the idle check now instead of in 100 s
    assert armed is not None
    armed.cancel()
    quick(conn._idle_check, limit=0.1)
    assert fake.wait_for(lambda: fake.aborted, 2.0)
    assert conn._thread is not None
    conn._thread.join(2.0)
    assert not conn._thread.is_alive()


# -- the end of a stream after the closing handshake -------------------------------------------


def test_finish_closing_resets_after_the_grace(fake: FakeTransport) -> None:
    """A server that does not end the stream (hypercorn) gets RST_STREAM(CANCEL), not
    END_STREAM, ``_CLOSE_GRACE`` seconds after our last write; the socket hears the end then."""
    conn, (one, _two) = connect(fake)
    sink = Sink()
    one._sink = sink  # type: ignore[assignment]
    one.write([b"our close frame"])
    written = one._written_at
    quick(one.finish_closing, limit=0.1)
    assert fake.wait_for(lambda: one.stream_id in fake.resets, 2.0)
    assert sink.lost.wait(2.0) and sink.lost_exc is None
    assert sink.lost_at - written >= blockws.http2._CLOSE_GRACE - 0.01
    assert fake.resets[one.stream_id] == CANCEL and one.stream_id not in fake.ended


@pytest.mark.parametrize("how", ["end_stream", "reset_no_error"])
def test_finish_closing_lets_the_server_end_the_stream(fake: FakeTransport, how: str) -> None:
    """A server that ends the stream itself (nghttpx: END_STREAM, then RST_STREAM NO_ERROR)
    within the grace ends the socket at once, and the client resets nothing."""
    conn, (one, _two) = connect(fake)
    sink = Sink()
    one._sink = sink  # type: ignore[assignment]
    one.write([b"our close reply"])
    quick(one.finish_closing, limit=0.1)
    with fake.cond:
        if how == "end_stream":
            fake.server.end_stream(one.stream_id)
        else:
            fake.server.reset_stream(one.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        fake.send_from_server()
    assert sink.lost.wait(2.0) and sink.lost_exc is None
    assert sink.lost_at - one._written_at < blockws.http2._CLOSE_GRACE
    one.close()  # what the socket's teardown does
    time.sleep(blockws.http2._CLOSE_GRACE + 0.1)  # nothing is due any more
    if how == "reset_no_error":
        assert one.stream_id not in fake.resets
    else:
        # The server only half-closed it: the teardown closes our half, with CANCEL.
        assert fake.resets.get(one.stream_id) in (None, CANCEL)
    assert one.stream_id not in fake.ended
