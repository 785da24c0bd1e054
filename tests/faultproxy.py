"""A TCP relay that injects network faults, under the test's control.

:class:`FaultProxy` listens on 127.0.0.1 and relays every connection it accepts to one
upstream server, both ways. It sees bytes only (TLS and HTTP/2 pass through it as they
are), and can, at any moment, for every connection it relays:

* add **latency** (``latency = seconds``): each chunk is forwarded that long after it
  arrived, in order, while the next ones are already being read (a long pipe, not a
  slow reader);
* cap the **bandwidth** (``bandwidth = bytes per second``, each direction);
* **stall** (:meth:`stall` / :meth:`resume`): nothing is forwarded meanwhile; nothing is
  dropped either;
* act once a given number of bytes have gone downstream (server to client) from now:
  :meth:`arm` with ``"rst"`` (forward that many bytes, then reset the client's
  connection), ``"cut"`` (forward that many, then end it with a FIN both ways),
  ``"half_close"`` (forward that many, then FIN toward the client only: the client's
  bytes still reach the server) or ``"split"`` (forward that many, wait, then the rest:
  one frame in two reads);
* :meth:`half_close` at once.

``down_bytes`` counts what went downstream, so a test can measure a frame (:meth:`mark`,
then :meth:`since_mark`). Threads are named ``faultproxy-*`` and all end in :meth:`close`.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import struct
import threading
import time

CHUNK = 65536
_ACTIONS = ("rst", "cut", "half_close", "split")


class _Link:
    """One relayed connection: the client's socket and the upstream one."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.dead = False
        self.down_closed = False  # no more bytes toward the client
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, src, dst, down in (
            ("up", self.client, self.upstream, False),
            ("down", self.upstream, self.client, True),
        ):
            chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
            self.threads += [
                threading.Thread(target=self._read, args=(src, chunks), daemon=True,
                                 name=f"faultproxy-{name}-read"),
                threading.Thread(target=self._write, args=(dst, chunks, down), daemon=True,
                                 name=f"faultproxy-{name}-write"),
            ]
        for thread in self.threads:
            thread.start()

    def _read(self, src: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while True:
                # select() first: a reset closes the client socket under this thread,
                # and a recv() blocked on a closed socket would never return.
                if self.dead:
                    break
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(CHUNK)
                if not data:
                    break
                chunks.put((time.monotonic(), data))
        except (OSError, ValueError):  # ValueError: select() on a closed socket
            pass
        chunks.put((time.monotonic(), b""))

    def _write(self, dst: socket.socket, chunks: queue.Queue[tuple[float, bytes]],
               down: bool) -> None:
        proxy = self.proxy
        try:
            while True:
                arrived, data = chunks.get()
                if not data:
                    break
                proxy._flowing.wait()
                due = arrived + proxy.latency
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                while data:
                    proxy._flowing.wait()  # a stall may begin in the middle of a chunk
                    if self.dead or (down and self.down_closed):
                        return
                    piece = data
                    if proxy.bandwidth:
                        piece = data[: max(1, proxy.bandwidth // 50)]  # 20 ms at the cap
                    if down:
                        if not self._down(piece):
                            return
                    else:
                        dst.sendall(piece)
                    if proxy.bandwidth:
                        time.sleep(len(piece) / proxy.bandwidth)
                    data = data[len(piece):]
        except OSError:
            pass
        finally:
            if not self.dead and not (down and self.down_closed):
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

    def _down(self, piece: bytes) -> bool:
        """Send ``piece`` to the client, applying an armed action; False: stop forwarding."""
        proxy = self.proxy
        with proxy._lock:
            action, left = proxy._armed
            if action is not None and left <= len(piece):
                proxy._armed = (None, 0)
            elif action is not None:
                proxy._armed = (action, left - len(piece))
                action = None
            proxy.down_bytes += len(piece) if action is None else left
        if action is None:
            self.client.sendall(piece)
            return True
        proxy.fired.set()  # before the client can see any effect
        if left:
            self.client.sendall(piece[:left])
        if action == "split":
            time.sleep(0.05)  # the client reads the first part on its own
            with proxy._lock:
                proxy.down_bytes += len(piece) - left
            self.client.sendall(piece[left:])
            return True
        if action == "rst":
            self.reset()
        elif action == "cut":
            self.end()
        else:  # half_close
            self.down_closed = True
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_WR)
        return False

    def reset(self) -> None:
        """RST toward the client (SO_LINGER 0), FIN toward the server."""
        self.dead = True
        with contextlib.suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.client.close()
        self.end()

    def end(self) -> None:
        self.dead = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.end()
        for thread in self.threads:
            thread.join(5)
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """A fault-injecting TCP relay in front of ``upstream_port`` on 127.0.0.1."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        #: Seconds each chunk is held before it is forwarded.
        self.latency = 0.0
        #: Bytes per second per direction; 0 for no cap.
        self.bandwidth = 0
        #: Bytes forwarded toward the client so far, over every connection.
        self.down_bytes = 0
        #: Set when an armed action has fired.
        self.fired = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._armed: tuple[str | None, int] = (None, 0)
        self._mark = 0
        self.links: list[_Link] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy-accept",
                                          daemon=True)
        self._acceptor.start()

    def url(self, scheme: str = "ws", host: str = "127.0.0.1", path: str = "/") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                client.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, upstream)
            with self._lock:
                self.links.append(link)
            link.start()

    # -- faults --------------------------------------------------------------------------

    def stall(self) -> None:
        """Stop forwarding, both ways, on every connection (nothing is dropped)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def arm(self, action: str, after: int) -> None:
        """Do ``action`` once ``after`` more bytes have gone to the client."""
        assert action in _ACTIONS, action
        self.fired.clear()
        with self._lock:
            self._armed = (action, after)

    def half_close(self) -> None:
        """FIN toward every client now; what clients send still reaches the server."""
        with self._lock:
            links = list(self.links)
        for link in links:
            link.down_closed = True
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)

    def mark(self) -> None:
        with self._lock:
            self._mark = self.down_bytes

    def since_mark(self) -> int:
        with self._lock:
            return self.down_bytes - self._mark

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux)
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            links, self.links = self.links, []
        for link in links:
            link.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
