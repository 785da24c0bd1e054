"""Autobahn TestSuite client cases (categories 1-7, 9, 10) against an echoing testee.

(Categories 12 and 13, permessage-deflate, are in ``test_autobahn_deflate.py``, which reuses
the adapters and ``run_case`` from here.)

Each test starts ``fuzzserver.FuzzServer`` for one case on 127.0.0.1 (port 0), runs the
testee client against it (the testee echoes every text and binary message), waits for the
case to finish and asserts that ``fuzzserver.judge`` rates it OK (INFORMATIONAL for the
informational cases 7.1.6 and 7.13.x) -- NON-STRICT is a failure here.

The testee is blockws by default (the tests skip while ``blockws.WebSocket`` does not
exist). ``BLOCKWS_AUTOBAHN_TESTEE`` picks another adapter, which is how the fuzzer and the
judge were validated:

* ``websockets``: the `websockets` library's sync client. OK on most cases, NON-STRICT on
  the fail-fast ones (3.2, 4.1.3, 4.1.4, 4.2.3, 4.2.4, 5.15, 6.4.x) and FAILED on 7.1.5
  (it answers a close inside a fragmented message with 1002), so those tests fail with it.
* ``reference``: ``ReferenceAdapter`` below, a small strict raw-socket client: OK on every
  case (INFORMATIONAL on 7.1.6 / 7.13.x), i.e. every OK outcome is reachable.

``test_judge_tells_behaviours_apart`` always runs: lax variants of the reference client
must get NON-STRICT / FAILED where Autobahn would give them.

blockws offers permessage-deflate by default, and the fuzzer ignores the offer in these
categories as Autobahn's fuzzing server does (``test_deflate_offer_is_ignored``), so RSV1
from the fuzzer must still fail the connection (3.1).

Run it as a script for a verdict table instead of asserts (all categories, 12 and 13
included)::

    python tests/test_autobahn.py [--testee websockets] [case-id-prefix ...]
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any

import pytest
from autobahn_cases import ALL_CASES, CASES_BY_ID
from fuzzserver import FAILED, INFORMATIONAL, NON_STRICT, OK, Case, FuzzServer, Verdict, judge

TESTEE_ENV = "BLOCKWS_AUTOBAHN_TESTEE"
#: The biggest message a case sends (9.1.6 / 9.2.6: 16 MiB); the testee must accept it.
MAX_MESSAGE_SIZE = 64 * 2**20


# --------------------------------------------------------------------------------------
# Testee adapters: run an echo client for one connection in a thread


class TesteeAdapter:
    """An echo client run in its own thread: ``start(url)``, then ``join(timeout)``.

    ``error`` is the exception the client ended with (None if it closed normally) and
    ``close_code`` the close code it reported, when the library reports them.
    """

    __test__ = False  # not a pytest test class despite the name
    name = "abstract"
    #: offer permessage-deflate (blockws always does, with its default extensions)
    deflate = False

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.close_code: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, url: str) -> None:
        self._thread = threading.Thread(
            target=self._main, args=(url,), name=f"testee-{self.name}", daemon=True
        )
        self._thread.start()

    def _main(self, url: str) -> None:
        try:
            self.run(url)
        except BaseException as exc:  # reported, not raised: the fuzzer judges the wire
            self.error = exc

    def run(self, url: str) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the client to give up (used when the case is over but the client is not)."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


class WebsocketsAdapter(TesteeAdapter):
    """The `websockets` library's threaded (sync) client: recv() / send() until closed."""

    name = "websockets"

    def run(self, url: str) -> None:
        import websockets.sync.messages
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        # websockets fails messages of more than 4096 frames with 1009 "too many fragments"
        # (a DoS limit, env WEBSOCKETS_MAX_FRAGMENTS read at import); 9.3.1 / 9.4.1 send
        # 65536 frames, so lift it for this reference testee.
        websockets.sync.messages.MAX_FRAGMENTS = 1 << 20

        with connect(
            url,
            max_size=None,
            compression="deflate" if self.deflate else None,
            proxy=None,
            ping_interval=None,
            max_queue=None,
            open_timeout=10,
            close_timeout=3,
        ) as ws:
            self._ws = ws
            while not self._stop.is_set():
                try:
                    message = ws.recv()
                    ws.send(message)
                except ConnectionClosed as exc:
                    self.close_code = exc.sent.code if exc.sent else None
                    if exc.rcvd_then_sent is None and exc.sent is None:
                        self.error = exc
                    return

    def stop(self) -> None:
        super().stop()
        ws = getattr(self, "_ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass


class BlockwsAdapter(TesteeAdapter):
    """blockws: callbacks run inside update(); echo text with send(str), binary with bytes."""

    name = "blockws"

    def run(self, url: str) -> None:
        import blockws

        done = threading.Event()

        def on_message(ws: Any, text: str) -> None:
            # The server may have closed meanwhile (7.1.6 sends a close right
            # behind a big message): send() then raises ConnectionClosed.
            with contextlib.suppress(blockws.ConnectionClosed):
                ws.send(text)

        def on_binary(ws: Any, segment: Any) -> None:
            with contextlib.suppress(blockws.ConnectionClosed):
                ws.send(bytes(segment))

        def on_closed(ws: Any, code: int | None, reason: str) -> None:
            self.close_code = code
            done.set()

        ws = blockws.WebSocket(
            url,
            on_message=on_message,
            on_binary=on_binary,
            on_closed=on_closed,
            max_message_size=MAX_MESSAGE_SIZE,
        )
        ws.open()
        stop_deadline: float | None = None
        while not done.is_set():
            if self._stop.is_set():  # the case is over but the client is not: give up
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + 5.0
                    ws.abort()
                elif time.monotonic() > stop_deadline:
                    break
            ws.wait(0.05)
            ws.update()
        ws.join(5.0)
        self.error = getattr(ws, "error", None)
        if self.close_code is None:
            self.close_code = getattr(ws, "close_code", None)


class ReferenceAdapter(TesteeAdapter):
    """A minimal, strict RFC 6455 echo client on a raw socket, used to check the fuzzer:
    with the defaults it must get OK (or INFORMATIONAL) on every case, which shows each
    case's OK outcome is reachable. The options make it worse on purpose, for the judge's
    self-tests:

    * ``fail_fast=False``: validate UTF-8 only when a message is complete, and check every
      frame already received before acting on any (so nothing is echoed when a later frame
      in the same read is bad): the NON-STRICT behaviour of many clients.
    * ``validate=False``: ignore RSV bits, reserved opcodes and invalid UTF-8.
    * ``error_code``: close with this code instead of 1002 / 1007 on errors.

    ``deflate=True`` offers permessage-deflate (``deflate_offer``, by default what blockws
    offers) and, when the server accepts, compresses every message it sends (RSV1) and
    inflates the RSV1 messages it receives, as the answer says. Lax on purpose:
    ``keep_context`` ignores ``client_no_context_takeover``, ``ignore_window`` ignores
    ``client_max_window_bits`` (compresses with a 15-bit window).
    """

    name = "reference"

    def __init__(self, fail_fast: bool = True, validate: bool = True,
                 error_code: int | None = None, deflate: bool = False,
                 deflate_offer: str = "permessage-deflate; client_max_window_bits",
                 keep_context: bool = False, ignore_window: bool = False) -> None:
        super().__init__()
        self.fail_fast = fail_fast
        self.validate = validate
        self.error_code = error_code
        self.deflate = deflate
        self.deflate_offer = deflate_offer
        self.keep_context = keep_context
        self.ignore_window = ignore_window
        #: the server's permessage-deflate parameters ({name: value or None}), if accepted
        self.agreed: dict[str, str | None] | None = None
        self._compressor: Any = None
        self._decompressor: Any = None

    def run(self, url: str) -> None:
        import base64
        import hashlib
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path + ("?" + parts.query if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode()
        sock = socket.create_connection((host, port), timeout=10)
        offer = f"Sec-WebSocket-Extensions: {self.deflate_offer}\r\n" if self.deflate else ""
        try:
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n{offer}"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                buf += chunk
            head, rest = buf.split(b"\r\n\r\n", 1)
            accept = base64.b64encode(
                hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            if not head.startswith(b"HTTP/1.1 101 ") or accept not in head:
                raise ConnectionError(f"bad handshake response {head!r}")
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "sec-websocket-extensions":
                    if not self.deflate or self.agreed is not None:
                        raise ConnectionError(f"unexpected extension answer {value!r}")
                    ext, *params = [x.strip() for x in value.split(";")]
                    if ext != "permessage-deflate":
                        raise ConnectionError(f"unexpected extension answer {value!r}")
                    self.agreed = {}
                    for param in params:
                        k, eq, v = param.partition("=")
                        self.agreed[k.strip()] = v.strip() if eq else None
            sock.settimeout(None)  # the fuzzer ends every case
            self._sock = sock
            self._loop(sock, bytearray(rest))
        finally:
            sock.close()

    # -- framing --------------------------------------------------------------------------

    def _send(self, sock: Any, opcode: int, payload: bytes = b"") -> None:
        from fuzzserver import build_frame

        rsv = 0
        if self.agreed is not None and opcode in (1, 2):
            payload, rsv = self._compress(payload), 4
        sock.sendall(build_frame(opcode, payload, rsv=rsv, mask=os.urandom(4)))

    def _compress(self, payload: bytes) -> bytes:
        import zlib

        agreed = self.agreed
        assert agreed is not None
        reset = "client_no_context_takeover" in agreed and not self.keep_context
        if self._compressor is None or reset:
            bits = int(agreed.get("client_max_window_bits") or 15)
            if self.ignore_window:
                bits = 15
            # raw deflate: zlib takes 9 for 8 (its matches still stay within 250 octets)
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, -max(bits, 9))
        data = self._compressor.compress(payload) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]

    def _inflate(self, data: bytes) -> bytes:
        import zlib

        agreed = self.agreed
        assert agreed is not None
        if self._decompressor is None or "server_no_context_takeover" in agreed:
            bits = int(agreed.get("server_max_window_bits") or 15)
            self._decompressor = zlib.decompressobj(-max(bits, 9))
        return self._decompressor.decompress(data + b"\x00\x00\xff\xff")

    def _fail(self, sock: Any, code: int) -> None:
        """Fail the connection: close frame with the error code, then wait for the server to
        answer and close TCP."""
        import struct

        code = self.error_code or code
        self.close_code = code
        try:
            self._send(sock, 8, struct.pack("!H", code))
        except OSError:
            return
        self._drain_until_eof(sock)

    def _drain_until_eof(self, sock: Any) -> None:
        sock.settimeout(3.0)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def _loop(self, sock: Any, buf: bytearray) -> None:
        import codecs
        import struct

        from fuzzserver import VALID_CLOSE_CODES

        msg_op: int | None = None
        msg = bytearray()
        msg_deflated = False
        decoder: Any = None
        frame: list[Any] | None = None  # [fin, opcode, length, received, control payload]
        pending: list[tuple[int, bytes]] = []  # fail_fast=False: echoes held back
        while True:
            while True:
                if frame is None:
                    if len(buf) < 2:
                        break
                    b0, b1 = buf[0], buf[1]
                    length, pos = b1 & 0x7F, 2
                    if length == 126:
                        if len(buf) < 4:
                            break
                        (length,) = struct.unpack_from("!H", buf, 2)
                        pos = 4
                    elif length == 127:
                        if len(buf) < 10:
                            break
                        (length,) = struct.unpack_from("!Q", buf, 2)
                        pos = 10
                    del buf[:pos]
                    fin, rsv, opcode = bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF
                    error = None
                    if b1 & 0x80:
                        error = "masked server frame"
                    elif self.validate and rsv and not (
                        rsv == 4 and self.agreed is not None and opcode in (1, 2)
                    ):
                        error = "RSV bits set"
                    elif self.validate and opcode not in (0, 1, 2, 8, 9, 10):
                        error = "reserved opcode"
                    elif opcode >= 8 and (not fin or length > 125):
                        error = "bad control frame"
                    elif opcode in (1, 2) and msg_op is not None:
                        error = "data frame inside a message"
                    elif opcode == 0 and msg_op is None:
                        error = "continuation without message"
                    if error:
                        self.error = ConnectionError(error)
                        return self._fail(sock, 1002)
                    if opcode in (1, 2):
                        msg_op, msg = opcode, bytearray()
                        msg_deflated = bool(rsv & 4) and self.agreed is not None
                        decoder = codecs.getincrementaldecoder("utf-8")("strict")
                    frame = [fin, opcode, length, 0, bytearray()]
                fin, opcode, length, got, control = frame
                take = min(len(buf), length - got)
                chunk = bytes(buf[:take])
                del buf[:take]
                frame[3] = got = got + take
                if opcode >= 8:
                    control += chunk
                elif opcode in (0, 1, 2) and msg_op is not None:
                    msg += chunk
                    if msg_op == 1 and self.fail_fast and self.validate and not msg_deflated:
                        try:
                            decoder.decode(chunk)
                        except UnicodeDecodeError:
                            return self._fail(sock, 1007)
                if got < length:
                    break  # the rest of this frame has not arrived yet
                frame = None
                if opcode == 9:
                    pending.append((10, bytes(control)))
                elif opcode == 8:
                    for op, data in pending:
                        self._send(sock, op, data)
                    return self._on_close(sock, bytes(control), VALID_CLOSE_CODES)
                elif opcode in (0, 1, 2) and fin and msg_op is not None:
                    if msg_deflated:
                        try:
                            msg = bytearray(self._inflate(bytes(msg)))
                        except Exception:
                            return self._fail(sock, 1007)
                    if msg_op == 1 and self.validate:
                        try:
                            bytes(msg).decode("utf-8")
                        except UnicodeDecodeError:
                            return self._fail(sock, 1007)
                    pending.append((msg_op, bytes(msg)))
                    msg_op, msg = None, bytearray()
                if self.fail_fast:
                    for op, data in pending:
                        self._send(sock, op, data)
                    pending.clear()
            for op, data in pending:  # fail_fast=False: the whole read was fine
                self._send(sock, op, data)
            pending.clear()
            data = sock.recv(65536)
            if not data:
                return
            buf += data

    def _on_close(self, sock: Any, payload: bytes, valid: frozenset[int]) -> None:
        import struct

        if len(payload) == 1:
            return self._fail(sock, 1002)
        if len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            if code not in valid:
                return self._fail(sock, 1002)
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(sock, 1007)
            self.close_code = code
            self._send(sock, 8, payload[:2])  # echo the code
        else:
            self._send(sock, 8)
        self._drain_until_eof(sock)


TESTEES: dict[str, type[TesteeAdapter]] = {
    "blockws": BlockwsAdapter,
    "websockets": WebsocketsAdapter,
    "reference": ReferenceAdapter,
}


def selected_testee() -> str:
    return os.environ.get(TESTEE_ENV, "blockws").strip().lower() or "blockws"


def blockws_unavailable() -> str | None:
    """Why blockws cannot be the testee (None when it can)."""
    try:
        import blockws
    except Exception as exc:  # ImportError, or a half-written package failing at import
        return f"blockws is not importable: {exc!r}"
    if not hasattr(blockws, "WebSocket"):
        return "blockws.WebSocket does not exist yet"
    return None


# --------------------------------------------------------------------------------------
# Running one case


def run_case(case: Case, testee: TesteeAdapter) -> Verdict:
    """Play ``case`` against ``testee`` and judge it. Waits only as long as the case runs
    (the server signals the end), bounded by the case's own time limit."""
    with FuzzServer(case) as server:
        testee.start(server.url)
        server.wait(case.time_limit + 5.0)
    # the connection is over: the client should end by itself right away
    if not testee.join(5.0):
        testee.stop()
        testee.join(5.0)
    return judge(case, server.record)


def make_testee(name: str, case: Case) -> TesteeAdapter:
    """A fresh adapter; it offers permessage-deflate in the deflate cases (blockws always
    does)."""
    testee = TESTEES[name]()
    testee.deflate = testee.deflate or case.deflate is not None
    return testee


def expected_verdict(case: Case) -> str:
    return INFORMATIONAL if case.informational else OK


def _params() -> list[Any]:
    params = []
    for case in ALL_CASES:
        marks = []
        # the whole case, plus the client's own shutdown, plus slack for a slow machine
        needed = case.time_limit + 20.0
        if needed > 60.0:  # 60 s is the global pytest-timeout (setup.cfg)
            marks.append(pytest.mark.timeout(int(needed)))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def testee_class() -> type[TesteeAdapter]:
    name = selected_testee()
    if name not in TESTEES:
        pytest.fail(f"{TESTEE_ENV}={name!r}: expected one of {sorted(TESTEES)}")
    if name == "blockws":
        reason = blockws_unavailable()
        if reason:
            pytest.skip(f"{reason}; set {TESTEE_ENV}=websockets to validate the fuzzer")
    return TESTEES[name]


@pytest.mark.parametrize("case", _params())
def test_autobahn_case(case: Case, testee_class: type[TesteeAdapter]) -> None:
    testee = testee_class()
    verdict = run_case(case, testee)
    assert verdict.verdict == expected_verdict(case), (
        f"[testee {testee.name}, error {testee.error!r}, close code {testee.close_code}]\n"
        + verdict.explain(case)
    )


@pytest.mark.parametrize(
    ("options", "case_id", "verdict"),
    [
        ({}, "3.2", OK),
        ({"fail_fast": False}, "3.2", NON_STRICT),  # failed before echoing the 1st message
        ({}, "6.4.3", OK),
        ({"fail_fast": False}, "6.4.1", NON_STRICT),  # failed only when the message ended
        ({"fail_fast": False}, "6.4.3", NON_STRICT),
        ({"validate": False}, "3.1", FAILED),  # never fails: the fuzzer has to close
        ({"validate": False}, "6.3.1", FAILED),
        ({"error_code": 1000}, "2.5", NON_STRICT),  # wrong close code
        ({"error_code": 1000}, "7.9.1", FAILED),  # category 7: a wrong code fails the case
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_judge_tells_behaviours_apart(options: dict[str, Any], case_id: str, verdict: str) -> None:
    """The fuzzer and judge, checked with deliberately lax variants of the reference client
    (runs whatever the testee; does not need blockws)."""
    case = CASES_BY_ID[case_id]
    result = run_case(case, ReferenceAdapter(**options))
    assert result.verdict == verdict, result.explain(case)


@pytest.mark.parametrize("case_id", ["1.1.1", "3.1"])
def test_deflate_offer_is_ignored(case_id: str) -> None:
    """Outside categories 12 and 13 the fuzzer answers a permessage-deflate offer with no
    extension (as Autobahn does), so frames with RSV1 stay a protocol error (3.1): checked
    with the reference client offering what blockws offers, and with blockws itself."""
    case = CASES_BY_ID[case_id]
    testees: list[TesteeAdapter] = [ReferenceAdapter(deflate=True)]
    if blockws_unavailable() is None:
        testees.append(BlockwsAdapter())
    for testee in testees:
        verdict = run_case(case, testee)
        rec = verdict.record
        assert rec.extensions_offered is not None and "permessage-deflate" in \
            rec.extensions_offered, (testee.name, rec.extensions_offered)
        assert rec.extensions_response is None and rec.deflate is None
        assert verdict.verdict == OK, f"[{testee.name}]\n" + verdict.explain(case)


def test_case_table_is_complete() -> None:
    """Every Autobahn client case of categories 1-7, 9 and 10 is here, once."""
    counts: dict[str, int] = {}
    for case in ALL_CASES:
        sub = ".".join(case.id.split(".")[:2]) if case.id.count(".") == 2 else case.id.split(".")[0]
        counts[sub] = counts.get(sub, 0) + 1
    assert counts["1.1"] == 8 and counts["1.2"] == 8
    assert counts["2"] == 11 and counts["3"] == 7 and counts["5"] == 20
    assert counts["4.1"] == 5 and counts["4.2"] == 5
    six = {f"6.{i}": n for i, n in enumerate(
        [3, 4, 2, 4, 5, 11, 4, 2, 4, 3, 5, 8, 5, 10, 1, 3, 5, 5, 5, 7, 8, 34, 7], 1)}
    for sub, n in six.items():
        assert counts[sub] == n, sub
    assert (counts["7.1"], counts["7.3"], counts["7.5"], counts["7.7"], counts["7.9"],
            counts["7.13"]) == (6, 6, 1, 13, 9, 2)
    assert [counts[f"9.{i}"] for i in range(1, 9)] == [6, 6, 9, 9, 6, 6, 6, 6]
    assert counts["10.1"] == 1
    assert len(ALL_CASES) == 301


# --------------------------------------------------------------------------------------
# Script mode: a verdict table


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testee", default=selected_testee(), choices=sorted(TESTEES))
    parser.add_argument("-v", "--verbose", action="store_true", help="explain non-OK verdicts")
    parser.add_argument("prefixes", nargs="*", help="case id prefixes, e.g. 6.4 9.1.6 13.3")
    args = parser.parse_args(argv)
    if args.testee == "blockws" and blockws_unavailable():
        print(blockws_unavailable(), file=sys.stderr)
        return 2
    from autobahn_deflate_cases import DEFLATE_CASES

    cases = [
        c for c in ALL_CASES + DEFLATE_CASES
        if not args.prefixes or any(c.id == p or c.id.startswith(p + ".") for p in args.prefixes)
    ]
    counts: dict[str, int] = {}
    t_all = time.monotonic()
    for case in cases:
        t0 = time.monotonic()
        verdict = run_case(case, make_testee(args.testee, case))
        counts[verdict.verdict] = counts.get(verdict.verdict, 0) + 1
        flag = "" if verdict.verdict == expected_verdict(case) else "   <--"
        print(f"{case.id:<8} {verdict.verdict:<13} {verdict.behavior:<10} "
              f"{verdict.behavior_close:<10} {time.monotonic() - t0:6.2f}s{flag}"
              + (f"  [{case.scaled}]" if case.scaled else ""), flush=True)
        if args.verbose and verdict.verdict not in (OK, INFORMATIONAL):
            print("    " + verdict.explain(case).replace("\n", "\n    "))
    print(f"\n{len(cases)} cases in {time.monotonic() - t_all:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if not counts.get(FAILED) and not counts.get(NON_STRICT) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
