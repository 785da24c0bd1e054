"""The benchmark server: picows (asyncio + Cython) with coalesced writes, plus a plain-TCP twin.

    python -m benchmarks.server WS_PORT TCP_PORT

One process, one event loop, two listeners on 127.0.0.1. The harness pins it
to its own CPU and reads its CPU time from ``/proc``.

WebSocket endpoints (the path picks the behaviour):

* ``/echo``: every data frame goes back as it came (opcode, FIN bit and
  payload; fragments as fragments). Frames are not sent one by one: the
  replies to all the frames parsed from one read are joined and written with
  one ``write()`` when picows reports the last frame of the buffer
  (``frame.last_in_buffer``). This coalescing is what keeps the server ahead
  of every client (see the probe client in ``benchmarks/clients.py``).
* ``/flood``: after a text message ``"N SIZE"``, sends N binary messages of
  SIZE bytes, from a pre-built chunk, honouring ``pause_writing``.
* ``/sink``: counts binary messages (and their bytes); a text message is a
  query, answered with the text ``"COUNT BYTES"``.
* ``/stream``: after a text message ``"RATE SIZE SECONDS"``, sends RATE binary
  messages of SIZE bytes per second for SECONDS, paced in 1 ms ticks; the
  first 8 bytes of each payload are ``time.perf_counter_ns()`` (CLOCK_MONOTONIC,
  the same clock in every process of the host) when it was written. Ends with
  a text message ``"done SENT"``.
* ``/pulse?GROUP``: the same messages as ``/stream``, for many sockets at low
  rates (W8: 2,000 sockets at 10 msgs/s each): one scheduler task serves
  every ``/pulse`` socket from a heap of due times, instead of a task per
  socket waking every millisecond. ``"start RATE SIZE SECONDS"`` on any socket
  of GROUP (the query string: W8 uses its process id) starts every other
  socket of the group, so one message on a control connection starts 2,000
  streams; ``"stop"`` ends them all,
  each with its ``"done SENT"``; ``"RATE SIZE SECONDS"`` starts just the one
  socket. Each socket's first message is due at a random phase within its
  period, so the load is spread evenly; a late message goes out as soon as
  the task runs again, and the next one a full period later (no bursts).

The plain-TCP listener (the "TCP ceiling": the same payload bytes with no
WebSocket framing) reads one command line first: ``echo``, ``flood TOTAL``
(sends TOTAL bytes), ``sink TOTAL`` (answers ``ok`` once TOTAL bytes arrived)
or ``idle``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import resource
import struct
import sys
import time
from typing import Any

from picows import WSListener, WSMsgType, WSTransport, ws_create_server

_OPCODE = {
    WSMsgType.CONTINUATION: 0,
    WSMsgType.TEXT: 1,
    WSMsgType.BINARY: 2,
}
_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")
# Two-byte headers for every (first byte, length < 126) pair, built once.
_SMALL = {(b0, n): bytes((b0, n)) for b0 in (0, 1, 2, 0x80, 0x81, 0x82) for n in range(126)}
_CHUNK = 64 * 1024


def frame_header(b0: int, n: int) -> bytes:
    """Header of an unmasked (server-to-client) frame with first byte ``b0``."""
    if n < 126:
        return _SMALL[b0, n]
    if n < 65536:
        return _H16.pack(b0, 126, n)
    return _H64.pack(b0, 127, n)


def data_frame(opcode: int, payload: bytes) -> bytes:
    return frame_header(0x80 | opcode, len(payload)) + payload


class _Base(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.write: Any = None
        self.paused = False
        self.resumed: asyncio.Event | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write

    def on_close(self, transport: WSTransport, frame: Any) -> None:
        transport.send_close(frame.get_close_code())
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.paused = False
        if self.resumed is not None:
            self.resumed.set()  # a paused flood or stream task ends

    def pause_writing(self) -> None:
        self.paused = True
        if self.resumed is not None:
            self.resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        if self.resumed is not None:
            self.resumed.set()

    async def drain(self) -> None:
        if self.paused:
            if self.resumed is None:
                self.resumed = asyncio.Event()
            self.resumed.clear()
            await self.resumed.wait()


class Echo(_Base):
    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        opcode = _OPCODE.get(frame.msg_type)
        if opcode is None:
            if frame.msg_type == WSMsgType.CLOSE:
                if self.out:
                    self.write(b"".join(self.out))
                    self.out.clear()
                self.on_close(transport, frame)
            return
        payload = frame.get_payload_as_bytes()
        out = self.out
        out.append(frame_header((0x80 if frame.fin else 0) | opcode, len(payload)))
        out.append(payload)
        if frame.last_in_buffer:
            self.write(b"".join(out))
            out.clear()


class Flood(_Base):
    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            n, size = map(int, frame.get_payload_as_ascii_text().split())
            asyncio.ensure_future(self.flood(n, size))
        elif frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)

    async def flood(self, n: int, size: int) -> None:
        one = data_frame(2, bytes(size))
        per_chunk = max(1, _CHUNK // len(one))
        chunk = one * per_chunk
        assert self.transport is not None
        while n > 0 and not self.transport.is_disconnected:
            if n >= per_chunk:
                self.write(chunk)
                n -= per_chunk
            else:
                self.write(one * n)
                n = 0
            if self.paused:
                await self.drain()


class Sink(_Base):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bytes = 0

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        mt = frame.msg_type
        if mt == WSMsgType.BINARY or mt == WSMsgType.CONTINUATION:
            self.bytes += frame.payload_size
            if frame.fin:
                self.count += 1
        elif mt == WSMsgType.TEXT:
            self.write(data_frame(1, f"{self.count} {self.bytes}".encode()))
        elif mt == WSMsgType.CLOSE:
            self.on_close(transport, frame)


class Stream(_Base):
    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            rate, size, seconds = frame.get_payload_as_ascii_text().split()
            asyncio.ensure_future(self.stream(float(rate), int(size), float(seconds)))
        elif frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)

    async def stream(self, rate: float, size: int, seconds: float) -> None:
        assert self.transport is not None
        size = max(size, 8)
        head = frame_header(0x82, size)
        pad = bytes(size - 8)
        pack = struct.Struct("!Q").pack
        now = time.perf_counter_ns
        start = now()
        end = start + int(seconds * 1e9)
        sent = 0
        while not self.transport.is_disconnected:
            t = now()
            if t >= end:
                break
            due = int((t - start) * rate / 1e9) + 1 - sent
            if due > 0:
                frame = head + pack(t) + pad
                self.write(frame * due)
                sent += due
            if self.paused:
                await self.drain()
            await asyncio.sleep(0.001 if rate >= 1000 else min(0.001, 0.5 / rate))
        if not self.transport.is_disconnected:
            self.write(data_frame(1, f"done {sent}".encode()))


class Pulses:
    """The one scheduler of every ``/pulse`` socket: a heap of (due, seq, Pulse), and groups."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, Pulse]] = []
        self.groups: dict[bytes, set[Pulse]] = {}
        self.seq = 0
        self.task: asyncio.Future[None] | None = None
        self.wake: asyncio.Event | None = None

    def add(self, listener: Pulse, rate: float, size: int, seconds: float) -> None:
        now = time.perf_counter_ns()
        listener.period_ns = max(1, int(1e9 / rate))
        listener.end_ns = now + int(seconds * 1e9)
        listener.sent = 0
        size = max(size, 8)
        listener.head = frame_header(0x82, size)
        listener.pad = bytes(size - 8)
        listener.streaming = True
        self.push(now + random.randrange(listener.period_ns), listener)
        if self.wake is None:
            self.wake = asyncio.Event()
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.run())

    def start_group(
        self, sender: Pulse, group: bytes, rate: float, size: int, seconds: float
    ) -> None:
        """Start every socket of ``group`` but ``sender`` (a control connection)."""
        for lst in list(self.groups.get(group, ())):
            if not lst.streaming and lst is not sender:
                self.add(lst, rate, size, seconds)

    def stop_group(self, group: bytes) -> None:
        """End every stream of ``group`` now: each of its sockets gets ``"done SENT"``."""
        for lst in self.groups.get(group, ()):
            if lst.streaming:
                lst.done()
        self.heap[:] = [e for e in self.heap if e[2].streaming]
        heapq.heapify(self.heap)

    def push(self, due: int, listener: Pulse) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, listener))

    async def run(self) -> None:
        assert self.wake is not None
        heap, now, pack = self.heap, time.perf_counter_ns, struct.Struct("!Q").pack
        while True:
            if not heap:
                self.wake.clear()
                await self.wake.wait()
                continue
            t = now()
            while heap and heap[0][0] <= t:
                due, _, lst = heapq.heappop(heap)
                assert lst.transport is not None
                if lst.transport.is_disconnected or not lst.streaming:
                    continue
                if t >= lst.end_ns:
                    lst.done()
                    continue
                lst.write(lst.head + pack(t) + lst.pad)
                lst.sent += 1
                self.push(max(due + lst.period_ns, t + 1), lst)
            if heap:
                delay = (heap[0][0] - now()) / 1e9
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.05))
                else:
                    await asyncio.sleep(0)


