"""receive()'s own path: the messages a thread in receive() parses go straight
to the inbox when nothing is queued before them, in order, and a second thread
waiting in receive() is still woken for them. Over real TCP to the embedded
echo server (the read token is lent only over plain TCP)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from faultserver import OP_BINARY, Peer, fault_server, frame_bytes

import blockws
from blockws.delivery import Delivery
from blockws.server import EchoServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Any:
    with EchoServer() as srv:
        yield srv


def test_round_trips_through_receive_skip_the_dispatcher(
    server: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the read token is lent to receive(), its replies never take a
    dispatcher round (Delivery.messages): they arrive through the fast path."""
    through_dispatcher = []
    original = Delivery.messages

    def counting(self: Delivery, messages: list[Any], chunk: bool = False) -> int:
        through_dispatcher.extend(messages)
        return original(self, messages, chunk)

    monkeypatch.setattr(Delivery, "messages", counting)
    ws = blockws.connect(server.url, timeout=10, extensions=[])
    try:
        for i in range(300):
            ws.send(f"m{i}")
            assert ws.receive(10) == f"m{i}"
    finally:
        ws.close()
        assert ws.join(10)
    # The first few may come from the reader thread before the token is lent
    # (and a lease may lapse on a loaded machine), but most skip it.
    assert len(through_dispatcher) < 100, len(through_dispatcher)


def test_pipelined_messages_keep_their_order_across_both_paths(server: EchoServer) -> None:
    """Messages parsed by the reader thread (through the dispatcher) and by the
    thread in receive() (straight to the inbox) come out in the order sent."""
    ws = blockws.connect(server.url, timeout=10, extensions=[])
    try:
        got: list[Any] = []
        for burst in range(20):
            for i in range(50):
                ws.send(f"{burst}:{i}")
            for _ in range(50):
                got.append(ws.receive(10))
            if burst % 3 == 0:
                ws.update()  # nothing pending in receive() mode: a no-op, and harmless
    finally:
        ws.close()
        assert ws.join(10)
    assert got == [f"{b}:{i}" for b in range(20) for i in range(50)]


def test_a_second_thread_in_receive_is_woken_for_a_message_the_first_parsed(
    server: EchoServer,
) -> None:
    """Two threads in receive() on one socket: the one holding the token may
    parse two messages at once; the other, waiting, must be woken for the
    second, not sleep through its timeout with the message in the inbox."""
    ws = blockws.connect(server.url, timeout=10, extensions=[])
    total = 400
    got: list[list[Any]] = [[], []]
    slow: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    taken = [0]

    def consumer(k: int) -> None:
        import time

        try:
            while True:
                with lock:
                    if taken[0] >= total:
                        return
                    taken[0] += 1
                start = time.monotonic()
                got[k].append(ws.receive(30))
                took = time.monotonic() - start
                if took > 2.0:
                    slow.append(took)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    try:
        for i in range(total):
            ws.send(f"{i}")
    finally:
        for t in threads:
            t.join(60)
        ws.close()
        assert ws.join(10)
    assert not errors, errors
    assert not slow, f"a receive() slept {max(slow):.1f} s with a message ready"
    assert sorted(got[0] + got[1], key=int) == [f"{i}" for i in range(total)]
    for part in got:  # each thread saw its messages in order
        assert part == sorted(part, key=int)


def _dribble(release: threading.Event) -> Any:
    """A server that sends a 1 MiB message's first half in 8 pieces 0.1 s
    apart, then the rest once ``release`` is set."""

    def handler(peer: Peer) -> None:
        peer.handshake()
        wire = frame_bytes(OP_BINARY, bytes(1 << 20))
        half = len(wire) // 2
        for i in range(0, half, 1 << 16):
            peer.send(wire[i : min(i + (1 << 16), half)])
            time.sleep(0.1)
        release.wait(20)
        peer.send(wire[half:])
        peer.read_until_close()  # then hang up: the client's close ends at once

    return handler


@pytest.mark.parametrize("how", ["wait", "receive"])
def test_a_timeout_spans_every_read_of_a_message_that_comes_in_pieces(how: str) -> None:
    """wait() and receive() read once a chunk on the calling thread: the
    timeout bounds them all together, and a message whose last piece comes
    within it is delivered."""
    release = threading.Event()
    got: list[int] = []
    with fault_server(_dribble(release)) as server:
        options: dict[str, Any] = {"extensions": []}
        if how == "wait":
            options["on_binary"] = lambda ws, segment: got.append(len(segment))
        ws = blockws.connect(server.url, timeout=10, **options)
        try:
            started = time.monotonic()
            if how == "wait":
                assert ws.wait(0.5) is False
            else:
                with pytest.raises(TimeoutError):
                    ws.receive(0.5)
            took = time.monotonic() - started
            # Pieces still came at 0.5 s: a timeout counted from each read would
            # end 0.5 s after the last one, at 1.3 s.
            assert 0.5 <= took < 1.2, took
            release.set()
            if how == "wait":
                assert ws.wait(10) is True
                assert ws.update() == 1 and got == [1 << 20]
            else:
                assert ws.receive(10) == bytes(1 << 20)
        finally:
            release.set()
            ws.close()
            assert ws.join(10)
