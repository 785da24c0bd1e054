"""The exception tree drawn in ``blockws/exceptions.py``: one root, builtins where they fit,
close codes on protocol errors, and what ``send()`` raises while and after a socket closes."""

from __future__ import annotations

import pytest
from memory import MemoryOpener

import blockws
from blockws import exceptions as exc

pytestmark = pytest.mark.unit

URL = "ws://memory.test/"


def test_every_exception_derives_from_the_root() -> None:
    for name in exc.__all__:
        assert issubclass(getattr(exc, name), exc.BlockwsError), name
        assert getattr(blockws, name) is getattr(exc, name), f"{name} not public"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (exc.InvalidURL, ValueError),
        (exc.InvalidState, RuntimeError),
        (exc.SegmentReleasedTwice, ValueError),
        (exc.TransportError, OSError),
        (exc.ConnectError, OSError),
        (exc.TLSError, OSError),
        (exc.ConnectionLost, OSError),
        (exc.OpenTimeout, TimeoutError),
        (exc.PingTimeout, TimeoutError),
        (exc.CloseTimeout, TimeoutError),
    ],
)
def test_builtins_where_they_fit(cls: type[BaseException], builtin: type[BaseException]) -> None:
    assert issubclass(cls, builtin)


def test_the_branches_of_the_tree() -> None:
    for closed in (exc.ConnectionClosedOK, exc.ConnectionClosedError):
        assert issubclass(closed, exc.ConnectionClosed)
    for refused in (exc.InvalidStatus, exc.InvalidHeader, exc.NegotiationError,
                    exc.HTTP2Unavailable):
        assert issubclass(refused, exc.HandshakeError)
    assert issubclass(exc.HeadersTooLarge, exc.InvalidHeader)
    assert not issubclass(exc.HandshakeError, exc.ProtocolError)
    codes = [(c, c.close_code) for c in (exc.ProtocolError, exc.InvalidPayload, exc.MessageTooBig)]
    assert codes == [(exc.ProtocolError, 1002), (exc.InvalidPayload, 1007),
                     (exc.MessageTooBig, 1009)]


def test_connection_closed_says_code_reason_and_cause() -> None:
    closing = exc.ConnectionClosedOK(None, "")
    assert (closing.code, closing.reason, closing.cause) == (None, "", None)
    assert str(closing) == "the socket is closing"
    lost = exc.ConnectionLost("reset by peer")
    closed = exc.ConnectionClosedError(1006, "", lost)
    assert closed.cause is lost
    assert str(closed) == "the socket is closed (code 1006): reset by peer"
    assert str(exc.ConnectionClosedOK(4000, "bye")) == "the socket is closed (code 4000, 'bye')"


def test_invalid_status_and_http2_unavailable_keep_their_details() -> None:
    status = exc.InvalidStatus(403, "Forbidden", {"x": "y"}, b"no")
    assert (status.status, status.reason, status.headers, status.body) == (
        403, "Forbidden", {"x": "y"}, b"no")
    assert "HTTP 403 Forbidden" in str(status)
    refused = exc.HTTP2Unavailable("no RFC 8441 here", status)
    assert refused.cause is status and str(refused) == "no RFC 8441 here"
    assert exc.HTTP2Unavailable("plain").cause is None



@pytest.mark.timeout(10)
def test_send_while_closing_and_after(memory: MemoryOpener) -> None:
    """While the closing handshake runs, send() raises ConnectionClosedOK with code None;
    once closed, the code the socket closed with."""
    ws = blockws.WebSocket(URL, extensions=[])
    with pytest.raises(exc.InvalidState, match="not open yet"):
        ws.send("too early")
    ws.open()
    assert ws.wait(5)
    ws.update()
    ws.close(4000, "bye")
    with pytest.raises(exc.ConnectionClosedOK) as closing:
        ws.send("late")
    assert closing.value.code is None
    transport = memory.transports[-1]
    transport.feed(b"\x88\x05\x0f\xa0bye")  # the server's close: 4000 "bye"
    transport.feed_eof()
    assert ws.join(5)
    with pytest.raises(exc.ConnectionClosedOK) as closed:
        ws.send("later")
    assert (closed.value.code, closed.value.reason) == (4000, "bye")
