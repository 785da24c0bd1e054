"""blockws.connection: the engine paths the other test files leave out.

Most run over the memory transport (tests/memory.py, no sockets); the ones
about the socket itself run against blockws's embedded echo server.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
from memory import MemoryOpener, MemoryTransport, use_memory

import blockws
from blockws.server import EchoServer

URL = "ws://memory.invalid/chat"


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryOpener]:
    with use_memory(monkeypatch) as opener:
        yield opener


def opened(opener: MemoryOpener, **options: Any) -> tuple[blockws.WebSocket, MemoryTransport]:
    """A socket opened over memory, with ``on_open`` dispatched."""
    options.setdefault("extensions", [])
    ws = blockws.WebSocket(URL, **options)
    ws.open()
    assert ws.wait(5)
    ws.update()
    assert ws.is_open
    return ws, opener.transports[-1]


# -- over a real socket ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_abort_reports_the_same_error_every_time() -> None:
    """``ws.abort()`` on an open socket: its connector, still holding the socket,
    shut it down and closed it under the reader thread, whose read then failed, in
    about one abort out of fifty, with "connection lost: Bad file descriptor" in
    place of the usual "connection closed without a close frame". The transport
    alone ends the socket now (and closes it once the reader is done)."""
    errors: collections.Counter[str] = collections.Counter()
    with EchoServer() as server:
        for _ in range(1000):
            ws = blockws.connect(server.url, timeout=10)
            ws.abort()
            assert ws.join(5)
            ws.update()
            assert ws.close_code == 1006
            errors[repr(ws.error)] += 1
    assert errors == {
        "ConnectionLost('connection closed without a close frame')": 1000
    }, errors
