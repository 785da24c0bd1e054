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

One optional capability, :meth:`Transport.read_here`, lets a thread that is
waiting for the socket's next message read the socket itself instead of
being woken by the reader thread (see "Reading on the caller's thread" in
:class:`TCPTransport`).

``OSError`` is translated into :mod:`blockws.exceptions` here, once, at the
I/O boundary (:func:`map_os_errors`).
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Callable, Protocol, Union

from .deadline import Deadline
from .exceptions import (
    BlockwsError,
    ConnectError,
    ConnectionLost,
    OpenTimeout,
    TLSError,
    TransportError,
)

__all__ = [
    "Sink",
    "Transport",
    "TCPTransport",
    "map_os_errors",
]

BytesLike = Union[bytes, bytearray, memoryview]

#: Bytes asked for per ``recv`` while data is streaming in: large enough to
#: take many frames per system call, and below glibc's default mmap threshold
#: (128 KiB). ``recv(n)`` allocates ``n`` bytes and shrinks them to what came;
#: at or above the threshold that is an mmap, an mremap and a munmap per read
#: (until the allocator's dynamic threshold happens to rise), and fresh pages
#: to fault in: 256 KiB reads made 1 MiB echoes through on_binary ~30% slower.
RECV_SIZE = 127 * 1024
#: Bytes asked for per ``recv`` otherwise; a read asks for RECV_SIZE only
#: after one that filled this much (more data is likely waiting).
RECV_SMALL = 64 * 1024

#: The right to read lent to a waiting caller lapses once this many seconds
#: pass without a read by it (between one and two leases after its last
#: read, or up to 50 ms more after a long blocking read; see
#: :class:`TCPTransport`). Long enough to cover a callback and a
#: send between two reads, short enough that pings, pongs and the closing
#: handshake are still read promptly when the caller has gone off to do
#: something else.
READ_LEASE = 0.005

#: ``send(..., MSG_DONTWAIT)`` and ``recv(..., MSG_DONTWAIT)`` exist on POSIX only.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: Longest single blocking read on a caller's thread; a longer wait is several.
_RCVTIMEO_CAP = 0.05
#: Waits at least this long use that bounded read (see TCPTransport._recv_here).
_RCVTIMEO_LONG = 0.1
#: select() takes descriptors below this; poll() (millisecond timeouts) the rest.
_FD_SETSIZE = 1024
#: A reader whose last read waited longer than this (seconds) treats the
#: socket as quiet: see TCPTransport._wait_readable.
_QUIET = 0.1
#: Most chunks written with one sendmsg(): POSIX guarantees 16 and Linux takes
#: 1024, but more than a few dozen are small frames, cheaper to join.
_IOV_MAX = 64
_select = select.select
_timeval = struct.Struct("@ll")
_poll = getattr(select, "poll", None)  # POSIX
_POLLIN = getattr(select, "POLLIN", 1)


class Sink(Protocol):
    """Where a transport delivers what it reads (the WebSocket's reader side)."""

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: BaseException | None) -> None:
        """The stream ended: ``exc`` is ``None`` for a clean EOF."""


@contextlib.contextmanager
def map_os_errors(connecting: bool = False) -> Iterator[None]:
    """Translate ``OSError`` and ``ssl.SSLError`` into blockws exceptions."""
    try:
        yield
    except TransportError:
        raise
    except OSError as exc:
        raise os_error(exc, connecting) from exc


def os_error(exc: OSError, connecting: bool = False) -> BlockwsError:
    """The blockws exception for ``exc`` (:func:`map_os_errors` without a ``with``,
    for the per-message paths, where a context manager's cost shows)."""
    if isinstance(exc, socket.timeout):  # TimeoutError on 3.10+
        return OpenTimeout("timed out opening the WebSocket")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"TLS certificate verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        if connecting:
            return TLSError(f"TLS handshake failed: {exc}")
        return ConnectionLost(f"TLS error: {exc}")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve host: {exc.strerror or exc}")
    if connecting:
        return ConnectError(f"cannot connect: {exc.strerror or exc}")
    return ConnectionLost(f"connection lost: {exc.strerror or exc}")


