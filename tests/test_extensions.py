"""The extension seam: header parsing, negotiation, and a toy extension on the frame path.

``XorExtension`` flips every payload bit and marks its messages with RSV2: a
client and a server ``Protocol`` that both have it exchange messages through it,
and one without it fails the connection on the RSV2 bit.
"""

from __future__ import annotations

from typing import Any

import pytest

from blockws.exceptions import MessageTooBig, NegotiationError, ProtocolError
from blockws.extensions import Extension, ExtensionParams, parse_extension_header
from blockws.frames import RSV1, RSV2, Frame, Opcode, apply_mask
from blockws.handshake import (
    Headers,
    Request,
    Response,
    accept_key,
    build_request,
    validate_response,
)
from blockws.protocol import BinaryMessage, Failure, Protocol, Role, State, TextMessage

pytestmark = pytest.mark.unit

KEY = b"\x37\xfa\x21\x3d"


def xor(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


class XorExtension(Extension):
    """XORs every payload byte with 0xFF; owns RSV2."""

    name = "x-xor"
    rsv_bits = RSV2

    def __init__(self) -> None:
        self.accepted: ExtensionParams | None = None
        self.decoded_chunks: list[tuple[bytes, bool]] = []

    def accept(self, params: ExtensionParams) -> None:
        if any(name != "level" for name, _ in params):
            raise NegotiationError(f"x-xor: unknown parameter in {params}")
        self.accepted = params

    def encode(self, opcode: int, payload: bytes) -> tuple[bytes, int]:
        return xor(payload), RSV2

    def begin_message(self, opcode: int, rsv: int) -> bool:
        return bool(rsv & RSV2)

    def decode(self, data: bytes, end: bool, limit: int) -> bytes:
        self.decoded_chunks.append((data, end))
        return xor(data)


class DoublingExtension(Extension):
    """Decodes each byte into two: a stand-in for a decompressor."""

    name = "x-double"
    rsv_bits = RSV1

    def begin_message(self, opcode: int, rsv: int) -> bool:
        return bool(rsv & RSV1)

    def decode(self, data: bytes, end: bool, limit: int) -> bytes:
        return bytes(b for b in data for _ in range(2))


def pair(**kwargs: Any) -> tuple[Protocol, Protocol, XorExtension, XorExtension]:
    cx, sx = XorExtension(), XorExtension()
    client = Protocol(Role.CLIENT, extensions=[cx], mask_keys=lambda: KEY, **kwargs)
    server = Protocol(Role.SERVER, extensions=[sx], **kwargs)
    return client, server, cx, sx


# -- parse_extension_header -----------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a; x=1, b", [("a", [("x", "1")]), ("b", [])]),
        ("permessage-deflate", [("permessage-deflate", [])]),
        (
            "permessage-deflate; client_max_window_bits; server_max_window_bits=10",
            [
                (
                    "permessage-deflate",
                    [("client_max_window_bits", None), ("server_max_window_bits", "10")],
                )
            ],
        ),
        ('foo; bar="baz"', [("foo", [("bar", "baz")])]),
        ('foo; bar=""', [("foo", [("bar", "")])]),
        ("  a ;  x = 1 ;y  ,  b  ", [("a", [("x", "1"), ("y", None)]), ("b", [])]),
        ("a;", [("a", [])]),
        ("a;;x", [("a", [("x", None)])]),
        ("a, , b,", [("a", []), ("b", [])]),
        ("", []),
        ("a, a", [("a", []), ("a", [])]),
    ],
)
def test_parse_extension_header(value: str, expected: list[Any]) -> None:
    assert parse_extension_header(value) == expected


@pytest.mark.parametrize("value", ["; x=1", "a, ; x", "a; =1", "a; x=1; =2"])
def test_parse_extension_header_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_extension_header(value)


# -- the base class ---------------------------------------------------------------------


def test_base_extension_is_the_identity() -> None:
    ext = Extension()
    assert ext.offer() == ""
    assert ext.rsv_bits == 0
    assert ext.encode(Opcode.TEXT, b"abc") == (b"abc", 0)
    assert ext.begin_message(Opcode.TEXT, 0) is False
    assert ext.decode(b"abc", True, 10) == b"abc"
    ext.accept([("x", None)])  # accepts anything


def test_fresh_returns_a_copy() -> None:
    ext = XorExtension()
    copy = ext.fresh()
    assert type(copy) is XorExtension and copy is not ext
    assert copy.name == "x-xor" and copy.rsv_bits == RSV2


