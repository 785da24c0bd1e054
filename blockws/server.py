"""A small embedded echo server: the protocol core in the server role.

``python -m blockws`` with no URL runs its demo against this server, so the
demo works offline. It is also handy in examples and tests of your own code::

    with EchoServer() as server:
        ws = blockws.connect(server.url)

It binds 127.0.0.1 on a free port, serves each connection on its own thread
(``blockws-echo-<n>``), echoes text as text and binary as binary, answers
pings, and completes the closing handshake. ``close()`` stops accepting,
drops open connections and joins every thread it started. It is a
demonstration server, not a production one: no TLS, no limits on clients.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from .exceptions import BlockwsError, HeadersTooLarge
from .frames import Opcode
from .handshake import accept_key
from .protocol import BinaryMessage, Protocol, Role, TextMessage

__all__ = ["EchoServer"]

_MAX_REQUEST_HEAD = 16 * 1024


class EchoServer:
    """An RFC 6455 echo server on 127.0.0.1 (``port=0`` picks a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="blockws-echo-accept")
        #: Number of messages echoed, over all connections.
        self.echoed = 0

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def start(self) -> EchoServer:
        self._acceptor.start()
        return self

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, drop every connection, join every thread."""
        with self._lock:
            self._closing = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._acceptor.is_alive():
            self._acceptor.join()
        for thread in list(self._threads):
            thread.join()

    def _accept_loop(self) -> None:
        count = 0
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                self._conns.add(conn)
                count += 1
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"blockws-echo-{count}"
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            extra = self._handshake(conn)
            if extra is not None:
                self._echo(conn, Protocol(Role.SERVER, max_message_size=None), extra)
        except (OSError, BlockwsError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bytes | None:
        """Read the upgrade request and answer it; returns bytes read past it."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(4096)
            if not data:
                return None
            buf += data
            if len(buf) > _MAX_REQUEST_HEAD:
                raise HeadersTooLarge("request head too large")
        head, _, extra = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if (
            not lines[0].startswith("GET ")
            or headers.get("upgrade", "").lower() != "websocket"
            or headers.get("sec-websocket-version") != "13"
            or not key
        ):
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return None
        conn.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
            ).encode("latin-1")
        )
        return extra

    def _echo(self, conn: socket.socket, proto: Protocol, data: bytes) -> None:
        while True:
            if data:
                out: list[bytes] = []
                for event in proto.receive_data(data):
                    if isinstance(event, TextMessage):
                        out += proto.encode_data(Opcode.TEXT, event.text.encode("utf-8"))
                        self.echoed += 1
                    elif isinstance(event, BinaryMessage):
                        out += proto.encode_data(Opcode.BINARY, bytes(event))
                        self.echoed += 1
                out += proto.data_to_send()
                if out:
                    conn.sendall(b"".join(out))
                if proto.close_received is not None or proto.failure is not None:
                    return  # the server closes the TCP connection first (RFC 6455 7.1.1)
            data = conn.recv(65536)
            if not data:
                return
