"""The send side (blockws.sender.Sender) driven directly over a memory transport:
queue order, control frames first, buffered_amount, segments, direct writes,
large messages, the close callback, failures and the writer thread's life."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, Callable

import pytest
from memory import MemoryTransport

import blockws
import blockws.frames as frames_module
import blockws.sender as sender_module
from blockws.buffers import BufferPool, BufferSegment
from blockws.deflate import PerMessageDeflate
from blockws.frames import Frame, Opcode, pack_close
from blockws.log import ContextAdapter
from blockws.protocol import Protocol, Role, batch_room
from blockws.sender import DIRECT_MAX, UNCOMPRESSED, WRITE_BATCH, Sender
from blockws.sendqueue import PySendQueue, SendQueue, c_SendQueue
from blockws.transport import TCPTransport

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]

WAIT = 5.0
TEXT, BINARY = int(Opcode.TEXT), int(Opcode.BINARY)
DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll briefly: no event says "the writer has counted a batch off"."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def masked_close(code: int = 1000) -> bytes:
    """A client's close frame, as the protocol queues a close reply."""
    return Frame(Opcode.CLOSE, pack_close(code)).serialize(b"\x01\x02\x03\x04")


class TryWriteTransport(MemoryTransport):
    """A memory transport that takes non-blocking writes: ``take`` bytes of each
    (``None``: all of it), as a kernel with a nearly full buffer would."""

    can_try_write = True

    def __init__(self, take: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.take = take
        self.try_writes: list[int] = []  # the size offered to each try_write

    def try_write(self, chunks: Sequence[Any]) -> int:
        data = b"".join(bytes(c) for c in chunks)
        self.try_writes.append(len(data))
        n = len(data) if self.take is None else min(self.take, len(data))
        self.bytes_written += n
        with self._cond:
            self._written += data[:n]
            self._cond.notify_all()
        return n


class HookTransport(MemoryTransport):
    """A memory transport that calls ``hook(index)`` before each write and keeps
    the size of every write and the chunks it was given. With ``gathers`` it
    says it writes many chunks with one system call (as plain TCP does)."""

    def __init__(self, hook: Callable[[int], None] | None = None, gathers: bool = False) -> None:
        super().__init__()
        self.hook = hook
        self.gathers = gathers
        self.writes: list[int] = []
        self.chunks: list[list[Any]] = []

    def write(self, chunks: Sequence[Any]) -> None:
        if self.hook is not None:
            self.hook(len(self.writes))
        self.writes.append(sum(len(c) for c in chunks))
        self.chunks.append(list(chunks))
        super().write(chunks)


class FailingTransport(MemoryTransport):
    """Every write fails, as on a reset connection."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def write(self, chunks: Sequence[Any]) -> None:
        self.attempts += 1
        raise blockws.ConnectionLost("connection reset (test)")


class Rig:
    """A Sender with its lock, protocol and transport, and what its callbacks saw."""

    def __init__(self, transport: MemoryTransport, proto: Protocol) -> None:
        self.lock = threading.Lock()
        self.transport = transport
        self.proto = proto
        self.failures: list[BaseException] = []
        self.close_written: list[list[int]] = []  # opcodes written when the callback ran
        self.events = threading.Condition()
        self.sender = Sender(
            "sender-test-writer", self.lock, ContextAdapter({}), self._failed, self._closed
        )
        self.sender.attach(proto, transport)
        self.threads: list[threading.Thread] = []

    def _failed(self, sender: Sender, exc: BaseException) -> None:
        with self.events:
            # What the test checks: a failure the sender reported about another one is wrong.
            self.failures.append(exc if sender is self.sender else AssertionError(sender))
            self.events.notify_all()

    def _closed(self, sender: Sender) -> None:
        with self.events:
            frames = [f.opcode for f in self.transport.frames()]
            self.close_written.append(frames if sender is self.sender else [-1])
            self.events.notify_all()

    def wait_event(self, test: Callable[[], bool]) -> None:
        with self.events:
            assert self.events.wait_for(test, WAIT), "callback not called"

    def enqueue(self, opcode: int, payload: Any, segment: BufferSegment | None = None) -> bool:
        """What SendQueue.push does (the socket open): queue, or write directly. True if direct."""
        with self.lock:
            direct = self.sender.queue.push_locked(opcode, payload, segment, len(payload))
            self._note_thread()
        if direct:
            self.sender.direct_write(opcode, payload, segment)
        return direct

    def control(self, *frames: bytes) -> None:
        with self.lock:
            self.sender.control_locked(list(frames))
            self._note_thread()

    def ping(self, payload: bytes = b"p") -> None:
        self.control(self.proto.encode_control(Opcode.PING, payload))

    def _note_thread(self) -> None:
        thread = self.sender.thread
        if thread is not None and thread not in self.threads:
            self.threads.append(thread)

    def wait_frames(self, count: int) -> list[Frame]:
        return self.transport.wait_for(lambda fs: len(fs) >= count)

    def wait_idle(self) -> None:
        """Until everything accepted has been written and counted off."""
        wait_until(lambda: self.sender.buffered == 0 and not self.sender.writing)

    def stop(self) -> threading.Thread | None:
        with self.lock:
            return self.sender.stop_locked()


@pytest.fixture
def rigs() -> Iterator[Callable[..., Rig]]:
    """Make rigs; every writer thread is stopped and joined at teardown."""
    made: list[Rig] = []

    def make(transport: MemoryTransport | None = None, **proto_options: Any) -> Rig:
        rig = Rig(transport or MemoryTransport(), Protocol(Role.CLIENT, **proto_options))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        thread = rig.stop()
        rig.transport.unblock_writes()
        for t in [*rig.threads, *([thread] if thread else [])]:
            if t.ident is None:
                continue  # never started (an interrupted start)
            t.join(WAIT)
            assert not t.is_alive(), "writer thread did not end"


def payloads(frames: list[Frame]) -> list[bytes]:
    return [f.payload for f in frames]


# -- order ------------------------------------------------------------------------------


def test_messages_are_written_in_queue_order(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    sent = [f"message {i}".encode() for i in range(40)]
    for i, payload in enumerate(sent):
        assert rig.enqueue(TEXT if i % 2 else BINARY, payload) is False  # no direct writes here
    frames = rig.wait_frames(len(sent))
    assert payloads(frames) == sent
    assert [f.opcode for f in frames] == [TEXT if i % 2 else BINARY for i in range(40)]
    assert all(f.fin for f in frames)


def test_control_frames_go_ahead_of_queued_messages(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    with rig.lock:  # the writer cannot start until all three are queued
        rig.sender.queue.push_locked(TEXT, b"first", None, 5)
        rig.sender.queue.push_locked(TEXT, b"second", None, 6)
        rig.sender.control_locked([rig.proto.encode_control(Opcode.PING, b"ping!")])
        rig._note_thread()
    frames = rig.wait_frames(3)
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.PING, b"ping!"),
        (Opcode.TEXT, b"first"),
        (Opcode.TEXT, b"second"),
    ]


def test_control_frames_queued_during_a_write_go_before_later_messages(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs(MemoryTransport(block_writes=True))
    rig.enqueue(TEXT, b"in flight")
    assert rig.transport.write_started.wait(WAIT)  # the writer holds "in flight"
    rig.enqueue(TEXT, b"queued 1")
    rig.enqueue(TEXT, b"queued 2")
    rig.ping(b"p1")
    rig.control(rig.proto.encode_control(Opcode.PONG, b"p2"))
    rig.transport.unblock_writes()
    frames = rig.wait_frames(5)
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.TEXT, b"in flight"),
        (Opcode.PING, b"p1"),
        (Opcode.PONG, b"p2"),
        (Opcode.TEXT, b"queued 1"),
        (Opcode.TEXT, b"queued 2"),
    ]


def test_close_frame_goes_behind_messages_queued_before_it(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    close = rig.proto.encode_close(1000, "bye")
    with rig.lock:
        rig.sender.queue.push_locked(TEXT, b"one", None, 3)
        rig.sender.queue.push_locked(BINARY, b"two", None, 3)
        rig.sender.close_frame_locked(close)
        rig.sender.control_locked([rig.proto.encode_control(Opcode.PING, b"late ping")])
        rig._note_thread()
    frames = rig.wait_frames(4)
    assert [f.opcode for f in frames] == [Opcode.PING, Opcode.TEXT, Opcode.BINARY, Opcode.CLOSE]
    assert frames[-1].payload == pack_close(1000, "bye")


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
def test_runs_of_messages_break_at_close_frames_and_fragmented_messages(
    rigs: Callable[..., Rig], deflate: bool
) -> None:
    """One batch through the writer: without extensions its runs of
    one-frame messages are encoded a run at a time (Protocol.encode_messages),
    and what ends a run -- a message that needs fragments, one larger than a
    write batch, the close frame -- goes on its own, in queue order. With
    permessage-deflate every message goes on its own and the large ones are
    compressed."""
    extensions = []
    if deflate:
        extension = PerMessageDeflate()
        extension.accept([])
        extensions.append(extension)
    rig = rigs(extensions=extensions)
    fragment = rig.proto.max_fragment_size
    queued: list[tuple[int, bytes]] = [
        (TEXT, b"one"),
        (BINARY, bytes(range(200))),
        (BINARY, b"f" * (fragment + 1)),  # two fragments
        (BINARY | UNCOMPRESSED, b"u" * 1000),
        (TEXT, b"two"),
        (BINARY, b"L" * (WRITE_BATCH + 5)),  # larger than a write batch
        (BINARY, b""),
        (TEXT, b"three"),
    ]
    close = rig.proto.encode_close(1000, "bye")
    with rig.lock:  # all in one batch: the writer starts once they are queued
        for opcode, payload in queued:
            rig.sender.queue.push_locked(opcode, payload, None, len(payload))
        rig.sender.close_frame_locked(close)
        rig._note_thread()
    frames = rig.transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    rig.wait_idle()
    assert all(len(frame.payload) <= fragment for frame in frames)
    messages: list[tuple[int, bytes, int]] = []
    for frame in frames:
        if frame.opcode == Opcode.CONT:
            opcode, data, rsv = messages[-1]
            messages[-1] = (opcode, data + frame.payload, rsv)
        else:
            messages.append((frame.opcode, frame.payload, frame.rsv))
    assert messages[-1] == (Opcode.CLOSE, pack_close(1000, "bye"), 0)
    got = messages[:-1]
    if deflate:  # the server's side of RFC 7692: one context for every message
        inflater = zlib.decompressobj(-15)
        got = [(o, inflater.decompress(p + b"\x00\x00\xff\xff") if r else p, r) for o, p, r in got]
    assert [(o, p) for o, p, _r in got] == [(o & 0xF, p) for o, p in queued]
    compressed = [bool(r) for _o, _p, r in got]
    if deflate:
        assert compressed == [False, True, True, False, False, True, False, False]
    else:
        assert not any(compressed)


# -- buffered_amount ---------------------------------------------------------------------


def test_buffered_counts_queued_payload_bytes_until_written(rigs: Callable[..., Rig]) -> None:
    rig = rigs(MemoryTransport(block_writes=True))
    assert rig.sender.buffered == 0
    rig.enqueue(BINARY, b"x" * 1000)
    assert rig.transport.write_started.wait(WAIT)
    rig.enqueue(TEXT, b"y" * 250)
    rig.enqueue(BINARY, b"z" * 10)
    assert rig.sender.buffered == 1260  # payload bytes: the batch in flight too
    rig.ping()  # control frames count as their bytes on the wire
    assert rig.sender.buffered == 1260 + 2 + 4 + 1
    rig.transport.unblock_writes()
    rig.wait_frames(4)
    rig.wait_idle()
    assert rig.sender.buffered == 0


def pong(proto: Protocol, payload: bytes) -> bytes:
    return proto.encode_control(Opcode.PONG, payload)


def test_pongs_queued_while_a_write_is_under_way_keep_only_the_newest(
    rigs: Callable[..., Rig],
) -> None:
    """Probe "pong queue without bound" (issue 11, item 3): a server floods pings
    and never reads. While the writer is stuck, each new pong replaces the one
    still waiting (RFC 6455 5.5.3), and the pending pong counts in buffered."""
    rig = rigs(MemoryTransport(block_writes=True))
    rig.enqueue(BINARY, b"x" * 100)
    assert rig.transport.write_started.wait(WAIT)  # the writer is stuck in write()
    for i in range(1000):
        rig.control(pong(rig.proto, b"%d" % i))
    rig.control(*[pong(rig.proto, b"batch-%d" % i) for i in range(50)])
    rig.ping(b"mine")  # other control frames are kept
    assert len(rig.sender.control) == 2
    assert rig.sender.buffered == 100 + len(pong(rig.proto, b"batch-49")) + 2 + 4 + 4
    rig.transport.unblock_writes()
    frames = rig.wait_frames(3)
    rig.wait_idle()
    assert [(f.opcode, f.payload) for f in frames[1:]] == [
        (Opcode.PONG, b"batch-49"),
        (Opcode.PING, b"mine"),
    ]
    assert rig.sender.buffered == 0


def test_pongs_that_arrive_while_the_writer_is_idle_all_go_out(rigs: Callable[..., Rig]) -> None:
    """Every ping of one read is answered when nothing is being written (Autobahn 2.10)."""
    rig = rigs()
    rig.control(*[pong(rig.proto, b"payload-%d" % i) for i in range(10)])
    frames = rig.wait_frames(10)
    assert [f.payload for f in frames] == [b"payload-%d" % i for i in range(10)]
    rig.wait_idle()
    assert rig.sender.buffered == 0


# -- segments and drop -------------------------------------------------------------------


def test_segments_are_released_once_written(rigs: Callable[..., Rig]) -> None:
    pool = BufferPool()
    rig = rigs()
    segments = []
    for i in range(3):
        segment = pool.get(1000)
        segment.data[:1000] = bytes([i]) * 1000
        segments.append(segment)
    for segment in segments:
        rig.enqueue(BINARY, segment.view(), segment)
    frames = rig.wait_frames(3)
    assert payloads(frames) == [bytes([i]) * 1000 for i in range(3)]
    wait_until(lambda: all(s.released for s in segments))
    assert pool.pooled_bytes == 3 * 1024  # back in the pool's 1 KiB class


def test_a_batch_mixing_segments_and_plain_payloads_releases_each_segment_once(
    rigs: Callable[..., Rig],
) -> None:
    """One writer batch with segments and bytes alike (the queue flags that
    the batch holds segments; only those are released)."""
    pool = BufferPool()
    rig = rigs(MemoryTransport(block_writes=True))
    rig.enqueue(TEXT, b"first")  # the writer blocks in its write: the rest queue up
    assert rig.transport.write_started.wait(WAIT)
    segment = pool.get(100)
    segment.data[:100] = b"s" * 100
    size_class = len(segment.data)
    rig.enqueue(BINARY, b"plain")
    rig.enqueue(BINARY, segment.view(), segment)
    rig.enqueue(BINARY, b"after")
    assert not segment.released
    rig.transport.unblock_writes()
    rig.wait_idle()
    assert payloads(rig.transport.frames()) == [b"first", b"plain", b"s" * 100, b"after"]
    wait_until(lambda: segment.released)
    assert pool.pooled_bytes == size_class  # back in the pool, once


def test_a_queue_without_a_socket_refuses_with_invalid_state(rigs: Callable[..., Rig]) -> None:
    """A Sender made without ``refused`` (as the tests make it) refuses a
    push while it is not open with a plain InvalidState."""
    rig = rigs()
    with pytest.raises(blockws.InvalidState, match="not open"):
        rig.sender.queue.push(BINARY, b"x", None, 1)
    assert rig.sender.buffered == 0 and not rig.lock.locked()


def test_drop_discards_queued_messages_and_releases_their_segments(
    rigs: Callable[..., Rig],
) -> None:
    pool = BufferPool()
    rig = rigs(MemoryTransport(block_writes=True))
    in_flight = pool.get(300)
    in_flight.data[:300] = b"a" * 300
    rig.enqueue(BINARY, in_flight.view(), in_flight)
    assert rig.transport.write_started.wait(WAIT)
    queued = [pool.get(500), pool.get(600)]
    for segment in queued:
        rig.enqueue(BINARY, segment.view(), segment)
    rig.enqueue(TEXT, b"plain")
    assert rig.sender.buffered == 300 + 500 + 600 + 5
    with rig.lock:
        assert rig.sender.drop_locked() == 3
        assert rig.sender.drop_locked() == 0
    assert all(s.released for s in queued)
    assert pool.pooled_bytes == 512 + 1024
    assert not in_flight.released  # being written: the writer releases it
    assert rig.sender.buffered == 300  # the batch in flight is counted off by the writer
    rig.transport.unblock_writes()
    rig.wait_idle()
    assert payloads(rig.transport.frames()) == [b"a" * 300]
    wait_until(lambda: in_flight.released)


# -- direct writes -----------------------------------------------------------------------


def test_direct_write_happens_on_the_callers_thread(rigs: Callable[..., Rig]) -> None:
    rig = rigs(TryWriteTransport())
    assert rig.enqueue(TEXT, b"request") is True
    assert payloads(rig.transport.frames()) == [b"request"]  # written before enqueue returned
    assert rig.sender.thread is None and rig.sender.buffered == 0
    assert rig.sender.queue.direct_ok is False
    # The next send goes through the writer, until a reply (or idleness) allows direct ones.
    assert rig.enqueue(TEXT, b"burst") is False
    rig.wait_frames(2)
    rig.wait_idle()
    rig.sender.queue.direct_ok = True  # what Connection.data_received does
    assert rig.enqueue(TEXT, b"after reply") is True
    assert payloads(rig.transport.frames()) == [b"request", b"burst", b"after reply"]


def test_direct_write_is_skipped_for_large_or_compressed_messages(
    rigs: Callable[..., Rig],
) -> None:
    transport = TryWriteTransport()
    rig = rigs(transport)
    with rig.lock:
        assert (
            rig.sender.queue.push_locked(BINARY, b"x" * (DIRECT_MAX + 1), None, DIRECT_MAX + 1)
            is False
        )
        rig._note_thread()
    rig.wait_frames(33)  # 1 MiB + 1 in 32 KiB fragments
    rig.wait_idle()
    assert transport.try_writes == []

    deflate = PerMessageDeflate()
    deflate.accept([])
    rig = rigs(TryWriteTransport(), extensions=[deflate])
    big = b"compress me " * 100  # above min_size: compressed, on the writer thread
    assert rig.enqueue(TEXT, big) is False
    frames = rig.wait_frames(1)
    assert frames[0].rsv & 0x40  # RSV1: compressed
    rig.wait_idle()
    rig.sender.queue.direct_ok = True
    assert rig.enqueue(TEXT | UNCOMPRESSED, big) is True  # not compressed: may go directly
    rig.sender.queue.direct_ok = True
    assert rig.enqueue(TEXT, b"tiny") is True  # below min_size: sent uncompressed
    frames = rig.transport.frames()
    assert [(f.payload, f.rsv) for f in frames[1:]] == [(big, 0), (b"tiny", 0)]


def test_partial_direct_write_rest_goes_first_then_later_messages(
    rigs: Callable[..., Rig],
) -> None:
    pool = BufferPool()
    transport = TryWriteTransport(take=10, block_writes=True)
    rig = rigs(transport)
    segment = pool.get(1000)
    segment.data[:1000] = bytes(range(250)) * 4
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, 1000) is True
    # Another thread queues a message while the direct write is under way.
    assert rig.enqueue(TEXT, b"later") is False
    assert rig.sender.buffered == 5
    rig.sender.direct_write(BINARY, segment.view(), segment)
    assert segment.released  # its bytes were copied into the frame
    assert transport.try_writes == [1008]  # 4-byte header + 4-byte mask + 1000
    assert len(transport.written()) == 10
    assert rig.sender.buffered == 5 + 1008 - 10  # the rest counts until written
    transport.unblock_writes()
    frames = rig.wait_frames(2)
    assert [(f.opcode, f.payload) for f in frames] == [
        (Opcode.BINARY, bytes(range(250)) * 4),
        (Opcode.TEXT, b"later"),
    ]
    rig.wait_idle()
    assert rig.sender.buffered == 0


class CappedTransport(TryWriteTransport):
    """Takes non-blocking writes whole until ``cap`` bytes in all, then the part
    that fits, then nothing: a kernel buffer filling up."""

    def __init__(self, cap: int, **options: Any) -> None:
        super().__init__(**options)
        self.cap = cap

    def try_write(self, chunks: Sequence[Any]) -> int:
        self.take = max(0, self.cap - len(self.written()))
        return super().try_write(chunks)


ONE_MIB = 1 << 20
BATCH_BYTES = 8 * (4 + 4 + 32768)  # a client's batch: 8 masked fragments of 32 KiB


def test_a_large_direct_write_goes_a_batch_at_a_time_on_the_callers_thread(
    rigs: Callable[..., Rig],
) -> None:
    transport = TryWriteTransport()
    rig = rigs(transport)
    message = bytes(range(256)) * 4096  # 1 MiB: 32 fragments, 4 batches
    assert WRITE_BATCH < len(message) <= DIRECT_MAX
    assert rig.enqueue(BINARY, message) is True
    assert transport.try_writes == [BATCH_BYTES] * 4  # one non-blocking write a batch
    frames = transport.frames()  # all written before enqueue returned
    assert [f.opcode for f in frames] == [Opcode.BINARY] + [Opcode.CONT] * 31
    assert [f.fin for f in frames] == [False] * 31 + [True]
    assert b"".join(payloads(frames)) == message
    assert rig.sender.thread is None and rig.sender.buffered == 0
    assert rig.sender.unfinished is None and rig.sender.queue.direct_ok is False


def test_a_large_direct_write_the_kernel_cuts_leaves_the_rest_to_the_writer(
    rigs: Callable[..., Rig],
) -> None:
    """The caller's thread stops at the first batch the kernel takes in part; the
    writer sends what is left of it, then the other batches, with a ping that
    came meanwhile between two of them; the segment is released at the end."""
    cap = BATCH_BYTES + 5000
    transport = CappedTransport(cap, block_writes=True)
    rig = rigs(transport)
    pool = BufferPool()
    segment = pool.get(ONE_MIB)
    message = bytes(range(251)) * (ONE_MIB // 251) + bytes(ONE_MIB % 251)
    segment.data[:ONE_MIB] = message
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, ONE_MIB) is True
    rig.sender.direct_write(BINARY, segment.view(), segment)
    rig._note_thread()
    assert transport.try_writes == [BATCH_BYTES, BATCH_BYTES]  # the second taken in part
    assert len(transport.written()) == cap
    assert not segment.released  # the writer still encodes from it
    # Counted: the second batch's rest on the wire, the two unencoded batches' payload.
    assert rig.sender.buffered == (2 * BATCH_BYTES - cap) + ONE_MIB // 2
    rig.ping(b"meanwhile")
    transport.unblock_writes()
    frames = rig.wait_frames(33)
    data = [f for f in frames if f.opcode in DATA_OPCODES]
    pings = [i for i, f in enumerate(frames) if f.opcode == Opcode.PING]
    assert len(pings) == 1 and 16 <= pings[0] <= 24  # after the cut batch, between batches
    assert [f.opcode for f in data] == [Opcode.BINARY] + [Opcode.CONT] * 31
    assert [f.fin for f in data] == [False] * 31 + [True]
    assert b"".join(payloads(data)) == message
    rig.wait_idle()
    assert rig.sender.buffered == 0 and rig.sender.unfinished is None
    wait_until(lambda: segment.released)
    assert not rig.failures


class GatheringCapped(CappedTransport):
    """CappedTransport, saying it writes gathered chunks with one system call
    and is done with them when the call returns (plain TCP): large messages
    are then encoded into a pooled buffer."""

    gathers = True


def test_large_direct_writes_reuse_one_pooled_buffer(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 1 MiB messages the kernel takes whole: each batch is written from
    the same pooled buffer, which goes back to the pool after each message."""
    if frames_module.encode_frames_into is None:
        pytest.skip("without the C speedups the frames are sent as made")
    pool: list[bytearray] = []
    monkeypatch.setattr(sender_module, "_pool", pool)
    transport = GatheringCapped(1 << 30)
    rig = rigs(transport)
    first, second = bytes(range(256)) * 4096, bytes(range(255, -1, -1)) * 4096
    assert rig.enqueue(BINARY, first) is True
    assert len(pool) == 1
    buffer = pool[0]
    rig.sender.queue.direct_ok = True  # (as a reply arriving sets it)
    assert rig.enqueue(BINARY, second) is True
    assert pool == [buffer] and pool[0] is buffer
    assert transport.try_writes == [BATCH_BYTES] * 8
    data = [f for f in transport.frames() if f.opcode in DATA_OPCODES]
    assert b"".join(payloads(data)) == first + second
    assert rig.sender.buffered == 0


@pytest.mark.parametrize("fragment", [600_000, 1 << 20])
def test_fragments_larger_than_a_batch_are_encoded_into_a_pooled_buffer_too(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch, fragment: int
) -> None:
    """With max_fragment_size above WRITE_BATCH (up to POOLED_FRAGMENT_MAX) a
    batch is one fragment, masked into the pooled buffer, not into fresh
    memory (which made a 1 MiB echo fault its pages in again every message):
    here a message of one fragment and one of several, the same buffer for
    both, back in the pool after each."""
    if frames_module.encode_frames_into is None:
        pytest.skip("without the C speedups the frames are sent as made")
    assert WRITE_BATCH < fragment <= sender_module.POOLED_FRAGMENT_MAX
    pool: list[bytearray] = []
    monkeypatch.setattr(sender_module, "_pool", pool)
    transport = GatheringCapped(1 << 30)
    rig = rigs(transport, max_fragment_size=fragment)
    one = bytes(range(256)) * 2000
    several = bytes(range(255, -1, -1)) * (fragment // 256 + 1000)
    assert WRITE_BATCH < len(one) <= fragment < len(several)
    assert rig.enqueue(BINARY, one) is True  # written directly
    assert len(pool) == 1 and len(pool[0]) == batch_room(WRITE_BATCH, fragment)
    buffer = pool[0]
    rig.sender.queue.direct_ok = True  # (as a reply arriving sets it)
    rig.enqueue(BINARY, several)  # directly, or by the writer (above DIRECT_MAX)
    rig.wait_idle()
    assert pool == [buffer] and pool[0] is buffer
    data = [f for f in transport.frames() if f.opcode in DATA_OPCODES]
    assert [len(f.payload) for f in data] == [len(one)] + [
        min(fragment, len(several) - i) for i in range(0, len(several), fragment)
    ]
    assert b"".join(payloads(data)) == one + several
    assert rig.sender.buffered == 0


def test_fragments_above_the_pooled_limit_get_a_pooled_buffer_for_pieces() -> None:
    """Above POOLED_FRAGMENT_MAX a batch is a piece of a fragment: any pooled
    buffer of a batch and a header will do (none without the C speedups)."""
    proto = Protocol(Role.CLIENT, max_fragment_size=sender_module.POOLED_FRAGMENT_MAX + 1)
    buf = sender_module._batch_buffer(proto, TryWriteTransport())
    if frames_module.encode_piece_into is None or frames_module.encode_frames_into is None:
        assert buf is None
    else:
        assert buf is not None and len(buf) >= WRITE_BATCH + 14


BIG_FRAGMENT = sender_module.POOLED_FRAGMENT_MAX + 4000


def pieces_pooled() -> bool:
    """Whether fragments above the pooled limit go in pieces (the C speedups)."""
    proto = Protocol(Role.CLIENT, max_fragment_size=BIG_FRAGMENT)
    return sender_module._batch_buffer(proto, TryWriteTransport()) is not None


def test_fragments_above_the_pooled_limit_go_in_pieces_with_control_frames_between_frames(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer sends a fragment larger than POOLED_FRAGMENT_MAX in pieces
    of a batch, masked into one pooled buffer (no fresh memory a fragment);
    a ping queued during the first piece waits for the first frame's end:
    nothing goes out inside a frame."""
    if not pieces_pooled():
        pytest.skip("without the C speedups the frames are sent as made")
    pool: list[bytearray] = []
    monkeypatch.setattr(sender_module, "_pool", pool)
    rig: Rig

    def hook(index: int) -> None:
        if index == 0:  # during the first piece
            rig.ping(b"between")

    transport = HookTransport(hook, gathers=True)
    rig = rigs(transport, max_fragment_size=BIG_FRAGMENT)
    message = bytes(range(251)) * (5 * ONE_MIB // 2 // 251)  # 3 fragments, the last shorter
    rig.enqueue(BINARY, message)
    frames = rig.wait_frames(4)
    assert [f.opcode for f in frames] == [Opcode.BINARY, Opcode.PING, Opcode.CONT, Opcode.CONT]
    data = [f for f in frames if f.opcode in DATA_OPCODES]
    assert [len(f.payload) for f in data] == [BIG_FRAGMENT] * 2 + [len(message) - 2 * BIG_FRAGMENT]
    assert [f.fin for f in data] == [False, False, True]
    assert b"".join(payloads(data)) == message
    data_chunks = [c for chunks in transport.chunks for c in chunks if len(c) > 1000]
    assert len(data_chunks) >= 10 and max(map(len, data_chunks)) <= WRITE_BATCH + 14
    assert len({id(c.obj) for c in data_chunks}) == 1  # one buffer for every piece
    rig.wait_idle()
    assert pool and rig.sender.buffered == 0 and not rig.failures


def test_a_direct_write_cut_before_a_fragments_short_last_piece_sends_it_as_it_is(
    rigs: Callable[..., Rig],
) -> None:
    """The kernel cuts the third piece of a frame whose fourth and last piece
    is short (smaller than GATHER_FROM): the writer sends the rest and the
    short piece as they are, then a ping that came during the write."""
    if not pieces_pooled():
        pytest.skip("without the C speedups the frames are sent as made")
    piece = 10 + 4 + WRITE_BATCH
    cap = piece + 2 * WRITE_BATCH - 5000  # inside the third piece
    rig: Rig

    class PingDuring(GatheringCapped):
        def try_write(self, chunks: Sequence[Any]) -> int:
            if len(self.try_writes) == 2:
                rig.ping(b"meanwhile")
            return super().try_write(chunks)

    transport = PingDuring(cap, block_writes=True)
    rig = rigs(transport, max_fragment_size=BIG_FRAGMENT)
    message = bytes(range(256)) * (3 * WRITE_BATCH // 256) + bytes(range(100))  # 4 pieces
    assert len(message) - 3 * WRITE_BATCH == 100 < sender_module.GATHER_FROM
    assert rig.enqueue(BINARY, message) is True
    assert transport.try_writes == [piece, WRITE_BATCH, WRITE_BATCH]
    transport.unblock_writes()
    frames = rig.wait_frames(2)
    assert [f.opcode for f in frames] == [Opcode.BINARY, Opcode.PING]
    assert frames[0].fin and frames[0].payload == message
    rig.wait_idle()
    assert rig.sender.buffered == 0 and not rig.failures


def test_a_direct_write_cut_inside_a_large_fragment_holds_control_frames_to_its_end(
    rigs: Callable[..., Rig],
) -> None:
    """The kernel takes a piece of a large fragment (here a message's one
    frame) in part: the writer sends the rest of the piece and the frame's
    other pieces before a ping that came meanwhile (after the cut, a control
    frame would land inside the frame); what is counted buffered is the
    piece's rest plus the payload not yet encoded."""
    if not pieces_pooled():
        pytest.skip("without the C speedups the frames are sent as made")
    piece = 10 + 4 + WRITE_BATCH  # the first: header, key, a batch of payload
    cap = piece + 5000
    rig: Rig

    class PingDuring(GatheringCapped):
        def try_write(self, chunks: Sequence[Any]) -> int:
            if len(self.try_writes) == 1:  # the ping comes during the direct write
                rig.ping(b"meanwhile")
            return super().try_write(chunks)

    transport = PingDuring(cap, block_writes=True)
    rig = rigs(transport, max_fragment_size=BIG_FRAGMENT)
    message = bytes(range(253)) * (DIRECT_MAX // 253)  # one frame, in 4 pieces
    assert WRITE_BATCH * 3 < len(message) <= DIRECT_MAX
    assert rig.enqueue(BINARY, message) is True
    assert transport.try_writes == [piece, WRITE_BATCH]  # the second taken in part
    # (Nothing is counted off while the writes block: the writer may have
    # taken the work, not written it.)
    ping = len(rig.proto.encode_control(Opcode.PING, b"meanwhile"))
    rest = piece + WRITE_BATCH - cap
    assert rig.sender.buffered == rest + len(message) - 2 * WRITE_BATCH + ping
    transport.unblock_writes()
    frames = rig.wait_frames(2)
    assert [f.opcode for f in frames] == [Opcode.BINARY, Opcode.PING]
    assert frames[0].fin and frames[0].payload == message
    assert frames[1].payload == b"meanwhile"
    rig.wait_idle()
    assert rig.sender.buffered == 0 and rig.sender.unfinished is None and not rig.failures


def test_a_pooled_buffer_the_kernel_cut_stays_with_the_writer(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the kernel takes in part leaves its rest in the pooled buffer:
    the buffer is not given back (no other send may write over the rest), the
    writer sends the rest and then the next batches from it, and a large
    message queued meanwhile is encoded elsewhere: every byte as sent."""
    if frames_module.encode_frames_into is None:
        pytest.skip("without the C speedups the frames are sent as made")
    pool: list[bytearray] = []
    monkeypatch.setattr(sender_module, "_pool", pool)
    cap = BATCH_BYTES + 5000
    transport = GatheringCapped(cap, block_writes=True)
    rig = rigs(transport)
    first = bytes(range(251)) * (ONE_MIB // 251)
    second = bytes(range(7, 256)) * 4000
    assert rig.enqueue(BINARY, first) is True
    assert transport.try_writes == [BATCH_BYTES, BATCH_BYTES]  # the second taken in part
    assert pool == []  # the rest is in it
    rig.enqueue(BINARY, second)  # queued behind it (the writer has it)
    transport.unblock_writes()
    frames = rig.wait_frames(32 + 30)
    data = [f for f in frames if f.opcode in DATA_OPCODES]
    assert b"".join(payloads(data)) == first + second
    rig.wait_idle()
    assert rig.sender.buffered == 0 and not rig.failures
    assert len(pool) == 1  # the queued message's, given back once written


def test_a_close_reply_cuts_short_the_rest_of_a_large_direct_write(
    rigs: Callable[..., Rig],
) -> None:
    """A close reply queued while the writer finishes a direct write goes out at
    the next frame boundary, and no data frame follows it (RFC 6455 5.5.1)."""
    transport = CappedTransport(BATCH_BYTES + 5000, block_writes=True)
    rig = rigs(transport)
    assert rig.enqueue(BINARY, bytes(ONE_MIB)) is True
    rig.control(masked_close())
    transport.unblock_writes()
    rig.wait_event(lambda: bool(rig.close_written))
    frames = rig.transport.frames()
    assert frames[-1].opcode == Opcode.CLOSE
    assert all(f.opcode in DATA_OPCODES for f in frames[:-1])
    assert 16 <= len(frames) - 1 <= 24  # the cut batch's rest, at most one batch more
    rig.wait_idle()
    assert rig.sender.buffered == 0 and not rig.failures


def test_the_socket_ending_drops_a_large_direct_writes_rest(rigs: Callable[..., Rig]) -> None:
    transport = CappedTransport(BATCH_BYTES + 5000, block_writes=True)
    rig = rigs(transport)
    pool = BufferPool()
    segment = pool.get(ONE_MIB)
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, ONE_MIB) is True
    rig.sender.direct_write(BINARY, segment.view(), segment)
    rig._note_thread()
    assert rig.sender.buffered > 0
    thread = rig.stop()  # whether or not the writer took the rest yet
    transport.unblock_writes()
    if thread is not None:
        thread.join(WAIT)
        assert not thread.is_alive()
    wait_until(lambda: segment.released)
    assert rig.sender.buffered == 0 and rig.sender.unfinished is None


def test_a_socket_that_ends_during_a_large_direct_write_keeps_nothing_of_it(
    rigs: Callable[..., Rig],
) -> None:
    transport = CappedTransport(BATCH_BYTES + 5000)
    rig = rigs(transport)
    offer = transport.try_write

    def ending(chunks: Sequence[Any]) -> int:
        n = offer(chunks)
        if len(transport.try_writes) == 2:
            rig.stop()  # the socket ends while the caller's thread writes
        return n

    transport.try_write = ending  # type: ignore[method-assign]
    segment = BufferPool().get(ONE_MIB)
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, ONE_MIB) is True
    rig.sender.direct_write(BINARY, segment.view(), segment)
    assert transport.try_writes == [BATCH_BYTES, BATCH_BYTES]
    assert segment.released and rig.sender.unfinished is None
    assert rig.sender.thread is None  # no writer started for what was left


class HookLock:
    """A socket lock for tests of the points a Sender and its C queue pass
    through: runs ``after_release[n]()`` just after its n-th release, raises
    ``KeyboardInterrupt`` from its n-th acquire for n in ``interrupt``
    (counting from 1), and, made ``gated``, holds the writer thread
    ("sender-test-writer") back before it takes the lock until ``gate`` is
    set (``writer_waits`` tells it got there): a test then acts before the
    writer does, without relying on timing."""

    def __init__(self, gated: bool = False) -> None:
        self._lock = threading.Lock()
        self.acquires = self.releases = 0
        self.after_release: dict[int, Callable[[], None]] = {}
        self.interrupt: set[int] = set()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.writer_waits = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self.gate.is_set() and threading.current_thread().name == "sender-test-writer":
            self.writer_waits.set()
            assert self.gate.wait(WAIT), "gate never opened"
        self.acquires += 1
        if self.acquires in self.interrupt:
            raise KeyboardInterrupt
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()
        self.releases += 1
        hook = self.after_release.pop(self.releases, None)
        if hook is not None:
            hook()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_ending_before_the_writer_takes_a_large_direct_writes_rest_releases_it() -> None:
    """The kernel cut a large direct write; the socket ends before the writer
    it started has taken the rest: the end lets go of the message (its count in
    buffered_amount and its segment), and the writer then writes nothing."""
    transport = CappedTransport(BATCH_BYTES + 5000)
    rig = Rig(transport, Protocol(Role.CLIENT))
    gated = HookLock(gated=True)
    rig.lock = gated  # type: ignore[assignment]
    rig.sender = Sender(
        "sender-test-writer", gated, ContextAdapter({}), rig._failed, rig._closed  # type: ignore[arg-type]
    )
    rig.sender.attach(rig.proto, transport)
    segment = BufferPool().get(ONE_MIB)
    with gated:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, ONE_MIB) is True
    rig.sender.direct_write(BINARY, segment.view(), segment)
    # the second batch's rest, and the two batches not encoded yet
    assert rig.sender.unfinished is not None
    assert rig.sender.buffered == BATCH_BYTES - 5000 + ONE_MIB // 2
    thread = rig.sender.thread
    assert thread is not None
    assert gated.writer_waits.wait(WAIT)  # held back before it took anything
    assert rig.stop() is thread
    assert rig.sender.unfinished is None and segment.released
    assert rig.sender.buffered == 0
    gated.gate.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(transport.written()) == BATCH_BYTES + 5000  # nothing more written
    assert rig.failures == []


@pytest.mark.parametrize("case", ["extensions", "server", "over DIRECT_MAX"])
def test_a_large_message_goes_to_the_writer_where_its_batches_are_not_whole_fragments(
    case: str,
) -> None:
    """Direct writes above WRITE_BATCH are for a client without extensions (its
    batches' payload is then known, fragment by fragment) and up to DIRECT_MAX."""
    options: dict[str, Any] = {}
    if case == "extensions":
        deflate = PerMessageDeflate()
        deflate.accept([])
        options["extensions"] = [deflate]
    role = Role.SERVER if case == "server" else Role.CLIENT
    size = DIRECT_MAX + 1 if case == "over DIRECT_MAX" else WRITE_BATCH + 1
    transport = TryWriteTransport()
    rig = Rig(transport, Protocol(role, **options))
    try:
        with rig.lock:
            queued = rig.sender.queue.push_locked(BINARY | UNCOMPRESSED, bytes(size), None, size)
            assert queued is False
            rig._note_thread()
        wait_until(lambda: len(transport.written()) > size)
        rig.wait_idle()
        assert transport.try_writes == []
    finally:
        thread = rig.stop()
        for t in [*rig.threads, *([thread] if thread else [])]:
            t.join(WAIT)


# -- large messages ----------------------------------------------------------------------


@pytest.mark.parametrize("gathers", [False, True], ids=["buffer", "gather"])
def test_large_message_is_fragmented_with_control_frames_between_batches(
    rigs: Callable[..., Rig], gathers: bool
) -> None:
    rig: Rig

    def hook(index: int) -> None:
        if index == 0:  # during the first batch of the large message
            rig.ping(b"between")

    transport = HookTransport(hook, gathers)
    rig = rigs(transport, max_fragment_size=60000)
    message = bytes(range(256)) * 2400  # 614400 bytes: 11 fragments, 3 batches
    assert len(message) > WRITE_BATCH
    rig.enqueue(BINARY, message)
    frames = rig.wait_frames(12)
    assert len(frames) == 12
    data = [f for f in frames if f.opcode in DATA_OPCODES]
    pings = [i for i, f in enumerate(frames) if f.opcode == Opcode.PING]
    assert len(pings) == 1 and 0 < pings[0] < len(frames) - 1  # slipped in between
    assert frames[pings[0]].payload == b"between"
    assert [f.opcode for f in data] == [Opcode.BINARY] + [Opcode.CONT] * 10
    assert [f.fin for f in data] == [False] * 10 + [True]
    assert [len(f.payload) for f in data] == [60000] * 10 + [14400]
    assert b"".join(f.payload for f in data) == message
    assert len(transport.writes) >= 3
    # one buffer, or one batch of at most WRITE_BATCH plus a fragment (plus the ping)
    assert max(transport.writes) <= WRITE_BATCH + 60014 + 64
    if gathers and frames_module.encode_frames_into is not None:
        # Each batch encoded into a pooled buffer, written as one view of it
        # (and the ping beside one): never copied into the writer's buffer.
        assert all(
            type(c) is memoryview for chunks in transport.chunks for c in chunks if len(c) > 1000
        )
    elif gathers:  # the frames themselves, several per write: never copied into a buffer
        assert max(map(len, transport.chunks)) > 1
        assert all(type(c) is bytes for chunks in transport.chunks for c in chunks)
    else:  # the buffer: one chunk of data per write (and the ping beside one)
        assert all(sum(len(c) > 1000 for c in chunks) == 1 for chunks in transport.chunks)
    if frames_module.encode_frames_into is not None:
        # Either way, a batch encoded into a pooled buffer goes as that one
        # chunk, not copied again into the writer's buffer.
        room = batch_room(WRITE_BATCH, 60000)
        data_chunks = [c for chunks in transport.chunks for c in chunks if len(c) > 1000]
        assert all(type(c) is memoryview and len(c.obj) == room for c in data_chunks)
    rig.wait_idle()
    assert rig.sender.buffered == 0


def test_small_fragments_of_a_large_message_are_joined_even_when_gathering(
    rigs: Callable[..., Rig],
) -> None:
    """Fragments below GATHER_FROM go through the writer's buffer: a gathering
    write of a few hundred bytes per system call would cost more than the copy."""
    transport = HookTransport(gathers=True)
    rig = rigs(transport, max_fragment_size=1000)
    message = bytes(range(256)) * 1200  # 307200 bytes: 308 fragments
    assert len(message) > WRITE_BATCH
    rig.enqueue(BINARY, message)
    frames = rig.wait_frames(308)
    assert b"".join(payloads(frames)) == message
    assert all(len(chunks) == 1 for chunks in transport.chunks)
    assert len(transport.writes) == 2  # 308 fragments in two writes
    rig.wait_idle()
    assert rig.sender.buffered == 0


@pytest.mark.parametrize("gathers", [False, True], ids=["buffer", "gather"])
def test_fragment_larger_than_the_write_buffer_is_written_as_it_is(
    rigs: Callable[..., Rig], gathers: bool
) -> None:
    transport = HookTransport(gathers=gathers)
    rig = rigs(transport, max_fragment_size=300000)
    message = bytes(range(7)) * 100000
    rig.enqueue(BINARY, message)
    frames = rig.wait_frames(3)
    assert [len(f.payload) for f in frames] == [300000, 300000, 100000]
    assert [f.fin for f in frames] == [False, False, True]
    assert b"".join(payloads(frames)) == message


def test_a_servers_fragments_overflowing_the_write_buffer_are_flushed_then_written_as_they_are(
) -> None:
    """A server's frames come as header and payload (unmasked: nothing is
    encoded into a pooled buffer), so through a transport that does not gather
    they go by the writer's buffer, whatever the speedups: the buffer is
    flushed when the next piece does not fit, and a payload larger than the
    buffer is written as it is."""
    transport = HookTransport(gathers=False)
    rig = Rig(transport, Protocol(Role.SERVER, max_fragment_size=300000))
    try:
        message = bytes(range(7)) * 100000
        with rig.lock:
            assert rig.sender.queue.push_locked(BINARY, message, None, len(message)) is False
            rig._note_thread()
        wait_until(lambda: len(transport.written()) >= len(message) + 3 * 10)
        rig.wait_idle()
        data, frames = transport.written(), []
        while data:
            parsed = Frame.parse(data, masked=False)
            assert parsed is not None
            frames.append(parsed[0])
            data = data[parsed[1]:]
        assert [len(f.payload) for f in frames] == [300000, 300000, 100000]
        assert [f.fin for f in frames] == [False, False, True]
        assert b"".join(payloads(frames)) == message
        # header, payload, header, payload, header + last payload (which fits)
        assert transport.writes == [10, 300000, 10, 300000, 100010]
        assert all(len(chunks) == 1 for chunks in transport.chunks)
    finally:
        thread = rig.stop()
        for t in [*rig.threads, *([thread] if thread else [])]:
            t.join(WAIT)


@pytest.mark.parametrize("gathers", [False, True], ids=["buffer", "gather"])
def test_no_data_frame_follows_a_close_reply_slipped_into_a_large_message(
    rigs: Callable[..., Rig], gathers: bool
) -> None:
    rig: Rig

    def hook(index: int) -> None:
        if index == 0:  # the server's close arrives: Connection queues the reply as control
            rig.control(masked_close())

    rig = rigs(HookTransport(hook, gathers), max_fragment_size=60000)
    rig.enqueue(BINARY, bytes(614400))
    rig.transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    rig.wait_idle()  # the large message is abandoned at the close: the writer is done
    opcodes = [f.opcode for f in rig.transport.frames()]
    after_close = opcodes[opcodes.index(Opcode.CLOSE) + 1 :]
    assert not any(op in DATA_OPCODES for op in after_close), opcodes
    assert len(opcodes) < 12  # 11 fragments make the whole message: it was cut short


@pytest.mark.parametrize("gathers", [False, True], ids=["buffer", "gather"])
def test_close_written_after_a_close_reply_slipped_into_a_large_message(
    rigs: Callable[..., Rig], gathers: bool
) -> None:
    rig: Rig

    def hook(index: int) -> None:
        if index == 0:
            rig.control(masked_close())

    rig = rigs(HookTransport(hook, gathers), max_fragment_size=60000)
    rig.enqueue(BINARY, bytes(614400))
    rig.transport.wait_for(lambda fs: any(f.opcode == Opcode.CLOSE for f in fs))
    rig.ping(b"marker")  # batches run in order: once it is out, the large batch is done
    rig.transport.wait_for(lambda fs: fs[-1].opcode == Opcode.PING)
    assert rig.close_written, "on_close_written not called after the close frame was written"


# -- the close callback ------------------------------------------------------------------


def test_close_written_fires_after_a_queued_close_only(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.enqueue(TEXT, b"data")
    rig.wait_frames(1)
    rig.ping(b"a ping")
    rig.wait_frames(2)
    rig.wait_idle()
    with rig.lock:
        rig.sender.close_frame_locked(rig.proto.encode_close(1001))
    rig.wait_event(lambda: bool(rig.close_written))
    # Batches run one after the other: had a data batch fired it, it would be first.
    assert len(rig.close_written) == 1
    assert rig.close_written[0] == [Opcode.TEXT, Opcode.PING, Opcode.CLOSE]


def test_close_written_fires_after_a_control_close_frame(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    rig.ping(b"not a close")
    rig.wait_frames(1)
    rig.control(masked_close(1000))  # a close reply goes as a control frame
    rig.wait_event(lambda: bool(rig.close_written))
    assert rig.close_written == [[Opcode.PING, Opcode.CLOSE]]


# -- failures and the end ----------------------------------------------------------------


def test_failed_write_reports_once(rigs: Callable[..., Rig]) -> None:
    transport = FailingTransport()
    rig = rigs(transport)
    with rig.lock:
        for i in range(3):
            rig.sender.queue.push_locked(TEXT, b"m%d" % i, None, 2)
        rig._note_thread()
    writer = rig.sender.thread
    assert writer is not None
    writer.join(WAIT)
    assert not writer.is_alive()
    assert len(rig.failures) == 1
    assert isinstance(rig.failures[0], blockws.ConnectionLost)
    assert transport.attempts == 1  # one batch, one failure: the writer stops there
    assert rig.sender.buffered == 0
    assert rig.close_written == []


def test_failed_direct_write_reports_and_releases_the_segment(rigs: Callable[..., Rig]) -> None:
    class Broken(TryWriteTransport):
        def try_write(self, chunks: Sequence[Any]) -> int:
            raise blockws.ConnectionLost("reset (test)")

    pool = BufferPool()
    rig = rigs(Broken())
    segment = pool.get(100)
    assert rig.enqueue(BINARY, segment.view(), segment) is True
    assert [type(e) for e in rig.failures] == [blockws.ConnectionLost]
    assert segment.released and pool.pooled_bytes == 256
    assert rig.sender.writing is False and rig.sender.buffered == 0


def test_failed_batch_segments_are_released(rigs: Callable[..., Rig]) -> None:
    pool = BufferPool()
    rig = rigs(FailingTransport())
    segment = pool.get(1000)
    rig.enqueue(BINARY, segment.view(), segment)
    writer = rig.sender.thread
    assert writer is not None
    writer.join(WAIT)
    assert len(rig.failures) == 1
    rig.stop()  # what the connection's teardown does next
    assert segment.released


def test_stop_ends_the_writer_and_returns_it(rigs: Callable[..., Rig]) -> None:
    pool = BufferPool()
    rig = rigs(MemoryTransport(block_writes=True))
    rig.enqueue(TEXT, b"in flight")
    assert rig.transport.write_started.wait(WAIT)
    segment = pool.get(100)
    rig.enqueue(BINARY, segment.view(), segment)
    rig.ping()
    writer = rig.stop()
    assert writer is not None and writer is rig.sender.thread
    assert segment.released  # queued messages are dropped
    rig.transport.unblock_writes()
    writer.join(WAIT)
    assert not writer.is_alive()
    assert [f.payload for f in rig.transport.frames()] == [b"in flight"]  # nothing after it
    assert rig.sender.buffered == 0
    # A stopped sender starts no writer and writes nothing more.
    assert rig.enqueue(TEXT, b"too late") is False
    rig.ping()
    assert rig.sender.thread is writer and not writer.is_alive()
    assert len(rig.transport.frames()) == 1
    assert rig.failures == []


def test_write_failure_after_stop_is_not_reported(rigs: Callable[..., Rig]) -> None:
    rig = rigs(MemoryTransport(block_writes=True))
    rig.enqueue(TEXT, b"stuck")
    assert rig.transport.write_started.wait(WAIT)
    writer = rig.stop()
    assert writer is not None
    rig.transport.abort()  # the teardown unblocks a writer stuck on a full socket
    writer.join(WAIT)
    assert not writer.is_alive()
    assert rig.failures == []


def test_a_waiting_writer_is_notified_once_however_many_sends_come_before_it_runs(
    rigs: Callable[..., Rig],
) -> None:
    """A flood's sends that come while the woken writer waits for the GIL (or,
    here, for the lock) wake it once: each used to notify it again, until it
    ran -- 99 % of a 64 B flood's sends, a quarter of their cost."""
    rig = rigs(MemoryTransport())
    rig.enqueue(BINARY, b"first")  # starts the writer, which writes it and waits
    rig.wait_frames(1)
    wait_until(lambda: rig.sender.queue.waiting)
    wake = rig.sender._wake
    assert wake is not None
    notified: list[int] = []
    real_notify = wake.notify

    def notify(n: int = 1) -> None:
        notified.append(n)
        real_notify(n)

    wake.notify = notify  # type: ignore[method-assign]
    with rig.lock:  # the writer cannot run until all are queued
        for i in range(100):
            assert rig.sender.queue.push_locked(BINARY, b"m%d" % i, None, 3) is False
    assert notified == [1]
    assert len(rig.wait_frames(101)) == 101


def test_idle_writer_thread_ends_and_a_new_one_starts(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sender_module, "WRITER_IDLE", 0.05)
    rig = rigs(TryWriteTransport())
    rig.sender.queue.direct_ok = False  # as after a direct write: sends go to the writer
    rig.enqueue(TEXT, b"one")
    first = rig.sender.thread
    assert first is not None
    rig.wait_frames(1)
    first.join(WAIT)
    assert not first.is_alive()
    assert rig.sender.thread is None
    assert rig.sender.queue.direct_ok is True  # a quiet spell: the next send may go directly
    rig.sender.queue.direct_ok = False
    rig.enqueue(TEXT, b"two")
    second = rig.sender.thread
    assert second is not None and second is not first
    assert payloads(rig.wait_frames(2)) == [b"one", b"two"]


# -- rare paths: failed non-blocking writes, an interrupted thread start, a late end ------


def test_a_ping_whose_direct_write_fails_goes_through_the_writer(rigs: Callable[..., Rig]) -> None:
    """try_write() failing (an EAGAIN the transport did not map, say) is not
    the socket's end: the ping is queued, and the writer writes it."""

    class NoTryWrite(TryWriteTransport):
        def try_write(self, chunks: Sequence[Any]) -> int:
            raise OSError("try_write failed (test)")

    rig = rigs(NoTryWrite())
    rig.ping(b"via writer")
    frames = rig.wait_frames(1)
    assert [(f.opcode, f.payload) for f in frames] == [(Opcode.PING, b"via writer")]
    assert rig.threads  # a writer thread was started: it wrote the ping
    rig.wait_idle()
    assert not rig.failures


def test_direct_pings_partly_taken_leave_the_rest_to_the_writer(rigs: Callable[..., Rig]) -> None:
    """The kernel takes part of a ping written directly: the rest, counted in
    buffered, goes first through the writer; a later frame follows it whole."""
    transport = TryWriteTransport(take=3)
    rig = rigs(transport)
    rig.ping(b"first ping")
    assert transport.try_writes == [2 + 4 + 10]
    frames = rig.wait_frames(1)
    assert [(f.opcode, f.payload) for f in frames] == [(Opcode.PING, b"first ping")]
    rig.wait_idle()


def test_interrupted_writer_start_drops_the_connection(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside Thread.start() while a send kicks the writer: whether a
    writer runs cannot be told, so the transport is aborted (the socket ends
    with 1006) and the interrupt propagates; nothing waits on a writer that
    never ran."""

    class Unstartable(threading.Thread):
        def start(self) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(sender_module.threading, "Thread", Unstartable)
    transport = MemoryTransport()
    rig = rigs(transport)
    with pytest.raises(KeyboardInterrupt):
        rig.enqueue(BINARY, b"queued")
    assert transport.aborted
    monkeypatch.undo()
    thread = rig.stop()
    assert thread is not None and not thread.is_alive()  # never started: nothing to join


def test_writer_that_starts_after_the_socket_ended_returns_at_once(
    rigs: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket ended (stopped and released) between the thread's creation
    and its first step, as when start() was interrupted after the thread began:
    the writer finds no transport and ends without touching anything."""
    ran = threading.Event()

    class LateThread(threading.Thread):
        def start(self) -> None:
            rig.sender.stop_locked()  # the kick holds the lock, as the teardown would
            rig.sender.release_locked()
            super().start()
            ran.set()

    rig = rigs(MemoryTransport())
    monkeypatch.setattr(sender_module.threading, "Thread", LateThread)
    rig.enqueue(BINARY, b"never written")
    assert ran.is_set()
    thread = rig.sender.thread
    assert thread is not None
    thread.join(WAIT)
    assert not thread.is_alive()
    assert rig.transport.written() == b"" and not rig.failures


def test_direct_write_after_the_socket_ended_releases_the_segment(
    rigs: Callable[..., Rig],
) -> None:
    """A send claimed the transport for a direct write, then the socket ended
    before it wrote: nothing is written, and the segment is released."""
    pool = BufferPool()
    transport = TryWriteTransport()
    rig = rigs(transport)
    segment = pool.get(100)
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, segment.view(), segment, 100) is True
        rig.sender.stop_locked()
        rig.sender.release_locked()
    rig.sender.direct_write(BINARY, segment.view(), segment)
    assert segment.released and pool.pooled_bytes == 256
    assert transport.try_writes == [] and transport.written() == b""
    assert rig.sender.writing is False and not rig.failures


class ClosingTransport(TryWriteTransport):
    """Notes which thread closed it, and, with ``hold``, keeps each
    ``try_write`` inside the call until the test lets it go (``fail``: it
    then fails, as a write after the teardown's shutdown does)."""

    def __init__(self, hold: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.hold, self.fail = hold, fail
        self.inside = threading.Event()
        self.go = threading.Event()
        self.closed_by: list[str] = []

    def try_write(self, chunks: Sequence[Any]) -> int:
        if self.hold:
            self.inside.set()
            assert self.go.wait(WAIT)
            assert not self.closed, "closed under a write"
            if self.fail:
                raise blockws.ConnectionLost("broken pipe (test)")
        return super().try_write(chunks)

    def close(self) -> None:
        self.closed_by.append(threading.current_thread().name)
        super().close()


def teardown(rig: Rig) -> None:
    """What Connection._finish does with the sender and the transport."""
    with rig.lock:
        rig.sender.stop_locked()
    rig.transport.abort()
    rig.sender.close_transport(rig.transport)


def test_the_teardown_closes_an_idle_transport_at_once(rigs: Callable[..., Rig]) -> None:
    transport = ClosingTransport()
    rig = rigs(transport)
    assert rig.enqueue(TEXT, b"written") is True
    teardown(rig)
    assert transport.closed_by == [threading.current_thread().name]


@pytest.mark.parametrize("fail", [False, True], ids=["written", "failed"])
def test_a_direct_write_under_way_at_the_teardown_closes_the_transport_itself(
    rigs: Callable[..., Rig], fail: bool
) -> None:
    """The descriptor is not closed under a caller's direct write: another
    socket opened meanwhile could get its number and the write's bytes. The
    writing thread closes it when its write returns (or fails)."""
    transport = ClosingTransport(hold=True, fail=fail)
    rig = rigs(transport)
    sent: list[bool] = []
    caller = threading.Thread(
        target=lambda: sent.append(rig.enqueue(TEXT, b"in flight")), name="caller"
    )
    caller.start()
    assert transport.inside.wait(WAIT)
    teardown(rig)  # on this thread, as the reader's teardown runs on the reader
    assert transport.closed_by == []
    transport.go.set()
    caller.join(WAIT)
    assert sent == [True]
    assert transport.closed_by == ["caller"]
    assert len(rig.failures) == int(fail)
    assert rig.sender._late_close is None


def test_a_writer_the_teardown_did_not_join_closes_the_transport(
    rigs: Callable[..., Rig],
) -> None:
    class Closing(MemoryTransport):
        closed_by: list[str] = []

        def close(self) -> None:
            self.closed_by.append(threading.current_thread().name)
            super().close()

    transport = Closing(block_writes=True)
    rig = rigs(transport)
    rig.enqueue(TEXT, b"stuck")
    assert transport.write_started.wait(WAIT)
    writer = rig.sender.thread
    assert writer is not None
    teardown(rig)  # abort() fails the blocked write (within 50 ms here)
    writer.join(WAIT)
    assert not writer.is_alive()
    assert transport.closed_by == [writer.name]
    assert rig.failures == []


def test_failed_direct_write_of_plain_bytes_reports_once(rigs: Callable[..., Rig]) -> None:
    class Broken(TryWriteTransport):
        def try_write(self, chunks: Sequence[Any]) -> int:
            raise blockws.ConnectionLost("reset (test)")

    rig = rigs(Broken())
    assert rig.enqueue(TEXT, b"no segment") is True
    assert [type(e) for e in rig.failures] == [blockws.ConnectionLost]
    assert rig.sender.writing is False and rig.sender.buffered == 0


def test_large_message_whose_last_fragment_exceeds_the_write_buffer(
    rigs: Callable[..., Rig],
) -> None:
    """Every fragment larger than the writer's buffer: each goes as it is, and
    nothing is left in the buffer at the end."""
    rig = rigs(HookTransport(gathers=False), max_fragment_size=300000)
    message = bytes(range(6)) * 100000
    rig.enqueue(BINARY, message)
    frames = rig.wait_frames(2)
    assert [len(f.payload) for f in frames] == [300000, 300000]
    assert b"".join(payloads(frames)) == message
    assert len(rig.transport.writes) == 2


# -- small direct writes by the queue itself (SendQueue.set_fast) ----------------------------

needs_c_queue = pytest.mark.skipif(c_SendQueue is None, reason="the C speedups are not built")
QUEUES = [pytest.param(PySendQueue, id="py")]
if c_SendQueue is not None:
    QUEUES.append(pytest.param(c_SendQueue, id="c"))


class TCPRig(Rig):
    """A rig over a real TCPTransport (one end of a socketpair), open, with a
    HookLock; ``direct_writes`` counts the calls of Sender.direct_write."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        proto: Protocol | None = None,
        queue: type[PySendQueue] = SendQueue,
    ) -> None:
        monkeypatch.setattr(sender_module, "SendQueue", queue)
        self.here, self.peer = socket.socketpair()
        self.peer.settimeout(WAIT)
        transport = TCPTransport(self.here)
        super().__init__(MemoryTransport(), proto or Protocol(Role.CLIENT))
        self.transport = transport  # type: ignore[assignment]
        self.hook_lock = HookLock()
        self.lock = self.hook_lock  # type: ignore[assignment]
        self.sender = Sender(
            "sender-test-writer", self.hook_lock, ContextAdapter({}),  # type: ignore[arg-type]
            self._failed, self._closed,
        )
        with self.hook_lock:
            self.sender.attach(self.proto, transport)
            self.sender.queue.open = True
        self.direct_writes: list[int] = []
        self.keys: list[bytes] = []  # the mask keys of the small frames received
        real = Sender.direct_write

        def counted(sender: Sender, opcode: int, payload: Any, segment: Any) -> None:
            self.direct_writes.append(len(payload))
            real(sender, opcode, payload, segment)

        monkeypatch.setattr(Sender, "direct_write", counted)

    def allow_direct(self) -> None:
        with self.hook_lock:
            self.sender.queue.direct_ok = True

    def stop_during_the_next_write(self) -> None:
        """At the lock's next release (a direct write's claim let go), the
        socket is torn down as its teardown does: stopped, and the closing of
        the transport left to the write under way (close_transport)."""
        transport = self.transport

        def teardown() -> None:
            with self.hook_lock:
                self.sender.stop_locked()
            self.sender.close_transport(transport)  # writing: left to the writing thread

        self.hook_lock.after_release[self.hook_lock.releases + 1] = teardown

    def received(self, count: int) -> list[Frame]:
        """The next ``count`` frames the peer end reads."""
        data, frames = b"", []
        while len(frames) < count:
            parsed = Frame.parse(data, masked=True)
            if parsed is None:
                chunk = self.peer.recv(65536)
                assert chunk, "the connection ended"
                data += chunk
                continue
            frames.append(parsed[0])
            if data[1] & 0x7F < 126:  # a small frame's key
                self.keys.append(data[2:6])
            data = data[parsed[1]:]
        assert data == b""
        return frames

    def end(self) -> None:
        thread = self.stop()
        for t in [*self.threads, *([thread] if thread else [])]:
            t.join(WAIT)
            assert not t.is_alive()
        self.transport.close()
        self.peer.close()


@pytest.fixture(params=QUEUES)
def tcp_rigs(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Callable[..., TCPRig]]:
    """TCPRigs whose sender has the queue of the test's parameter: each test
    of the path runs on the pure-Python queue (the reference) and the C one."""
    made: list[TCPRig] = []

    def make(proto: Protocol | None = None) -> TCPRig:
        rig = TCPRig(monkeypatch, proto, request.param)
        assert type(rig.sender.queue) is request.param
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.end()


def test_a_small_direct_send_to_plain_tcp_is_framed_masked_and_written_by_the_queue(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    rig = tcp_rigs()
    queue = rig.sender.queue
    for i, payload in enumerate([b"hello", b"", bytes(range(125))]):
        rig.allow_direct()
        queue.push(TEXT if i == 0 else BINARY, payload, None, len(payload))
        assert not queue.writing and not queue.direct_ok  # as a direct write leaves them
    frames = rig.received(3)
    assert [(f.opcode, f.fin, f.payload) for f in frames] == [
        (Opcode.TEXT, True, b"hello"), (Opcode.BINARY, True, b""),
        (Opcode.BINARY, True, bytes(range(125))),
    ]
    assert rig.direct_writes == []  # none went through Sender.direct_write
    assert rig.transport.bytes_written == 11 + 6 + 131
    assert queue.buffered == 0 and rig.sender.thread is None
    # A key per frame, drawn fresh (2**-64 odds of a false alarm).
    assert len(set(rig.keys)) == 3


@pytest.mark.parametrize(
    "case", ["126 bytes", "bytearray", "memoryview", "with a segment", "not direct"]
)
def test_what_the_fast_path_does_not_take_goes_the_usual_way(
    tcp_rigs: Callable[..., TCPRig], case: str
) -> None:
    rig = tcp_rigs()
    payload: Any = b"x" * 126 if case == "126 bytes" else b"small"
    segment = None
    if case == "bytearray":
        payload = bytearray(payload)
    elif case == "memoryview":
        payload = memoryview(b"a small view")
    elif case == "with a segment":
        segment = BufferPool().get(5)
        segment.view()[:] = b"small"
        payload = segment.view()
    with rig.hook_lock:
        rig.sender.queue.direct_ok = case != "not direct"
    rig.sender.queue.push(BINARY, payload, segment, len(payload))
    [frame] = rig.received(1)
    assert frame.payload == bytes(payload)
    assert rig.direct_writes == ([] if case == "not direct" else [len(payload)])
    if case == "not direct":
        assert rig.sender.thread is not None  # the writer wrote it
        rig._note_thread()


@pytest.mark.parametrize("case", ["own keys", "extensions", "small fragments", "server"])
def test_the_fast_path_is_only_for_a_client_without_extensions_using_the_shared_keys(
    tcp_rigs: Callable[..., TCPRig], case: str
) -> None:
    options: dict[str, Any] = {}
    if case == "own keys":
        options["mask_keys"] = lambda: b"\x01\x02\x03\x04"
    elif case == "extensions":
        deflate = PerMessageDeflate()
        deflate.accept([])
        options["extensions"] = [deflate]
    elif case == "small fragments":
        options["max_fragment_size"] = 100
    role = Role.SERVER if case == "server" else Role.CLIENT
    rig = tcp_rigs(Protocol(role, **options))
    rig.allow_direct()
    rig.sender.queue.push(BINARY | UNCOMPRESSED, b"abc", None, 3)
    assert rig.direct_writes == [3]
    if case == "own keys":
        rig.received(1)
        assert rig.keys == [b"\x01\x02\x03\x04"]


def c_queue_only(rig: TCPRig) -> None:
    if type(rig.sender.queue) is PySendQueue:
        pytest.skip("the pure-Python queue writes through transport.sock and shared_mask_keys")


@needs_c_queue
def test_a_send_the_kernel_takes_nothing_of_goes_to_direct_write(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """send(2) fails (here: the descriptor is a pipe's, not a socket): nothing
    was written, and Sender.direct_write writes the message (or meets the
    error and reports it)."""
    rig = tcp_rigs()
    c_queue_only(rig)
    r, w = os.pipe()
    try:
        with rig.hook_lock:
            assert rig.sender.queue.set_fast(rig.transport, w) is True
        rig.allow_direct()
        rig.sender.queue.push(BINARY, b"abc", None, 3)
        assert rig.direct_writes == [3]
        assert rig.received(1)[0].payload == b"abc"
    finally:
        os.close(r)
        os.close(w)


def test_a_full_kernel_buffer_sends_a_small_message_through_direct_write_then_the_writer(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """The socket's buffer is full: the fast path's send() takes nothing, so
    Sender.direct_write gets the message; its try_write takes nothing either,
    so the writer sends it once the peer reads."""
    rig = tcp_rigs()
    filled = 0
    while True:
        try:
            filled += rig.here.send(bytes(65536), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    rig.allow_direct()
    rig.sender.queue.push(BINARY, b"abc", None, 3)
    assert rig.direct_writes == [3]
    rig._note_thread()
    while filled:  # what filled the buffer, then the frame
        filled -= len(rig.peer.recv(min(filled, 65536)))
    assert rig.received(1)[0].payload == b"abc"
    rig.wait_idle()
    assert rig.sender.buffered == 0 and not rig.sender.writing


def test_an_interrupt_before_a_fast_write_sends_lets_go_of_the_write(
    tcp_rigs: Callable[..., TCPRig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the pure-Python path draws the frame's key: nothing is
    written, the interrupt propagates from send(), and the socket is not left
    claimed: what was queued meanwhile goes to the writer, and the next
    message goes out."""
    rig = tcp_rigs()
    if type(rig.sender.queue) is not PySendQueue:
        pytest.skip("the C path runs no Python code there")
    import blockws.sendqueue as sendqueue_module

    queue = rig.sender.queue
    rig.allow_direct()
    start = rig.hook_lock.releases

    def meanwhile() -> None:  # between the claim and the write (the lock let go)
        with rig.hook_lock:
            assert queue.push_locked(BINARY, b"queued", None, 6) is False
        rig._note_thread()

    def interrupted() -> bytes:
        raise KeyboardInterrupt

    rig.hook_lock.after_release[start + 1] = meanwhile
    monkeypatch.setattr(sendqueue_module, "_draw_key", interrupted)
    with pytest.raises(KeyboardInterrupt):
        queue.push(BINARY, b"lost", None, 4)
    assert not queue.writing and rig.transport.bytes_written == 0
    assert not rig.hook_lock.locked()
    monkeypatch.undo()
    assert [f.payload for f in rig.received(1)] == [b"queued"]
    rig.wait_idle()
    rig.allow_direct()
    queue.push(BINARY, b"next", None, 4)
    assert [f.payload for f in rig.received(1)] == [b"next"]
    assert rig.direct_writes == []


def test_messages_queued_during_a_fast_write_are_left_to_the_writer_in_order(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    rig = tcp_rigs()
    queue = rig.sender.queue
    rig.allow_direct()
    start = rig.hook_lock.releases

    def meanwhile() -> None:  # between the claim and the write (the lock let go)
        with rig.hook_lock:
            assert queue.push_locked(BINARY, b"second", None, 6) is False  # queued
            rig._note_thread()

    rig.hook_lock.after_release[start + 1] = meanwhile
    queue.push(BINARY, b"first", None, 5)
    assert [f.payload for f in rig.received(2)] == [b"first", b"second"]
    assert rig.direct_writes == []
    rig.wait_idle()


def test_a_socket_stopped_during_a_fast_write_has_its_transport_closed_by_it(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """The teardown left the close to the write under way (close_transport):
    the queue closes it once written, as direct_write does."""
    rig = tcp_rigs()
    rig.allow_direct()
    transport = rig.transport
    rig.stop_during_the_next_write()
    rig.sender.queue.push(BINARY, b"last", None, 4)
    assert rig.received(1)[0].payload == b"last"
    assert transport.sock.fileno() == -1  # closed
    assert rig.peer.recv(10) == b""


def test_an_interrupt_while_a_fast_write_takes_the_lock_again_loses_no_bookkeeping(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """Ctrl-C in the contended acquire that ends the write, twice in a row
    (the retry is interrupted too): the lock is taken whatever lands, the
    write let go of, and the first interrupt propagates."""
    rig = tcp_rigs()
    queue = rig.sender.queue
    rig.allow_direct()
    start = rig.hook_lock.acquires
    rig.hook_lock.interrupt = {start + 2, start + 3}  # the acquires after the write
    with pytest.raises(KeyboardInterrupt):
        queue.push(BINARY, b"data", None, 4)
    assert rig.hook_lock.acquires == start + 4
    assert rig.received(1)[0].payload == b"data"  # written once
    assert not queue.writing and rig.transport.bytes_written == 10
    assert not rig.hook_lock.locked()
    queue.push(BINARY, b"next", None, 4)  # not direct (direct_ok cleared): the writer
    rig._note_thread()
    assert rig.received(1)[0].payload == b"next"


def test_a_kick_that_raises_as_a_fast_write_ends_propagates_with_the_write_let_go(
    tcp_rigs: Callable[..., TCPRig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message queued during the write needs the writer kicked as the write
    ends; the kick raises: the error propagates from send(), the write is
    not left claimed and the lock is free (the queued message waits for the
    teardown, as push() leaves one whose kick failed)."""
    rig = tcp_rigs()
    queue = rig.sender.queue
    rig.allow_direct()
    start = rig.hook_lock.releases

    def meanwhile() -> None:  # between the claim and the write (the lock let go)
        monkeypatch.setattr(Sender, "kick_locked", boom)
        with rig.hook_lock:
            queue.append((BINARY, b"queued", None, 6))

    def boom(sender: Sender) -> None:
        raise RuntimeError("kick")

    rig.hook_lock.after_release[start + 1] = meanwhile
    with pytest.raises(RuntimeError, match="kick"):
        queue.push(BINARY, b"first", None, 5)
    assert [f.payload for f in rig.received(1)] == [b"first"]
    assert not queue.writing and not rig.hook_lock.locked()
    assert rig.transport.bytes_written == 11


class CuttingSocket:
    """A TCPTransport's socket whose next ``send()`` takes only the first
    ``take`` bytes (the kernel cut the write); everything else is the socket's."""

    def __init__(self, sock: socket.socket, take: int) -> None:
        self._sock = sock
        self.take = take

    def send(self, data: Any, flags: int = 0) -> int:
        if self.take:
            take, self.take = self.take, 0
            return self._sock.send(bytes(data)[:take], flags)
        return self._sock.send(data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_fast_write_the_kernel_cut_leaves_the_rest_to_the_writer(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """The pure-Python path's send() took part of the frame: the writer sends
    the rest first (Sender.direct_part), then what was queued after it."""
    rig = tcp_rigs()
    if type(rig.sender.queue) is not PySendQueue:
        pytest.skip("the C path writes to the descriptor, not through transport.sock")
    rig.transport.sock = CuttingSocket(rig.here, 4)  # type: ignore[assignment]
    rig.allow_direct()
    rig.sender.queue.push(BINARY, b"whole", None, 5)
    rig._note_thread()
    rig.enqueue(BINARY, b"after")
    assert [f.payload for f in rig.received(2)] == [b"whole", b"after"]
    assert rig.direct_writes == []
    rig.wait_idle()
    assert rig.transport.bytes_written == 22 and not rig.sender.writing


def test_an_interrupt_once_the_kernel_took_a_fast_write_keeps_its_bookkeeping(
    tcp_rigs: Callable[..., TCPRig],
) -> None:
    """Ctrl-C as the pure-Python path's send() returns (the interpreter raises
    it after the call; here a trace hook does, at the first instruction after
    the count was kept): the frame went out once, is counted, and the write
    is let go of before the interrupt propagates."""
    rig = tcp_rigs()
    queue = rig.sender.queue
    if type(queue) is not PySendQueue:
        pytest.skip("the C path runs no Python code there")
    fired: list[int] = []
    code = PySendQueue._write_small.__code__

    def opcode(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and not fired and frame.f_locals.get("sent"):
            fired.append(frame.f_lasti)
            raise KeyboardInterrupt
        return opcode

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code is code:
            frame.f_trace_opcodes = True
            return opcode
        return None

    rig.allow_direct()
    before = sys.gettrace()
    sys.settrace(call)
    try:
        with pytest.raises(KeyboardInterrupt):
            queue.push(BINARY, b"data", None, 4)
    finally:
        sys.settrace(before)
    assert fired
    assert [f.payload for f in rig.received(1)] == [b"data"]
    assert not queue.writing and rig.transport.bytes_written == 10
    assert not rig.hook_lock.locked()


def test_an_interrupt_before_a_fast_write_of_a_stopped_socket_closes_its_transport(
    tcp_rigs: Callable[..., TCPRig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teardown left the close to the write under way; the write is then
    interrupted before it sent anything: letting it go closes the transport,
    as a write that ends does."""
    rig = tcp_rigs()
    if type(rig.sender.queue) is not PySendQueue:
        pytest.skip("the C path runs no Python code there")
    import blockws.sendqueue as sendqueue_module

    rig.allow_direct()
    transport = rig.transport
    rig.stop_during_the_next_write()

    def interrupted() -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(sendqueue_module, "_draw_key", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rig.sender.queue.push(BINARY, b"lost", None, 4)
    assert transport.sock.fileno() == -1  # closed
    assert rig.peer.recv(10) == b""  # nothing was written


def test_the_rest_of_a_frame_the_kernel_cut_is_written_first_by_the_writer(
    rigs: Callable[..., Rig],
) -> None:
    """Sender.direct_part, where the C path hands a cut write: the writer
    sends the frame's rest before anything queued after it."""
    rig = rigs(TryWriteTransport())
    frame = Frame(Opcode.BINARY, b"whole").serialize(b"\x01\x02\x03\x04")
    rig.transport.write([frame[:4]])  # what the kernel took
    with rig.lock:
        assert rig.sender.queue.push_locked(BINARY, b"whole", None, 5) is True  # claimed
    rig.sender.direct_part(frame[4:], 4)
    rig._note_thread()
    rig.enqueue(BINARY, b"after")
    assert [f.payload for f in rig.wait_frames(2)] == [b"whole", b"after"]
    rig.wait_idle()
    assert rig.sender.buffered == 0 and not rig.sender.writing


@needs_c_queue
def test_reset_keys_drops_the_keys_read_ahead(tcp_rigs: Callable[..., TCPRig]) -> None:
    """What a forked child runs first (so it never reuses its parent's keys)."""
    from blockws import _speedups

    rig = tcp_rigs()
    c_queue_only(rig)
    rig.allow_direct()
    rig.sender.queue.push(BINARY, b"a", None, 1)
    _speedups.reset_keys()
    rig.allow_direct()
    rig.sender.queue.push(BINARY, b"b", None, 1)
    first, second = rig.received(2)
    assert (first.payload, second.payload) == (b"a", b"b")
    assert rig.keys[0] != rig.keys[1]
