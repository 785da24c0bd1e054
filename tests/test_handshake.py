"""The opening handshake, sans-I/O: request bytes, response parsing and validation."""

from __future__ import annotations

import base64
import sys

import pytest

import blockws
from blockws.exceptions import (
    HandshakeError,
    HeadersTooLarge,
    InvalidHeader,
    InvalidStatus,
    InvalidURL,
    NegotiationError,
)
from blockws.handshake import (
    DEFAULT_USER_AGENT,
    WSURL,
    Headers,
    Request,
    Response,
    ResponseReader,
    accept_key,
    build_request,
    new_key,
    parse_url,
    redact_url,
    validate_response,
)

pytestmark = pytest.mark.unit

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
# RFC 6455 sections 1.3 and 4.2.2.
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_key_rfc_example() -> None:
    assert accept_key(KEY) == ACCEPT


def test_new_key_is_16_random_bytes_base64() -> None:
    keys = {new_key() for _ in range(10)}
    assert len(keys) == 10
    for key in keys:
        assert len(base64.b64decode(key, validate=True)) == 16


# -- build_request ----------------------------------------------------------------------


def head(resource: str, host: str, *extra: str) -> bytes:
    lines = [
        f"GET {resource} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_build_request_exact_bytes() -> None:
    assert build_request(Request("ws://example.com/chat"), KEY) == (
        b"GET /chat HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    "url, resource, host",
    [
        ("ws://example.com", "/", "example.com"),
        ("ws://example.com:80/", "/", "example.com"),
        ("ws://example.com:8080/", "/", "example.com:8080"),
        ("ws://example.com:443/", "/", "example.com:443"),
        ("wss://example.com/", "/", "example.com"),
        ("wss://example.com:443/", "/", "example.com"),
        ("wss://example.com:80/", "/", "example.com:80"),
        ("wss://example.com:8443/x", "/x", "example.com:8443"),
        ("ws://EXAMPLE.com/", "/", "example.com"),
        ("ws://127.0.0.1:9001/", "/", "127.0.0.1:9001"),
        ("ws://[::1]/", "/", "[::1]"),
        ("ws://[::1]:9000/", "/", "[::1]:9000"),
        ("wss://[2001:db8::1]:443/p", "/p", "[2001:db8::1]"),
        ("ws://h/path/to?a=1&b=two", "/path/to?a=1&b=two", "h"),
        ("ws://h?x", "/?x", "h"),
        ("ws://h/p?", "/p", "h"),
        ("ws://h/a%20b?q=%2F", "/a%20b?q=%2F", "h"),
    ],
)
def test_build_request_host_and_resource(url: str, resource: str, host: str) -> None:
    assert build_request(Request(url), KEY) == head(resource, host)


def test_build_request_subprotocols_origin_and_user_headers() -> None:
    request = Request("ws://example.com/chat", subprotocols=["chat", "superchat"])
    request.origin = "http://example.com"
    request.headers["X-Token"] = "abc"
    request.headers.add("X-Multi", "1")
    request.headers.add("x-multi", "2")
    assert build_request(request, KEY) == head(
        "/chat",
        "example.com",
        "Sec-WebSocket-Protocol: chat, superchat",
        "Origin: http://example.com",
        "X-Token: abc",
        "X-Multi: 1",
        "x-multi: 2",
    )


def test_user_origin_header_wins_over_origin_field() -> None:
    request = Request("ws://h/", origin="http://a")
    request.headers["origin"] = "http://b"
    assert build_request(request, KEY) == head("/", "h", "origin: http://b")


def test_userinfo_becomes_basic_authorization() -> None:
    expected = "Authorization: Basic " + base64.b64encode(b"user:secret").decode()
    assert build_request(Request("ws://user:secret@h/"), KEY) == head("/", "h", expected)
    no_password = "Authorization: Basic " + base64.b64encode(b"user:").decode()
    assert build_request(Request("ws://user@h/"), KEY) == head("/", "h", no_password)
    encoded = "Authorization: Basic " + base64.b64encode("us@er:p:ss/é".encode()).decode()
    assert build_request(Request("ws://us%40er:p%3Ass%2F%C3%A9@h/"), KEY) == head("/", "h", encoded)
    explicit = Request("ws://user:secret@h/")
    explicit.headers["Authorization"] = "Bearer t"
    assert build_request(explicit, KEY) == head("/", "h", "Authorization: Bearer t")


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "upgrade",
        "CONNECTION",
        "Sec-WebSocket-Key",
        "sec-websocket-version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Content-Length",
        "Transfer-Encoding",
    ],
)
def test_reserved_headers_are_rejected(name: str) -> None:
    request = Request("ws://h/")
    request.headers[name] = "x"
    with pytest.raises(ValueError, match="cannot be overridden"):
        build_request(request, KEY)


