"""Raw-socket WebSocket servers that misbehave on purpose, and a callback recorder.

Not a test module. A :class:`FaultServer` listens on 127.0.0.1 (port 0) and runs a
*handler* on its own thread for every connection it accepts. The handler gets a
:class:`Peer`, a thin wrapper over the accepted socket with just enough of RFC 6455 to
answer the upgrade correctly (or not), send any frame (legal or not) and read the
client's frames. The frame code here is written from the RFC on purpose, not imported
from blockws, so a bug in blockws's framing cannot hide in the test's own.

:class:`Recorder` collects a socket's callbacks in the order they ran and pumps
``ws.wait()``/``ws.update()`` until a condition holds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Callable

import blockws

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: How long a fault server's socket operations may block before giving up.
PEER_TIMEOUT = 10.0

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def frame_bytes(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """One frame on the wire. ``rsv`` holds the RSV bits in place (RSV1 = 0x40);
    ``length`` overrides the announced payload length (to lie about it)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 1 << 16:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if mask is not None:
        header += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + payload


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(PEER_TIMEOUT)
        self._buf = b""
        #: The upgrade request's headers, names lower-cased (after read_request()).
        self.request_headers: dict[str, str] = {}
        self.request_line = ""
        #: Every frame read from the client: (fin, opcode, payload).
        self.frames: list[tuple[bool, int, bytes]] = []
        #: The close frame the client sent: (code or None, reason), once read.
        self.close_received: tuple[int | None, str] | None = None
        self.done = threading.Event()

    # -- bytes ---------------------------------------------------------------

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise EOFError("client closed the connection")
        self._buf += data

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- the opening handshake -------------------------------------------------

    def read_request(self) -> dict[str, str]:
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.request_headers[name.strip().lower()] = value.strip()
        return self.request_headers

    def response_101(
        self,
        *,
        accept: str | None = "",
        extra: Sequence[str] = (),
        upgrade: str | None = "websocket",
        connection: str | None = "Upgrade",
    ) -> bytes:
        """A 101 response to the request read; ``accept=""`` means the right value,
        ``None`` leaves a header out."""
        if accept == "":
            accept = accept_value(self.request_headers["sec-websocket-key"])
        lines = ["HTTP/1.1 101 Switching Protocols"]
        if upgrade is not None:
            lines.append(f"Upgrade: {upgrade}")
        if connection is not None:
            lines.append(f"Connection: {connection}")
        if accept is not None:
            lines.append(f"Sec-WebSocket-Accept: {accept}")
        lines.extend(extra)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def handshake(self, extra: Sequence[str] = ()) -> None:
        """Read the upgrade request and answer it correctly."""
        self.read_request()
        self.send(self.response_101(extra=extra))

    # -- frames ------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.send(frame_bytes(opcode, payload, **kwargs))

    def read_frame(self) -> tuple[bool, int, bytes]:
        """The next frame from the client, unmasked; asserts it was masked."""
        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        assert b1 & 0x80, "client frame not masked (RFC 6455 5.3)"
        key = self._take(4)
        data = self._take(n)
        payload = (int.from_bytes(data, "little") ^ int.from_bytes(
            (key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
        frame = (bool(b0 & 0x80), b0 & 0x0F, payload)
        self.frames.append(frame)
        if frame[1] == OP_CLOSE and self.close_received is None:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.close_received = (code, payload[2:].decode("utf-8", "replace"))
        return frame

    def read_until_close(self) -> tuple[int | None, str]:
        """Read frames until the client's close frame; returns its (code, reason)."""
        while self.close_received is None:
            self.read_frame()
        return self.close_received

    def drain_forever(self) -> None:
        """Read and discard everything until the client goes away; never answer."""
        with contextlib.suppress(socket.timeout):
            while True:
                self._buf = b""
                self._fill()

    # -- ending ----------------------------------------------------------------

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """Close with an RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


Handler = Callable[[Peer], None]


class FaultServer:
    """A threaded TCP server on 127.0.0.1 running ``handler(peer)`` per connection.

    Use it as a context manager: on exit every connection is shut down, every thread
    joined and every descriptor closed, then an unexpected exception from a handler
    (anything but the client going away) is re-raised. ``rcvbuf`` shrinks the
    accepted sockets' receive buffer (set on the listener, before any window is
    advertised).
    """

    def __init__(self, handler: Handler, *, rcvbuf: int | None = None) -> None:
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="faultserver-accept", daemon=True
        )

    def __enter__(self) -> FaultServer:
        self._accept_thread.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down
            peer = Peer(sock)
            thread = threading.Thread(target=self._serve, args=(peer,),
                                      name="faultserver-peer", daemon=True)
            with self._cond:
                self.peers.append(peer)
                self._threads.append(thread)
                self._cond.notify_all()
            thread.start()

    def _serve(self, peer: Peer) -> None:
        try:
            self.handler(peer)
        except socket.timeout as exc:  # the client never did what the handler waited for
            self.errors.append(exc)
        except (EOFError, OSError):
            pass  # the client went away (or close() shut us down): how faults usually end
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.errors.append(exc)
        finally:
            peer.close()
            peer.done.set()

    def peer(self, index: int = 0, timeout: float = PEER_TIMEOUT) -> Peer:
        """The ``index``-th accepted connection, once its handler has finished."""
        deadline = time.monotonic() + timeout
        with self._cond:
            arrived = self._cond.wait_for(lambda: len(self.peers) > index, timeout)
            assert arrived, f"connection {index} never came"
            peer = self.peers[index]
        assert peer.done.wait(max(0.0, deadline - time.monotonic())), "handler still running"
        return peer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._accept_thread.join(PEER_TIMEOUT)
        self.listener.close()
        with self._cond:
            peers, threads = list(self.peers), list(self._threads)
        for peer in peers:
            peer.abort()
        for thread in threads:
            thread.join(PEER_TIMEOUT)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        if exc_type is None and self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def fault_server(handler: Handler, **kwargs: Any) -> Iterator[FaultServer]:
    with FaultServer(handler, **kwargs) as server:
        yield server


# -- recording callbacks ------------------------------------------------------------


class Recorder:
    """Records a socket's callbacks as tuples, in the order they ran:

    ``("open",)``, ``("text", str)``, ``("binary", bytes)``, ``("closed", code, reason)``.
    ``segments`` keeps every BufferSegment ``on_binary`` received (to check release).
    """

    def __init__(self, binary: bool = True, text: bool = True) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.segments: list[blockws.BufferSegment] = []
        self._text = text
        self._binary = binary

    def callbacks(self) -> dict[str, Any]:
        cbs: dict[str, Any] = {"on_open": self.on_open, "on_closed": self.on_closed}
        if self._text:
            cbs["on_message"] = self.on_message
        if self._binary:
            cbs["on_binary"] = self.on_binary
        return cbs

    def on_open(self, ws: blockws.WebSocket) -> None:
        self.events.append(("open",))

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        self.events.append(("text", text))

    def on_binary(self, ws: blockws.WebSocket, seg: blockws.BufferSegment) -> None:
        assert not seg.released
        self.segments.append(seg)
        self.events.append(("binary", bytes(seg)))

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        self.events.append(("closed", code, reason))

    # -- queries ---------------------------------------------------------------

    @property
    def opened(self) -> bool:
        return ("open",) in self.events

    @property
    def closes(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "closed"]

    @property
    def messages(self) -> list[Any]:
        return [e[1] for e in self.events if e[0] in ("text", "binary")]

    def pump_until(self, ws: blockws.WebSocket, condition: Callable[[], bool],
                   timeout: float = 10.0, what: str = "condition") -> None:
        """Run ``ws.update()`` until ``condition()`` holds, waiting on ``ws.wait()``."""
        deadline = time.monotonic() + timeout
        while True:
            ws.update()
            if condition():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.summary()}")
            ws.wait(left)

    def wait_open(self, ws: blockws.WebSocket, timeout: float = 10.0) -> None:
        self.pump_until(ws, lambda: self.opened or bool(self.closes), timeout, "on_open")
        assert self.opened, f"socket did not open: {self.summary()} error={ws.error!r}"

    def wait_closed(self, ws: blockws.WebSocket, timeout: float = 10.0) -> tuple[int, str]:
        """Pump until on_closed ran; then check it ran exactly once. Returns (code, reason)."""
        self.pump_until(ws, lambda: bool(self.closes), timeout, "on_closed")
        # Nothing may follow on_closed: the socket's threads are gone once it ran.
        assert not ws.wait(0.05) and ws.update() == 0
        assert len(self.closes) == 1, self.summary()
        _, code, reason = self.closes[0]
        return code, reason

    def summary(self) -> list[tuple[Any, ...]]:
        return [e if e[0] not in ("text", "binary") or len(e[1]) <= 40
                else (e[0], f"<{len(e[1])}>") for e in self.events]


def random_text(nbytes: int) -> str:
    """A str of exactly ``nbytes`` UTF-8 bytes, mostly 2-byte characters."""
    return "é" * (nbytes // 2) + "a" * (nbytes % 2)
