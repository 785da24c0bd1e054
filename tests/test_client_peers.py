"""blockws against real RFC 6455 servers: the `websockets` package and Node's `ws`.

Every test here runs against both peers (the ``url`` fixture). The peers echo what they
receive and understand the text commands ``!stats``, ``!close CODE REASON``, ``!ping``,
``!headers`` and ``!subprotocol`` (tests/peers/ws_echo_server.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import Recorder, random_text

import blockws
import blockws.connection

SERVERS = ["websockets_server", "node_ws_server"]
TLS_SERVERS = ["websockets_tls_server", "node_ws_tls_server"]
TIMEOUT = 10.0
KiB = 1024
MiB = 1024 * KiB
SIZES = [0, 125, 126, 65535, 65536, MiB, 16 * MiB]


@pytest.fixture(params=SERVERS)
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


def open_socket(url: str, rec: Recorder, **options: Any) -> blockws.WebSocket:
    ws = blockws.WebSocket(url, **rec.callbacks(), **options)
    ws.open()
    rec.wait_open(ws)
    return ws


def close_socket(ws: blockws.WebSocket, rec: Recorder) -> tuple[int, str]:
    ws.close()
    return rec.wait_closed(ws)


def stats(ws: blockws.WebSocket) -> dict[str, int]:
    """The peer's frame counts (needs a socket without handlers: uses receive())."""
    ws.send("!stats")
    reply = ws.receive(TIMEOUT)
    assert isinstance(reply, str)
    result: dict[str, int] = json.loads(reply)
    return result


def payload(kind: str, size: int) -> str | bytes:
    return random_text(size) if kind == "text" else os.urandom(size)


def same(a: object, b: object) -> bool:
    """Equality without pytest diffing megabytes on failure."""
    return a == b


# -- echo -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_echo_with_callbacks(url: str, kind: str, size: int) -> None:
    data = payload(kind, size)
    rec = Recorder()
    ws = open_socket(url, rec)
    ws.send(data)
    rec.pump_until(ws, lambda: len(rec.messages) == 1, timeout=30.0, what="echo")
    assert rec.events[1][0] == kind
    got = rec.messages[0]
    assert len(got) == len(data) and same(got, data)
    if kind == "binary":
        # on_binary's segment went back to the pool when the callback returned.
        assert len(rec.segments) == 1 and rec.segments[0].released
    wait_drained(ws)
    assert close_socket(ws, rec)[0] == 1000


def wait_drained(ws: blockws.WebSocket, timeout: float = 5.0) -> None:
    """Wait for buffered_amount to reach 0.

    The writer subtracts a batch once sendall() returns, so an echo can arrive a moment
    before that; no event marks it, so poll briefly.
    """
    deadline = time.monotonic() + timeout
    while ws.buffered_amount:
        assert time.monotonic() < deadline, f"buffered_amount stuck at {ws.buffered_amount}"
        time.sleep(0.001)


@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_echo_with_receive(url: str, kind: str, size: int) -> None:
    data = payload(kind, size)
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        ws.send(data)
        got = ws.receive(timeout=30.0)
        assert type(got) is type(data)
        assert len(got) == len(data) and same(got, data)
    assert ws.closed and ws.close_code == 1000 and ws.error is None


def test_send_variants(url: str) -> None:
    pool = blockws.BufferPool.default
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        ws.send(b"0123456789", 2, 5)
        assert ws.receive(TIMEOUT) == b"23456"
        ws.send(bytearray(b"mutable"))
        assert ws.receive(TIMEOUT) == b"mutable"
        ws.send(memoryview(b"view of bytes")[8:])
        assert ws.receive(TIMEOUT) == b"bytes"
        seg = pool.get(4)
        seg.view()[:] = b"\x00\x01\x02\x03"
        ws.send_as_binary(seg)
        assert ws.receive(TIMEOUT) == b"\x00\x01\x02\x03"
        text_seg = pool.get(len("héllo".encode()))
        text_seg.view()[:] = "héllo".encode()
        ws.send_as_text(text_seg)
        assert ws.receive(TIMEOUT) == "héllo"
        with pytest.raises(ValueError):
            ws.send(b"short", 3, 5)
    # blockws released the segments it was given once they were written.
    assert seg.released and text_seg.released


