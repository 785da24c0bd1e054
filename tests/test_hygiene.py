"""What a socket leaves behind: threads, file descriptors, the timer thread, and logs.

Every way a socket can end (clean close, server close, protocol failure, refused, open
timeout, abandoned while connecting, never opened) must leave no ``blockws-*`` thread and
no descriptor (the ``no_leaks`` fixture). Logging must identify the socket on every record
(``record.ws_context``) and never show credentials.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultserver import OP_TEXT, Peer, Recorder, fault_server, frame_bytes

import blockws
from blockws.sender import DIRECT_MAX
from blockws.timer import timer
from peerutil import free_port

TIMEOUT = 10.0


def blockws_thread_names() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("blockws")}


def run(url: str, action: str = "client-close", **options: Any) -> blockws.WebSocket:
    """Open a socket, end it the way ``action`` says, pump until on_closed ran once."""
    rec = Recorder()
    ws = blockws.WebSocket(url, **rec.callbacks(), **options)
    if action == "never-opened":
        ws.close()  # a no-op: nothing was started, nothing is queued
        assert ws.update() == 0 and rec.events == [] and not ws.is_open
        return ws
    ws.open()
    if action == "abandon-while-connecting":
        ws.close()
    elif action in ("client-close", "server-close"):
        rec.wait_open(ws)
        ws.send("hello")
        rec.pump_until(ws, lambda: rec.messages == ["hello"])
        if action == "client-close":
            ws.close(4000, "bye")
        else:
            ws.send("!close 4001 server says bye")
    rec.wait_closed(ws)
    return ws


def hang(peer: Peer) -> None:
    peer.drain_forever()


def violate(peer: Peer) -> None:
    peer.handshake()
    peer.send_frame(0x3)  # reserved opcode: the client fails the connection with 1002
    peer.read_until_close()


def test_many_sockets_leave_nothing_behind(websockets_server: str, no_leaks: None) -> None:
    refused = f"ws://127.0.0.1:{free_port()}/"
    with fault_server(violate) as bad, fault_server(hang) as silent:
        for _ in range(8):
            ws = run(websockets_server, "client-close")
            assert ws.close_code == 4000 and ws.error is None
            ws = run(websockets_server, "server-close")
            assert ws.close_code == 4001 and ws.error is None
            ws = run(bad.url, "failure")
            assert ws.close_code == 1002 and type(ws.error) is blockws.ProtocolError
            ws = run(refused, "refused")
            assert type(ws.error) is blockws.ConnectionRefused
            ws = run(silent.url, "open-timeout", open_timeout=0.1)
            assert type(ws.error) is blockws.OpenTimeout
            ws = run(silent.url, "abandon-while-connecting")
            assert ws.close_code == 1006
            ws = run(websockets_server, "never-opened")
            with blockws.connect(websockets_server, timeout=TIMEOUT) as ws:
                ws.send(b"ctx")
                assert ws.receive(TIMEOUT) == b"ctx"
            with pytest.raises(blockws.ConnectError):
                blockws.connect(refused, timeout=TIMEOUT)
    # no_leaks checks threads and descriptors after the fault servers are gone.


def test_threads_end_even_if_update_is_never_called(websockets_server: str,
                                                    no_leaks: None) -> None:
    ws = blockws.WebSocket(websockets_server, send_pings=True, ping_frequency=0.1)
    ws.open()
    deadline = time.monotonic() + TIMEOUT
    while not ws.is_open:  # no callback pumping at all: poll the property
        assert ws.error is None and time.monotonic() < deadline
        ws.wait(0.01)
    ws.close()
    assert ws.join(TIMEOUT)  # the socket ended and its threads are gone; on_closed is queued
    assert ws.closed and not ws.is_open and "closed" in repr(ws)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(f"blockws-{ws.id}-")]
    assert ws.update() == 2  # on_open, on_closed
    assert ws.closed and ws.close_code == 1000


def test_thread_names(websockets_server: str, no_leaks: None) -> None:
    rec = Recorder()
    ws = blockws.WebSocket(websockets_server, send_pings=True, **rec.callbacks())
    ws.open()
    rec.wait_open(ws)
    # An idle open socket has its reader only: the writer starts with something that
    # must wait to be written (blockws.sender) -- a message larger than DIRECT_MAX always
    # does -- and ends when idle again.
    assert f"blockws-{ws.id}-reader" in blockws_thread_names()
    ws.send(b"x" * (DIRECT_MAX + 1))
    names = blockws_thread_names()
    assert {f"blockws-{ws.id}-reader", f"blockws-{ws.id}-writer", "blockws-timer"} <= names
    pattern = re.compile(r"blockws-(\d+-(reader|writer)|timer)")
    assert all(pattern.fullmatch(name) for name in names), names
    for thread in threading.enumerate():
        if thread.name.startswith("blockws"):
            assert thread.daemon, thread.name
    ws.close()
    rec.wait_closed(ws)
    assert not {n for n in blockws_thread_names() if n.startswith(f"blockws-{ws.id}-")}


def test_timer_thread_ends_when_no_socket_needs_it(websockets_server: str,
                                                    no_leaks: None) -> None:
    # open_timeout needs the timer while connecting; once open, nothing does.
    rec = Recorder()
    ws = blockws.WebSocket(websockets_server, **rec.callbacks())
    ws.open()
    rec.wait_open(ws)
    thread = timer.thread
    if thread is not None:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert timer.thread is None and ws.is_open
    # Pings need it for as long as they are on.
    ws.ping_frequency = 0.1
    ws.send_pings = True
    thread = timer.thread
    assert thread is not None and thread.name == "blockws-timer" and thread.is_alive()
    ws.close()
    rec.wait_closed(ws)
    thread.join(TIMEOUT)
    assert not thread.is_alive() and timer.thread is None


# -- logging ---------------------------------------------------------------------------------

class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("blockws")
    handler = ListHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


FORMATTER = logging.Formatter(
    "%(asctime)s %(name)s %(levelname)s %(threadName)s %(message)s ws_context=%(ws_context)r"
)


def full_text(record: logging.LogRecord) -> str:
    """Everything a handler could print for the record: message, args, context, traceback."""
    return "\n".join([FORMATTER.format(record), repr(record.args), repr(record.msg),
                      repr(getattr(record, "ws_context", None)), record.exc_text or ""])


def log_one_socket(url: str, echo: bool) -> blockws.WebSocket:
    rec = Recorder()
    ws = blockws.WebSocket(url, context={"player": "p1"}, send_pings=True,
                           ping_frequency=0.1, **rec.callbacks())
    ws.context["match"] = 7  # the context is live: later records show it
    ws.open()
    if echo:
        rec.wait_open(ws)
        ws.send("logged?")
        rec.pump_until(ws, lambda: rec.messages == ["logged?"])
        ws.close()
    rec.wait_closed(ws)
    return ws


def test_every_record_carries_the_socket_context(websockets_server: str,
                                                 log_records: list[logging.LogRecord]) -> None:
    refused = f"ws://127.0.0.1:{free_port()}/"
    sockets = []
    with fault_server(violate) as bad:
        for url in (websockets_server, bad.url, refused):
            sockets.append(log_one_socket(url, echo=url == websockets_server))
    by_id = {ws.id: ws for ws in sockets}
    assert log_records, "blockws wrote no records at DEBUG"
    seen = set()
    for record in log_records:
        context = getattr(record, "ws_context", None)
        assert context is not None, f"record without ws_context: {record.getMessage()!r}"
        assert context["id"] in by_id, context
        ws = by_id[context["id"]]
        assert context["url"] == ws.context["url"]
        assert context["player"] == "p1" and context["match"] == 7
        seen.add(context["id"])
        FORMATTER.format(record)  # the documented format string works
    assert seen == set(by_id), "every socket logged something"
    assert all(ws.context["id"] == ws.id and "url" in ws.context for ws in sockets)


SECRET_PASSWORD = "pw-S3cr3t-9f2c"
SECRET_TOKEN = "tok-S3cr3t-77aa"
SECRET_COOKIE = "cookie-S3cr3t-0b1d"


def secret_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET_TOKEN}", "Cookie": f"session={SECRET_COOKIE}"}


def assert_no_secret(records: list[logging.LogRecord], *extra: str) -> None:
    basic = base64.b64encode(f"user:{SECRET_PASSWORD}".encode()).decode()
    secrets = (SECRET_PASSWORD, SECRET_TOKEN, SECRET_COOKIE, basic, *extra)
    assert records
    for record in records:
        text = full_text(record)
        for secret in secrets:
            assert secret not in text, f"{secret!r} logged in: {text}"


@pytest.mark.parametrize("where", ["url", "headers"])
def test_credentials_never_logged(websockets_server: str, where: str,
                                  log_records: list[logging.LogRecord]) -> None:
    port = websockets_server.rsplit(":", 1)[1]
    url = f"ws://user:{SECRET_PASSWORD}@127.0.0.1:{port}/"
    # An Authorization header takes precedence over the URL's credentials.
    headers = secret_headers() if where == "headers" else {"Cookie": f"s={SECRET_COOKIE}"}
    expected = {"url": base64.b64encode(f"user:{SECRET_PASSWORD}".encode()).decode(),
                "headers": SECRET_TOKEN}[where]
    rec = Recorder(text=False, binary=False)
    ws = blockws.WebSocket(url, headers=headers, **rec.callbacks())
    assert SECRET_PASSWORD not in ws.context["url"] and SECRET_PASSWORD not in repr(ws)
    ws.open()
    rec.wait_open(ws)
    ws.send("!headers")
    reply = str(ws.receive(TIMEOUT))
    assert expected in reply and SECRET_COOKIE in reply  # the server sees them ...
    ws.close()
    rec.wait_closed(ws)
    assert_no_secret(log_records)  # ... and no log record does


@pytest.mark.parametrize("failure", ["401", "protocol-error", "refused", "open-timeout"])
def test_credentials_never_logged_on_failure(failure: str,
                                             log_records: list[logging.LogRecord]) -> None:
    def reject(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\n"
                  b"Content-Length: 0\r\n\r\n")
        peer.drain_forever()

    def protocol_error(peer: Peer) -> None:
        peer.handshake()
        peer.send(frame_bytes(OP_TEXT, b"\xff"))
        peer.read_until_close()

    handler = {"401": reject, "protocol-error": protocol_error, "open-timeout": hang,
               "refused": hang}[failure]
    with fault_server(handler) as server:
        port = free_port() if failure == "refused" else server.port
        url = f"ws://user:{SECRET_PASSWORD}@127.0.0.1:{port}/path"
        rec = Recorder()
        ws = blockws.WebSocket(url, headers=secret_headers(), open_timeout=0.3,
                               **rec.callbacks())
        ws.open()
        rec.wait_closed(ws)
        assert ws.error is not None
    assert_no_secret(log_records)
    for secret in (SECRET_PASSWORD, SECRET_TOKEN, SECRET_COOKIE):
        assert secret not in str(ws.error) and secret not in repr(ws.error)


def test_writer_thread_starts_on_demand_and_ends_when_idle(websockets_server: str,
                                                           no_leaks: None) -> None:
    from blockws.sender import WRITER_IDLE

    ws = blockws.connect(websockets_server, timeout=10)
    writer_name = f"blockws-{ws.id}-writer"
    # A small message on plain TCP with nothing queued is written on the caller's
    # thread (non-blocking), so no writer thread is needed for it.
    ws.send("direct")
    assert ws.receive(10) == "direct"
    assert writer_name not in blockws_thread_names()
    # So is a ping (the timer's or ours) with nothing else queued or being written.
    ws.ping(b"p")
    assert writer_name not in blockws_thread_names()
    ws.send(b"x" * (8 << 20))  # larger than DIRECT_MAX: the writer writes it
    writers = [t for t in threading.enumerate() if t.name == writer_name]
    assert len(writers) == 1
    assert ws.receive(10) == b"x" * (8 << 20)
    writers[0].join(WRITER_IDLE + 5)  # it ends by itself once idle
    assert not writers[0].is_alive()
    ws.close()
    ws.join(10)
    ws.update()
    assert ws.close_code == 1000
