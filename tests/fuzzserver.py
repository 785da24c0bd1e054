"""A raw-socket WebSocket "fuzzing server" that plays Autobahn TestSuite client cases.

The Autobahn TestSuite (``wstest -m fuzzingserver``) cannot run here, so this module
reproduces what it does for client testees, without any WebSocket library:

* ``FuzzServer`` listens on 127.0.0.1 (port 0), accepts one connection, answers the HTTP
  upgrade with 101 and the right ``Sec-WebSocket-Accept``, then plays one ``Case``: a list of
  steps (frames with any opcode / RSV / FIN / length, raw octets, octet-wise "chops" and
  per-frame "sync" writes, waits, the closing handshake, ``killAfter`` / ``closeAfter``
  timers). Meanwhile it parses and unmasks everything the client sends and keeps a ``Record``
  of it with timestamps: messages, pings, pongs, the close frame and its code, who closed the
  TCP connection, and any protocol violation by the client.
* ``judge(case, record)`` rates the run the way Autobahn's ``Case.onConnectionLost`` does
  (``autobahntestsuite/case/case.py``): the observed events must equal one of the expected
  event lists (``OK`` or ``NON-STRICT``), then the closing behaviour is checked
  (``closedByMe``, ``requireClean``, close code). The per-case overrides of the suite are
  data on the ``Case`` (``wrong_code_is_fatal`` for category 7,
  ``closed_by_wrong_endpoint_is_fatal`` for the UTF-8 cases, ``informational``).

Autobahn reports two columns (behaviour and close behaviour); ``judge`` folds them into one
verdict: FAILED if either is a failure (close ``FAILED`` / ``UNCLEAN``), NON-STRICT if the
behaviour is non-strict or the close code is wrong (Autobahn colours that column
"non-strict"), else OK. It is slightly stricter than Autobahn in two ways: any protocol
violation by the client (unmasked frame, invalid close payload or close code, RSV bits, ...)
fails the case, and echoed payloads in the performance cases are compared byte for byte
(Autobahn only compares lengths).

Timing model (Autobahn runs on a Twisted reactor): frames written in the same step batch go
out in one ``send()`` (one TCP segment on loopback); ``sync=True`` frames and every chop of a
``chopsize`` frame are separate writes with a short pause after each, as Autobahn's
``send_queue`` does. ``Wait`` is ``continueLater``: if the connection is still open when it
expires, ``("timeout", tag)`` is appended to the observed events, which is how the fail-fast
cases (6.4.x) tell "failed right after the bad octets" from "failed only at the end".
"""

from __future__ import annotations

