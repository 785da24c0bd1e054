"""The facade's less travelled paths (issue 11's coverage goal): option setters after
open, the segment senders' failures, send()'s argument checks, and connect() when a
callback raises while it fails. Over memory transports (tests/memory.py)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from memory import MEMORY_URL, MemoryOpener, MemoryTransport

import blockws
from blockws.buffers import BufferPool
from blockws.frames import Opcode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]

URL = MEMORY_URL



def opened(opener: MemoryOpener, **options: Any) -> tuple[blockws.WebSocket, MemoryTransport]:
    options.setdefault("extensions", [])
    ws = blockws.WebSocket(URL, **options)
    ws.open()
    assert ws.wait(5)
    ws.update()
    assert ws.is_open
    return ws, opener.transports[-1]


def test_fixed_options_refuse_a_change_after_open(memory: MemoryOpener) -> None:
    ws, _ = opened(memory)
    try:
        with pytest.raises(blockws.InvalidState, match="extensions"):
            ws.extensions = []
    finally:
        ws.abort()
        ws.join(5)


def test_silence_limit_is_read_and_changed_while_open(memory: MemoryOpener) -> None:
    ws, _ = opened(memory, open_timeout=7, close_after_no_message=3)
    try:
        assert ws.open_timeout == 7.0
        assert ws.close_after_no_message == 3.0
        ws.close_after_no_message = 1.5
        assert ws.close_after_no_message == 1.5
        with pytest.raises(ValueError):
            ws.close_after_no_message = -1
        assert ws.close_after_no_message == 1.5
    finally:
        ws.abort()
        ws.join(5)


def test_offset_and_count_apply_to_binary_only(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    try:
        with pytest.raises(TypeError, match="binary messages only"):
            ws.send("text", offset=1)
        with pytest.raises(TypeError, match="binary messages only"):
            ws.send("text", count=2)
        ws.send(b"abcdef", offset=1, count=3)
        frames = transport.wait_for(lambda fs: len(fs) >= 1)
        assert [(f.opcode, f.payload) for f in frames] == [(Opcode.BINARY, b"bcd")]
    finally:
        ws.abort()
        ws.join(5)


def test_text_segment_that_is_not_utf8_is_released_and_refused(memory: MemoryOpener) -> None:
    ws, transport = opened(memory)
    pool = BufferPool()
    try:
        segment = pool.get(2)
        segment.data[:2] = b"\xff\xfe"
        with pytest.raises(ValueError, match="not valid UTF-8"):
            ws.send_as_text(segment)
        assert segment.released
        good = pool.get(2)
        good.data[:2] = b"ok"
        ws.send_as_text(good)
        frames = transport.wait_for(lambda fs: len(fs) >= 1)
        assert [(f.opcode, f.payload) for f in frames] == [(Opcode.TEXT, b"ok")]
    finally:
        ws.abort()
        ws.join(5)


def test_segment_senders_check_their_argument(memory: MemoryOpener) -> None:
    ws, _ = opened(memory)
    try:
        with pytest.raises(TypeError, match="expected a BufferSegment, not bytes"):
            ws.send_as_binary(b"raw")  # type: ignore[arg-type]
    finally:
        ws.abort()
        ws.join(5)


def test_segment_sent_on_a_closed_socket_is_released(memory: MemoryOpener) -> None:
    ws, _ = opened(memory)
    ws.abort()
    assert ws.join(5)
    segment = BufferPool().get(4)
    with pytest.raises(blockws.ConnectionClosed):
        ws.send_as_binary(segment)
    assert segment.released


def test_connect_failing_logs_a_raising_on_closed_and_raises_the_cause(
        memory: MemoryOpener, caplog: pytest.LogCaptureFixture) -> None:
    """connect()'s own wait times out (the socket's open_timeout is longer); the
    on_closed that runs as it cleans up raises: the timeout is what the caller gets,
    and the callback's exception is logged."""
    memory.gate = threading.Event()  # the handshake never completes

    def on_closed(ws: blockws.WebSocket, code: int, reason: str) -> None:
        raise RuntimeError("on_closed broke")

    with caplog.at_level(logging.ERROR, logger="blockws"):
        with pytest.raises(blockws.OpenTimeout):
            blockws.connect(URL, timeout=0.3, open_timeout=30, extensions=[],
                            on_closed=on_closed)
    assert any("a callback raised while connect() was failing" in r.getMessage()
               and r.exc_info is not None and "on_closed broke" in str(r.exc_info[1])
               for r in caplog.records), [r.getMessage() for r in caplog.records]
