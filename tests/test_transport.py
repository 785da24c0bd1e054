"""blockws.transport: the TCP transport over a socketpair, no server needed."""

from __future__ import annotations

import socket
import threading

import pytest

from blockws.exceptions import ConnectionLost
from blockws.transport import TCPTransport


class RecordingSink:
    def __init__(self, fail_on: bytes | None = None) -> None:
        self.data: list[bytes] = []
        self.lost: list[BaseException | None] = []
        self.fail_on = fail_on
        self.done = threading.Event()

    def data_received(self, data: bytes) -> None:
        if self.fail_on is not None and self.fail_on in data:
            raise MemoryError("sink failed")
        self.data.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.done.set()


def run_in_thread(transport: TCPTransport, sink: RecordingSink) -> threading.Thread:
    thread = threading.Thread(target=transport.run, args=(sink,))
    thread.start()
    return thread


def test_run_delivers_data_then_a_clean_eof() -> None:
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink()
    thread = run_in_thread(transport, sink)
    b.sendall(b"hello")
    b.close()
    assert sink.done.wait(5)
    thread.join(5)
    assert b"".join(sink.data) == b"hello" and sink.lost == [None]
    assert transport.bytes_read == 5
    transport.close()


def test_an_exception_in_the_sink_ends_the_stream_through_connection_lost() -> None:
    # Whatever the sink raises, the reader reports it rather than dying silently.
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink(fail_on=b"boom")
    thread = run_in_thread(transport, sink)
    b.sendall(b"boom")
    assert sink.done.wait(5)
    thread.join(5)
    assert len(sink.lost) == 1 and isinstance(sink.lost[0], MemoryError)
    transport.close()
    b.close()


def test_abort_from_another_thread_wakes_the_reader_as_eof() -> None:
    a, b = socket.socketpair()
    transport, sink = TCPTransport(a), RecordingSink()
    thread = run_in_thread(transport, sink)
    transport.abort()
    assert sink.done.wait(5)
    thread.join(5)
    assert sink.lost == [None] and transport.aborted
    transport.close()
    b.close()


def test_write_counts_bytes_and_a_reset_peer_raises_connection_lost() -> None:
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    transport.write([b"ab", b"cd"])
    assert b.recv(10) == b"abcd" and transport.bytes_written == 4
    b.close()
    with pytest.raises(ConnectionLost):
        for _ in range(100):  # the first writes may still land in the buffer
            transport.write([b"x" * 65536])
    transport.close()