def test_build_request_rejects_a_bad_url() -> None:
    with pytest.raises(InvalidURL):
        build_request(Request("http://h/"), KEY)


# -- Headers --------------------------------------------------------------------------------


def test_headers_case_insensitive() -> None:
    h = Headers({"Content-Type": "text/plain"})
    assert h["content-type"] == h["CONTENT-TYPE"] == "text/plain"
    assert "cOnTeNt-TyPe" in h
    assert "Other" not in h
    assert 42 not in h
    assert h.get("missing") is None
    with pytest.raises(KeyError):
        h["missing"]


def test_headers_multiple_values() -> None:
    h = Headers([("Set-Cookie", "a=1"), ("X", "x"), ("set-cookie", "b=2")])
    assert h["SET-COOKIE"] == "a=1"  # the first one
    assert h.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert h.get_all("nope") == []
    assert len(h) == 2
    assert list(h) == ["Set-Cookie", "X"]
    assert h.raw_items() == [("Set-Cookie", "a=1"), ("X", "x"), ("set-cookie", "b=2")]
    h.add("x", "y")
    assert h.get_all("X") == ["x", "y"]


def test_headers_set_replaces_every_value_and_del_removes_all() -> None:
    h = Headers([("A", "1"), ("a", "2"), ("B", "3")])
    h["A"] = "new"
    assert h.get_all("a") == ["new"]
    assert h.raw_items() == [("B", "3"), ("A", "new")]
    del h["b"]
    assert "B" not in h
    del h["absent"]  # deleting a missing name is a no-op
    assert h.raw_items() == [("A", "new")]


def test_headers_copy_keeps_repeated_values() -> None:
    # Regression: Headers(headers) went through Mapping.items() and kept only
    # the first value of each name.
    h = Headers([("Cookie", "a=1"), ("cookie", "b=2")])
    copy = Headers(h)
    assert copy.raw_items() == h.raw_items()
    copy.add("Cookie", "c=3")
    assert len(h.get_all("cookie")) == 2  # an independent copy


@pytest.mark.parametrize("name", ["", "Bad Name", "Colon:", "Tab\t", "CR\r", "LF\n"])
def test_headers_reject_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        Headers().add(name, "v")


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nb", "a\rb"])
def test_headers_reject_line_breaks_in_values(value: str) -> None:
    with pytest.raises(ValueError):
        Headers()["X"] = value


def test_headers_redacted_hides_credentials() -> None:
    h = Headers(
        [
            ("Authorization", "Bearer secret-token"),
            ("cookie", "session=secret-cookie"),
            ("Proxy-Authorization", "Basic secret-proxy"),
            ("Set-Cookie", "secret-set"),
            ("X-Visible", "shown"),
        ]
    )
    assert h.redacted() == [
        ("Authorization", "<redacted>"),
        ("cookie", "<redacted>"),
        ("Proxy-Authorization", "<redacted>"),
        ("Set-Cookie", "<redacted>"),
        ("X-Visible", "shown"),
    ]
    assert "secret" not in repr(h)
    assert "shown" in repr(h)
    assert h["Authorization"] == "Bearer secret-token"  # only the display is redacted


# -- parse_url ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("ws://h", WSURL(False, "h", 80, "/")),
        ("wss://h", WSURL(True, "h", 443, "/")),
        ("WS://H:1234/a?b=c", WSURL(False, "h", 1234, "/a?b=c")),
        ("wss://[::1]:8443/", WSURL(True, "::1", 8443, "/")),
        ("ws://u:p@h/", WSURL(False, "h", 80, "/", "u", "p")),
    ],
)
def test_parse_url_accepts(url: str, expected: WSURL) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://h/",
        "https://h/",
        "ftp://h/",
        "h/path",
        "",
        "ws://",
        "ws:///path",
        "wss://:443/",
        "ws://h/#frag",
        "ws://h/path#",
        "ws://h:notaport/",
        "ws://h:99999/",
        "ws://[::1/",
    ],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(InvalidURL):
        parse_url(url)
    with pytest.raises(ValueError):  # InvalidURL is a ValueError
        parse_url(url)