def test_receive_timeout_keeps_socket_open(url: str) -> None:
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            ws.receive(timeout=0.1)
        assert time.monotonic() - start >= 0.09
        assert ws.is_open
        ws.send("still here")
        assert ws.receive(TIMEOUT) == "still here"


# -- fragmentation, as the server counts frames ----------------------------------------

@pytest.mark.parametrize(
    ("size", "frames"),
    [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (2000, 2), (10000, 10), (10001, 11)],
)
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_max_fragment_size(url: str, kind: str, size: int, frames: int) -> None:
    data = "x" * size if kind == "text" else os.urandom(size)
    with blockws.connect(url, timeout=TIMEOUT, max_fragment_size=1000) as ws:
        ws.send(data)
        assert same(ws.receive(TIMEOUT), data)
        assert stats(ws) == {"frames": frames, "messages": 1}


@pytest.mark.parametrize(
    ("size", "frames"), [(32768, 1), (32769, 2), (65536, 2), (MiB, 32), (MiB + 1, 33)]
)
def test_default_max_fragment_size(url: str, size: int, frames: int) -> None:
    assert blockws.DEFAULT_MAX_FRAGMENT_SIZE == 32768
    data = os.urandom(size)
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        assert ws.max_fragment_size == 32768
        ws.send(data)
        assert same(ws.receive(TIMEOUT), data)
        assert stats(ws) == {"frames": frames, "messages": 1}


def test_fragments_split_utf8_characters(url: str) -> None:
    """999-byte fragments cut 2-byte characters in half; the peer reassembles them."""
    text = "é" * 1000
    with blockws.connect(url, timeout=TIMEOUT, max_fragment_size=999) as ws:
        ws.send(text)
        assert ws.receive(TIMEOUT) == text
        assert stats(ws) == {"frames": 3, "messages": 1}


def test_max_fragment_size_changed_while_open(url: str) -> None:
    # Guess: like the seed's settable MaxFragmentSize, a change applies to later messages.
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        ws.max_fragment_size = 1000
        ws.send(b"y" * 10000)
        assert ws.receive(TIMEOUT) == b"y" * 10000
        assert stats(ws) == {"frames": 10, "messages": 1}


# -- closing ------------------------------------------------------------------------

def test_client_close_with_code_and_reason(url: str) -> None:
    rec = Recorder()
    ws = open_socket(url, rec)
    assert ws.is_open
    ws.close(4000, "bye")
    assert not ws.is_open  # from the call on, not from on_closed
    code, reason = rec.wait_closed(ws)
    assert code == 4000  # the server echoes the code
    assert reason in ("bye", "")
    assert ws.error is None and ws.closed
    assert (ws.close_code, ws.close_reason) == (code, reason)
    with pytest.raises(blockws.ConnectionClosedOK):
        ws.receive(0.1)


@pytest.mark.parametrize(
    ("command", "code", "reason"),
    [("!close 4001 reason", 4001, "reason"), ("!close", 1000, ""),
     ("!close 1001 going away", 1001, "going away"), ("!close 3000 ünïcödé ✓", 3000, "ünïcödé ✓")],
)
def test_server_close_with_code_and_reason(url: str, command: str, code: int,
                                           reason: str) -> None:
    rec = Recorder()
    ws = open_socket(url, rec)
    ws.send(command)
    assert rec.wait_closed(ws) == (code, reason)
    assert rec.events == [("open",), ("closed", code, reason)]
    assert ws.error is None and not ws.is_open


def test_receive_returns_pending_messages_then_raises(url: str) -> None:
    ws = blockws.connect(url, timeout=TIMEOUT)
    ws.send("a")
    ws.send(b"b")
    ws.send("!close 4001 later")
    assert ws.receive(TIMEOUT) == "a"
    assert ws.receive(TIMEOUT) == b"b"
    with pytest.raises(blockws.ConnectionClosedOK) as excinfo:
        ws.receive(TIMEOUT)
    assert (excinfo.value.code, excinfo.value.reason) == (4001, "later")
    with pytest.raises(blockws.ConnectionClosed):
        ws.send("too late")


def test_context_manager_closes(url: str) -> None:
    closed: list[tuple[int, str]] = []
    with blockws.connect(url, timeout=TIMEOUT,
                         on_closed=lambda ws, c, r: closed.append((c, r))) as ws:
        ws.send("x")
        assert ws.receive(TIMEOUT) == "x"
    assert closed == [(1000, "")]
    assert ws.closed and not ws.is_open


