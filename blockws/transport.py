"""Transports: how a WebSocket's bytes travel, behind one small interface.

A :class:`Transport` is a connected byte stream. The WebSocket layer needs
only four things from it:

* :meth:`Transport.recv` -- blocking read (``b""`` at EOF), used for the
  opening handshake and by the default :meth:`Transport.run` loop;
* :meth:`Transport.run` -- deliver incoming bytes to a :class:`Sink` until
  the stream ends. A TCP transport loops on the calling (reader) thread; a
  transport fed by a shared connection, such as an HTTP/2 stream, is pushed
  data by that connection's thread and returns at once;
* :meth:`Transport.read` -- one read bounded by a timeout, for a thread
  that is waiting for the socket's next message and reads in the reader
  thread's place (TCP, and TLS over TCP, on POSIX; not an HTTP/2 stream; who
  reads is decided by the connection's
  :class:`~blockws.readtoken.ReadToken`, not here);
* :meth:`Transport.write` -- blocking write of a batch of chunks, from the
  writer thread;
* :meth:`Transport.abort` / :meth:`Transport.close` -- unblock every reader
  and writer at once (from any thread), then release the file descriptor.

``OSError`` is translated into :mod:`blockws.exceptions` here, once, at the
I/O boundary (:func:`map_os_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import math
import operator
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Callable, Protocol, Union

from .deadline import Deadline
from .exceptions import (
    BlockwsError,
    ConnectError,
    ConnectionLost,
    ConnectionRefused,
    OpenTimeout,
    TLSError,
    TransportError,
)
from .readtoken import BUSY_RECHECK, Ended
from .tls import HTTP1_ALPN
from .tls import handshake as tls_handshake
from .tls import start_bio as tls_start_bio

__all__ = [
    "Sink",
    "Transport",
    "TCPTransport",
    "Connector",
    "Tunnel",
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
#: Bytes asked for per ``recv`` after a read of at least RECV_SCRATCH; a read
#: asks for RECV_SIZE only after one that filled this much (more data is
#: likely waiting).
RECV_SMALL = 64 * 1024
#: The reader thread's reads go into a reusable buffer of this size, and only
#: the bytes that came are copied out, while reads stay below it (the usual
#: case: messages come one or a few at a time). ``recv(n)`` would allocate
#: ``n`` bytes and shrink them to what came: with hundreds of reader threads,
#: those shrunk blocks, of every size, fragmented glibc's arenas, and RSS grew
#: without bound (a 100-socket soak: +84 % in two minutes; +0.5 % with the
#: buffer). A read that fills it switches to plain ``recv(RECV_SMALL)``: a
#: stream's large reads then cost one copy, not two.
RECV_SCRATCH = 16 * 1024

#: ``send(..., MSG_DONTWAIT)`` and ``recv(..., MSG_DONTWAIT)`` exist on POSIX only.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: Longest single blocking read on a caller's thread; a longer wait is several
#: (the read token's recheck interval: see blockws.readtoken).
_RCVTIMEO_CAP = BUSY_RECHECK
#: Waits at least this long use that bounded read (see TCPTransport._recv_here).
_RCVTIMEO_LONG = 0.1
#: select() takes descriptors below this; poll() (millisecond timeouts) the rest.
_FD_SETSIZE = 1024
#: A reader whose last read waited longer than this (seconds) treats the
#: socket as quiet: see TCPTransport.recv.
_QUIET = 0.1
#: Bytes a quiet socket's reader asks for in its blocking read: ``recv(n)``
#: allocates its ``n`` bytes before it blocks, and a small block is all an idle
#: socket then pins (with the bytes object's 33-byte header, within pymalloc's
#: 512-byte blocks: none of the glibc arena fragmentation described at
#: RECV_SCRATCH). A larger message is read on at once, at the usual sizes, by
#: the reads that follow.
RECV_QUIET = 448
#: Without the C speedup's gated read (which reads into its own stack), a
#: quiet socket's reader first waits in a 1-byte ``recv(1, MSG_PEEK)``, which
#: pins a 34-byte object instead of RECV_QUIET's 481 for as long as the socket
#: stays idle (tracemalloc, tests/test_scale.py: 9,441 -> 9,096 bytes per idle
#: socket), then reads. The second system call is paid once per message that
#: ends a quiet spell. (TCPTransport only ever holds a plain socket: TLS runs
#: over it through a memory BIO, and an SSLSocket would refuse the flag.)
_PEEK = getattr(socket, "MSG_PEEK", 0)
#: Most chunks written with one sendmsg(): POSIX guarantees 16 and Linux takes
#: 1024, but more than a few dozen are small frames, cheaper to join.
_IOV_MAX = 64
# read()'s arguments to recv, made once (see TCPTransport.read).
_SIZES = {RECV_SIZE: (RECV_SIZE,), RECV_SMALL: (RECV_SMALL,), RECV_SCRATCH: (RECV_SCRATCH,)}
_DONTWAITS = (_DONTWAIT,)
_ZEROS = (0,)  # recv_into's nbytes: the whole buffer; recvmsg_into's ancbufsize: none
_first = operator.itemgetter(0)  # recvmsg_into's count
_select = select.select
_timeval = struct.Struct("@ll")
_poll = getattr(select, "poll", None)  # POSIX

# The reader threads' blocking reads on TCP (TLS's too): through the C speedup's gate
# when it is built (see blockws/_speedups.c, "gated_recv": with thousands of
# sockets, reader threads waiting for the GIL at once cost more than the
# messages), else socket.recv. ``BLOCKWS_PURE_PYTHON=1`` forces socket.recv.
_gated_recv: Callable[[socket.socket, int], bytes] | None = None
_gated_recv_into: Callable[[socket.socket, memoryview], int] | None = None
try:
    from . import _speedups
except ImportError:  # pragma: no cover - depends on the install
    pass
else:
    if hasattr(_speedups, "gated_recv") and not os.environ.get("BLOCKWS_PURE_PYTHON"):
        _gated_recv, _gated_recv_into = _speedups.gated_recv, _speedups.gated_recv_into
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_speedups.reset_gate)
_POLLIN = getattr(select, "POLLIN", 1)
_POLLOUT = getattr(select, "POLLOUT", 4)
# connect_ex()'s answers for a connect that goes on without blocking.
_CONNECTING = frozenset(
    getattr(errno, name)
    for name in ("EINPROGRESS", "EWOULDBLOCK", "EAGAIN", "WSAEWOULDBLOCK")
    if hasattr(errno, name)
)


class Sink(Protocol):
    """Where a transport delivers what it reads (the WebSocket's reader side)."""

    def data_received(self, data: bytes | int) -> None:
        """Bytes read, or (an ``int``) how many were read into the place the
        transport's ``read_target`` gave."""

    def connection_lost(self, exc: BaseException | None) -> None:
        """The stream ended: ``exc`` is ``None`` for a clean EOF."""


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (an IPv6 one may carry a
    ``%scope``), which needs no lookup.

    Only C calls, unlike ``ipaddress.ip_address``: that one runs Python code
    under two C calls, which took a reader thread's stack one page (4 KiB of
    RSS per socket, for its whole life) past where it otherwise stays.
    """
    for family, text in ((socket.AF_INET, host), (socket.AF_INET6, host.partition("%")[0])):
        try:
            socket.inet_pton(family, text)
        except (OSError, ValueError):  # ValueError: a NUL in the text
            continue
        return True
    return False


@contextlib.contextmanager
def map_os_errors(connecting: bool = False, where: str = "") -> Iterator[None]:
    """Translate ``OSError`` and ``ssl.SSLError`` into blockws exceptions.

    ``where`` (``"host:port"``) goes into the messages of connect failures.
    """
    try:
        yield
    except TransportError:
        raise
    except OSError as exc:
        raise os_error(exc, connecting, where) from exc


def os_error(exc: OSError, connecting: bool = False, where: str = "") -> BlockwsError:
    """The blockws exception for ``exc`` (:func:`map_os_errors` without a ``with``,
    for the per-message paths, where a context manager's cost shows).

    ``errno`` and ``strerror`` are kept; a refused connection is a
    :class:`~blockws.exceptions.ConnectionRefused` (a ``ConnectionRefusedError``).
    """
    errno, strerror = exc.errno, exc.strerror
    what = strerror or str(exc)
    at = f" {where}" if where else ""
    if isinstance(exc, socket.timeout):  # TimeoutError on 3.10+
        return OpenTimeout(f"timed out opening the WebSocket{' to' + at if at else ''}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(f"TLS certificate verification failed{at}: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        if connecting:
            return TLSError(f"TLS handshake failed{at}: {exc}")
        return ConnectionLost(f"TLS error: {exc}")
    if isinstance(exc, socket.gaierror):
        host = where.rsplit(":", 1)[0] if where else ""
        return ConnectError(
            f"cannot resolve host {host!r}: {what}" if host else f"cannot resolve host: {what}",
            errno=errno, strerror=strerror,
        )
    if connecting:
        kind = ConnectionRefused if isinstance(exc, ConnectionRefusedError) else ConnectError
        return kind(f"cannot connect to{at or ' the server'}: {what}", errno=errno,
                    strerror=strerror)
    return ConnectionLost(f"connection lost: {what}", errno=errno, strerror=strerror)


class Transport:
    """Base class of transports; see the module docstring for the contract."""

    #: Which HTTP version carried the opening handshake: ``"1.1"`` or ``"2"``.
    http_version = "1.1"
    #: The protocol TLS ALPN selected (``"h2"``, ``"http/1.1"``), or ``None``.
    alpn_protocol: str | None = None
    #: True once :meth:`abort` was called: an EOF after it is our own doing.
    aborted = False
    #: Whether :meth:`try_write` can take bytes without blocking (plain TCP).
    can_try_write = False
    #: Whether :meth:`write` sends a few large chunks with one gathering system
    #: call (``sendmsg``), without joining them first (plain TCP on POSIX).
    #: Without it, a writer that has large frames copies them into one buffer.
    gathers = False
    #: Bytes read and written so far, handshake included (on the wire, after
    #: compression; before TLS). Each is updated by one thread only.
    bytes_read = 0
    bytes_written = 0

    def recv(self, timeout: float | None = None) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def recv_any(self, timeout: float | None = None, into: bool = True) -> bytes | int:
        """The reader thread's read (:meth:`run`): :meth:`recv`, or, on a
        transport with :attr:`read_target`, the count of bytes read into it."""
        return self.recv(timeout)

    def write(self, chunks: Sequence[BytesLike]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def try_write(self, chunks: Sequence[BytesLike]) -> int:
        """Write what the kernel takes of ``chunks`` without blocking; returns how
        many bytes (counted from the start of the first chunk)."""
        return 0

    #: Whether :meth:`read` is supported (TCP, and TLS over it, on POSIX).
    can_read_bounded = False
    #: Where the reads may go straight into the message being assembled: the
    #: sink's ``payload_target`` (see :meth:`TCPTransport.recv`), set by the
    #: socket on a transport with :attr:`can_read_into`. Such a read yields
    #: the ``int`` count of bytes it put there instead of ``bytes``.
    read_target: Callable[[bool], memoryview | list[memoryview] | None] | None = None
    can_read_into = False

    def read(self, timeout: float | None) -> bytes | int | None:
        """One read on the calling thread, waiting up to ``timeout`` seconds (at
        most :data:`~blockws.readtoken.BUSY_RECHECK` at a time): ``None`` if
        nothing came, ``b""`` at EOF (or after our own abort or close); an
        ``int`` when it read into :attr:`read_target` (see :class:`Sink`)."""
        raise NotImplementedError  # pragma: no cover - only where can_read_bounded

    def abort(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def pause_reading(self) -> bool:
        """The sink holds too much undelivered data: stop taking more from the
        peer. Returns True if the transport did so itself (an HTTP/2 stream
        withholds its flow-control credit); False, the default, leaves it to
        the caller, which stops calling :meth:`recv` (TCP: the kernel's
        buffers then push back on the peer). Called on the thread that
        delivered the data; must not block."""
        return False

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading` (any thread; must not block)."""

    def finish_closing(self) -> None:
        """Both close frames are through, and ours has been written.

        Over TCP the server closes the connection (RFC 6455 7.1.1), so this
        does nothing. A transport whose server does not end it (an HTTP/2
        stream, RFC 8441 section 5) ends itself here. Called once, from the
        writer or the reader thread; must not block.
        """

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, sink: Sink, before_read: Callable[[], Ended | None] | None = None) -> None:
        """Deliver data to ``sink`` until EOF or failure, on the calling thread.

        ``before_read`` runs before each read (the read token lends the
        reading there); when it returns what ended the stream, the loop ends
        with that. Any exception -- from the network or from the sink itself
        (say, a ``MemoryError``) -- ends the stream through
        ``connection_lost``, so the socket always learns that its reader stopped.
        """
        try:
            while True:
                if before_read is not None:
                    ended = before_read()
                    if ended is not None:
                        sink.connection_lost(ended[0])
                        return
                data = self.recv_any()
                if not data:
                    break
                sink.data_received(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the sink
            sink.connection_lost(exc)
        else:
            sink.connection_lost(None)


class TCPTransport(Transport):
    """A plain TCP socket (TLS runs above it: :class:`TLSTransport`).

    ``recv`` and ``write`` may run at the same time on two threads (the reader
    and the writer); ``abort`` may run on any thread and makes both return.

    Bounded reads (POSIX): :meth:`read` (and :meth:`read_to`, for the TLS
    above) serves a caller that reads in the reader thread's place. The
    socket's blocking mode is never changed for it (the writer thread shares
    the socket): a wait of a tenth of a second or more is a blocking
    ``recv`` bounded by ``SO_RCVTIMEO``, which applies to reads only and is
    set once, so such a wait costs one system call; a shorter wait polls
    with a precise timeout, then reads with ``MSG_DONTWAIT``. The reader
    thread's :meth:`recv` is not affected by that bound: it waits in
    ``poll()`` whenever a read finds nothing.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._closed = False
        self.aborted = False
        self._lock = threading.Lock()
        self._recv_size = RECV_SCRATCH
        # The reader thread's read buffer (see RECV_SCRATCH): made by its
        # first read, after a wait in poll(), so an idle socket has none.
        self._scratch: memoryview | None = None
        self.can_try_write = _DONTWAIT != 0
        self._sendmsg = hasattr(sock, "sendmsg")
        self.gathers = self._sendmsg
        self.can_read_bounded = self.can_try_write
        self._rcvtimeo_set = False  # SO_RCVTIMEO is set (by the first long bounded read)
        self._poller: select.poll | None = None  # see _wait_readable
        self._quiet = True  # a socket starts out waiting for its first message
        # The reader thread's gated reads (with the C speedup; see _gated_recv
        # above). A TLS socket's reads are these too (TLSTransport).
        self._gated_recv = _gated_recv
        self._gated_recv_into = _gated_recv_into
        #: Bytes a caller's :meth:`read` took from the socket and has not yet
        #: parsed (an interrupted caller leaves them here): :meth:`recv` and
        #: the next caller return these first. See blockws.readtoken.
        self.held: list[bytes | int] = []  # a chunk or two: a list (a deque is 760 B)
        self.can_read_into = True
        self.read_target: Callable[[bool], memoryview | list[memoryview] | None] | None = None
        # The reader thread may scatter a read over a list of buffers.
        self._scatter = hasattr(sock, "recvmsg_into")

    def recv(self, timeout: float | None = None) -> bytes:
        """See :meth:`recv_any`; never into :attr:`read_target`."""
        data = self.recv_any(timeout, False)
        assert isinstance(data, bytes)  # only a read with ``into`` reads into a target
        return data

    def recv_any(self, timeout: float | None = None, into: bool = True) -> bytes | int:
        """Blocking read (``b""`` at EOF or after our own abort or close).

        Raises :class:`~blockws.exceptions.OpenTimeout` when ``timeout`` runs
        out (``0``: nothing to read now), ``ConnectionLost`` when the network
        fails.

        With ``into``, while large reads come (the last one was of
        :data:`RECV_SIZE`), :attr:`read_target` is asked where the next bytes
        go: when it gives a place (the rest of a large frame), they are read
        straight into it and their count returned, an ``int``; ``0`` at EOF.
        Where the socket has ``recvmsg_into``, the place may be a list of
        buffers, which the one read fills in order (see
        :meth:`blockws.protocol.Protocol.payload_target`).

        With a ``timeout`` (the opening handshake) the socket's timeout bounds
        it. Without one -- the reader thread -- a socket that is new, or whose
        last read waited longer than :data:`_QUIET`, waits in a read of
        :data:`RECV_QUIET` bytes (without the C speedup, in a 1-byte peek
        first: see :data:`_PEEK`; or, once a caller's bounded reads have set
        ``SO_RCVTIMEO``, which would end such a read every 50 ms, in
        :meth:`_wait_readable`); an active one just reads. Either way an idle
        socket pins no large buffer, and a quiet socket's message costs one
        trip through the GIL: polling first cost a second, and with thousands
        of sockets (W8) the reader threads queued for the GIL until the
        process spent its time in the kernel handing it round.

        After :meth:`abort`, ``b""`` at once: the connection is dropped, and
        what the kernel still holds is not read (after ``shutdown()`` Linux
        still hands out every queued byte -- megabytes under a flood -- and
        parsing them delayed the end, ``on_closed``, by seconds).
        """
        if self.held:
            return self.held.pop(0)  # left by an interrupted caller: in order
        if self.aborted:
            return b""
        sock = self.sock
        started = time.monotonic()
        try:
            # map_os_errors(), inline: a reader thread waits in here for the
            # socket's life, and a generator-based context manager would keep
            # its generator and frame alive all along (350 B per idle socket).
            try:
                if timeout is not None:
                    sock.settimeout(timeout)
                while True:
                    try:
                        size = self._recv_size
                        if timeout is None and self._quiet:
                            if self._rcvtimeo_set and _poll is not None:
                                self._wait_readable()
                            else:
                                size = RECV_QUIET
                        if timeout is not None:
                            data = sock.recv(size)
                        elif (
                            into
                            and size == RECV_SIZE
                            and (target := self._target(self._scatter)) is not None
                        ):
                            if isinstance(target, list):
                                count = sock.recvmsg_into(target)[0]
                            else:
                                gated_into = self._gated_recv_into
                                count = (
                                    gated_into(sock, target)
                                    if gated_into is not None
                                    else sock.recv_into(target)
                                )
                            self.bytes_read += count
                            return count
                        elif size == RECV_SCRATCH:
                            scratch = self._scratch
                            if scratch is None:
                                scratch = self._scratch = memoryview(bytearray(RECV_SCRATCH))
                            gated_into = self._gated_recv_into
                            n = (
                                gated_into(sock, scratch)
                                if gated_into is not None
                                else sock.recv_into(scratch)
                            )
                            data = scratch[:n].tobytes()
                        else:
                            gated = self._gated_recv
                            if gated is not None:
                                data = gated(sock, size)
                            else:
                                if size == RECV_QUIET and _PEEK:
                                    # Wait holding 1 byte, not RECV_QUIET: see _PEEK.
                                    sock.recv(1, _PEEK)
                                data = sock.recv(size)
                        break
                    except BlockingIOError:
                        if timeout is not None:  # 0: non-blocking, and nothing came
                            raise socket.timeout("timed out") from None
                        # SO_RCVTIMEO, set for bounded reads, ran out: wait in poll()
                        self._quiet = True
            except TransportError:
                raise
            except OSError as exc:
                raise os_error(exc) from exc
            n = len(data)
            self._recv_size = (
                RECV_SIZE if n >= RECV_SMALL else RECV_SMALL if n >= RECV_SCRATCH else RECV_SCRATCH
            )
            self.bytes_read += n
            return data
        except ConnectionLost:
            if self.aborted or self._closed:
                return b""  # our own abort or close, not a network failure
            raise
        except ValueError as exc:  # on a closed socket: poll's register(), an SSL socket's recv
            if self.aborted or self._closed:
                return b""
            raise ConnectionLost(f"connection lost: {exc}") from exc
        finally:
            if timeout is None:
                self._quiet = time.monotonic() - started > _QUIET  # this wait, poll included
            elif not self._closed:
                with contextlib.suppress(OSError):
                    sock.settimeout(None)

    def _target(self, scatter: bool) -> memoryview | list[memoryview] | None:
        read_target = self.read_target  # (cleared by another thread at the end)
        return read_target(scatter) if read_target is not None else None

    def _wait_readable(self) -> None:
        """Block until the socket is readable (or ended): a quiet socket's wait
        once ``SO_RCVTIMEO`` is set (see :meth:`recv`), which would end a
        blocking read every 50 ms. Polling costs a second trip through the
        GIL per read (and 20% of the throughput of compressed 1 MiB echoes
        when it ran before every read), so it serves only that case.
        """
        poller = self._poller
        if poller is None:
            assert _poll is not None
            poller = self._poller = _poll()
            poller.register(self.sock, _POLLIN)
        # No timeout: returns on data, EOF, error or abort, never empty (EINTR is
        # retried, PEP 475).
        poller.poll()

    def read(self, timeout: float | None) -> bytes | int | None:
        """See :meth:`Transport.read`. What it reads is also left in :attr:`held`,
        in the same C-level step as the read (``list.extend`` over ``map``: no
        bytecode runs in between, so no ``KeyboardInterrupt`` can land between
        the bytes leaving the socket and their being kept); the caller takes
        them off once parsed (blockws.readtoken). A read into
        :attr:`read_target` (see :meth:`_recv`) keeps and returns its count
        the same way: the bytes are in the target, and the count says so."""
        if self.aborted:
            return b""  # dropped: see recv()
        if self._recv_size == RECV_SIZE and self.read_target is not None:
            target = self._target(self._scatter)
            if target is not None:
                return self._read_into(target, timeout)
        sock = self.sock
        held = self.held
        try:
            if timeout is None or timeout >= _RCVTIMEO_LONG:
                if not self._rcvtimeo_set:
                    self._set_rcvtimeo(_RCVTIMEO_CAP)
                held.extend(map(sock.recv, _SIZES[self._recv_size]))
            elif timeout <= 0 or self._readable_within(timeout):
                held.extend(map(sock.recv, _SIZES[self._recv_size], _DONTWAITS))
            else:
                return None
        except BlockingIOError:
            return None  # nothing within the bound; the caller's loop decides what next
        except OSError as exc:
            if self.aborted or self._closed:
                return b""  # our own abort or close, not a network failure
            raise os_error(exc) from exc
        # bytes: a count is kept only by _read_into (and a caller reads only
        # once ``held`` is empty). No check here: this runs once a message.
        data: bytes = held[-1]  # type: ignore[assignment]
        n = len(data)
        self._recv_size = (
            RECV_SIZE if n >= RECV_SMALL else RECV_SMALL if n >= RECV_SCRATCH else RECV_SCRATCH
        )
        self.bytes_read += n
        return data

    def _read_into(
        self, target: memoryview | list[memoryview], timeout: float | None
    ) -> int | None:
        """:meth:`read` into ``target`` (a list: one ``recvmsg_into`` over
        them): the count is kept in :attr:`held` in the read's own C-level
        step, as read bytes are; ``0`` at EOF."""
        sock = self.sock
        held = self.held
        try:
            blocking = timeout is None or timeout >= _RCVTIMEO_LONG
            if timeout is not None and not blocking:
                if not (timeout <= 0 or self._readable_within(timeout)):
                    return None
            elif not self._rcvtimeo_set:
                self._set_rcvtimeo(_RCVTIMEO_CAP)
            # (recvmsg_into's count out of its tuple by a C-level call too.)
            if isinstance(target, list):
                if blocking:
                    held.extend(map(_first, map(sock.recvmsg_into, (target,))))
                else:
                    held.extend(map(_first, map(sock.recvmsg_into, (target,), _ZEROS, _DONTWAITS)))
            elif blocking:
                held.extend(map(sock.recv_into, (target,)))
            else:
                held.extend(map(sock.recv_into, (target,), _ZEROS, _DONTWAITS))
        except BlockingIOError:
            return None
        except OSError as exc:
            if self.aborted or self._closed:
                return 0  # our own abort or close, not a network failure
            raise os_error(exc) from exc
        count = held[-1]
        assert isinstance(count, int)
        self.bytes_read += count
        return count

    def read_to(self, write: Callable[[bytes], int], timeout: float | None) -> int | None:
        """:meth:`read`, handing what it reads to ``write`` (a TLS transport's
        ``MemoryBIO.write``) in the same C-level step as the read, instead of
        keeping it in :attr:`held`: no interrupt can land while the bytes are
        out of the socket and not yet in the TLS buffer. Returns how many bytes
        were read, ``0`` at EOF (or after our own abort or close), ``None`` if
        nothing came within ``timeout``."""
        if self.aborted:
            return 0
        sock = self.sock
        try:
            if timeout is None or timeout >= _RCVTIMEO_LONG:
                if not self._rcvtimeo_set:
                    self._set_rcvtimeo(_RCVTIMEO_CAP)
                n = sum(map(write, map(sock.recv, _SIZES[self._recv_size])))
            elif timeout <= 0 or self._readable_within(timeout):
                n = sum(map(write, map(sock.recv, _SIZES[self._recv_size], _DONTWAITS)))
            else:
                return None
        except BlockingIOError:
            return None
        except OSError as exc:
            if self.aborted or self._closed:
                return 0
            raise os_error(exc) from exc
        self._recv_size = (
            RECV_SIZE if n >= RECV_SMALL else RECV_SMALL if n >= RECV_SCRATCH else RECV_SCRATCH
        )
        self.bytes_read += n
        return n

    def _readable_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, precisely, for the socket to be readable.

        The kernel rounds ``SO_RCVTIMEO`` up to its clock tick (4 ms here, and
        one tick more), so only waits much longer than a tick use it.
        """
        sock = self.sock
        if sock.fileno() < _FD_SETSIZE or _poll is None:
            return bool(_select([sock], [], [], timeout)[0])  # microseconds
        poller = self._poller
        if poller is None:
            poller = self._poller = _poll()
            poller.register(sock, _POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))  # milliseconds, rounded up

    def _set_rcvtimeo(self, seconds: float) -> None:
        """Bound blocking reads to ``seconds``."""
        whole = int(seconds)
        micros = max(1, int((seconds - whole) * 1e6))
        with contextlib.suppress(OSError):  # a closed socket: the read that follows says so
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval.pack(whole, micros)
            )
        self._rcvtimeo_set = True

    # -- writing -----------------------------------------------------------------

    def write(self, chunks: Sequence[BytesLike]) -> None:
        n = len(chunks)
        if n == 1 or not self._sendmsg or n > _IOV_MAX:
            # One chunk, or many small frames: joining them is one cheap copy.
            data = chunks[0] if n == 1 else b"".join(chunks)
            self.bytes_written += len(data)  # counted first: a reply may beat the return
            # (map_os_errors(), inline: a context manager is six Python calls a
            # write, and a writer writes a 1 MiB message in four.)
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise os_error(exc) from exc
            return
        # A few chunks (large frames, or what is left of a direct write): one
        # gathering system call instead of joining, which would copy them all.
        self.bytes_written += sum(map(len, chunks))
        first, views = 0, list(chunks)
        try:
            while first < n:
                sent = self.sock.sendmsg(views[first:])
                while first < n and sent >= len(views[first]):
                    sent -= len(views[first])
                    first += 1
                if sent:
                    views[first] = memoryview(views[first])[sent:]
        except OSError as exc:
            raise os_error(exc) from exc

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
        with contextlib.suppress(OSError):
            # shutdown() on the raw descriptor wakes a recv/send blocked in
            # another thread; SSLSocket.shutdown would also drop its SSL object.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._scratch = None  # a reader still in recv_into() keeps its own reference
        with contextlib.suppress(OSError):
            self.sock.close()