PULSES = Pulses()


class Pulse(_Base):
    """``/pulse?GROUP``: a socket of GROUP (any bytes; the query string, maybe empty).

    Text commands: ``"RATE SIZE SECONDS"`` streams to this socket; ``"start RATE
    SIZE SECONDS"`` to every other socket of the group connected now; ``"stop"``
    ends every stream of the group at once.
    """

    def __init__(self, group: bytes = b"") -> None:
        super().__init__()
        self.group = group
        self.period_ns = self.end_ns = self.sent = 0
        self.head = self.pad = b""
        self.streaming = False

    def done(self) -> None:
        self.streaming = False
        if self.transport is not None and not self.transport.is_disconnected:
            self.write(data_frame(1, f"done {self.sent}".encode()))

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        PULSES.groups.setdefault(self.group, set()).add(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        self.streaming = False
        members = PULSES.groups.get(self.group)
        if members is not None:
            members.discard(self)
            if not members:
                del PULSES.groups[self.group]

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            words = frame.get_payload_as_ascii_text().split()
            if words == ["stop"]:
                PULSES.stop_group(self.group)
            elif words[0] == "start":
                rate, size, seconds = words[1:]
                PULSES.start_group(self, self.group, float(rate), int(size), float(seconds))
            else:
                rate, size, seconds = words
                PULSES.add(self, float(rate), int(size), float(seconds))
        elif frame.msg_type == WSMsgType.CLOSE:
            self.on_close(transport, frame)


_ROUTES = {
    b"/echo": Echo,
    b"/flood": Flood,
    b"/sink": Sink,
    b"/stream": Stream,
    b"/pulse": Pulse,
}


def route(request: Any) -> WSListener | None:
    path, _, query = request.path.partition(b"?")
    if path == b"/pulse":
        return Pulse(query)
    cls = _ROUTES.get(path)
    return cls() if cls is not None else None


class TCPPeer(asyncio.Protocol):
    """The plain-TCP twin of the endpoints above (no framing, no masking)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.mode = ""
        self.total = 0
        self.got = 0
        self.paused = False
        self.left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.mode == "echo":
            self.transport.write(data)
            return
        if self.mode == "sink":
            self.got += len(data)
            if self.got >= self.total:
                self.transport.write(b"ok\n")
                self.mode = "idle"
            return
        if self.mode:
            return
        self.head += data
        if b"\n" not in self.head:
            return
        line, rest = self.head.split(b"\n", 1)
        words = line.decode().split()
        self.mode = words[0]
        if self.mode in ("flood", "sink"):
            self.total = int(words[1])
        if self.mode == "flood":
            self.left = self.total
            self.pump()
        elif rest:
            self.data_received(rest)

    def pump(self) -> None:
        assert self.transport is not None
        block = bytes(_CHUNK)
        while self.left > 0 and not self.paused and not self.transport.is_closing():
            n = min(self.left, _CHUNK)
            self.transport.write(block if n == _CHUNK else block[:n])
            self.left -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == "flood":
            self.pump()


async def serve(ws_port: int, tcp_port: int) -> None:
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(TCPPeer, "127.0.0.1", tcp_port, backlog=2048)
    ws = await ws_create_server(
        route,
        "127.0.0.1",
        ws_port,
        backlog=2048,
        max_frame_size=64 * 1024 * 1024,
        read_buffer_init_size=256 * 1024,
        websocket_handshake_timeout=30,
    )
    async with tcp, ws:
        await asyncio.gather(tcp.serve_forever(), ws.serve_forever())


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 <= hard:  # W8 holds 2,000 sockets (more with --scale)
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, hard))
    ws_port, tcp_port = int(sys.argv[1]), int(sys.argv[2])
    asyncio.run(serve(ws_port, tcp_port))


if __name__ == "__main__":
    main()
