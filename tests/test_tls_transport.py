"""``TLSTransport``: TLS in memory over a plain TCP transport, against a real
TLS server (Python's ``ssl`` on the other end of a socket pair, with the
test CA's certificate).

What it must keep from the plain transport: bounded reads on the caller's
thread (``read``), with what they decrypt kept in ``held`` until parsed;
the reader thread's ``recv`` taking ``held`` first; the end of the stream
as ``b""`` (close_notify or a cut); our own abort as ``b""``; and
``TCPTransport.read_to`` handing bytes to the TLS buffer with the read.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from blockws.deadline import Deadline
from blockws.exceptions import ConnectionLost
from blockws.transport import TCPTransport, TLSTransport

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 10.0


class Peer:
    """The server end: an ``SSLSocket`` whose handshake runs on a thread."""

    def __init__(self, sock: socket.socket, certs: Any) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs.certfile, certs.keyfile)
        self.raw = sock
        self.tls: ssl.SSLSocket | None = None
        self._ctx = ctx
        self._thread = threading.Thread(target=self._accept, name="tls-peer")
        self._thread.start()

    def _accept(self) -> None:
        self.raw.settimeout(TIMEOUT)
        self.tls = self._ctx.wrap_socket(self.raw, server_side=True)

    def ready(self) -> ssl.SSLSocket:
        self._thread.join(TIMEOUT)
        assert self.tls is not None
        return self.tls


@pytest.fixture
def pair(tls_certs: Any) -> Iterator[tuple[TLSTransport, Peer]]:
    a, b = socket.socketpair()
    peer = Peer(b, tls_certs)
    transport = TLSTransport(TCPTransport(a), tls_certs.client_context(), "localhost")
    transport.handshake(Deadline(TIMEOUT))
    peer.ready()
    try:
        yield transport, peer
    finally:
        transport.close()
        peer.raw.close()
        if peer.tls is not None:
            peer.tls.close()


def test_a_bounded_read_waits_no_longer_than_its_timeout(
    pair: tuple[TLSTransport, Peer],
) -> None:
    transport, _ = pair
    assert transport.can_read_bounded and not transport.can_try_write
    for _ in range(3):  # the server's session tickets (TLS 1.3): records, no data
        assert transport.read(0.2) is None
    started = time.monotonic()
    assert transport.read(0.05) is None
    assert 0.04 <= time.monotonic() - started < 2.0
    assert transport.read(0) is None and transport.held == []


def test_records_come_decrypted_and_kept_until_parsed(pair: tuple[TLSTransport, Peer]) -> None:
    """Several records that came together are one chunk, kept in ``held``
    (the caller takes it off once parsed; the reader thread's recv takes it
    first if the caller was interrupted)."""
    transport, peer = pair
    tls = peer.ready()
    for i in range(5):
        tls.sendall(b"record %d;" % i)  # one TLS record each
    time.sleep(0.05)  # all five in the kernel's buffer
    data = transport.read(TIMEOUT)
    assert data == b"".join(b"record %d;" % i for i in range(5))
    assert transport.held == [data]
    assert transport.recv(TIMEOUT) is data  # held first, as an interrupted caller left it
    assert transport.held == []
    assert transport.bytes_read == len(data)


def test_a_message_over_many_records_comes_through_bounded_reads(
    pair: tuple[TLSTransport, Peer],
) -> None:
    """300 kB: many records, which the reads cut anywhere (a read that brought
    only part of a record returns None); every byte arrives, in order."""
    transport, peer = pair
    tls = peer.ready()
    sent = bytes(range(256)) * 1200
    writer = threading.Thread(target=tls.sendall, args=(sent,), name="tls-peer-writer")
    writer.start()
    got = bytearray()
    nones = 0
    deadline = time.monotonic() + TIMEOUT
    while len(got) < len(sent) and time.monotonic() < deadline:
        data = transport.read(0.5)
        if data is None:
            nones += 1
            continue
        got += data
        transport.held.clear()  # parsed
    writer.join(TIMEOUT)
    assert bytes(got) == sent


def test_the_end_of_the_stream_is_empty_bytes(pair: tuple[TLSTransport, Peer]) -> None:
    transport, peer = pair
    tls = peer.ready()
    tls.sendall(b"last words")
    tls.settimeout(0.2)
    with contextlib.suppress(OSError):
        tls.unwrap()  # sends close_notify, then waits for ours (never sent)
    got = b""
    for _ in range(10):
        data = transport.read(TIMEOUT)
        if data is None:
            continue
        if not data:
            break
        got += data
        transport.held.clear()
    else:
        pytest.fail("no end of stream")
    assert got == b"last words"
    assert transport.recv(TIMEOUT) == b""  # and again, for the reader thread


def test_a_cut_without_close_notify_is_the_end_too(tls_certs: Any) -> None:
    a, b = socket.socketpair()
    peer = Peer(b, tls_certs)
    transport = TLSTransport(TCPTransport(a), tls_certs.client_context(), "localhost")
    transport.handshake(Deadline(TIMEOUT))
    tls = peer.ready()
    tls.sendall(b"cut")
    socket.socket.shutdown(tls, socket.SHUT_RDWR)  # the TCP stream ends, no alert
    try:
        assert transport.recv(TIMEOUT) == b"cut"
        assert transport.recv(TIMEOUT) == b""
    finally:
        transport.close()
        tls.close()


def test_our_own_abort_reads_as_the_end(pair: tuple[TLSTransport, Peer]) -> None:
    transport, _ = pair
    results: list[bytes] = []
    reader = threading.Thread(target=lambda: results.append(transport.recv()), name="reader")
    reader.start()
    time.sleep(0.05)  # blocked in the outer transport's read
    transport.abort()
    reader.join(TIMEOUT)
    assert results == [b""] and transport.aborted
    assert transport.read(TIMEOUT) == b""


def test_writes_go_out_as_records_in_order(pair: tuple[TLSTransport, Peer]) -> None:
    transport, peer = pair
    tls = peer.ready()
    chunks = [b"a" * 100, memoryview(b"b" * 70_000), b"c"]
    transport.write(chunks)
    expected = b"".join(bytes(c) for c in chunks)
    got = b""
    tls.settimeout(TIMEOUT)
    while len(got) < len(expected):
        got += tls.recv(1 << 16)
    assert got == expected and transport.bytes_written == len(expected)


def test_a_corrupt_record_is_a_connection_loss(pair: tuple[TLSTransport, Peer]) -> None:
    transport, peer = pair
    peer.ready()
    # Bytes that are not a record of this session, straight onto the TCP stream.
    socket.socket.sendall(peer.ready(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    with pytest.raises(ConnectionLost, match="TLS error"):
        while True:
            if transport.read(TIMEOUT) == b"":
                pytest.fail("ended instead of failing")


@pytest.mark.parametrize("reader", ["read", "recv"])
def test_records_before_a_corrupt_one_are_handed_on_first(
    pair: tuple[TLSTransport, Peer], reader: str
) -> None:
    """Good records, then a bad one in the same read: the good ones' plaintext
    comes out, then the failure (nothing decrypted is dropped with it)."""
    transport, peer = pair
    tls = peer.ready()
    tls.sendall(b"good 1;")
    tls.sendall(b"good 2;")
    socket.socket.sendall(tls, b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    time.sleep(0.05)  # all three in the kernel's buffer: one read takes them
    got = b""
    with pytest.raises(ConnectionLost, match="TLS error"):
        for _ in range(20):
            data = transport.read(TIMEOUT) if reader == "read" else transport.recv(TIMEOUT)
            if data:
                got += data
                transport.held.clear()
    assert got == b"good 1;good 2;"


def test_read_to_hands_the_bytes_to_the_writer_with_the_read() -> None:
    a, b = socket.socketpair()
    transport = TCPTransport(a)
    got: list[bytes] = []

    def write(data: bytes) -> int:
        got.append(data)
        return len(data)

    try:
        assert transport.read_to(write, 0) is None and got == []
        b.sendall(b"hello")
        assert transport.read_to(write, TIMEOUT) == 5 and got == [b"hello"]
        assert transport.bytes_read == 5
        b.shutdown(socket.SHUT_WR)
        assert transport.read_to(write, TIMEOUT) == 0  # the end
        transport.abort()
        assert transport.read_to(write, TIMEOUT) == 0
    finally:
        transport.close()
        b.close()