# -- pings, latency, last_message_received --------------------------------------------------

def wait_for_latency(ws: blockws.WebSocket, timeout: float = 5.0) -> float:
    # No callback announces a pong, so poll, sleeping in ws.wait() between checks.
    deadline = time.monotonic() + timeout
    while ws.latency is None:
        assert time.monotonic() < deadline, "no pong within the deadline"
        ws.wait(0.02)
        ws.update()
    return ws.latency


def test_pings_measure_latency(url: str) -> None:
    rec = Recorder()
    ws = open_socket(url, rec, send_pings=True, ping_frequency=0.1)
    assert ws.send_pings and ws.ping_frequency == 0.1
    latency = wait_for_latency(ws)
    assert isinstance(latency, float) and 0 < latency < 0.5
    assert ws.is_open and ws.error is None
    assert close_socket(ws, rec)[0] == 1000


def test_send_pings_switched_on_while_open(url: str) -> None:
    rec = Recorder()
    ws = open_socket(url, rec)
    assert ws.latency is None
    ws.ping_frequency = 0.1
    ws.send_pings = True
    assert 0 < wait_for_latency(ws) < 0.5
    assert close_socket(ws, rec)[0] == 1000


def test_last_message_received(url: str) -> None:
    rec = Recorder()
    ws = blockws.WebSocket(url, **rec.callbacks())
    assert ws.last_message_received is None
    ws.open()
    rec.wait_open(ws)
    before = time.monotonic()
    ws.send("tick")
    rec.pump_until(ws, lambda: rec.messages == ["tick"])
    first = ws.last_message_received
    assert first is not None and before <= first <= time.monotonic()
    ws.send("tock")
    rec.pump_until(ws, lambda: rec.messages == ["tick", "tock"])
    second = ws.last_message_received
    assert second is not None and second >= first
    assert close_socket(ws, rec)[0] == 1000


def test_server_ping_is_answered(url: str) -> None:
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        for _ in range(3):
            ws.send("!ping")
        ws.send("after pings")
        assert ws.receive(TIMEOUT) == "after pings"  # pings are not messages
        assert ws.is_open
        ws.send("still echoing")
        assert ws.receive(TIMEOUT) == "still echoing"
    assert ws.close_code == 1000 and ws.error is None


# -- TLS ---------------------------------------------------------------------------------

@pytest.fixture(params=TLS_SERVERS)
def tls_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


def test_tls_default_verification_rejects_unknown_ca(tls_url: str, no_leaks: None) -> None:
    rec = Recorder()
    ws = blockws.WebSocket(tls_url, **rec.callbacks())
    ws.open()
    assert rec.wait_closed(ws) == (1006, "")
    assert rec.events == [("closed", 1006, "")]
    assert type(ws.error) is blockws.TLSError, repr(ws.error)
    assert "certificate" in str(ws.error).lower()
    with pytest.raises(blockws.TLSError):
        blockws.connect(tls_url, timeout=TIMEOUT)


def test_tls_with_trusted_context(tls_url: str, tls_certs: Any) -> None:
    for target in (tls_url, tls_url.replace("localhost", "127.0.0.1")):
        with blockws.connect(target, timeout=TIMEOUT,
                             ssl_context=tls_certs.client_context()) as ws:
            assert ws.http_version == "1.1"
            ws.send("secure")
            assert ws.receive(TIMEOUT) == "secure"
            big = os.urandom(MiB)
            ws.send(big)
            assert same(ws.receive(TIMEOUT), big)
        assert ws.close_code == 1000 and ws.error is None


# -- threads ------------------------------------------------------------------------------

def test_concurrent_senders_keep_order(url: str) -> None:
    threads, per_thread = 4, 500
    rec = Recorder()
    ws = open_socket(url, rec)
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def sender(t: int) -> None:
        try:
            start.wait()
            for seq in range(per_thread):
                ws.send(f"t{t}-{seq}-" + "p" * (seq % 50))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    rec.pump_until(ws, lambda: len(rec.messages) >= threads * per_thread, timeout=30.0,
                   what="every echo")
    for w in workers:
        w.join()
    assert errors == []
    received: dict[int, list[int]] = {t: [] for t in range(threads)}
    for message in rec.messages:
        tag, seq, pad = message.split("-")
        assert pad == "p" * (int(seq) % 50)  # intact
        received[int(tag[1:])].append(int(seq))
    assert all(received[t] == list(range(per_thread)) for t in range(threads)), {
        t: received[t][:10] for t in received
    }
    assert close_socket(ws, rec)[0] == 1000


