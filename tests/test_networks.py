"""What every peer library does on real networks (issue 10, section 6): connect errors that
are ``OSError``s with their errno and the host and port, ``connect()`` raising the cause
without the connecting thread's frames, and the ``User-Agent`` header, seen by real servers.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import traceback
from typing import Any

import pytest

import blockws
from blockws.handshake import DEFAULT_USER_AGENT
from peerutil import free_port

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 10.0


def test_refused_connection_is_a_connection_refused_error() -> None:
    port = free_port()
    with pytest.raises(ConnectionRefusedError) as info:  # the builtin: existing handlers work
        blockws.connect(f"ws://127.0.0.1:{port}/", timeout=TIMEOUT)
    exc = info.value
    assert isinstance(exc, blockws.ConnectionRefused) and isinstance(exc, blockws.ConnectError)
    assert exc.errno == errno.ECONNREFUSED and exc.strerror
    assert str(exc) == f"cannot connect to 127.0.0.1:{port}: {exc.strerror}"
    # The cause is chained, with `from`.
    assert isinstance(exc.__cause__, ConnectionRefusedError)
    assert not isinstance(exc.__cause__, blockws.BlockwsError)
    assert exc.__suppress_context__


def test_connect_raises_without_the_reader_threads_frames() -> None:
    """Issue 10: connect() re-raised the error raised on the connecting thread, with its
    frames (about 25 lines of blockws internals) in front of the caller's."""
    with pytest.raises(blockws.ConnectError) as info:
        blockws.connect(f"ws://127.0.0.1:{free_port()}/", timeout=TIMEOUT)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] in ("connect", "_raise_cause"), frames
    for internal in ("_reader_main", "_connect", "open_transport", "open_over_network"):
        assert internal not in frames, frames
    text = "".join(traceback.format_exception(type(info.value), info.value,
                                              info.value.__traceback__))
    assert text.count("\n") < 40, text  # both tracebacks, the cause's included


def test_unresolvable_host_names_it_and_keeps_the_code() -> None:
    with pytest.raises(blockws.ConnectError) as info:
        blockws.connect("ws://nonexistent.invalid:8765/", timeout=TIMEOUT)
    exc = info.value
    assert "cannot resolve host 'nonexistent.invalid'" in str(exc)
    assert isinstance(exc.__cause__, socket.gaierror)
    assert exc.errno == exc.__cause__.errno and exc.errno is not None


@pytest.mark.unit
def test_connect_error_is_an_oserror_with_errno() -> None:
    exc = blockws.ConnectError("cannot connect to h:1: No route to host",
                               errno=errno.EHOSTUNREACH, strerror="No route to host")
    assert isinstance(exc, OSError) and exc.errno == errno.EHOSTUNREACH
    assert str(exc) == "cannot connect to h:1: No route to host"
    assert not isinstance(exc, ConnectionRefusedError)
    assert isinstance(blockws.ConnectionRefused("x"), ConnectionRefusedError)


# -- User-Agent -----------------------------------------------------------------------------


def headers_seen(ws: blockws.WebSocket) -> dict[str, str]:
    ws.send("!headers")
    reply = ws.receive(TIMEOUT)
    assert isinstance(reply, str)
    result: dict[str, str] = json.loads(reply)["headers"]
    return result


def test_default_user_agent_reaches_the_server(websockets_server: str) -> None:
    major, minor = sys.version_info[:2]
    with blockws.connect(websockets_server, timeout=TIMEOUT) as ws:
        seen = headers_seen(ws)
    assert seen["user-agent"] == f"blockws/{blockws.__version__} Python/{major}.{minor}"
    assert seen["user-agent"] == DEFAULT_USER_AGENT


def test_user_agent_none_sends_none(websockets_server: str) -> None:
    with blockws.connect(websockets_server, timeout=TIMEOUT, user_agent=None) as ws:
        assert "user-agent" not in headers_seen(ws)


def test_user_agent_option_and_header(websockets_server: str) -> None:
    with blockws.connect(websockets_server, timeout=TIMEOUT, user_agent="game/1.0") as ws:
        assert headers_seen(ws)["user-agent"] == "game/1.0"
    with blockws.connect(websockets_server, timeout=TIMEOUT,
                         headers={"User-Agent": "own/2"}) as ws:
        assert headers_seen(ws)["user-agent"] == "own/2"  # the header wins, sent once


def test_user_agent_over_http2(hypercorn_h2_server: Any, tls_context_h2: Any) -> None:
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT,
                         ssl_context=tls_context_h2) as ws:
        assert ws.http_version == "2"
        assert headers_seen(ws)["user-agent"] == DEFAULT_USER_AGENT
    with blockws.connect(hypercorn_h2_server.wss, timeout=TIMEOUT,
                         ssl_context=tls_context_h2, user_agent=None) as ws:
        assert ws.http_version == "2"
        assert "user-agent" not in headers_seen(ws)
