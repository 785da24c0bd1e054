"""A memory transport: the engine's tests run over it, without sockets.

:class:`MemoryTransport` is a :class:`~blockws.transport.Transport` whose
reads come from :meth:`MemoryTransport.feed` and whose writes are kept as
bytes, parsed back into frames by :meth:`MemoryTransport.frames`.
:func:`use_memory` puts an opener in place of the network one, so a
:class:`blockws.WebSocket` or a bare :class:`~blockws.connection.Connection`
opens over it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import pytest

import blockws.connection
from blockws.frames import Frame, encode_header
from blockws.opening import Opened
from blockws.transport import Transport

BytesLike = Any


class MemoryTransport(Transport):
    """A transport between the engine and the test (the test plays the server)."""

    def __init__(self, *, block_writes: bool = False, stuck_writes: bool = False) -> None:
        self._incoming: queue.Queue[bytes] = queue.Queue()
        self._written = bytearray()
        self._cond = threading.Condition()
        self._writes_open = threading.Event()
        if not block_writes:
            self._writes_open.set()
        self.aborted = False
        self.closed = False
        self.finished_closing = 0  # how many times finish_closing() was called
        # A blocked write that even abort() does not end (a peer that stopped
        # reading a shared connection): only unblock_writes() does.
        self.stuck_writes = stuck_writes
        self.write_started = threading.Event()  # a write() was entered

    # -- the test's side ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the "server"."""
        self._incoming.put(data)

    def feed_eof(self) -> None:
        self._incoming.put(b"")

    def unblock_writes(self) -> None:
        self._writes_open.set()

    def written(self) -> bytes:
        with self._cond:
            return bytes(self._written)

    def frames(self) -> list[Frame]:
        """Every frame written so far (client frames, unmasked)."""
        data = self.written()
        out = []
        while data:
            parsed = Frame.parse(data, masked=True)
            assert parsed is not None, "a partial frame was written"
            frame, used = parsed
            out.append(frame)
            data = data[used:]
        return out

    def wait_for(self, test: Callable[[list[Frame]], bool], timeout: float = 5.0) -> list[Frame]:
        """Wait until ``test(frames())`` holds; returns the frames."""
        with self._cond:
            ok = self._cond.wait_for(lambda: test(self._frames_locked()), timeout)
            frames = self._frames_locked()
        assert ok, f"timed out waiting; frames written: {frames}"
        return frames

    def _frames_locked(self) -> list[Frame]:
        data = bytes(self._written)
        out = []
        while data:
            parsed = Frame.parse(data, masked=True)
            if parsed is None:
                break
            out.append(parsed[0])
            data = data[parsed[1] :]
        return out

    # -- the Transport interface -----------------------------------------------------

    def recv(self, timeout: float | None = None) -> bytes:
        data = self._incoming.get(timeout=timeout)
        self.bytes_read += len(data)
        return data

    def write(self, chunks: Sequence[BytesLike]) -> None:
        data = b"".join(bytes(c) for c in chunks)
        self.write_started.set()
        while not self._writes_open.wait(0.05):
            if self.aborted and not self.stuck_writes:
                raise blockws.ConnectionLost("aborted while writing")
        if self.aborted and not self.stuck_writes:
            raise blockws.ConnectionLost("aborted while writing")
        self.bytes_written += len(data)
        with self._cond:
            self._written += data
            self._cond.notify_all()

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self._incoming.put(b"")

    def finish_closing(self) -> None:
        self.finished_closing += 1

    def close(self) -> None:
        self.closed = True


def server_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """An unmasked frame, as a server sends it."""
    return encode_header((0x80 if fin else 0) | rsv | opcode, len(payload), None) + payload


class MemoryOpener:
    """Stands in for :func:`blockws.connection.open_over_network`."""

    def __init__(self, transport_factory: Callable[[], MemoryTransport]) -> None:
        self.factory = transport_factory
        self.transports: list[MemoryTransport] = []
        self.requests: list[Any] = []
        self.gate: threading.Event | None = None  # set: the handshake "completes"

    def __call__(
        self,
        request: Any,
        options: Any,
        connector: Any,
        register: Any,
        new_request: Any,
        log: Any,
        redirect_request: Any = None,
    ) -> Opened:
        self.requests.append(request)
        transport = self.factory()
        self.transports.append(transport)
        register(transport)
        if self.gate is not None:
            while not self.gate.wait(0.01):
                if transport.aborted:
                    raise blockws.ConnectionLost("aborted during the handshake")
        if transport.aborted:
            raise blockws.ConnectionLost("aborted during the handshake")
        return Opened(transport, None, [])


@contextmanager
def use_memory(
    monkeypatch: pytest.MonkeyPatch, **transport_options: Any
) -> Iterator[MemoryOpener]:
    """Sockets opened inside the block run over memory transports."""
    opener = MemoryOpener(lambda: MemoryTransport(**transport_options))
    monkeypatch.setattr(blockws.connection, "open_over_network", opener)
    yield opener


#: The URL the sockets of these tests open (no network: see :func:`use_memory`).
MEMORY_URL = "ws://memory.invalid/chat"


def opened(opener: MemoryOpener, **options: Any) -> tuple[blockws.WebSocket, MemoryTransport]:
    """A socket opened over memory (``MEMORY_URL``), with ``on_open`` dispatched."""
    options.setdefault("extensions", [])
    ws = blockws.WebSocket(MEMORY_URL, **options)
    ws.open()
    assert ws.wait(5)
    ws.update()
    assert ws.is_open
    return ws, opener.transports[-1]