#: The most plaintext one TLS record carries (RFC 8446 section 5.1).
_TLS_RECORD = 16 * 1024
#: TLSTransport.read's decryptions per call: up to this many records at once.
_RECORDS = (_TLS_RECORD,) * 16


class TLSTransport(Transport):
    """TLS over another transport, in an ``ssl.SSLObject`` over memory buffers.

    The outer transport is a plain :class:`TCPTransport` (``wss://``, and the
    TLS to a server through a plain proxy) or the TLS connection to an
    ``https://`` proxy (TLS inside TLS, which an ``SSLSocket`` cannot do).
    The network is read by the outer transport, so a TLS socket reads as a
    plain one does: the reader thread's reads pass the reader gate, and,
    when the outer transport has bounded reads (plain TCP), so does this one
    (:meth:`read`): a thread waiting for the socket's next message (a game
    loop in ``ws.wait()``) reads, decrypts and parses it itself, in its own
    idle time, while the reader thread stays parked and out of its frames.

    Construction does no I/O; :meth:`handshake` follows, on one thread,
    before any other call. Then :meth:`recv` or :meth:`read` (one reader at a
    time: the reader thread, or the read token's holder) and :meth:`write`
    (the writer) may run at once: ``_tls_lock`` serializes the calls into the
    ``SSLObject`` and is never held across I/O, and ``_send_lock`` keeps TLS
    records in the order they were made. :meth:`abort` and :meth:`close` act
    on the outer transport, from any thread.
    """

    def __init__(
        self,
        outer: Transport,
        ssl_context: ssl.SSLContext,
        server_hostname: str,
        alpn: Sequence[str] = HTTP1_ALPN,
    ) -> None:
        self.outer = outer
        self.server_hostname = server_hostname
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._tls = tls_start_bio(
            ssl_context, self._incoming, self._outgoing, server_hostname, alpn
        )
        read_to = getattr(outer, "read_to", None) if outer.can_read_bounded else None
        self._read_to: Callable[[Callable[[bytes], int], float | None], int | None] | None = (
            read_to
        )
        self.can_read_bounded = read_to is not None
        #: Plaintext a caller's :meth:`read` decrypted and has not yet parsed
        #: (see :attr:`TCPTransport.held`); :meth:`recv` returns it first.
        self.held: list[bytes] = []
        # A TLS error met after some records had been decrypted: raised by
        # the next read, once those have been handed on (see _decrypt).
        self._failed: ConnectionLost | None = None

    @property
    def sock(self) -> socket.socket | None:
        """The outer transport's socket (``None`` inside another TLS)."""
        return getattr(self.outer, "sock", None)

    def handshake(self, deadline: Deadline) -> None:
        """Run the TLS handshake, each wait bounded by ``deadline``.

        Raises ``ssl.SSLError`` (``SSLCertVerificationError``...) as it comes,
        and what the outer transport's :meth:`recv` raises (``OpenTimeout``
        when the deadline passes, ``ConnectionLost``...).
        """
        while True:
            try:
                with self._tls_lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed(deadline.remaining())
        self._flush()
        self.alpn_protocol = self._tls.selected_alpn_protocol()

    def _feed(self, timeout: float | None) -> None:
        data = self.outer.recv(timeout)
        with self._tls_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def _flush(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                data = self._outgoing.read()
            if data:
                self.outer.write([data])

    def recv(self, timeout: float | None = None) -> bytes:
        """Blocking read of plaintext (``b""`` at the end of the TLS stream or
        after our own abort): up to :data:`RECV_SMALL` bytes, as many whole
        records as the SSL object has, after reading the network when it has
        none. Timeouts and failures as :meth:`TCPTransport.recv`."""
        held = self.held
        if held:
            return held.pop(0)  # left by an interrupted caller: in order
        while True:
            parts: list[bytes] = []
            end = self._decrypt(self._read_records, parts)
            if parts and not parts[-1]:  # the end (OP_IGNORE_UNEXPECTED_EOF)
                del parts[-1]
                end = True
            if parts:  # the end, if it came too, comes with the next call
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                self.bytes_read += len(data)
                return data
            if end:
                return b""
            # At the end of the outer stream the next read raises SSLEOFError
            # (or returns b""), never SSLWantReadError:
            # test_memory_bio_at_eof_never_asks_for_more.
            self._feed(timeout)

    def _read_records(self, parts: list[bytes]) -> None:
        """Plaintext records into ``parts``, up to about :data:`RECV_SMALL`
        bytes (an empty one, the end, last)."""
        read = self._tls.read
        size = 0
        while size < RECV_SMALL:
            part = read(_TLS_RECORD)
            parts.append(part)
            if not part:
                return
            size += len(part)

    def _keep_records(self, held: list[bytes]) -> None:
        """Up to ``len(_RECORDS)`` records into ``held``: each lands there as it
        is decrypted (one C-level step), and those already there stay when the
        SSL object asks for more."""
        held.extend(map(self._tls.read, _RECORDS))

    def _decrypt(self, step: Callable[[list[bytes]], None], into: list[bytes]) -> bool:
        """Run ``step(into)``, which reads the SSL object, under the TLS lock;
        True at the end of the TLS stream (close_notify, or the stream ended
        without one, as an ``SSLSocket`` with ``suppress_ragged_eofs`` reads
        it; or any TLS error after our own abort). Another TLS error raises
        ``ConnectionLost``, once what was decrypted before it has been
        handed on. Then sends what reading queued (a TLS 1.3 key
        update's answer), except at the end: the alert OpenSSL queues about a
        missing close_notify is not sent, the peer has gone."""
        if self._failed is not None:
            raise self._failed
        end = False
        with self._tls_lock:
            try:
                step(into)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                end = True
            except ssl.SSLError as exc:
                if self.aborted:
                    end = True
                else:
                    lost = ConnectionLost(f"TLS error: {exc}")
                    lost.__cause__ = exc
                    if not into:
                        raise lost from exc
                    # The records decrypted before the bad one go to the
                    # parser first; the next call raises (the SSL object
                    # itself would then read as an orderly end).
                    self._failed = lost
            pending = 0 if end else self._outgoing.pending
        if pending:
            self._flush()
        return end

    def read(self, timeout: float | None) -> bytes | None:
        """See :meth:`Transport.read`: the plaintext of the records the SSL
        object has, or else of those one bounded read of the outer transport
        brings (``None`` if that read got nothing, or only part of a record).

        Interrupts: the network's bytes go to the SSL object in one C-level
        step with their read (:meth:`TCPTransport.read_to`), and each record's
        plaintext to :attr:`held` in one with its decryption, so an interrupt
        leaves every byte either in the SSL object or in :attr:`held`.
        """
        if self.aborted:
            return b""
        read_to = self._read_to
        assert read_to is not None  # only where can_read_bounded
        data = self._decrypt_held()
        if data is None:
            n = read_to(self._incoming.write, timeout)
            if n is None:
                return None
            if n == 0:
                with self._tls_lock:
                    self._incoming.write_eof()
            data = self._decrypt_held()
        return data

    def _decrypt_held(self) -> bytes | None:
        """Decrypt what the SSL object has into :attr:`held` (empty on entry):
        one chunk, returned; ``b""`` at the end; ``None`` if no whole record."""
        held = self.held
        end = self._decrypt(self._keep_records, held)
        if held and not held[-1]:  # the end (OP_IGNORE_UNEXPECTED_EOF)
            del held[-1]
            end = True
        if not held:
            return b"" if end else None
        if len(held) > 1:
            # One chunk for the parser. Until this store, held has the parts:
            # an interrupt before it loses nothing.
            held[:] = (b"".join(held),)
        data = held[0]
        self.bytes_read += len(data)
        return data

    def write(self, chunks: Sequence[BytesLike]) -> None:
        n = 0
        with self._send_lock:
            with self._tls_lock:
                try:
                    for chunk in chunks:
                        self._tls.write(chunk)
                        n += len(chunk)
                except ssl.SSLError as exc:
                    raise ConnectionLost(f"TLS error: {exc}") from exc
                data = self._outgoing.read()
            self.bytes_written += n
            self.outer.write([data])

    def abort(self) -> None:
        self.aborted = True
        self.outer.abort()

    def close(self) -> None:
        self.outer.close()


class Tunnel(Protocol):
    """A route to hosts through a proxy (:mod:`blockws.proxy` makes them).

    ``key`` tells routes apart where connections are shared (the HTTP/2 pool):
    equal keys, the same route. ``open`` reaches ``host:port`` through the
    proxy with the connector's help (so ``close()`` can abort it) and starts
    TLS to the host inside the tunnel when ``ssl_context`` is given.
    """

    @property
    def key(self) -> Hashable: ...

    def open(
        self,
        connector: Connector,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        alpn: Sequence[str] = ...,
    ) -> Transport: ...


class Connector:
    """Opens a TCP (and TLS) connection, abortable from another thread.

    With a :attr:`tunnel` set, :meth:`connect` goes through that proxy; the
    opening sets it before each request (a redirect may lead elsewhere).
    :meth:`abort` ends every phase at once (probe "close() ignored during a
    TLS handshake", issue 11): the host lookup runs on a helper thread that
    an abort abandons (a resolver that hangs finishes there, unheeded); the
    TCP connect and the TLS handshake run on a registered socket that abort
    shuts down, which wakes the blocked call. The TLS socket is registered
    before its handshake starts: ``wrap_socket`` moves the descriptor into
    it, so shutting down the plain socket then no longer reached it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._lookup: threading.Event | None = None  # set when the lookup ends, or on abort
        self.aborted = False
        #: The proxy route :meth:`connect` takes, or ``None`` to connect directly.
        self.tunnel: Tunnel | None = None

    @property
    def route_key(self) -> Hashable:
        """What tells this connector's route apart (``None``: direct)."""
        tunnel = self.tunnel
        return None if tunnel is None else tunnel.key

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sock, lookup = self._sock, self._lookup
        if lookup is not None:
            lookup.set()
        if sock is not None:
            # Shut down, never closed here: the thread using the socket closes
            # it (_drop, or the transport's close). A close from this thread
            # could land between that thread taking the descriptor's number
            # and its recv() or connect() -- which then ran on a closed
            # descriptor, or on whatever the process opened next under the
            # same number, and waited there for good (a reader that outlived
            # Ctrl-C in connect()).
            with contextlib.suppress(OSError):
                # On the raw descriptor: SSLSocket.shutdown would drop its SSL
                # object under the thread that is in its handshake.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _resolve(self, host: str, port: int, deadline: Deadline) -> list[Any]:
        """``getaddrinfo`` on a helper thread, so that an abort or the deadline
        need not wait for a resolver that hangs (numeric hosts skip the thread)."""
        if is_ip_literal(host.strip("[]")):
            with map_os_errors(connecting=True, where=f"{host}:{port}"):
                return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        result: list[Any] = []
        woken = threading.Event()  # the lookup ended, or abort()

        def lookup() -> None:
            try:
                result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except BaseException as exc:  # noqa: BLE001 - handed to the connecting thread
                result.append(exc)
            woken.set()

        with self._lock:
            if self.aborted:
                raise ConnectError("connection aborted by close()")
            self._lookup = woken
        threading.Thread(target=lookup, name="blockws-resolve", daemon=True).start()
        woken.wait(deadline.remaining())
        with self._lock:
            self._lookup = None
        if self.aborted:  # whether or not the lookup has ended
            raise ConnectError("connection aborted by close()")
        if not result:
            raise OpenTimeout(f"looking up {host!r} took too long")
        found = result[0]
        if isinstance(found, OSError):
            raise os_error(found, connecting=True, where=f"{host}:{port}") from found
        if isinstance(found, BaseException):
            # UnicodeError: not a host name (an IDNA label empty or over 63 characters)
            raise ConnectError(f"cannot resolve host {host!r}: {found}") from found
        infos: list[Any] = found
        return infos

    def detach(self) -> None:
        """Forget the connected socket: it now belongs to someone else (a shared
        HTTP/2 connection), so this connector's :meth:`abort` must not touch it."""
        with self._lock:
            self._sock = None

    def _register(self, sock: socket.socket) -> None:
        """``sock`` is the one :meth:`abort` ends; closes it and raises if aborted."""
        with self._lock:
            if self.aborted:
                sock.close()
                raise ConnectError("connection aborted by close()")
            self._sock = sock

    def _drop(self, sock: socket.socket) -> None:
        """A connection attempt failed: forget ``sock`` and close it; then, if
        :meth:`abort` came meanwhile, raise that as the reason."""
        with self._lock:
            self._sock = None
        sock.close()
        if self.aborted:
            raise ConnectError("connection aborted by close()") from None

    def _probe(self, host: str, port: int, timeout: float) -> socket.socket:
        """A new plain connection for reading a rejected certificate (:mod:`blockws.tls`),
        registered so that :meth:`abort` ends it too."""
        sock = socket.create_connection((host, port), timeout)
        self._register(sock)  # closes it and raises if aborted meanwhile
        return sock

    def connect(
        self,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        alpn: Sequence[str] = HTTP1_ALPN,
    ) -> Transport:
        """Reach ``host:port`` (through :attr:`tunnel` when set) and optionally
        start TLS offering ``alpn``."""
        tunnel = self.tunnel
        if tunnel is not None:
            return tunnel.open(self, host, port, deadline, ssl_context, server_hostname, alpn)
        return self.connect_direct(host, port, deadline, ssl_context, server_hostname, alpn)

    def connect_direct(
        self,
        host: str,
        port: int,
        deadline: Deadline,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        alpn: Sequence[str] = HTTP1_ALPN,
    ) -> TCPTransport | TLSTransport:
        """Resolve, connect (trying each address) and optionally start TLS.

        With ``ssl_context``, TLS offers ``alpn`` (set on the context for this
        connection: see :mod:`blockws.tls`). Failures name ``host:port``.
        """
        where = f"{host}:{port}"
        infos = self._resolve(host, port, deadline)
        last: BaseException | None = None
        for family, type_, proto, _, addr in infos:
            with map_os_errors(connecting=True, where=where):  # EMFILE, ENFILE, ENOBUFS too
                sock = socket.socket(family, type_, proto)
            self._register(sock)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with map_os_errors(connecting=True, where=where):
                    self._connect_sock(sock, addr, deadline)
                sock.settimeout(deadline.remaining())
            except BaseException as exc:
                self._drop(sock)  # raises if aborted
                if not isinstance(exc, ConnectError):
                    raise  # OpenTimeout (the deadline), KeyboardInterrupt...
                last = exc
                continue  # the next address
            break
        else:
            assert last is not None
            raise last
        if ssl_context is None:
            return TCPTransport(sock)
        return self.start_tls(
            sock, deadline, ssl_context, server_hostname or host, alpn, host, port, probe=True
        )

    def _connect_sock(self, sock: socket.socket, addr: Any, deadline: Deadline) -> None:
        """``sock.connect(addr)`` that :meth:`abort` ends at once, in any phase.

        ``shutdown()`` wakes a connect in progress, but not one that has yet
        to start: it does nothing to a socket that is not connecting. So the
        connect starts without blocking, and the flag :meth:`abort` sets
        before it shuts down is checked after that: an abort before it is
        seen there; one after it, the shutdown wakes the wait. Raises
        ``OSError`` (``socket.timeout`` when the deadline passes first).
        """
        deadline.remaining()  # raises OpenTimeout once it has passed
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in _CONNECTING:
            if self.aborted:
                raise ConnectError("connection aborted by close()")
            left = deadline.left()
            if _poll is not None:
                poller = _poll()
                poller.register(sock, _POLLOUT)
                ready = bool(poller.poll(None if left is None else max(0, math.ceil(left * 1000))))
            else:  # pragma: no cover - Windows: failures come in the third set
                _, writable, failed = _select([], [sock], [sock], left)
                ready = bool(writable or failed)
            if not ready:
                raise socket.timeout("timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        if self.aborted:
            raise ConnectError("connection aborted by close()")

    def start_tls(
        self,
        sock: socket.socket,
        deadline: Deadline,
        ssl_context: ssl.SSLContext,
        server_hostname: str,
        alpn: Sequence[str],
        host: str,
        port: int,
        *,
        probe: bool = False,
    ) -> TLSTransport:
        """TLS offering ``alpn`` over ``sock``, a connection this connector made
        to ``host:port`` (directly, or a tunnel through a proxy); on failure
        ``sock`` is closed. With ``probe``, a failed verification reads the
        server's certificate over a new direct connection for the message (see
        :mod:`blockws.tls`); through a tunnel there is none."""
        where = f"{host}:{port}"
        outer = TCPTransport(sock)
        try:
            with map_os_errors(connecting=True, where=where):
                sock.settimeout(deadline.remaining())  # bounds the handshake's writes
                tls = TLSTransport(outer, ssl_context, server_hostname, alpn)
                tls_handshake(
                    lambda: tls.handshake(deadline), server_hostname, host, port,
                    reconnect=(lambda t: self._probe(host, port, t)) if probe else None,
                    time_left=deadline.remaining(),
                )  # fmt: skip
        except BaseException:
            self._drop(sock)  # raises if aborted
            raise
        return tls