def test_identity_extension_is_transparent() -> None:
    class Named(Extension):
        name = "x-named"

    client = Protocol(Role.CLIENT, extensions=[Named()], mask_keys=lambda: KEY)
    server = Protocol(Role.SERVER, extensions=[Named()])
    wire = b"".join(client.encode_data(Opcode.TEXT, b"plain"))
    assert wire == Frame(Opcode.TEXT, b"plain").serialize(KEY)
    (event,) = server.receive_data(wire)
    assert isinstance(event, TextMessage) and event.text == "plain"


# -- negotiation --------------------------------------------------------------------------


def test_offer_in_the_request() -> None:
    class Offering(XorExtension):
        def offer(self) -> str:
            return "x-xor; level=2"

    request = build_request(Request("ws://h/"), "k", [Offering(), DoublingExtension()])
    assert b"\r\nSec-WebSocket-Extensions: x-xor; level=2, x-double\r\n" in request


def response_with(*extensions: str) -> Response:
    headers = Headers(
        [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key("k")),
        ]
    )
    for value in extensions:
        headers.add("Sec-WebSocket-Extensions", value)
    return Response(101, "Switching Protocols", headers)


def test_negotiation_accepts_offered_extensions_in_server_order() -> None:
    xor_ext, double = XorExtension(), DoublingExtension()
    _, accepted = validate_response(
        response_with("x-double", "x-xor; level=3"), "k", [], [xor_ext, double]
    )
    assert accepted == [double, xor_ext]
    assert xor_ext.accepted == [("level", "3")]


def test_negotiation_rejects_unoffered_or_repeated_or_invalid() -> None:
    with pytest.raises(NegotiationError, match="not offered"):
        validate_response(response_with("x-other"), "k", [], [XorExtension()])
    with pytest.raises(NegotiationError, match="accepted twice"):
        validate_response(response_with("x-xor, x-xor"), "k", [], [XorExtension()])
    with pytest.raises(NegotiationError, match="unknown parameter"):
        validate_response(response_with("x-xor; bogus"), "k", [], [XorExtension()])
    with pytest.raises(NegotiationError, match="empty extension"):
        validate_response(response_with("; x"), "k", [], [XorExtension()])


def test_negotiation_without_extensions_header() -> None:
    assert validate_response(response_with(), "k", [], [XorExtension()]) == (None, [])


# -- the frame path --------------------------------------------------------------------------


def test_encode_sets_rsv2_and_transforms_the_payload() -> None:
    client, _, _, _ = pair()
    (frame,) = client.encode_data(Opcode.TEXT, b"Hello")
    assert frame[0] == 0x80 | RSV2 | Opcode.TEXT == 0xA1
    assert frame[1] == 0x85
    assert frame[2:6] == KEY
    assert apply_mask(frame[6:], KEY) == xor(b"Hello")
    assert Frame.parse(frame) == (Frame(Opcode.TEXT, xor(b"Hello"), rsv=RSV2), 11)


def test_encode_on_the_server_side() -> None:
    _, server, _, _ = pair()
    assert b"".join(server.encode_data(Opcode.BINARY, b"\x00\x0f")) == b"\xa2\x02\xff\xf0"


def test_client_to_server_through_the_extension() -> None:
    client, server, _, sx = pair()
    wire = b"".join(client.encode_data(Opcode.TEXT, "héllo".encode()))
    (event,) = server.receive_data(wire)
    assert isinstance(event, TextMessage) and event.text == "héllo"
    assert sx.decoded_chunks == [(xor("héllo".encode()), True)]


def test_server_to_client_through_the_extension() -> None:
    client, server, cx, _ = pair()
    payload = bytes(range(256)) * 3
    wire = b"".join(server.encode_data(Opcode.BINARY, payload))
    assert wire[0] == 0x80 | RSV2 | Opcode.BINARY
    (event,) = client.receive_data(wire)
    assert isinstance(event, BinaryMessage) and bytes(event) == payload


def test_fragmented_message_only_the_first_frame_has_rsv2() -> None:
    client, server, _, sx = pair(max_fragment_size=4)
    frames = client.encode_data(Opcode.TEXT, b"fragmented!")
    assert len(frames) == 3
    assert [f[0] for f in frames] == [RSV2 | Opcode.TEXT, Opcode.CONT, 0x80 | Opcode.CONT]
    events = [e for f in frames for e in server.receive_data(f)]
    assert [e.text for e in events if isinstance(e, TextMessage)] == ["fragmented!"]
    assert [end for _, end in sx.decoded_chunks] == [False, False, True]