_reading_threads: list[str] | None = None
_parse = blockws.connection.Connection.data_received


def _recording_data_received(engine: blockws.connection.Connection, data: bytes) -> None:
    if _reading_threads is not None:
        _reading_threads.append(threading.current_thread().name)
    _parse(engine, data)


@pytest.fixture(autouse=True)
def _reading_recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    global _reading_threads
    monkeypatch.setattr(blockws.connection.Connection, "data_received", _recording_data_received)
    yield
    _reading_threads = None


def record_reading_threads(ws: blockws.WebSocket) -> list[str]:
    """The names of the threads that parse incoming data (of every socket), from now on."""
    global _reading_threads
    _reading_threads = []
    return _reading_threads


def test_receive_reads_on_the_calling_thread(url: str) -> None:
    # One message in flight at a time: after the first reply or two, the reader
    # thread lends the reading to the thread waiting in receive(), so the rest
    # arrive without a thread hand-off (a lapse of the 5 ms lease under load
    # can give a read back to the reader now and then).
    with blockws.connect(url, timeout=TIMEOUT) as ws:
        names = record_reading_threads(ws)
        for i in range(200):
            ws.send(f"m{i}")
            assert ws.receive(TIMEOUT) == f"m{i}"
        mine = names.count(threading.current_thread().name)
        assert mine >= len(names) // 2, names
        assert set(names) <= {threading.current_thread().name, f"blockws-{ws.id}-reader"}
    assert ws.close_code == 1000 and ws.error is None


def test_wait_reads_on_the_calling_thread_for_callbacks(url: str) -> None:
    got: list[str] = []
    ws = blockws.connect(url, timeout=TIMEOUT, on_message=lambda ws, text: got.append(text))
    names = record_reading_threads(ws)
    for i in range(100):
        ws.send(f"m{i}")
        while len(got) <= i:
            assert ws.wait(TIMEOUT)
            ws.update()
    assert got == [f"m{i}" for i in range(100)]
    assert names.count(threading.current_thread().name) >= len(names) // 2, names
    ws.close()
    assert ws.join(TIMEOUT)
    ws.update()
    assert ws.close_code == 1000 and ws.error is None


def test_closing_completes_while_the_caller_holds_the_reading(url: str) -> None:
    # The caller read last and then stops calling receive(): the server's close
    # frame and its end of the connection are still read (by the reader thread,
    # once the lease lapses), well within close_timeout.
    ws = blockws.connect(url, timeout=TIMEOUT, close_timeout=30.0)
    for i in range(20):
        ws.send(f"m{i}")
        assert ws.receive(TIMEOUT) == f"m{i}"
    started = time.monotonic()
    ws.close()
    assert ws.join(TIMEOUT)
    assert time.monotonic() - started < 5.0
    ws.update()
    assert ws.close_code == 1000 and ws.error is None


def test_close_from_another_thread_ends_a_receive_that_holds_the_reading(url: str) -> None:
    # The main thread holds the reading and is blocked in receive() when
    # another thread closes: the server's close frame and EOF are read by the
    # main thread, and receive() raises ConnectionClosedOK promptly.
    for _ in range(5):
        ws = blockws.connect(url, timeout=TIMEOUT, close_timeout=30.0)
        for i in range(5):
            ws.send(f"m{i}")
            assert ws.receive(TIMEOUT) == f"m{i}"
        closer = threading.Timer(0.05, ws.close)
        closer.start()
        started = time.monotonic()
        with pytest.raises(blockws.ConnectionClosedOK):
            ws.receive(TIMEOUT)
        assert time.monotonic() - started < 5.0
        closer.join()
        assert ws.closed and ws.close_code == 1000 and ws.error is None


