"""Options are checked when the socket is made, before any I/O (README "Options"):
a wrong type raises ``TypeError`` and a value out of range ``ValueError``, naming the
option; unknown keywords are refused; headers come as a mapping, pairs or ``Headers``."""

from __future__ import annotations

import re
import ssl
from typing import Any

import pytest

import blockws
from blockws.handshake import Headers
from blockws.http2 import HTTP2Settings
from blockws.options import Options

pytestmark = pytest.mark.unit

URL = "ws://127.0.0.1:9/"

WRONG_TYPES: list[tuple[str, Any]] = [
    ("subprotocols", "chat"),
    ("subprotocols", [1]),
    ("extensions", [object()]),
    ("max_fragment_size", "1"),
    ("max_message_size", 1.5),
    ("max_message_size", True),
    ("headers", "X: y"),
    ("headers", b"X: y"),
    ("headers", 5),
    ("headers", [("X", "y", "z")]),
    ("headers", ["X: y"]),
    ("headers", [("X", 1)]),
    ("headers", {"X": None}),
    ("origin", 5),
    ("server_hostname", b"host"),
    ("ssl_context", "default"),
    ("open_timeout", "10"),
    ("close_timeout", [5]),
    ("send_pings", 1),
    ("ping_frequency", "1"),
    ("close_after_no_message", None),
    ("buffer_pool", bytearray(10)),
    ("http2", "h2"),
    ("on_open", "not callable"),
    ("on_message", 5),
    ("on_binary", object()),
    ("on_closed", "x"),
    ("on_internal_request_created", 1),
    ("context", [("player", "p1")]),
]

OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("max_fragment_size", 0),
    ("max_message_size", 0),
    ("max_message_size", -1),
    ("open_timeout", 0),
    ("open_timeout", -1.0),
    ("close_timeout", 0.0),
    ("ping_frequency", 0.05),
    ("close_after_no_message", 0),
]


def _ids(cases: list[tuple[str, Any]]) -> list[str]:
    # No object addresses in the ids: pytest-xdist's workers must collect the same names.
    return [re.sub(r" at 0x[0-9a-f]+", "", f"{name}={value!r}") for name, value in cases]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES, ids=_ids(WRONG_TYPES))
def test_wrong_type_raises_type_error_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(TypeError) as info:
        blockws.WebSocket(URL, **{name: value})
    # "header names and values must be str" names the option in the singular.
    assert (name if name != "headers" else "header") in str(info.value), str(info.value)


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE, ids=_ids(OUT_OF_RANGE))
def test_out_of_range_raises_value_error_naming_the_option(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        blockws.WebSocket(URL, **{name: value})


def test_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="timout"):
        blockws.WebSocket(URL, timout=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unknown option 'timout'"):
        Options.build(timout=5)


def test_none_means_the_default_or_no_limit() -> None:
    options = Options.build(
        subprotocols=None, extensions=None, max_message_size=None, headers=None,
        open_timeout=None, close_timeout=None, buffer_pool=None, http2=None,
    )
    assert options.subprotocols == ()
    assert [type(e) for e in options.extensions] == [blockws.PerMessageDeflate]
    assert options.max_message_size is None
    assert options.headers == ()
    assert (options.open_timeout, options.close_timeout) == (None, None)
    assert options.buffer_pool is blockws.BufferPool.default
    assert options.http2 == HTTP2Settings()


def test_numbers_are_normalized() -> None:
    options = Options.build(open_timeout=5, close_timeout=2, ping_frequency=1,
                            close_after_no_message=3)
    assert (options.open_timeout, options.close_timeout) == (5.0, 2.0)
    assert type(options.open_timeout) is float and type(options.ping_frequency) is float
    assert options.close_after_no_message == 3.0


@pytest.mark.parametrize("value", [True, False, HTTP2Settings(cleartext=True)])
def test_http2_takes_a_bool_or_settings(value: Any) -> None:
    expected = (HTTP2Settings() if value is True else HTTP2Settings(enabled=False)
                if value is False else value)
    assert Options.build(http2=value).http2 == expected


def test_headers_as_mapping_pairs_or_headers_keep_repeated_names() -> None:
    repeated = Headers([("X-Tag", "a"), ("X-Tag", "b"), ("Authorization", "Bearer t")])
    assert Options.build(headers=repeated).headers == (
        ("X-Tag", "a"), ("X-Tag", "b"), ("Authorization", "Bearer t"))
    assert Options.build(headers={"X-One": "1"}).headers == (("X-One", "1"),)
    assert Options.build(headers=[("X-Two", "2")]).headers == (("X-Two", "2"),)
    ws = blockws.WebSocket(URL, headers=repeated)
    assert ws.internal_request.headers.get_all("x-tag") == ["a", "b"]


def test_origin_hostname_and_context_are_kept() -> None:
    ctx = ssl.create_default_context()
    options = Options.build(origin="https://game.example", server_hostname="example.com",
                            ssl_context=ctx)
    assert (options.origin, options.server_hostname, options.ssl_context) == (
        "https://game.example", "example.com", ctx)


def test_with_values_checks_what_changes() -> None:
    options = Options.build(max_fragment_size=100)
    changed = options.with_values(max_fragment_size=200, open_timeout=3)
    assert (changed.max_fragment_size, changed.open_timeout) == (200, 3.0)
    assert options.max_fragment_size == 100  # frozen: a copy
    with pytest.raises(ValueError, match="max_fragment_size"):
        options.with_values(max_fragment_size=0)
    with pytest.raises(TypeError, match="unknown option"):
        options.with_values(nonsense=1)