def test_parse_url_rejects_non_str() -> None:
    with pytest.raises(InvalidURL):
        parse_url(b"ws://h/")  # type: ignore[arg-type]


def test_wsurl_authority_and_origin_key() -> None:
    assert parse_url("wss://Example.com:443/").authority == "example.com"
    assert parse_url("ws://[::1]:80/").authority == "[::1]"
    assert parse_url("ws://h:81/").origin_key == ("ws", "h", 81)


def test_redact_url() -> None:
    assert redact_url("wss://user:hunter2@h/p") == "wss://user:<redacted>@h/p"
    assert redact_url("wss://s3cr3t-token@h/p") == "wss://<redacted>@h/p"
    assert redact_url("wss://user:@h:8443/p?q=1") == "wss://user:<redacted>@h:8443/p?q=1"
    # A user part alone is often a token (issue 11, item 7): redacted too.
    assert redact_url("wss://TOKEN@h/p") == "wss://<redacted>@h/p"
    assert redact_url("wss://u:p@ss@h/p?q=a@b") == "wss://u:<redacted>@h/p?q=a@b"
    assert redact_url("wss://u:pw@[::1:443/") == "wss://u:<redacted>@[::1:443/"  # unparseable
    assert redact_url("ws://h/") == "ws://h/"
    assert redact_url("ws://h/a@b") == "ws://h/a@b"


def test_request_parsed_url() -> None:
    assert Request("ws://h:1/x").parsed_url == WSURL(False, "h", 1, "/x")


# -- ResponseReader ----------------------------------------------------------------------------

GOOD_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"\r\n"
)


def test_reader_whole_response() -> None:
    response = ResponseReader().feed(GOOD_HEAD)
    assert response is not None
    assert (response.status, response.reason) == (101, "Switching Protocols")
    assert response.headers.raw_items() == [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", ACCEPT),
    ]
    assert response.extra == b""


def test_reader_byte_by_byte() -> None:
    reader = ResponseReader()
    for i in range(len(GOOD_HEAD) - 1):
        assert reader.feed(GOOD_HEAD[i : i + 1]) is None, i
    response = reader.feed(GOOD_HEAD[-1:])
    assert response is not None and response.status == 101
    assert response.headers["sec-websocket-accept"] == ACCEPT


def test_reader_keeps_the_bytes_after_the_head() -> None:
    frames = b"\x81\x05Hello\x82\x00"
    response = ResponseReader().feed(GOOD_HEAD + frames)
    assert response is not None and response.extra == frames
    # The same in two reads, cut inside the blank line.
    reader = ResponseReader()
    assert reader.feed(GOOD_HEAD[:-1]) is None
    response = reader.feed(GOOD_HEAD[-1:] + frames)
    assert response is not None and response.extra == frames


def test_reader_bounded_without_terminator() -> None:
    reader = ResponseReader(limit=100)
    assert reader.feed(b"HTTP/1.1 101 OK\r\n" + b"X: " + b"a" * 70) is None
    with pytest.raises(HeadersTooLarge):
        reader.feed(b"a" * 20)


def test_reader_bounded_byte_by_byte() -> None:
    reader = ResponseReader(limit=64)
    data = b"HTTP/1.1 101 OK\r\nX: " + b"a" * 100
    # A 64-byte head may still end in the next 3 bytes' "\r\n\r\n" (up to 67 bytes).
    for i in range(67):
        assert reader.feed(data[i : i + 1]) is None
    with pytest.raises(HeadersTooLarge):  # as soon as no head within the bound can come
        reader.feed(data[67:68])