def test_decode_is_fed_chunks_as_they_arrive() -> None:
    client, server, _, sx = pair()
    wire = b"".join(client.encode_data(Opcode.BINARY, b"0123456789"))
    events = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i : i + 1])
    assert len(events) == 1 and bytes(events[0]) == b"0123456789"  # type: ignore[call-overload]
    assert b"".join(xor(c) for c, _ in sx.decoded_chunks) == b"0123456789"
    assert len([c for c, _ in sx.decoded_chunks if c]) == 10
    assert sx.decoded_chunks[-1][1] is True


def test_compress_false_bypasses_the_extension() -> None:
    client, server, _, sx = pair()
    wire = b"".join(client.encode_data(Opcode.TEXT, b"raw", compress=False))
    assert wire == Frame(Opcode.TEXT, b"raw").serialize(KEY)
    (event,) = server.receive_data(wire)
    assert isinstance(event, TextMessage) and event.text == "raw"
    assert sx.decoded_chunks == []  # begin_message said no: decode never ran


def test_rsv2_without_the_extension_fails_with_1002() -> None:
    client, _, _, _ = pair()
    plain_server = Protocol(Role.SERVER)
    wire = b"".join(client.encode_data(Opcode.TEXT, b"Hello"))
    (event,) = plain_server.receive_data(wire)
    assert isinstance(event, Failure)
    assert type(event.error) is ProtocolError and event.error.close_code == 1002
    assert plain_server.state is State.CLOSE_SENT
    assert plain_server.data_to_send() == [b"\x88\x02\x03\xea"]


def test_rsv_bit_the_extension_does_not_own_fails_with_1002() -> None:
    _, server, _, _ = pair()
    (event,) = server.receive_data(Frame(Opcode.TEXT, b"x", rsv=RSV1).serialize(KEY))
    assert isinstance(event, Failure) and event.error.close_code == 1002


def test_rsv_bit_no_extension_claims_fails_with_1002() -> None:
    class Shy(XorExtension):
        def begin_message(self, opcode: int, rsv: int) -> bool:
            return False

    server = Protocol(Role.SERVER, extensions=[Shy()])
    (event,) = server.receive_data(Frame(Opcode.TEXT, b"x", rsv=RSV2).serialize(KEY))
    assert isinstance(event, Failure) and event.error.close_code == 1002


def test_rsv2_on_a_control_frame_fails_even_with_the_extension() -> None:
    _, server, _, _ = pair()
    (event,) = server.receive_data(Frame(Opcode.PING, b"", rsv=RSV2).serialize(KEY))
    assert isinstance(event, Failure) and event.error.close_code == 1002


def test_two_extensions_chain_in_order() -> None:
    # Sender applies encode in list order; the receiver decodes in reverse order.
    server = Protocol(Role.SERVER, extensions=[DoublingExtension(), XorExtension()])
    wire = Frame(Opcode.BINARY, xor(b"ab"), rsv=RSV1 | RSV2).serialize(KEY)
    (event,) = server.receive_data(wire)
    assert isinstance(event, BinaryMessage) and bytes(event) == b"aabb"


def test_decoded_size_is_bounded_by_max_message_size() -> None:
    server = Protocol(Role.SERVER, extensions=[DoublingExtension()], max_message_size=100)
    ok = server.receive_data(Frame(Opcode.BINARY, b"x" * 50, rsv=RSV1).serialize(KEY))
    assert [bytes(e) for e in ok] == [b"x" * 100]  # type: ignore[call-overload]
    # 60 bytes on the wire are under the limit, but decode to 120: 1009.
    events = server.receive_data(Frame(Opcode.BINARY, b"x" * 60, rsv=RSV1).serialize(KEY))
    (event,) = events
    assert isinstance(event, Failure) and isinstance(event.error, MessageTooBig)
    assert server.data_to_send() == [b"\x88\x02\x03\xf1"]


def test_round_trip_many_messages_through_the_extension() -> None:
    client, server, _, _ = pair(max_fragment_size=7)
    messages: list[str | bytes] = ["", "a", "é" * 50, b"", b"\x00" * 100, "end"]
    wire = b""
    for m in messages:
        if isinstance(m, str):
            wire += b"".join(client.encode_data(Opcode.TEXT, m.encode()))
        else:
            wire += b"".join(client.encode_data(Opcode.BINARY, m))
    got: list[str | bytes] = []
    for i in range(0, len(wire), 5):
        for e in server.receive_data(wire[i : i + 5]):
            got.append(e.text if isinstance(e, TextMessage) else bytes(e))  # type: ignore[call-overload]
    assert got == messages
