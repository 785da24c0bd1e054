"""An HTTP CONNECT proxy for the tests, over plain TCP or TLS, that misbehaves on demand.

:class:`ConnectProxy` listens on 127.0.0.1, answers ``CONNECT host:port`` with 200 and then
relays bytes both ways (the server's TLS, if any, passes through as it is). Unlike the real
proxies of tests/test_proxy.py it can:

* deliver what the server sends in pieces (``chunk=N``): each piece is its own write, so
  over TLS to the proxy each is its own TLS record and the client reads the server's
  bytes a few at a time;
* answer 200 and then relay nothing (``silent=True``), recording when the client speaks
  (:attr:`client_spoke`);
* :meth:`inject` bytes toward the client at a moment the test chooses.

Each tunnel is relayed by one thread (a ``select`` loop), so a TLS socket is never used
from two threads. Threads are named ``connectproxy-*``; :meth:`close` ends them all.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading

TIMEOUT = 10.0


class ConnectProxy:
    """See the module docstring. ``ssl_context`` (a server context) makes it an
    ``https://`` proxy, reached as ``localhost``."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *, chunk: int | None = None,
                 silent: bool = False) -> None:
        self.ssl_context = ssl_context
        self.chunk = chunk
        self.silent = silent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.url = (f"https://localhost:{self.port}" if ssl_context is not None
                    else f"http://127.0.0.1:{self.port}")
        #: The CONNECT request lines received, in order.
        self.requests: list[str] = []
        #: Set once a tunnel is open (200 sent).
        self.tunnel_open = threading.Event()
        #: Set when the client sends its first bytes through an open tunnel.
        self.client_spoke = threading.Event()
        self._injections: queue.Queue[bytes] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = False
        self._accept_thread = threading.Thread(target=self._accept, daemon=True,
                                               name="connectproxy-accept")

    def __enter__(self) -> ConnectProxy:
        self._accept_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inject(self, data: bytes) -> None:
        """Send ``data`` to the client of the open tunnel(s), between two relayed writes."""
        self._injections.put(data)
        self._wake_w.send(b"x")

    # -- serving -------------------------------------------------------------------------

    def _keep(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._sockets.append(sock)
            return True

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self._keep(sock):
                sock.close()
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                      name="connectproxy-tunnel")
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        upstream: socket.socket | None = None
        client: socket.socket = sock
        try:
            sock.settimeout(TIMEOUT)
            if self.ssl_context is not None:
                client = self.ssl_context.wrap_socket(sock, server_side=True)
                self._keep(client)
            request = b""
            while b"\r\n\r\n" not in request:
                data = client.recv(4096)
                if not data:
                    return
                request += data
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            self.requests.append(line)
            host, _, port = line.split()[1].rpartition(":")
            if not self.silent:  # a silent proxy never reaches the server
                upstream = socket.create_connection((host.strip("[]"), int(port)), TIMEOUT)
                self._keep(upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.tunnel_open.set()
            client.settimeout(None)
            self._relay(client, upstream)
        except (OSError, ValueError):
            pass  # the client went away, or close() shut us down
        finally:
            for s in (client, sock, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _relay(self, client: socket.socket, upstream: socket.socket | None) -> None:
        watched = [client, self._wake_r] if upstream is None else [client, upstream, self._wake_r]
        while True:
            pending = isinstance(client, ssl.SSLSocket) and client.pending() > 0
            ready = [client] if pending else select.select(watched, [], [])[0]
            for src in ready:
                if src is self._wake_r:
                    self._wake_r.recv(64)
                    while not self._injections.empty():
                        client.sendall(self._injections.get())
                    continue
                data = src.recv(65536)
                if not data:
                    return
                if src is client:
                    self.client_spoke.set()
                    if upstream is not None:
                        upstream.sendall(data)
                    continue
                assert upstream is not None
                step = self.chunk or len(data)
                for i in range(0, len(data), step):
                    client.sendall(data[i:i + step])

    def close(self) -> None:
        with self._lock:
            self._closing = True
            sockets, threads = list(self._sockets), list(self._threads)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accept_thread.join(TIMEOUT)
        for sock in sockets:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._wake_w.send(b"x")
        for thread in threads:
            thread.join(TIMEOUT)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