def test_reader_bound_does_not_depend_on_how_the_head_is_cut() -> None:
    """Found by benchmarks/fuzz (target handshake): a head of exactly ``limit`` bytes
    passed in one read but failed HeadersTooLarge when a read ended inside its blank line
    (the 3 bytes "\r\n\r" pushed the buffer past the limit before the terminator came)."""
    head = b"HTTP/1.1 101 OK\r\nX: " + b"a" * 80
    assert len(head) == 100
    assert ResponseReader(limit=100).feed(head + b"\r\n\r\n") is not None
    for cut in range(1, 4):
        reader = ResponseReader(limit=100)
        assert reader.feed(head + b"\r\n\r\n"[:cut]) is None
        response = reader.feed(b"\r\n\r\n"[cut:] + b"\x81\x00")
        assert response is not None and response.extra == b"\x81\x00"
    with pytest.raises(HeadersTooLarge):  # one byte more: too large either way
        ResponseReader(limit=100).feed(head + b"a\r\n\r\n")
    reader = ResponseReader(limit=100)
    assert reader.feed(head + b"a\r\n") is None
    with pytest.raises(HeadersTooLarge):
        reader.feed(b"\r\n")


def test_reader_bounded_with_terminator() -> None:
    head = b"HTTP/1.1 101 OK\r\nX: " + b"a" * 200 + b"\r\n\r\n"
    with pytest.raises(HeadersTooLarge):
        ResponseReader(limit=100).feed(head)
    assert ResponseReader(limit=len(head)).feed(head) is not None
    assert issubclass(HeadersTooLarge, InvalidHeader)


@pytest.mark.parametrize("status", ["\u00b901", "1\u00b20", "10\u00b3"])
def test_status_with_superscript_digits_is_an_invalid_header(status: str) -> None:
    """Found by benchmarks/fuzz (target handshake): "¹01" passes str.isdigit() but not int(),
    so a status line with a Latin-1 superscript digit raised a bare ValueError."""
    head = f"HTTP/1.1 {status} OK\r\n\r\n".encode("latin-1")
    with pytest.raises(InvalidHeader, match="malformed status line"):
        ResponseReader().feed(head)


def test_default_limit_accepts_a_large_head() -> None:
    big = b"HTTP/1.1 101 OK\r\n" + b"X-Pad: " + b"p" * 60000 + b"\r\n\r\n"
    response = ResponseReader().feed(big)
    assert response is not None and len(response.headers["x-pad"]) == 60000


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 101 OK\r\n\r\n",
        b"HTTP/1.1 1O1 OK\r\n\r\n",
        b"HTTP/1.1 1011 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nNoColon\r\n\r\n",
        b"HTTP/1.1 101 OK\r\n: empty name\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nSpace : before colon\r\n\r\n",
        b"HTTP/1.1 101 OK\r\n folded: line\r\n\r\n",
        b"HTTP/1.1 101 OK\r\nBad Name: x\r\n\r\n",
    ],
)
def test_reader_rejects_malformed_heads(head: bytes) -> None:
    with pytest.raises(InvalidHeader):
        ResponseReader().feed(head)


def test_reader_status_line_variants() -> None:
    response = ResponseReader().feed(b"HTTP/1.0 404\r\n\r\n")
    assert response is not None and (response.status, response.reason) == (404, "")
    response = ResponseReader().feed(b"HTTP/1.1 101 Switching  Protocols \r\nA:b\r\n\r\n")
    assert response is not None and response.reason == "Switching  Protocols "
    assert response.headers["a"] == "b"


# -- validate_response -------------------------------------------------------------------------


def response(*pairs: tuple[str, str], status: int = 101, extra: bytes = b"") -> Response:
    return Response(status, "Reason", Headers(pairs), extra)


GOOD = (
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Accept", ACCEPT),
)


def without(name: str) -> tuple[tuple[str, str], ...]:
    return tuple(p for p in GOOD if p[0] != name)


def test_validate_valid_response() -> None:
    assert validate_response(response(*GOOD), KEY, [], []) == (None, [])


def test_validate_tolerates_case_and_token_lists() -> None:
    r = response(
        ("upgrade", "WebSocket"),
        ("CONNECTION", "keep-alive, UPGRADE"),
        ("sec-websocket-accept", " " + ACCEPT + " "),
    )
    assert validate_response(r, KEY, [], []) == (None, [])


def test_validate_subprotocol() -> None:
    r = response(*GOOD, ("Sec-WebSocket-Protocol", "superchat"))
    assert validate_response(r, KEY, ["chat", "superchat"], []) == ("superchat", [])


