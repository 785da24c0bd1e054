"""Issue 14, W7: what an idle open socket holds, against the embedded echo server.

The benchmark (``python -m benchmarks --workloads W7``) measures RSS; this
test measures the Python allocations an idle socket keeps (tracemalloc,
the server's own allocations left out), which is deterministic enough to bound.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

import blockws
from blockws.server import EchoServer

SOCKETS = 30
WAIT = 10.0
#: Python bytes kept per idle socket (callbacks, pumped by update_all()).
#: Measured (CPython 3.11): 23.9 kB before the lazy Events, Conditions and
#: deque and Connection.__slots__, 17.5 kB after; 14.7 kB before the send
#: queue was made lazily, the control and held queues became lists, the
#: dispatcher's Condition a lighter signal and the reader's read lost its
#: generator-based context manager, 12.1 kB after.
MAX_BYTES_PER_SOCKET = 13_500


@pytest.fixture
def echo_url() -> Iterator[str]:
    with EchoServer() as server:
        yield server.url


def _client_bytes(snapshot: tracemalloc.Snapshot) -> int:
    # Only what blockws's client code allocated (a frame of blockws/ in the traceback: the
    # suite's other threads and fixtures allocate meanwhile too), and not what the
    # server's threads allocate (their stacks start in server.py).
    kept = snapshot.filter_traces(
        [
            tracemalloc.Filter(True, "*/blockws/*", all_frames=True),
            tracemalloc.Filter(False, "*/blockws/server.py", all_frames=True),
            tracemalloc.Filter(False, tracemalloc.__file__),
        ]
    )
    return sum(stat.size for stat in kept.statistics("filename"))


def test_idle_sockets_keep_little_python_memory(
    echo_url: str, coverage_paused: None, caplog: pytest.LogCaptureFixture
) -> None:
    # At WARNING whatever an earlier test set: pytest keeps the records it
    # captures, which would count as kept (DEBUG: about 2.6 kB per socket).
    caplog.set_level(logging.WARNING, logger="blockws")
    opened: list[Any] = []
    closed: list[Any] = []
    warm = blockws.connect(echo_url, timeout=WAIT, extensions=[])
    warm.close()
    assert warm.join(WAIT)
    warm.update()
    gc.collect()
    tracemalloc.start(40)
    try:
        before = _client_bytes(tracemalloc.take_snapshot())
        sockets = [
            blockws.WebSocket(
                echo_url,
                extensions=[],
                on_open=opened.append,
                on_closed=lambda ws, code, reason: closed.append(ws),
            ).open()
            for _ in range(SOCKETS)
        ]
        for _ in range(1000):
            if len(opened) == SOCKETS:
                break
            blockws.wait(0.1)
            blockws.update_all()
        assert len(opened) == SOCKETS
        gc.collect()
        after = _client_bytes(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    per_socket = (after - before) / SOCKETS
    try:
        assert per_socket <= MAX_BYTES_PER_SOCKET, f"{per_socket:.0f} bytes per idle socket"
    finally:
        for ws in sockets:
            ws.close()
        for ws in sockets:
            assert ws.join(WAIT)
        blockws.update_all()
    assert len(closed) == SOCKETS