import base64
import collections
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Verdicts (Autobahn's Case.OK etc.)
OK = "OK"
NON_STRICT = "NON-STRICT"
FAILED = "FAILED"
INFORMATIONAL = "INFORMATIONAL"
WRONG_CODE = "WRONG CODE"
UNCLEAN = "UNCLEAN"

# Opcodes
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

# Close codes
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007

#: Close codes an endpoint may put in a close frame: RFC 6455 7.4.1 plus the IANA registry
#: (1012-1014) and the registered / private ranges 3000-4999. 1004-1006 and 1015 are reserved.
VALID_CLOSE_CODES = frozenset(
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
    + list(range(3000, 5000))
)

#: Pause after each chop of a ``chopsize`` frame (Autobahn queues chops 10 us apart on its
#: reactor; a little more makes them reliably separate segments for a Python client). Frames
#: chopped into more than ``CHOP_DELAY_MAX_CHOPS`` pieces are written back to back instead,
#: still one ``send()`` per chop, so the performance cases stay fast.
CHOP_DELAY = 0.0005
CHOP_DELAY_MAX_CHOPS = 2000
#: Pause after a ``sync=True`` write.
SYNC_DELAY = 0.001
#: How long the server waits for the client's close frame after sending its own, before it
#: drops the TCP connection (Autobahn's default closeHandshakeTimeout is 1 s).
CLOSE_HANDSHAKE_TIMEOUT = 2.0
#: After the server shut down its side of the TCP connection, how long it waits for the
#: client to close its side before it aborts.
LINGER_TIMEOUT = 2.0
ACCEPT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# Frame helpers


def repeat_to(pattern: bytes, length: int | None) -> bytes:
    """Autobahn's ``payload_len``: ``pattern`` repeated and cut to ``length`` octets."""
    if length is None:
        return pattern
    if length == 0:
        return b""
    if not pattern:
        raise ValueError("cannot repeat an empty pattern")
    return (pattern * (length // len(pattern) + 1))[:length]


def xor_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """Mask or unmask ``data`` with the 4-octet ``key`` (fast for large payloads)."""
    n = len(data)
    if n == 0:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")
    return value.to_bytes(n, "little")


def frame_header(
    opcode: int,
    length: int,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    b0 = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mbit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, mbit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, length)
    return head + (mask or b"")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    body = xor_mask(payload, mask) if mask is not None else payload
    return frame_header(opcode, len(payload), fin, rsv, mask) + body


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    """Autobahn's ``sendCloseFrame``: optional 2-octet code, then the reason as given."""
    return (struct.pack("!H", code) if code is not None else b"") + reason


# --------------------------------------------------------------------------------------
# Steps: what a case does, as data


@dataclass(frozen=True)
class Frame:
    """``sendFrame``: one frame, any opcode / RSV / FIN. ``payload_len`` repeats ``payload``
    to that many octets. ``chopsize`` writes the frame octets in pieces of that size, each a
    separate write; ``sync`` writes the frame on its own."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    payload_len: int | None = None
    mask: bytes | None = None
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Raw:
    """Raw octets (e.g. a frame header announcing more payload than follows)."""

    data: bytes
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Message:
    """``sendMessage``: a whole text / binary message, in one frame or in frames of
    ``fragment_size`` payload octets (Autobahn's fragmentSize / autoFragmentSize)."""

    payload: bytes
    binary: bool = False
    payload_len: int | None = None
    fragment_size: int | None = None
    chopsize: int | None = None
    sync: bool = False


@dataclass(frozen=True)
class Close:
    """``sendClose`` / ``sendCloseFrame``: start the closing handshake. The payload is the
    2-octet ``code`` (if not None) followed by ``reason``, unchecked, so invalid close
    frames can be sent. Ignored (like Autobahn) when a close was already sent; send a raw
    ``Frame(OP_CLOSE, ...)`` for a second close frame."""

    code: int | None = None
    reason: bytes = b""


@dataclass(frozen=True)
class Wait:
    """``continueLater``: wait ``seconds``; if the connection is still open afterwards,
    record ``("timeout", tag)`` (when ``tag`` is given) and go on with the next steps,
    otherwise stop playing. With ``require_open=False`` the steps also go on while the
    closing handshake is in progress (Autobahn's 5.19 part 2 does not check the state)."""

    seconds: float
    tag: str | None = None
    require_open: bool = True


@dataclass(frozen=True)
class KillAfter:
    """``killAfter``: if the connection is not closed ``seconds`` after the steps were
    written, fail it (send close 1001 and wait for the client's close, or drop the TCP
    connection if a close was already sent)."""

    seconds: float


@dataclass(frozen=True)
class CloseAfter:
    """``closeAfter``: if the connection is still open ``seconds`` after the steps were
    written, start the closing handshake (a close frame without payload)."""

    seconds: float


Step = Union[Frame, Raw, Message, Close, Wait, KillAfter, CloseAfter]

#: An observed event, compared to the expected lists like Autobahn's ``received``:
#: ("message", payload: bytes, is_binary: bool) | ("ping", payload) | ("pong", payload)
#: | ("timeout", tag)
Event = tuple[Any, ...]


@dataclass(frozen=True)
class EchoCheck:
    """Category 9.1-9.6 (and the like): the first message the client sends must be the
    echo of the message sent (same type, same octets); then the server closes with 1000."""

    binary: bool
    length: int
    pattern: bytes

    def expected_payload(self) -> bytes:
        return repeat_to(self.pattern, self.length)


@dataclass(frozen=True)
class Roundtrip:
    """Category 9.7 / 9.8: send ``count`` messages one at a time, each after the echo of
    the previous one came back; then the server closes with 1000."""

    count: int
    length: int
    binary: bool
    pattern: bytes


@dataclass(frozen=True, eq=False)
class Case:
    id: str
    description: str
    expectation: str
    steps: tuple[Step, ...]
    #: verdict ("OK" / "NON-STRICT") -> the exact list of events observed for that verdict.
    #: Insertion order matters: the first match wins.
    expected: dict[str, list[Event]]
    #: Autobahn's expectedClose: must the fuzzer (True) or the client (False) start the close?
    closed_by_me: bool
    #: close codes the client may send (a close frame without code is always accepted)
    close_codes: tuple[int, ...]
    #: must the closing handshake complete (close frames both ways)?
    require_clean: bool
    #: UTF-8 cases: the client not failing the connection fails the case itself
    closed_by_wrong_endpoint_is_fatal: bool = False
    #: category 7: a wrong close code fails the case itself
    wrong_code_is_fatal: bool = False
    #: the outcome is reported as INFORMATIONAL (only client protocol violations fail it)
    informational: bool = False
    #: do not start the closing handshake once the expected events were observed
    suppress_close: bool = False
    echo: EchoCheck | None = None
    roundtrip: Roundtrip | None = None
    #: extra check on the record; returns an error string or None (10.1.1's frame counts)
    check: Callable[[Record], str | None] | None = None
    #: hard limit for the whole case (server side), seconds
    time_limit: float = 0.0
    #: how the case was scaled down from Autobahn's, if it was
    scaled: str = ""

    def __post_init__(self) -> None:
        if not self.time_limit:
            waits = sum(s.seconds for s in self.steps if isinstance(s, Wait))
            timers = [s.seconds for s in self.steps if isinstance(s, (KillAfter, CloseAfter))]
            limit = waits + max(timers, default=1.0) + 2 * CLOSE_HANDSHAKE_TIMEOUT + 5.0
            object.__setattr__(self, "time_limit", limit)

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Case({self.id})"


# --------------------------------------------------------------------------------------
# What happened


@dataclass
class Record:
    case_id: str
    started: float = 0.0  # time.monotonic() when the handshake completed
    connected: bool = False
    opened: bool = False
    handshake_error: str | None = None
    request_line: str = ""
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    #: Autobahn's ``received``: messages, pings, pongs (from the client) and timeouts
    received: list[Event] = field(default_factory=list)
    #: seconds since open at which each ``received`` event happened
    received_at: list[float] = field(default_factory=list)
    #: (seconds since open, what, detail) for diagnostics
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    closed_by_me: bool = False  # the fuzzer sent the first close frame
    was_clean: bool = False  # close frames went both ways
    local_close_code: int | None = None
    local_close_at: float | None = None
    client_close_payload: bytes | None = None
    client_close_at: float | None = None
    remote_close_code: int | None = None  # the client's (valid) close code
    remote_close_reason: str | None = None
    tcp_closed_by: str | None = None  # "client" or "server": who closed TCP first
    tcp_closed_at: float | None = None
    violations: list[str] = field(default_factory=list)
    steps_done_at: float | None = None  # all step octets handed to the kernel
    steps_completed: bool = False  # every step ran (no early stop on close)
    #: queued writes (chops, frames) dropped because the connection closed first: > 0 means
    #: the client closed before the fuzzer had sent everything
    discarded_writes: int = 0
    kill_fired: bool = False
    close_after_fired: bool = False
    close_timeout_fired: bool = False
    timed_out: bool = False  # the case's hard time limit was hit
    tx_data_frames: dict[int, int] = field(default_factory=dict)
    echo_ok: bool | None = None
    echo_result: str = ""
    roundtrips: int = 0
    duration: float = 0.0

    def note(self, what: str, detail: str = "") -> None:
        t = time.monotonic() - self.started if self.started else 0.0
        self.timeline.append((round(t, 4), what, detail))

    def format_timeline(self, limit: int = 60) -> str:
        lines = [f"{t:8.4f}s  {what:<18} {detail}" for t, what, detail in self.timeline]
        if len(lines) > limit:
            lines = lines[: limit // 2] + [f"   ... {len(lines) - limit} more ..."] + lines[
                -limit // 2 :
            ]
        return "\n".join(lines)


def _short(data: bytes, n: int = 40) -> str:
    if len(data) <= n:
        return f"{len(data)}B {data!r}"
    return f"{len(data)}B {data[:n]!r}..."


def _event_repr(ev: Event) -> str:
    parts = []
    for x in ev:
        if isinstance(x, (bytes, bytearray)) and len(x) > 40:
            parts.append(f"<{len(x)} octets {bytes(x[:16])!r}...>")
        else:
            parts.append(repr(x))
    return "(" + ", ".join(parts) + ")"


def events_repr(events: Sequence[Event]) -> str:
    return "[" + ", ".join(_event_repr(e) for e in events) + "]"


# --------------------------------------------------------------------------------------
# The server

_CONNECTING, _OPEN, _CLOSING, _CLOSED = "CONNECTING", "OPEN", "CLOSING", "CLOSED"


class FuzzServer:
    """Serve one ``Case`` to one client connection. Use as a context manager::

        with FuzzServer(case) as server:
            start_client(server.url)
            server.wait(case.time_limit + 5)
        verdict = judge(case, server.record)
    """

    def __init__(self, case: Case, host: str = "127.0.0.1") -> None:
        self.case = case
        self.record = Record(case.id)
        self.finished = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._sock: socket.socket | None = None
        self._cond = threading.Condition()  # guards the protocol state below
        self._state = _CONNECTING
        self._closing_since: float | None = None
        self._closed = threading.Event()  # protocol state reached CLOSED
        self._tcp_down = False  # the server shut down / aborted the TCP connection
        self._reader_done = threading.Event()
        # writer queue: ("data", bytes, delay, opcode-count dict or None) | ("shutdown",)
        self._wq: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wcond = threading.Condition()
        self._writer_stop = False
        self._send_lock = threading.RLock()  # makes a batch of steps atomic vs. the reader
        self._pending = bytearray()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(
            target=self._run, name=f"fuzzserver-{case.id}", daemon=True
        )

    # -- public -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/runCase?case={self.case.id}&agent=testee"

    def start(self) -> FuzzServer:
        self._main.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the case is over (connection closed, record final)."""
        return self.finished.wait(timeout)

    def close(self) -> None:
        """Abort whatever is still running and release the sockets."""
        with self._cond:
            self.record.timed_out = self.record.timed_out or not self.finished.is_set()
        self._abort("server")
        try:
            self._listener.close()
        except OSError:
            pass
        self._main.join(10)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FuzzServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- main thread ------------------------------------------------------------------

    def _run(self) -> None:
        rec = self.record
        t_begin = time.monotonic()
        try:
            self._listener.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                rec.handshake_error = f"no connection from the client ({exc!r})"
                return
            finally:
                try:
                    self._listener.close()
                except OSError:
                    pass
            rec.connected = True
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = conn
            leftover = self._handshake(conn)
            if leftover is None:
                self._abort("server")
                return
            with self._cond:
                self._state = _OPEN
                rec.opened = True
                rec.started = time.monotonic()
            rec.note("open", rec.request_line)
            for target, name in ((self._reader, "reader"), (self._writer, "writer")):
                t = threading.Thread(
                    target=target,
                    args=(leftover,) if name == "reader" else (),
                    name=f"fuzzserver-{self.case.id}-{name}",
                    daemon=True,
                )
                self._threads.append(t)
                t.start()
            deadlines = self._play()
            self._wait_until_closed(deadlines)
            # linger: let the client close its side after our FIN
            if not self._reader_done.wait(LINGER_TIMEOUT):
                rec.note("linger timeout", "client did not close its side of TCP")
        except Exception as exc:  # a bug in the fuzzer: make it visible in the verdict
            rec.violations.append(f"fuzzserver internal error: {exc!r}")
            raise
        finally:
            self._abort("server")
            with self._wcond:
                self._writer_stop = True
                self._wcond.notify_all()
            for t in self._threads:
                t.join(5)
            if self._sock is not None:
                try:
                    self._sock.close()
                except OSError:
                    pass
            rec.duration = time.monotonic() - t_begin
            self.finished.set()

    def _handshake(self, conn: socket.socket) -> bytes | None:
        rec = self.record
        conn.settimeout(HANDSHAKE_TIMEOUT)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    rec.handshake_error = "client closed the connection during the handshake"
                    return None
                buf += chunk
                if len(buf) > 65536:
                    rec.handshake_error = "handshake request too large"
                    return None
        except OSError as exc:
            rec.handshake_error = f"handshake read failed: {exc!r}"
            return None
        conn.settimeout(None)
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        rec.request_line = lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                rec.handshake_error = f"malformed header line {line!r}"
                break
            rec.request_headers.append((name.strip(), value.strip()))
            key = name.strip().lower()
            headers[key] = (headers[key] + ", " if key in headers else "") + value.strip()
        problems = []
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
            problems.append(f"bad request line {lines[0]!r}")
        if "websocket" not in [t.strip().lower() for t in headers.get("upgrade", "").split(",")]:
            problems.append("missing Upgrade: websocket")
        if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
            problems.append("missing Connection: Upgrade")
        if headers.get("sec-websocket-version", "").strip() != "13":
            problems.append("Sec-WebSocket-Version is not 13")
        if "host" not in headers:
            problems.append("missing Host header")
        key = headers.get("sec-websocket-key", "").strip()
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                problems.append("Sec-WebSocket-Key is not 16 octets")
        except ValueError:
            problems.append("Sec-WebSocket-Key is not base64")
        if problems or rec.handshake_error:
            rec.handshake_error = rec.handshake_error or "; ".join(problems)
            try:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            return None
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest())
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n"
            b"Server: blockws-fuzzserver\r\n\r\n"
        )
        try:
            conn.sendall(response)
        except OSError as exc:
            rec.handshake_error = f"could not send the 101 response: {exc!r}"
            return None
        return rest

    def _play(self) -> list[tuple[float, str]]:
        """Run the steps; return the killAfter / closeAfter timers (delay, kind)."""
        timers: list[tuple[float, str]] = []
        rec = self.record
        stopped = False
        for step in self.case.steps:
            if self._closed.is_set():
                stopped = True
                break
            if isinstance(step, Wait):
                self._flush()
                self._drain()
                if self._closed.wait(step.seconds):
                    stopped = True
                    break
                with self._cond:
                    state = self._state
                if state == _CLOSED or (step.require_open and state != _OPEN):
                    rec.note("wait", f"connection not open after {step.seconds}s: stop")
                    stopped = True
                    break
                if step.tag is not None:
                    self._event(("timeout", step.tag), f"tag {step.tag}")
            elif isinstance(step, KillAfter):
                timers.append((step.seconds, "kill"))
            elif isinstance(step, CloseAfter):
                timers.append((step.seconds, "closeAfter"))
            else:
                with self._send_lock:
                    self._do_send(step)
        self._flush()
        rec.steps_completed = not stopped
        self._drain()
        rec.steps_done_at = time.monotonic() - rec.started
        rec.note("steps done", "all steps played" if not stopped else "stopped early")
        return timers

    def _do_send(self, step: Step) -> None:
        if isinstance(step, Frame):
            payload = repeat_to(step.payload, step.payload_len)
            data = build_frame(step.opcode, payload, step.fin, step.rsv, step.mask)
            self._count_tx(step.opcode)
            self.record.note(
                "send frame",
                f"op={step.opcode} fin={int(step.fin)} rsv={step.rsv} {_short(payload)}"
                + (f" chop={step.chopsize}" if step.chopsize else "")
                + (" sync" if step.sync else ""),
            )
            self._send(data, step.chopsize, step.sync)
        elif isinstance(step, Raw):
            self.record.note("send raw", _short(step.data))
            self._send(step.data, step.chopsize, step.sync)
        elif isinstance(step, Message):
            payload = repeat_to(step.payload, step.payload_len)
            opcode = OP_BINARY if step.binary else OP_TEXT
            size = step.fragment_size or max(len(payload), 1)
            pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
            out = []
            for i, piece in enumerate(pieces):
                op = opcode if i == 0 else OP_CONT
                self._count_tx(op)
                out.append(build_frame(op, piece, fin=i == len(pieces) - 1))
            self.record.note(
                "send message",
                f"{'binary' if step.binary else 'text'} {_short(payload)}"
                f" in {len(pieces)} frame(s)",
            )
            self._send(b"".join(out), step.chopsize, step.sync)
        elif isinstance(step, Close):
            self._start_close(step.code, step.reason, via_pending=True)

    def _count_tx(self, opcode: int) -> None:
        d = self.record.tx_data_frames
        d[opcode] = d.get(opcode, 0) + 1

    def _wait_until_closed(self, timers: list[tuple[float, str]]) -> None:
        rec = self.record
        base = time.monotonic()
        pending = sorted((base + delay, kind) for delay, kind in timers)
        hard = rec.started + self.case.time_limit
        while True:
            action = None
            with self._cond:
                if self._state == _CLOSED:
                    return
                now = time.monotonic()
                candidates = list(pending[:1])
                if self._state == _CLOSING and self._closing_since is not None:
                    candidates.append((self._closing_since + CLOSE_HANDSHAKE_TIMEOUT, "close"))
                candidates.append((hard, "hard"))
                when, kind = min(candidates)
                if when > now:
                    self._cond.wait(when - now)
                    continue
                if pending and (when, kind) == pending[0]:
                    pending.pop(0)
                action = kind
                state = self._state
            if action == "kill":
                rec.kill_fired = True
                rec.note("killAfter fired", f"state {state}")
                if state == _OPEN:
                    with self._send_lock:
                        self._start_close(GOING_AWAY, b"Going Away")
                else:
                    self._abort("server")
            elif action == "closeAfter":
                if state == _OPEN:
                    rec.close_after_fired = True
                    rec.note("closeAfter fired")
                    with self._send_lock:
                        self._start_close(None)
            elif action == "close":
                rec.close_timeout_fired = True
                rec.note("close timeout", "no close frame from the client: drop TCP")
                self._abort("server")
            elif action == "hard":
                rec.timed_out = True
                rec.note("time limit", f"case not finished after {self.case.time_limit}s")
                self._abort("server")

    # -- sending ----------------------------------------------------------------------

    def _send(self, data: bytes, chopsize: int | None, sync: bool) -> None:
        if chopsize:
            self._flush()
            chops = [data[i : i + chopsize] for i in range(0, len(data), chopsize)]
            delay = CHOP_DELAY if len(chops) <= CHOP_DELAY_MAX_CHOPS else 0.0
            with self._wcond:
                self._wq.extend(("data", c, delay) for c in chops)
                self._wcond.notify_all()
        elif sync:
            self._flush()
            self._enqueue(data, SYNC_DELAY)
        else:
            self._pending += data

    def _flush(self) -> None:
        with self._send_lock:
            if self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                self._enqueue(data, 0.0)

    def _enqueue(self, data: bytes, delay: float = 0.0) -> None:
        with self._wcond:
            self._wq.append(("data", data, delay))
            self._wcond.notify_all()

    def _drain(self) -> None:
        """Wait until the writer handed everything queued to the kernel (or TCP is down)."""
        deadline = (self.record.started or time.monotonic()) + self.case.time_limit
        with self._wcond:
            while (self._wq or self._writing) and not self._tcp_down:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wcond.wait(min(left, 0.1))

    _writing = False

    def _writer(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            with self._wcond:
                while not self._wq and not self._writer_stop:
                    self._wcond.wait()
                if not self._wq:
                    return
                item = self._wq.popleft()
                self._writing = True
            try:
                if item[0] == "data":
                    if self._tcp_down:
                        self.record.discarded_writes += 1
                        continue
                    try:
                        sock.sendall(item[1])
                    except OSError as exc:
                        self.record.note("send failed", repr(exc))
                        self._abort("client" if self.record.tcp_closed_by is None else "server")
                        continue
                    if item[2]:
                        time.sleep(item[2])
                elif item[0] == "shutdown":
                    self._shutdown_graceful()
            finally:
                with self._wcond:
                    self._writing = False
                    self._wcond.notify_all()

    def _start_close(
        self, code: int | None, reason: bytes = b"", via_pending: bool = False
    ) -> None:
        """Send the first close frame (the fuzzer starts the closing handshake)."""
        with self._cond:
            if self._state != _OPEN:
                return
            self._state = _CLOSING
            self._closing_since = time.monotonic()
            self.record.closed_by_me = True
            self.record.local_close_code = code
            self.record.local_close_at = time.monotonic() - self.record.started
            self._cond.notify_all()
        payload = close_payload(code, reason)
        self.record.note("send close", f"code={code} {_short(reason)}")
        data = build_frame(OP_CLOSE, payload)
        if via_pending:
            self._pending += data
        else:
            with self._send_lock:
                self._flush()
                self._enqueue(data)

    def _finish_after_reply(self, reply: bytes | None) -> None:
        """Drop queued data, send ``reply`` (a close frame) if given, then close TCP."""
        with self._wcond:
            self.record.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
            self._wq.clear()
            if reply is not None:
                self._wq.append(("data", reply, 0.0))
            self._wq.append(("shutdown",))
            self._wcond.notify_all()

    def _set_closed(self) -> None:
        with self._cond:
            if self._state != _CLOSED:
                self._state = _CLOSED
                self._closed.set()
                self._cond.notify_all()

    def _shutdown_graceful(self) -> None:
        """Server closes TCP after the closing handshake: FIN after the queued octets."""
        rec = self.record
        with self._cond:
            if self._tcp_down:
                return
            self._tcp_down = True
            if rec.tcp_closed_by is None:
                rec.tcp_closed_by = "server"
                rec.tcp_closed_at = time.monotonic() - rec.started
        rec.note("tcp shutdown", "server closes its side")
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._set_closed()

    def _abort(self, by: str) -> None:
        """Drop the TCP connection now (both directions)."""
        rec = self.record
        with self._cond:
            first = not self._tcp_down
            self._tcp_down = True
            if rec.tcp_closed_by is None and rec.opened:
                rec.tcp_closed_by = by
                rec.tcp_closed_at = time.monotonic() - rec.started
        if first and rec.opened:
            rec.note("tcp abort", f"by {by}")
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._set_closed()
        with self._wcond:
            rec.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
            self._wq.clear()
            self._wcond.notify_all()

    # -- receiving --------------------------------------------------------------------

    def _event(self, ev: Event, detail: str = "") -> None:
        with self._cond:
            self.record.received.append(ev)
            self.record.received_at.append(time.monotonic() - self.record.started)
        self.record.note(f"recv {ev[0]}" if ev[0] != "timeout" else "timeout", detail)

    def _violation(self, what: str, code: int = PROTOCOL_ERROR) -> None:
        """The client broke the protocol: record it and fail the connection."""
        self.record.violations.append(what)
        self.record.note("VIOLATION", what)
        with self._cond:
            state = self._state
        if state == _OPEN:
            with self._send_lock:
                self._start_close(code, b"")
        # a violation while closing: just wait for the close / the timeout

    def _reader(self, leftover: bytes) -> None:
        sock = self._sock
        assert sock is not None
        buf = bytearray(leftover)
        msg_opcode: int | None = None
        msg_parts: list[bytes] = []
        client_closed = False
        try:
            while True:
                # parse as many complete frames as the buffer holds
                pos = 0
                while True:
                    parsed = _parse_frame(buf, pos)
                    if parsed is None:
                        break
                    fin, rsv, opcode, mask, payload, pos = parsed
                    if client_closed:
                        self.record.violations.append(
                            f"frame (opcode {opcode}) after the client's close frame"
                        )
                        continue
                    if self._closed.is_set() and self._tcp_down:
                        continue
                    if mask is None:
                        self._violation("unmasked frame from the client")
                    else:
                        payload = xor_mask(payload, mask)
                    if rsv:
                        self._violation(f"frame with RSV={rsv} (no extension negotiated)")
                    if opcode >= 8:
                        if not fin:
                            self._violation(f"fragmented control frame (opcode {opcode})")
                        if len(payload) > 125:
                            self._violation(f"control frame payload of {len(payload)} octets")
                        if opcode == OP_PING:
                            self._event(("ping", payload), _short(payload))
                            with self._cond:
                                can_reply = self._state == _OPEN
                            if can_reply:
                                with self._send_lock:
                                    self._flush()
                                    self._enqueue(build_frame(OP_PONG, payload))
                            self._finish_when_done()
                        elif opcode == OP_PONG:
                            self._event(("pong", payload), _short(payload))
                            self._finish_when_done()
                        elif opcode == OP_CLOSE:
                            client_closed = True
                            self._on_close(payload)
                        else:
                            self._violation(f"reserved control opcode {opcode}")
                    elif opcode in (OP_TEXT, OP_BINARY):
                        if msg_opcode is not None:
                            self._violation("new data frame while a message is in progress")
                        msg_opcode, msg_parts = opcode, [payload]
                    elif opcode == OP_CONT:
                        if msg_opcode is None:
                            self._violation("continuation frame without a message")
                        else:
                            msg_parts.append(payload)
                    else:
                        self._violation(f"reserved data opcode {opcode}")
                    if opcode in (OP_TEXT, OP_BINARY, OP_CONT) and fin and msg_opcode is not None:
                        data = msg_parts[0] if len(msg_parts) == 1 else b"".join(msg_parts)
                        is_binary = msg_opcode == OP_BINARY
                        msg_opcode, msg_parts = None, []
                        self._on_message(data, is_binary)
                if pos:
                    del buf[:pos]
                try:
                    chunk = sock.recv(1 << 18)
                except OSError as exc:
                    self.record.note("recv error", repr(exc))
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
        finally:
            rec = self.record
            with self._cond:
                if rec.tcp_closed_by is None:
                    rec.tcp_closed_by = "client"
                    rec.tcp_closed_at = time.monotonic() - rec.started
                    rec.note("tcp closed", "by the client")
                self._tcp_down = True
            self._set_closed()
            with self._wcond:
                rec.discarded_writes += sum(1 for item in self._wq if item[0] == "data")
                self._wq.clear()
                self._wcond.notify_all()
            self._reader_done.set()

    def _on_message(self, data: bytes, is_binary: bool) -> None:
        rec = self.record
        case = self.case
        if not is_binary:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self._violation("text message with invalid UTF-8 from the client", INVALID_PAYLOAD)
                return
        if case.echo is not None:
            self._event(("message", len(data), is_binary), f"{'binary' if is_binary else 'text'} "
                        f"{len(data)} octets")
            if rec.echo_ok is None:
                exp = case.echo
                if is_binary != exp.binary:
                    rec.echo_ok = False
                    rec.echo_result = f"expected a {'binary' if exp.binary else 'text'} message"
                elif len(data) != exp.length:
                    rec.echo_ok = False
                    rec.echo_result = f"expected {exp.length} octets, got {len(data)}"
                elif data != exp.expected_payload():
                    rec.echo_ok = False
                    rec.echo_result = "echoed payload differs from what was sent"
                else:
                    rec.echo_ok = True
                    rec.echo_result = f"received the echo of {len(data)} octets"
                self._start_close(NORMAL)
            return
        if case.roundtrip is not None:
            rt = case.roundtrip
            self._event(("message", len(data), is_binary), f"#{rec.roundtrips + 1}")
            if is_binary != rt.binary or data != repeat_to(rt.pattern, rt.length):
                rec.echo_ok = False
                rec.echo_result = (
                    f"echo #{rec.roundtrips + 1} differs (binary={is_binary}, {len(data)} octets)"
                )
                self._start_close(NORMAL)
                return
            rec.roundtrips += 1
            if rec.roundtrips < rt.count:
                with self._cond:
                    still_open = self._state == _OPEN
                if still_open:
                    with self._send_lock:
                        op = OP_BINARY if rt.binary else OP_TEXT
                        self._count_tx(op)
                        self._enqueue(build_frame(op, repeat_to(rt.pattern, rt.length)))
            else:
                rec.echo_ok = True
                rec.echo_result = f"received all {rt.count} echoes"
                self._start_close(NORMAL)
            return
        self._event(("message", data, is_binary), _short(data))
        self._finish_when_done()

    def _finish_when_done(self) -> None:
        """Autobahn's ``Case.finishWhenDone``: once the observed events equal every expected
        list, the fuzzer starts the closing handshake (when it is supposed to)."""
        case = self.case
        with self._cond:
            received = list(self.record.received)
        if not case.expected or any(received != exp for exp in case.expected.values()):
            return
        if case.closed_by_me and not case.suppress_close:
            self._start_close(case.close_codes[0])

    def _on_close(self, payload: bytes) -> None:
        rec = self.record
        rec.client_close_payload = payload
        rec.client_close_at = time.monotonic() - rec.started
        code: int | None = None
        problem = None
        if len(payload) == 1:
            problem = "client close frame with a 1-octet payload"
        elif len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            try:
                rec.remote_close_reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                problem = "client close reason is not valid UTF-8"
            if code not in VALID_CLOSE_CODES:
                problem = f"client sent invalid close code {code}"
            elif problem is None:
                rec.remote_close_code = code
        rec.note("recv close", f"code={code} {_short(payload[2:])}")
        if problem:
            rec.violations.append(problem)
            rec.note("VIOLATION", problem)
        with self._cond:
            state = self._state
            if state == _OPEN:
                # the client starts the closing handshake: reply (echo the code) and close TCP
                rec.was_clean = problem is None
            elif state == _CLOSING:
                # the client's reply to our close
                rec.was_clean = problem is None
        if state == _OPEN:
            if problem:
                reply = build_frame(OP_CLOSE, close_payload(PROTOCOL_ERROR))
            else:
                reply = build_frame(OP_CLOSE, close_payload(code))
            with self._cond:
                self._state = _CLOSING  # no more steps; the writer closes TCP after the reply
                self._cond.notify_all()
            self._finish_after_reply(reply)
        elif state == _CLOSING:
            self._finish_after_reply(None)


def _parse_frame(
    buf: bytearray, pos: int
) -> tuple[bool, int, int, bytes | None, bytes, int] | None:
    """Parse one frame at ``buf[pos:]``: (fin, rsv, opcode, mask, payload, next_pos)."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    fin = bool(b0 & 0x80)
    rsv = (b0 >> 4) & 0x7
    opcode = b0 & 0xF
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    i = pos + 2
    if length == 126:
        if avail < 4:
            return None
        (length,) = struct.unpack_from("!H", buf, i)
        i += 2
    elif length == 127:
        if avail < 10:
            return None
        (length,) = struct.unpack_from("!Q", buf, i)
        i += 8
    mask = None
    if masked:
        if len(buf) < i + 4:
            return None
        mask = bytes(buf[i : i + 4])
        i += 4
    if len(buf) < i + length:
        return None
    payload = bytes(buf[i : i + length])
    return fin, rsv, opcode, mask, payload, i + length


# --------------------------------------------------------------------------------------
# Judging


@dataclass
class Verdict:
    verdict: str  # OK / NON-STRICT / FAILED / INFORMATIONAL
    behavior: str
    behavior_close: str
    reasons: list[str]
    record: Record

    def __str__(self) -> str:
        return f"{self.verdict} (behavior {self.behavior}, close {self.behavior_close})"

    def explain(self, case: Case) -> str:
        rec = self.record
        lines = [
            f"case {case.id}: {case.description}",
            f"expectation: {case.expectation}",
            f"verdict: {self}",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        if case.expected:
            for name, exp in case.expected.items():
                lines.append(f"expected {name}: {events_repr(exp)}")
        lines.append(f"observed: {events_repr(rec.received)}")
        lines.append(
            f"closed_by_me={rec.closed_by_me} (expected {case.closed_by_me}), "
            f"was_clean={rec.was_clean}, client close code={rec.remote_close_code} "
            f"payload={rec.client_close_payload!r:.60}, tcp closed by {rec.tcp_closed_by}"
        )
        lines.append(
            f"client close at {rec.client_close_at}s, steps done at {rec.steps_done_at}s, "
            f"all steps played: {rec.steps_completed}, writes discarded: {rec.discarded_writes}"
        )
        lines.append("timeline:\n" + rec.format_timeline())
        return "\n".join(lines)


def judge(case: Case, rec: Record) -> Verdict:
    """Rate a run like Autobahn (see the module docstring for the folding into one verdict)."""
    reasons: list[str] = []
    if not rec.opened:
        reasons.append(f"WebSocket connection never opened: {rec.handshake_error}")
        return Verdict(FAILED, FAILED, FAILED, reasons, rec)

    # behaviour: the observed events against the expected lists
    behavior = FAILED
    if case.echo is not None or case.roundtrip is not None:
        if rec.echo_ok:
            behavior = OK
        else:
            reasons.append(rec.echo_result or "no echo before the connection ended")
    else:
        for name, exp in case.expected.items():
            if rec.received == exp:
                behavior = name
                break
        if behavior == FAILED:
            reasons.append("observed events differ from every expected list")
        elif behavior == NON_STRICT:
            reasons.append("observed events match the NON-STRICT list only")

    # closing behaviour (Autobahn's order of checks)
    if rec.closed_by_me != case.closed_by_me:
        behavior_close = FAILED
        reasons.append(
            "the connection was failed by the wrong endpoint: "
            + ("the fuzzer had to close it" if rec.closed_by_me else "the client closed it")
        )
    elif case.require_clean and not rec.was_clean:
        behavior_close = UNCLEAN
        reasons.append("the closing handshake did not complete (close frames both ways)")
    elif rec.remote_close_code is not None and rec.remote_close_code not in case.close_codes:
        behavior_close = WRONG_CODE
        reasons.append(
            f"client close code {rec.remote_close_code}, expected one of {case.close_codes} "
            "or none"
        )
    else:
        behavior_close = OK

    if case.closed_by_wrong_endpoint_is_fatal and rec.closed_by_me != case.closed_by_me:
        behavior = FAILED
    if case.wrong_code_is_fatal and behavior_close == WRONG_CODE:
        behavior = FAILED
    if case.check is not None:
        problem = case.check(rec)
        if problem:
            behavior = FAILED
            reasons.append(problem)
    if rec.violations:
        behavior = FAILED
        reasons += [f"client protocol violation: {v}" for v in rec.violations]
    if rec.timed_out:
        reasons.append(f"case hit its time limit of {case.time_limit}s")
        behavior = FAILED

    if case.informational:
        verdict = FAILED if rec.violations or rec.timed_out else INFORMATIONAL
    elif behavior == FAILED or behavior_close in (FAILED, UNCLEAN):
        verdict = FAILED
    elif behavior == NON_STRICT or behavior_close == WRONG_CODE:
        verdict = NON_STRICT
    else:
        verdict = OK
    return Verdict(verdict, behavior, behavior_close, reasons, rec)


def run_case(
    case: Case,
    start_client: Callable[[str], Any],
    extra_wait: float = 5.0,
) -> Verdict:
    """Serve ``case``, call ``start_client(url)`` (must not block), wait, judge."""
    with FuzzServer(case) as server:
        start_client(server.url)
        server.wait(case.time_limit + extra_wait)
    return judge(case, server.record)
