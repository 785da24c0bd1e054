"""Peers and network plumbing for the HTTP/2 tests (tests/test_http2*.py).

Not a test module and no fixtures:

* :func:`nghttpx` -- nghttpx as an RFC 8441 gateway in front of any backend port (an
  in-process :class:`faultserver.FaultServer` that records what the client sent, or a peer);
* :class:`CountingProxy` -- a TCP proxy that counts connections and can cut them all;
* :class:`Relay` -- a TCP proxy whose two directions can be held (a peer that stops
  reading, or goes silent), which also spots the WebSocket pings inside h2c DATA frames;
* :class:`MiniH2` -- a hand-written h2c server (prior knowledge) for the frames the ``h2``
  package refuses to send: DATA beyond the flow-control windows, oversized frames.

Everything listens on 127.0.0.1 and is torn down by its context manager.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable

import pytest

from peerutil import free_port, start_server

KiB = 1024

# HTTP/2 frame types, flags and error codes (RFC 9113 6, 7).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL = 0x0, 0x1, 0x3, 0x6, 0x8
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def sbin_which(name: str) -> str | None:
    # Debian installs nghttpx in /usr/sbin, not on a non-root user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclass
class Gateway:
    wss: str  # wss://localhost:PORT
    ws: str  # ws://127.0.0.1:PORT (h2c with prior knowledge)
    proc: Any


@contextlib.contextmanager
def nghttpx(backend_port: int, keyfile: str, certfile: str, *options: str) -> Iterator[Gateway]:
    """nghttpx (RFC 8441 gateway) in front of ``backend_port``, TLS and h2c frontends."""
    exe = sbin_which("nghttpx")
    if exe is None:
        pytest.skip("nghttpx is not installed (Debian nghttp2-proxy; .ci/run installs it)")
    tls_port, clear_port = free_port(), free_port()
    cmd = [exe, "--conf=/dev/null", "--single-process", "--no-ocsp", "--workers=1",
           f"--frontend=127.0.0.1,{tls_port}", f"--frontend=127.0.0.1,{clear_port};no-tls",
           f"--backend=127.0.0.1,{backend_port}", *options, keyfile, certfile]
    with start_server(cmd, [tls_port, clear_port]) as proc:
        yield Gateway(f"wss://localhost:{tls_port}", f"ws://127.0.0.1:{clear_port}", proc)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# -- TCP proxies --------------------------------------------------------------------------


def accept_pair(
    listener: socket.socket, upstream_port: int
) -> tuple[socket.socket, socket.socket] | None:
    """Accept a client and connect it to the upstream port (both with TCP_NODELAY);
    ``None`` once the listener has been shut down."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return None
        try:
            upstream = socket.create_connection(("127.0.0.1", upstream_port), 5.0)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, upstream


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``: counts the connections it
    accepts (what the server sees) and can cut them all, like a server dropping them."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._cond = threading.Condition()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def url(self, scheme: str, host: str = "127.0.0.1", path: str = "/") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while (accepted := accept_pair(self.listener, self.upstream_port)) is not None:
            client, upstream = accepted
            pumps = [threading.Thread(target=self._pump, args=pair, name="proxy-pump", daemon=True)
                     for pair in ((client, upstream), (upstream, client))]
            with self._cond:
                self.accepted += 1
                self._socks += [client, upstream]
                self._threads += pumps
                self._cond.notify_all()
            for pump in pumps:
                pump.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(256 * KiB)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Shut down every proxied connection, both ways."""
        with self._cond:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self.listener.close()
        self._acceptor.join(5.0)
        self.cut()
        with self._cond:
            threads, socks = list(self._threads), list(self._socks)
        for thread in threads:
            thread.join(5.0)
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def counting_proxy(upstream_url: str) -> Iterator[CountingProxy]:
    proxy = CountingProxy(port_of(upstream_url))
    try:
        yield proxy
    finally:
        proxy.close()


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``upstream_port`` whose directions can be held.

    ``up`` (client to server) and ``down`` (server to client) are Events: while one is
    clear, that direction's pump neither reads nor forwards, so the sender's socket
    buffers fill up, as with a peer that stopped reading. ``rcvbuf`` shrinks the receive
    buffer of the accepted client connections, so they fill up sooner.

    The client-to-server bytes are read as h2c (preface, then frames), recorded in
    ``frames_up`` (payloads cut to 16 bytes): every DATA frame whose payload starts a
    WebSocket ping (``0x89``) is counted, and after
    :meth:`hold_down_at_next_ping` the next one holds ``down`` just before it is forwarded
    (so its pong cannot get through) and records when in ``ping_at``.
    """

    def __init__(self, upstream_port: int, rcvbuf: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port: int = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.down = threading.Event()
        self.up.set()
        self.down.set()
        self.pings = 0
        self._ping_cond = threading.Condition(threading.Lock())
        self.frames_up: list[Frame] = []
        self.ping_at: float | None = None
        self.held_at_ping = threading.Event()
        self._armed = False
        self._closed = False
        self._lock = threading.Lock()
        self.clients: list[socket.socket] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._acceptor.start()

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self.clients)

    def hold_down_at_next_ping(self) -> None:
        with self._lock:
            self._armed = True

    def _accept(self) -> None:
        while (accepted := accept_pair(self.listener, self.upstream_port)) is not None:
            client, upstream = accepted
            pumps = [
                threading.Thread(target=self._pump, args=(client, upstream, self.up, True),
                                 name="relay-up", daemon=True),
                threading.Thread(target=self._pump, args=(upstream, client, self.down, False),
                                 name="relay-down", daemon=True),
            ]
            with self._lock:
                self.clients.append(client)
                self._socks += [client, upstream]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, flowing: threading.Event,
              sniff: bool) -> None:
        buf = b""
        preface = sniff
        try:
            while True:
                flowing.wait()
                if self._closed:
                    break
                data = src.recv(64 * KiB)
                if not data:
                    break
                if sniff:
                    buf += data
                    if preface and len(buf) >= len(PREFACE):
                        buf, preface = buf[len(PREFACE):], False
                    if not preface:
                        buf = self._sniff(buf)
                flowing.wait()
                if self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _sniff(self, buf: bytes) -> bytes:
        """Look at the whole frames in ``buf``; return the incomplete rest."""
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            head = buf[pos:pos + 9]
            got = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF,
                        buf[pos + 9:pos + 9 + min(length, 16)])
            with self._lock:
                self.frames_up.append(got)
            if got.type == DATA and length and got.payload[0] == 0x89:
                with self._ping_cond:
                    self.pings += 1
                    self._ping_cond.notify_all()
                with self._lock:
                    if self._armed:
                        self._armed = False
                        self.down.clear()  # before the ping is forwarded: no pong gets through
                        self.ping_at = time.monotonic()
                        self.held_at_ping.set()
            pos += 9 + length
        return buf[pos:]

    def wait_pings(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` pings in all have gone up; False on timeout."""
        with self._ping_cond:
            return self._ping_cond.wait_for(lambda: self.pings >= count, timeout)

    def unread(self) -> int:
        """Bytes the clients sent that wait, unread, in the relay's receive buffers."""
        total = 0
        with self._lock:
            clients = list(self.clients)
        for sock in clients:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
            total += struct.unpack("i", raw)[0]
        return total

    def wait_up_stalled(self, timeout: float = 10.0) -> None:
        """With ``up`` held: wait until the clients' unread bytes stop growing (their
        writers are then blocked in the socket). There is no event for "a peer's buffer
        is full", so this samples every 50 ms."""
        deadline = time.monotonic() + timeout
        last, same = -1, 0
        while same < 3:
            assert time.monotonic() < deadline, f"the relay's buffer never filled ({last})"
            time.sleep(0.05)
            now = self.unread()
            same = same + 1 if now == last and now > 0 else 0
            last = now

    def close(self) -> None:
        self._closed = True
        self.up.set()
        self.down.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(5.0)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5.0)
        for sock in socks:
            sock.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a hand-written HTTP/2 server ------------------------------------------------------------


@dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """RST_STREAM's error code, or GOAWAY's."""
        offset = 4 if self.type == GOAWAY else 0
        return int.from_bytes(self.payload[offset:offset + 4], "big")

    @property
    def increment(self) -> int:
        return int.from_bytes(self.payload[:4], "big") & 0x7FFFFFFF


def frame(type_: int, flags: int, stream_id: int, payload: bytes = b"",
          length: int | None = None) -> bytes:
    """One HTTP/2 frame; ``length`` overrides the announced length (to lie about it)."""
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes((type_, flags)) + stream_id.to_bytes(4, "big") + payload


#: ``:status: 200`` as an HPACK header block: index 8 of the static table (RFC 7541 A).
STATUS_200 = b"\x88"


@dataclass
class MiniConn:
    """The server side of one h2c connection: frames in and out, by hand."""

    sock: socket.socket
    frames: list[Frame] = field(default_factory=list)  # every frame the client sent
    _buf: bytes = b""
    _preface: bool = True

    def _fill(self) -> None:
        data = self.sock.recv(256 * KiB)
        if not data:
            raise EOFError("the client closed the connection")
        self._buf += data

    def read_frame(self) -> Frame:
        if self._preface:
            while len(self._buf) < len(PREFACE):
                self._fill()
            assert self._buf.startswith(PREFACE), self._buf[:24]
            self._buf, self._preface = self._buf[len(PREFACE):], False
        while len(self._buf) < 9:
            self._fill()
        length = int.from_bytes(self._buf[:3], "big")
        while len(self._buf) < 9 + length:
            self._fill()
        head, payload = self._buf[:9], self._buf[9:9 + length]
        self._buf = self._buf[9 + length:]
        got = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
        self.frames.append(got)
        return got

    def read_until(self, match: Callable[[Frame], bool]) -> Frame:
        while True:
            got = self.read_frame()
            if match(got):
                return got

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, settings: dict[int, int] | None = None) -> None:
        """Our SETTINGS (extended CONNECT on), then ACK the client's."""
        values = {SETTINGS_ENABLE_CONNECT_PROTOCOL: 1, **(settings or {})}
        body = b"".join(struct.pack("!HI", k, v) for k, v in values.items())
        self.send(frame(SETTINGS, 0, 0, body))
        self.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK)
        self.send(frame(SETTINGS, ACK, 0))

    def accept(self, then: bytes = b"") -> int:
        """Answer the next extended CONNECT with 200; ``then`` goes in the same write."""
        request = self.read_until(lambda f: f.type == HEADERS)
        assert request.flags & END_HEADERS, "CONTINUATION is not handled here"
        self.send(frame(HEADERS, END_HEADERS, request.stream_id, STATUS_200) + then)
        return request.stream_id

    def data(self, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
        """DATA frames carrying ``payload`` (at most 16 KiB each, the default maximum)."""
        step = 16 * KiB
        return b"".join(frame(DATA, flags if i + step >= len(payload) else 0, stream_id,
                              payload[i:i + step]) for i in range(0, max(len(payload), 1), step))


class MiniH2:
    """A one-scenario h2c server: ``scenario(conn)`` runs on its own thread for every
    accepted connection; its exceptions (other than the client leaving) are re-raised
    when the ``with`` block ends."""

    def __init__(self, scenario: Callable[[MiniConn], None]) -> None:
        self.scenario = scenario
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.conns: list[MiniConn] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()  # the first scenario ended
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="mini-h2", daemon=True)

    def __enter__(self) -> MiniH2:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(10.0)
            conn = MiniConn(sock)
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="mini-h2-conn",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: MiniConn) -> None:
        try:
            self.scenario(conn)
        except (EOFError, ConnectionError):
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.errors.append(exc)
        finally:
            self.done.set()
            with contextlib.suppress(OSError):
                conn.sock.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(5.0)
        for conn in list(self.conns):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5.0)
        if exc_type is None and self.errors:
            raise self.errors[0]
