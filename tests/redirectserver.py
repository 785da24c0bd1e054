"""A raw-socket HTTP server that answers every request with a redirect, for the tests.

Not a test module. :class:`RedirectServer` listens on 127.0.0.1 (port 0), over TLS when
given a server context, and answers each request by its path from ``routes``
(``path -> (status, Location)``; an unknown path gets 404). It records every request
(path and lower-cased headers) and counts connections; each connection carries one request
and is closed after the answer, as a server that redirects an upgrade does.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from types import TracebackType

REASONS = {301: "Moved Permanently", 302: "Found", 303: "See Other",
           307: "Temporary Redirect", 308: "Permanent Redirect", 404: "Not Found"}
TIMEOUT = 10.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class RedirectServer:
    def __init__(self, routes: dict[str, tuple[int, str]],
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        host = "localhost" if tls is not None else "127.0.0.1"
        self.base = f"{'wss' if tls is not None else 'ws'}://{host}:{self.port}"
        self.requests: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="redirectserver", daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> RedirectServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._thread.join(TIMEOUT)
        self.listener.close()

    def _serve(self) -> None:
        # One connection at a time: the client opens the hops one after another.
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            with contextlib.suppress(OSError, ssl.SSLError), sock:
                sock.settimeout(TIMEOUT)
                conn = sock
                if self.tls is not None:
                    conn = self.tls.wrap_socket(sock, server_side=True)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        with self._lock:
            self.requests.append(Seen(path, headers))
        status, location = self.routes.get(path, (404, ""))
        head = [f"HTTP/1.1 {status} {REASONS[status]}", "Content-Length: 0", "Connection: close"]
        if location:
            head.append(f"Location: {location}")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