@pytest.mark.parametrize("status", [200, 204, 301, 302, 400, 401, 403, 404, 500, 503])
def test_invalid_status(status: int) -> None:
    r = response(*GOOD, status=status, extra=b"body" * 1000)
    with pytest.raises(InvalidStatus) as info:
        validate_response(r, KEY, [], [])
    assert info.value.status == status
    assert info.value.reason == "Reason"
    assert info.value.body == (b"body" * 1000)[:1024]
    assert f"HTTP {status} Reason" in str(info.value)
    assert isinstance(info.value, HandshakeError)


@pytest.mark.parametrize(
    "pairs, match",
    [
        (without("Upgrade"), "Upgrade"),
        ((*without("Upgrade"), ("Upgrade", "h2c")), "Upgrade"),
        ((*without("Upgrade"), ("Upgrade", "websockets")), "Upgrade"),
        (without("Connection"), "Connection"),
        ((*without("Connection"), ("Connection", "keep-alive")), "Connection"),
        ((*without("Connection"), ("Connection", "close")), "Connection"),
        (without("Sec-WebSocket-Accept"), "missing"),
        ((*without("Sec-WebSocket-Accept"), ("Sec-WebSocket-Accept", "wrong=")), "match"),
        ((*without("Sec-WebSocket-Accept"), ("Sec-WebSocket-Accept", "")), "match"),
        ((*GOOD, ("Sec-WebSocket-Accept", ACCEPT)), "repeated"),
    ],
)
def test_invalid_headers(pairs: tuple[tuple[str, str], ...], match: str) -> None:
    with pytest.raises(InvalidHeader, match=match):
        validate_response(response(*pairs), KEY, [], [])


def test_accept_for_another_key_is_rejected() -> None:
    r = response(*without("Sec-WebSocket-Accept"), ("Sec-WebSocket-Accept", accept_key("other")))
    with pytest.raises(InvalidHeader, match="match"):
        validate_response(r, KEY, [], [])


@pytest.mark.parametrize(
    "extra, offered",
    [
        ((("Sec-WebSocket-Protocol", "chat"),), []),
        ((("Sec-WebSocket-Protocol", "other"),), ["chat"]),
        ((("Sec-WebSocket-Protocol", "chat, superchat"),), ["chat", "superchat"]),
        (
            (("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Protocol", "superchat")),
            ["chat", "superchat"],
        ),
        ((("Sec-WebSocket-Extensions", "permessage-deflate"),), ["chat"]),
    ],
)
def test_negotiation_errors(extra: tuple[tuple[str, str], ...], offered: list[str]) -> None:
    with pytest.raises(NegotiationError):
        validate_response(response(*GOOD, *extra), KEY, offered, [])


def test_subprotocol_is_case_sensitive() -> None:
    r = response(*GOOD, ("Sec-WebSocket-Protocol", "Chat"))
    with pytest.raises(NegotiationError):
        validate_response(r, KEY, ["chat"], [])


# -- User-Agent ---------------------------------------------------------------------------


def test_user_agent_is_sent_unless_the_headers_have_one() -> None:
    agent = "blockws/1.2.3 Python/3.11"
    assert build_request(Request("ws://h/", user_agent=agent), KEY) == head(
        "/", "h", f"User-Agent: {agent}"
    )
    assert build_request(Request("ws://h/", user_agent=None), KEY) == head("/", "h")
    own = Request("ws://h/", user_agent=agent)
    own.headers["user-agent"] = "game/2"
    assert build_request(own, KEY) == head("/", "h", "user-agent: game/2")


def test_default_user_agent_names_blockws_and_python() -> None:
    major, minor = sys.version_info[:2]
    assert DEFAULT_USER_AGENT == f"blockws/{blockws.__version__} Python/{major}.{minor}"
    assert blockws.WebSocket("ws://h/").internal_request.user_agent == DEFAULT_USER_AGENT
    assert blockws.WebSocket("ws://h/", user_agent=None).internal_request.user_agent is None
    assert blockws.WebSocket("ws://h/", user_agent="x/1").internal_request.user_agent == "x/1"


@pytest.mark.parametrize("value, error", [(b"x", TypeError), (3, TypeError),
                                          ("a\r\nb: c", ValueError)])
def test_user_agent_option_is_checked(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="user_agent"):
        blockws.WebSocket("ws://h/", user_agent=value)  # type: ignore[arg-type]