class Transport:
    """Base class of transports; see the module docstring for the contract."""

    #: Which HTTP version carried the opening handshake: ``"1.1"`` or ``"2"``.
    http_version = "1.1"
    #: True once :meth:`abort` was called: an EOF after it is our own doing.
    aborted = False
    #: Whether :meth:`try_write` can take bytes without blocking (plain TCP).
    can_try_write = False
    #: Bytes read and written so far, handshake included (on the wire, after
    #: compression; before TLS). Each is updated by one thread only.
    bytes_read = 0
    bytes_written = 0

    def recv(self, timeout: float | None = None) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, chunks: Sequence[BytesLike]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def try_write(self, chunks: Sequence[BytesLike]) -> int:
        """Write what the kernel takes of ``chunks`` without blocking; returns how
        many bytes (counted from the start of the first chunk)."""
        return 0

    def read_here(self, sink: Sink, timeout: float | None, wake: Callable[[], None]) -> bool:
        """Read once on the calling thread, if this transport allows it now.

        Returns False when the calling thread may not read (the transport does
        not support it, or its reader thread or another caller is reading);
        the caller then waits for the reader thread's delivery as usual, and
        ``wake()`` may be called later when reading here has become possible.
        Returns True after one read attempt of up to ``timeout`` seconds,
        whose data, if any, went to ``sink.data_received`` on this thread.
        """
        return False

    def abort(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish_closing(self) -> None:
        """Both close frames are through, and ours has been written.

        Over TCP the server closes the connection (RFC 6455 7.1.1), so this
        does nothing. A transport whose server does not end it (an HTTP/2
        stream, RFC 8441 section 5) ends itself here. Called once, from the
        writer or the reader thread; must not block.
        """

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
                data = self._read_next()
                if not data:
                    break
                sink.data_received(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the sink
            sink.connection_lost(exc)
        else:
            sink.connection_lost(self._ended_by)

    #: What ended the stream when a read returned ``b""`` (``None``: a clean EOF).
    _ended_by: BaseException | None = None

    def _read_next(self) -> bytes:
        """The next read of :meth:`run` (``b""`` at the end)."""
        return self.recv()


class TCPTransport(Transport):
    """A TCP socket, optionally wrapped in TLS.

    ``recv`` and ``write`` may run at the same time on two threads (the reader
    and the writer); ``abort`` may run on any thread and makes both return.

    Reading on the caller's thread (plain TCP on POSIX)
    ---------------------------------------------------
    A thread blocked in ``ws.receive()`` or ``ws.wait()`` would otherwise be
    woken by the reader thread for every message: a thread hand-off that
    costs more than the message itself when messages are small, and all of a
    round trip's latency when one is in flight. So the right to read -- held
    by exactly one thread at a time -- can pass to a waiting caller:

    * the caller asks (:meth:`read_here` returns False and notes the wish);
      the reader thread grants it after its current read, and stops reading;
    * while it holds the right, each :meth:`read_here` reads the socket,
      waiting up to its timeout, and parses what came on the calling thread;
    * the right lapses when a :data:`READ_LEASE` passes without a read by
      the caller, or at once on :meth:`abort`, and the reader thread reads again;
    * end of stream or an error met by the caller is handed to the reader
      thread, which reports it (``connection_lost``) as it always does.

    The socket's blocking mode is never changed for this (the writer thread
    shares it): the caller's wait is a blocking ``recv`` bounded by
    ``SO_RCVTIMEO``, which applies to reads only, and a non-blocking read
    uses ``MSG_DONTWAIT``. A TLS socket has neither, so TLS always reads on
    the reader thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._closed = False
        self.aborted = False
        self._lock = threading.Lock()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._recv_size = RECV_SMALL
        # A TLS socket has no non-blocking send that leaves its blocking mode
        # (shared with the reader thread) alone, so only plain TCP writes directly.
        self.can_try_write = not self._tls and _DONTWAIT != 0
        self._sendmsg = not self._tls and hasattr(sock, "sendmsg")
        # The right to read (see the class docstring), guarded by _rcond.
        self.can_read_here = self.can_try_write
        self._rlock = threading.Lock()  # the fast paths take it without the Condition
        self._rcond = threading.Condition(self._rlock)
        self._caller_reads = False  # a caller holds the right to read
        self._wanted = False  # a caller asked for it
        self._busy = False  # the holder is inside read_here right now
        self._reads = 0  # reads the holder has done: the lease lapses when it stops
        self._handed_back: tuple[BaseException | None] | None = None  # its EOF or error
        self._wake: Callable[[], None] | None = None
        self._rcvtimeo = 0.0  # the socket's SO_RCVTIMEO (0: none)
        self._poller: select.poll | None = None  # see _wait_readable
        self._quiet = True  # a socket starts out waiting for its first message

    def recv(self, timeout: float | None = None) -> bytes:
        sock = self.sock
        if timeout is not None:
            sock.settimeout(timeout)
        try:
            with map_os_errors():
                while True:
                    try:
                        data = sock.recv(self._recv_size)
                        break
                    except BlockingIOError:
                        if timeout is not None:
                            raise
                        # SO_RCVTIMEO left by a caller that read (see read_here)
            n = len(data)
            self._recv_size = RECV_SIZE if n >= RECV_SMALL else RECV_SMALL
            self.bytes_read += n
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

    # -- the reader thread, and the caller reading in its place -----------------

    def _read_next(self) -> bytes:
        if not self.can_read_here:
            return self.recv()
        if self._wanted or self._caller_reads:
            handed = self._hand_over()
            if handed is not None:
                self._ended_by = handed[0]  # what the caller met: end of stream or an error
                return b""
        started = time.monotonic()
        if self._quiet and _poll is not None:
            self._wait_readable()
        data = self.recv()
        self._quiet = time.monotonic() - started > _QUIET  # this wait, poll included
        return data

    def _wait_readable(self) -> None:
        """Reader thread: block until the socket is readable (or ended).

        ``recv(n)`` allocates its ``n`` bytes before it blocks, so an idle
        socket's reader would pin a 64 KiB buffer (and the pages its heap
        headers touch) for as long as the socket stays quiet. So a socket that
        is new, or whose last read waited longer than :data:`_QUIET`, waits
        here first, buffer-less; an active one just reads. (Polling before
        every read cost a second trip through the GIL per read, and 20% of
        the throughput of compressed 1 MiB echoes.)
        """
        poller = self._poller
        if poller is None:
            assert _poll is not None
            poller = self._poller = _poll()
            poller.register(self.sock, _POLLIN)
        while not poller.poll():  # -1 (forever); returns on data, EOF, error or abort
            pass

    def _hand_over(self) -> tuple[BaseException | None] | None:
        """Reader thread: grant the right to read, wait until it comes back.

        Returns what the caller met that ended the stream, or ``None`` when
        the lease lapsed (or the transport was aborted) and the reader reads on.
        """
        cond = self._rcond
        wake = None
        with cond:
            if self._wanted and not self.aborted:
                self._wanted = False
                self._caller_reads = True
                wake, self._wake = self._wake, None
        if wake is not None:
            wake()  # the caller may be waiting for a delivery that is not coming
        with cond:
            seen = -1
            while self._caller_reads:
                if self.aborted and not self._busy:
                    self._caller_reads = False
                    break
                if not self._busy and self._reads == seen:
                    self._caller_reads = False  # no read for a whole lease: it lapses
                    break
                seen = self._reads
                # While the caller is inside a read, look again only after its
                # longest blocking slice: a thread idling in receive() should
                # not wake the reader 200 times a second.
                cond.wait(_RCVTIMEO_CAP if self._busy else READ_LEASE)
            handed = self._handed_back
        if handed is None and self._rcvtimeo:
            self._set_rcvtimeo(0)  # the reader's reads block without a bound
        return handed

    def read_here(self, sink: Sink, timeout: float | None, wake: Callable[[], None]) -> bool:
        lock = self._rlock
        with lock:
            if not self._caller_reads or self._busy:
                if (
                    self.can_read_here
                    and not self._caller_reads
                    and timeout != 0
                    and self._handed_back is None
                ):
                    self._wanted = True
                    self._wake = wake
                return False
            self._busy = True
        handed: tuple[BaseException | None] | None = None
        try:
            try:
                data = self._recv_here(timeout)
            except Exception as exc:  # noqa: BLE001 - the network failed: handed to the reader
                handed, data = (exc,), None
            # (A KeyboardInterrupt while waiting propagates; the socket goes on.)
            if data:
                try:
                    sink.data_received(data)
                except BaseException as exc:  # noqa: BLE001 - handed to the reader thread
                    handed = (exc,)
                    if not isinstance(exc, Exception):
                        raise  # KeyboardInterrupt mid-parse: the socket ends; the caller hears it
            elif data is not None and handed is None:
                handed = (None,)  # end of stream
        finally:
            self._reads += 1  # only the holder writes these two, and in this order,
            self._busy = False  # so the reader never sees "idle" without the read counted
            if handed is not None:
                with lock:
                    self._handed_back = handed
                    self._caller_reads = False
                    self._rcond.notify_all()
        return True

    def _recv_here(self, timeout: float | None) -> bytes | None:
        """One read on the caller's thread, waiting up to ``timeout`` seconds:
        ``None`` if nothing came, ``b""`` at EOF (or after our own abort).

        A long wait is a blocking ``recv`` bounded by ``SO_RCVTIMEO``, which
        limits reads only (the writer thread's sends are not affected) and is
        set once, so such a wait costs one system call. The kernel rounds that
        bound up to its clock tick (4 ms here, and one tick more), so it only
        serves slices of waits much longer than a tick, which the caller's
        loop re-slices; a short wait polls with a precise timeout, then reads
        without blocking.
        """
        sock = self.sock
        try:
            if timeout is None or timeout >= _RCVTIMEO_LONG:
                if self._rcvtimeo != _RCVTIMEO_CAP:
                    self._set_rcvtimeo(_RCVTIMEO_CAP)
                data = sock.recv(self._recv_size)
            elif timeout <= 0 or self._readable_within(timeout):
                data = sock.recv(self._recv_size, _DONTWAIT)
            else:
                return None
        except BlockingIOError:
            return None  # nothing within the bound; the caller's loop decides what next
        except OSError as exc:
            if self.aborted:
                return b""  # our own abort, not a network failure
            raise os_error(exc) from exc
        n = len(data)
        self._recv_size = RECV_SIZE if n >= RECV_SMALL else RECV_SMALL
        self.bytes_read += n
        return data

    def _readable_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, precisely, for the socket to be readable."""
        sock = self.sock
        if sock.fileno() < _FD_SETSIZE or _poll is None:
            return bool(_select([sock], [], [], timeout)[0])  # microseconds
        poller = self._poller
        if poller is None:
            poller = self._poller = _poll()
            poller.register(sock, _POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))  # milliseconds, rounded up

    def _set_rcvtimeo(self, seconds: float) -> None:
        """Bound blocking reads to ``seconds`` (0: no bound). Only the holder of
        the right to read calls this."""
        whole = int(seconds)
        micros = 0 if seconds == 0 else max(1, int((seconds - whole) * 1e6))
        with contextlib.suppress(OSError):  # a closed socket: the read that follows says so
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval.pack(whole, micros)
            )
        self._rcvtimeo = seconds

    # -- writing -----------------------------------------------------------------

    def write(self, chunks: Sequence[BytesLike]) -> None:
        n = len(chunks)
        if n == 1 or not self._sendmsg or n > _IOV_MAX:
            # One chunk, or many small frames: joining them is one cheap copy.
            data = chunks[0] if n == 1 else b"".join(chunks)
            self.bytes_written += len(data)  # counted first: a reply may beat the return
            with map_os_errors():
                self.sock.sendall(data)
            return
        # A few chunks (large frames, or what is left of a direct write): one
        # gathering system call instead of joining, which would copy them all.
        self.bytes_written += sum(map(len, chunks))
        first, views = 0, list(chunks)
        with map_os_errors():
            while first < n:
                sent = self.sock.sendmsg(views[first:])
                while first < n and sent >= len(views[first]):
                    sent -= len(views[first])
                    first += 1
                if sent:
                    views[first] = memoryview(views[first])[sent:]

    def try_write(self, chunks: Sequence[BytesLike]) -> int:
        if not self.can_try_write:
            return 0
        try:
            if len(chunks) == 1:
                n = self.sock.send(chunks[0], _DONTWAIT)
            elif self._sendmsg and len(chunks) <= _IOV_MAX:
                n = self.sock.sendmsg(chunks, (), _DONTWAIT)
            else:
                n = self.sock.send(b"".join(chunks), _DONTWAIT)
        except BlockingIOError:
            return 0  # the kernel's buffer is full: the writer thread takes over
        except OSError as exc:
            raise os_error(exc) from exc
        self.bytes_written += n
        return n

    def abort(self) -> None:
        with self._lock:
            if self.aborted or self._closed:
                return
            self.aborted = True
        with self._rcond:
            self._rcond.notify_all()  # a reader thread lending its right to read takes it back
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
