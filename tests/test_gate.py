"""The C speedup's gated reads (``blockws._speedups.gated_recv`` and
``gated_recv_into``): a reader thread's blocking recv() that, once data has
come, waits for the GIL behind one process-wide gate, so that thousands of
reader threads woken at once do not all wait for the GIL (each of them waking
every 5 ms to ask for it). What they must do is what socket.recv does; the
load they are for is measured by W8 (``python -m benchmarks --workloads W8``:
2,000 sockets; before the gate, a quarter of the messages delivered and 79 %
of the CPU in the kernel on a 2-core VM)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

_speedups = pytest.importorskip("blockws._speedups", reason="the C speedup is not built")

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(
        not hasattr(_speedups, "gated_recv"), reason="no gated reads here (Windows)"
    ),
]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_reads_what_came_as_socket_recv_does(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"hello")
    assert _speedups.gated_recv(a, 100) == b"hello"
    b.sendall(b"0123456789")
    assert _speedups.gated_recv(a, 4) == b"0123"  # at most size
    buf = memoryview(bytearray(16))
    assert _speedups.gated_recv_into(a, buf) == 6
    assert bytes(buf[:6]) == b"456789"
    b.sendall(b"xy")
    assert _speedups.gated_recv_into(a, bytearray(1)) == 1
    assert _speedups.gated_recv(a, 0) == b""  # size 0: nothing asked, nothing read
    assert _speedups.gated_recv(a, 10) == b"y"
    b.shutdown(socket.SHUT_WR)
    assert _speedups.gated_recv(a, 10) == b""  # end of stream
    assert _speedups.gated_recv_into(a, bytearray(4)) == 0


@pytest.mark.parametrize("size", [1, 447, 448, 511, 512, 513, 4096, 65536])
def test_small_reads_through_the_stack_buffer_and_large_ones_alike(
    pair: tuple[socket.socket, socket.socket], size: int
) -> None:
    # Up to 512 bytes the read goes through a buffer in the C frame (no bytes
    # object held while the thread blocks); above, straight into the bytes.
    a, b = pair
    data = bytes(range(256)) * (size // 256 + 2)
    b.sendall(data[: size + 7])
    got = _speedups.gated_recv(a, size)
    assert got == data[:size] and type(got) is bytes
    assert _speedups.gated_recv(a, size + 7) == data[size : size + 7]  # a short read
    b.shutdown(socket.SHUT_WR)
    assert _speedups.gated_recv(a, size) == b""


def test_errors_are_socket_recvs(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="negative"):
        _speedups.gated_recv(a, -1)
    with pytest.raises(TypeError):
        _speedups.gated_recv_into(a, b"read-only")
    a.setblocking(False)  # as SO_RCVTIMEO running out: EAGAIN
    with pytest.raises(BlockingIOError):
        _speedups.gated_recv(a, 10)
    with pytest.raises(BlockingIOError):
        _speedups.gated_recv_into(a, bytearray(10))
    a.close()  # a closed socket's fileno() is -1, as socket.recv finds it
    with pytest.raises((ValueError, OSError)):
        _speedups.gated_recv(a, 10)
    with pytest.raises((ValueError, OSError)):
        _speedups.gated_recv_into(a, bytearray(10))


def test_a_signal_during_the_read_runs_its_handler(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """EINTR: the handler runs; if it raises, the read ends with its exception
    (Ctrl-C while a main thread reads); if not, the read goes on."""
    a, b = pair
    seen: list[int] = []

    class Interrupted(Exception):
        pass

    def raising(signum: int, frame: object) -> None:
        raise Interrupted

    def noting(signum: int, frame: object) -> None:
        seen.append(signum)
        if len(seen) == 1:
            b.sendall(b"after")  # what the read that goes on then gets

    old = signal.signal(signal.SIGALRM, raising)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            _speedups.gated_recv(a, 10)
        signal.signal(signal.SIGALRM, noting)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert _speedups.gated_recv(a, 10) == b"after"
        assert seen == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_many_readers_woken_at_once_all_read_their_own_data() -> None:
    """300 threads blocked in gated reads, data for all at once: each gets its
    own bytes and every thread ends (the gate serializes only the GIL wait)."""
    n = 300
    pairs = [socket.socketpair() for _ in range(n)]
    got: dict[int, bytes] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(n + 1)

    def reader(i: int, sock: socket.socket) -> None:
        try:
            started.wait()
            buf = bytearray(64)
            if i % 2:
                got[i] = _speedups.gated_recv(sock, 64)
            else:
                got[i] = bytes(buf[: _speedups.gated_recv_into(sock, buf)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=reader, args=(i, a), name=f"gate-{i}")
        for i, (a, _) in enumerate(pairs)
    ]
    try:
        for t in threads:
            t.start()
        started.wait()
        for i, (_, b) in enumerate(pairs):
            b.sendall(f"socket {i}".encode())
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        assert got == {i: f"socket {i}".encode() for i in range(n)}
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_forked_child_reads_through_a_gate_of_its_own(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The gate is remade in a forked child (os.register_at_fork, set up by
    blockws.transport): one held by a parent's thread at the fork would
    otherwise never be released there."""
    import warnings

    import blockws.transport  # noqa: F401 - registers the at-fork reset

    a, b = pair
    b.sendall(b"for the child")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0 if _speedups.gated_recv(a, 100) == b"for the child" else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
