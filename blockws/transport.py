"""Transports: how a WebSocket's bytes travel, behind one small interface.

A :class:`Transport` is a connected byte stream. The WebSocket layer needs
only four things from it:

* :meth:`Transport.recv` -- blocking read (``b""`` at EOF), used for the
  opening handshake and by the default :meth:`Transport.run` loop;
* :meth:`Transport.run` -- deliver incoming bytes to a :class:`Sink` until
  the stream ends. A TCP transport loops on the calling (reader) thread; a
  transport fed by a shared connection, such as an HTTP/2 stream, is pushed
  data by that connection's thread and returns at once;
* :meth:`Transport.write` -- blocking write of a batch of chunks, from the
  writer thread;
* :meth:`Transport.abort` / :meth:`Transport.close` -- unblock every reader
  and writer at once (from any thread), then release the file descriptor.

``OSError`` is translated into :mod:`blockws.exceptions` here, once, at the
I/O boundary (:func:`map_os_errors`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol, Union

from .exceptions import ConnectError, ConnectionLost, OpenTimeout, TLSError, TransportError

__all__ = [
    "Sink",
    "Transport",
    "TCPTransport",
    "Deadline",
    "connect_tcp",
    "map_os_errors",
]

BytesLike = Union[bytes, bytearray, memoryview]

#: Bytes asked for per ``recv``: large enough to take many small frames per
#: system call, and whole TLS records.
RECV_SIZE = 256 * 1024


class Sink(Protocol):
    """Where a transport delivers what it reads (the WebSocket's reader side)."""

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: BaseException | None) -> None:
        """The stream ended: ``exc`` is ``None`` for a clean EOF."""


class Deadline:
    """One timeout spread over several steps (DNS, connect, TLS, handshake)."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (``None`` for no limit); raises ``OpenTimeout`` at zero."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OpenTimeout("timed out opening the WebSocket")
        return left


@contextlib.contextmanager
def map_os_errors(connecting: bool = False) -> Iterator[None]:
    """Translate ``OSError`` and ``ssl.SSLError`` into blockws exceptions."""
    try:
        yield
    except TransportError:
        raise
    except socket.timeout as exc:  # TimeoutError on 3.10+
        raise OpenTimeout("timed out opening the WebSocket") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(f"TLS certificate verification failed: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        if connecting:
            raise TLSError(f"TLS handshake failed: {exc}") from exc
        raise ConnectionLost(f"TLS error: {exc}") from exc
    except socket.gaierror as exc:
        raise ConnectError(f"cannot resolve host: {exc.strerror or exc}") from exc
    except OSError as exc:
        if connecting:
            raise ConnectError(f"cannot connect: {exc.strerror or exc}") from exc
        raise ConnectionLost(f"connection lost: {exc.strerror or exc}") from exc


class Transport:
    """Base class of transports; see the module docstring for the contract."""

    #: Which HTTP version carried the opening handshake: ``"1.1"`` or ``"2"``.
    http_version = "1.1"
    #: True once :meth:`abort` was called: an EOF after it is our own doing.
    aborted = False
    #: Whether :meth:`try_write` can take bytes without blocking (plain TCP).
    can_try_write = False
    #: Whether the server ends the connection after the closing handshake
    #: (TCP, RFC 6455 7.1.1); if not, the client ends it (HTTP/2 streams).
    server_closes = True
    #: Bytes read and written so far, handshake included (on the wire, after
    #: compression; before TLS). Each is updated by one thread only.
    bytes_read = 0
    bytes_written = 0

    def recv(self, timeout: float | None = None) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, chunks: Sequence[BytesLike]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def try_write(self, data: bytes) -> int:
        """Write what the kernel takes without blocking; returns how many bytes."""
        return 0

    def abort(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, sink: Sink) -> None:
        """Deliver data to ``sink`` until EOF or failure, on the calling thread.

        Any exception -- from the network or from the sink itself (say, a
        ``MemoryError``) -- ends the stream through ``connection_lost``, so the
        socket always learns that its reader stopped.
        """
        try:
            while True:
                data = self.recv()
                if not data:
                    break
                sink.data_received(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the sink
            sink.connection_lost(exc)
        else:
            sink.connection_lost(None)


class TCPTransport(Transport):
    """A TCP socket, optionally wrapped in TLS.

    ``recv`` and ``write`` may run at the same time on two threads (the reader
    and the writer); ``abort`` may run on any thread and makes both return.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._closed = False
        self.aborted = False
        self._lock = threading.Lock()
        self._tls = isinstance(sock, ssl.SSLSocket)
        # A TLS socket has no non-blocking send that leaves its blocking mode
        # (shared with the reader thread) alone, so only plain TCP writes directly.
        self.can_try_write = not self._tls

    def recv(self, timeout: float | None = None) -> bytes:
        sock = self.sock
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            with map_os_errors():
                data = sock.recv(RECV_SIZE)
            self.bytes_read += len(data)
            return data
        except ConnectionLost:
            if self.aborted:
                return b""  # our own abort, not a network failure
            raise
        except ValueError:  # recv on a closed SSL socket
            if self.aborted:
                return b""
            raise
        finally:
            if timeout is not None and not self._closed:
                with contextlib.suppress(OSError):
                    sock.settimeout(None)

    def write(self, chunks: Sequence[BytesLike]) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.bytes_written += len(data)  # counted first: a reply may beat the return
        with map_os_errors():
            self.sock.sendall(data)

    def try_write(self, data: bytes) -> int:
        if not self.can_try_write:
            return 0
        with map_os_errors():
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return 0  # the kernel's buffer is full: the writer thread takes over
        self.bytes_written += n
        return n

    def abort(self) -> None:
        with self._lock:
            if self.aborted or self._closed:
                return
            self.aborted = True
        with contextlib.suppress(OSError):
            # shutdown() on the raw descriptor wakes a recv/send blocked in
            # another thread; SSLSocket.shutdown would also drop its SSL object.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class Connector:
    """Opens a TCP (and TLS) connection, abortable from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def detach(self) -> None:
        """Forget the connected socket: it now belongs to someone else (a shared
        HTTP/2 connection), so this connector's :meth:`abort` must not touch it."""
        with self._lock:
            self._sock = None

    def _register(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.aborted:
                if sock is not None:
                    sock.close()
                raise ConnectError("connection aborted by close()")
            self._sock = sock

    def connect(
        self,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> TCPTransport:
        """Resolve, connect (trying each address) and optionally start TLS."""
        with map_os_errors(connecting=True):
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: BaseException | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            self._register(sock)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(deadline.remaining())
                with map_os_errors(connecting=True):
                    sock.connect(addr)
            except ConnectError as exc:
                self._register(None)
                sock.close()
                if self.aborted:
                    raise ConnectError("connection aborted by close()") from None
                last = exc
                continue
            except BaseException:
                self._register(None)
                sock.close()
                raise
            break
        else:
            assert last is not None
            raise last
        try:
            if ssl_context is not None:
                with map_os_errors(connecting=True):
                    sock.settimeout(deadline.remaining())
                    tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
                self._register(tls)
                sock = tls
        except BaseException:
            self._register(None)
            sock.close()
            if self.aborted:
                raise ConnectError("connection aborted by close()") from None
            raise
        return TCPTransport(sock)


def connect_tcp(
    host: str,
    port: int,
    timeout: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> TCPTransport:
    """Open a TCP (and TLS) transport in one call; used by tools and tests."""
    return Connector().connect(host, port, Deadline(timeout), ssl_context)