def test_two_threads_receiving_share_the_messages(url: str) -> None:
    count = 400
    ws = blockws.connect(url, timeout=TIMEOUT)
    got: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def receiver(name: str) -> None:
        try:
            while True:
                message = ws.receive(TIMEOUT)
                assert isinstance(message, str)
                if message == "end":
                    ws.send("end")  # let the other receiver finish too
                    return
                got[name].append(message)
        except blockws.ConnectionClosed:
            return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for i in range(count):
        ws.send(f"m{i}")
    ws.send("end")
    for t in threads:
        t.join(30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    everything = got["a"] + got["b"]
    assert sorted(everything, key=lambda m: int(m[1:])) == [f"m{i}" for i in range(count)]
    for name in got:  # each thread saw its share in order
        assert got[name] == sorted(got[name], key=lambda m: int(m[1:]))
    ws.close()
    assert ws.join(TIMEOUT)
    ws.update()


def test_a_compressed_socket_reads_on_the_calling_thread(
    websockets_deflate_server: str,
) -> None:
    # With permessage-deflate in force the reading is lent as over plain TCP:
    # the thread waiting in receive() reads, inflates and parses the reply.
    with blockws.connect(websockets_deflate_server, timeout=TIMEOUT) as ws:
        assert ws.extensions, "deflate was not negotiated"
        names = record_reading_threads(ws)
        for i in range(200):
            ws.send(f"m{i}" * 50)  # compressed both ways (over min_size)
            assert ws.receive(TIMEOUT) == f"m{i}" * 50
        mine = names.count(threading.current_thread().name)
        assert mine >= len(names) // 2, names
        assert set(names) <= {threading.current_thread().name, f"blockws-{ws.id}-reader"}
    assert ws.close_code == 1000 and ws.error is None


def test_tls_reads_on_the_calling_thread(tls_url: str, tls_certs: Any) -> None:
    # A TLS socket reads the network through its plain TCP transport and
    # decrypts in memory (blockws.transport.TLSTransport), so its reading is
    # lent too: the waiting thread reads, decrypts and parses.
    with blockws.connect(tls_url, timeout=TIMEOUT, ssl_context=tls_certs.client_context()) as ws:
        names = record_reading_threads(ws)
        for i in range(200):
            ws.send(f"m{i}")
            assert ws.receive(TIMEOUT) == f"m{i}"
        mine = names.count(threading.current_thread().name)
        assert mine >= len(names) // 2, names
        assert set(names) <= {threading.current_thread().name, f"blockws-{ws.id}-reader"}
    assert ws.close_code == 1000 and ws.error is None


# -- subprotocols, headers, origin, the internal request -----------------------------------

@pytest.mark.parametrize(
    ("offered", "expected"),
    [(["chat"], "chat"), (["superchat", "chat"], "superchat"), (["other", "chat"], "chat"),
     (["other"], None), (None, None)],
)
def test_subprotocols(url: str, offered: list[str] | None, expected: str | None) -> None:
    with blockws.connect(url, timeout=TIMEOUT, subprotocols=offered) as ws:
        assert ws.protocol == expected
        ws.send("!subprotocol")
        assert ws.receive(TIMEOUT) == (expected or "")


def test_headers_origin_and_request_hook(url: str) -> None:
    calls: list[tuple[blockws.WebSocket, blockws.Request, str]] = []

    def hook(ws: blockws.WebSocket, request: blockws.Request) -> None:
        calls.append((ws, request, threading.current_thread().name))
        request.headers["X-From-Hook"] = "hooked"

    rec = Recorder(text=False, binary=False)  # messages go to receive()
    ws = blockws.WebSocket(
        url + "/game/lobby?room=7",
        headers={"X-Test": "yes", "User-Agent": "blockws-tests"},
        origin="https://game.example",
        on_internal_request_created=hook,
        **rec.callbacks(),
    )
    ws.internal_request.headers.add("X-Before-Open", "edited")
    ws.open()
    rec.wait_open(ws)
    ws.send("!headers")
    reply = json.loads(str(ws.receive(TIMEOUT)))
    assert close_socket(ws, rec)[0] == 1000
    assert len(calls) == 1
    assert calls[0][0] is ws and calls[0][1] is ws.internal_request
    assert isinstance(calls[0][1], blockws.Request)
    # API.md: the hook runs on the connecting thread (the socket's reader thread).
    assert calls[0][2] == f"blockws-{ws.id}-reader"
    headers = reply["headers"]
    assert reply["path"] == "/game/lobby?room=7"
    assert headers["x-test"] == "yes"
    assert headers["user-agent"] == "blockws-tests"
    assert headers["x-from-hook"] == "hooked"
    assert headers["x-before-open"] == "edited"
    assert headers["origin"] == "https://game.example"
    assert headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-version"] == "13"
    assert headers["host"] == url.split("://", 1)[1]


def test_request_hook_that_raises_fails_the_open(url: str, no_leaks: None) -> None:
    def hook(ws: blockws.WebSocket, request: blockws.Request) -> None:
        raise KeyError("no token")

    rec = Recorder()
    ws = blockws.WebSocket(url, on_internal_request_created=hook, **rec.callbacks())
    ws.open()
    assert rec.wait_closed(ws) == (1006, "")
    assert rec.events == [("closed", 1006, "")]
    assert isinstance(ws.error, KeyError)


# -- pumping many sockets -------------------------------------------------------------------

def test_update_all_and_global_wait(websockets_server: str, node_ws_server: str) -> None:
    recs = [Recorder() for _ in range(6)]
    sockets = [
        blockws.WebSocket((websockets_server, node_ws_server)[i % 2], **rec.callbacks())
        for i, rec in enumerate(recs)
    ]

    def pump_all(condition: Any, what: str) -> int:
        ran = 0
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            blockws.wait(left)
            ran += blockws.update_all()
        return ran

    for ws in sockets:
        ws.open()
    assert pump_all(lambda: all(r.opened for r in recs), "on_open") >= len(sockets)
    for i, ws in enumerate(sockets):
        ws.send(f"hello {i}")
    pump_all(lambda: all(r.messages for r in recs), "echoes")
    assert [r.messages for r in recs] == [[f"hello {i}"] for i in range(len(sockets))]
    # Once everything pending ran, wait() times out and says so.
    blockws.update_all()
    start = time.monotonic()
    assert blockws.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    assert blockws.update_all() == 0
    for ws in sockets:
        ws.close()
    pump_all(lambda: all(r.closes for r in recs), "on_closed")
    assert all(r.closes == [("closed", 1000, "")] for r in recs)
    assert not any(ws.update() for ws in sockets)  # update_all() ran them all


# -- on_binary's BufferSegment ----------------------------------------------------------------

def test_on_binary_segment(url: str) -> None:
    seen: list[dict[str, Any]] = []

    def on_binary(ws: blockws.WebSocket, seg: blockws.BufferSegment) -> None:
        seen.append({
            "seg": seg, "bytes": bytes(seg), "len": len(seg), "count": seg.count,
            "view": seg.view().tobytes(), "released": seg.released,
            "slice": bytes(seg.data[seg.offset:seg.offset + seg.count]),
        })

    data = os.urandom(3000)
    with blockws.connect(url, timeout=TIMEOUT, on_binary=on_binary) as ws:
        ws.send(data)
        ws.send(b"")
        deadline = time.monotonic() + TIMEOUT
        while len(seen) < 2:
            assert time.monotonic() < deadline
            ws.wait(deadline - time.monotonic())
            ws.update()
    first, empty = seen
    assert first["bytes"] == data and first["len"] == first["count"] == 3000
    assert first["view"] == data and first["slice"] == data
    assert first["released"] is False and first["seg"].released  # released after the callback
    assert empty["bytes"] == b"" and empty["len"] == 0 and empty["seg"].released


def test_on_binary_releasing_itself_or_raising(url: str) -> None:
    calls: list[str] = []

    def on_binary(ws: blockws.WebSocket, seg: blockws.BufferSegment) -> None:
        calls.append(bytes(seg).decode())
        if bytes(seg) == b"release":
            seg.release()  # releasing early is allowed; blockws must not release it again
        elif bytes(seg) == b"raise":
            raise RuntimeError("callback failed")

    with blockws.connect(url, timeout=TIMEOUT, on_binary=on_binary) as ws:
        for word in (b"release", b"raise", b"after"):
            ws.send(word)
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(RuntimeError, match="callback failed"):
            while "raise" not in calls:
                assert time.monotonic() < deadline
                ws.wait(deadline - time.monotonic())
                ws.update()
        # The event after the one that raised stays queued for the next update().
        while "after" not in calls:
            assert time.monotonic() < deadline
            ws.wait(deadline - time.monotonic())
            ws.update()
    assert calls == ["release", "raise", "after"]
