"""blockws.log: the documented format recipe works for every record; log levels."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

import blockws
from blockws.http2 import HTTP2Settings
from blockws.log import NO_CONTEXT, ContextAdapter, ContextFilter


@pytest.fixture
def recipe_stream() -> Iterator[io.StringIO]:
    """The recipe of blockws/log.py's docstring, on a fresh root logger, into a string."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    logging.basicConfig(
        handlers=[handler], format="%(ws_context)s %(message)s", level=logging.DEBUG
    )
    try:
        yield stream
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


@pytest.mark.unit
def test_recipe_formats_records_of_other_loggers(recipe_stream: io.StringIO) -> None:
    logging.getLogger("someone.else").warning("not a socket")
    ContextAdapter({"id": 7, "url": "ws://h/"}).debug("a socket")
    logging.getLogger("blockws").info("blockws, no socket")
    lines = recipe_stream.getvalue().splitlines()
    assert lines == [
        f"{NO_CONTEXT} not a socket",
        "{'id': 7, 'url': 'ws://h/'} a socket",
        f"{NO_CONTEXT} blockws, no socket",
    ]


@pytest.mark.unit
def test_filter_keeps_every_record_and_leaves_a_context_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert ContextFilter().filter(record) is True
    assert record.ws_context == NO_CONTEXT
    record.ws_context = {"id": 1}
    assert ContextFilter().filter(record) is True
    assert record.ws_context == {"id": 1}


@pytest.mark.timeout(30)
def test_fallback_to_http11_is_debug_and_a_normal_session_logs_nothing_above(
    websockets_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """h2c against an HTTP/1.1-only server: the fallback is ordinary, so DEBUG, not INFO."""
    caplog.set_level(logging.DEBUG, logger="blockws")
    with blockws.connect(websockets_server, timeout=10, http2=HTTP2Settings(cleartext=True)) as ws:
        ws.send("hi")
        assert ws.receive(timeout=10) == "hi"
        assert ws.http_version == "1.1"
    fallback = [r for r in caplog.records if "falling back to HTTP/1.1" in r.getMessage()]
    assert len(fallback) == 1
    assert fallback[0].levelno == logging.DEBUG
    assert fallback[0].ws_context["id"] == ws.id  # type: ignore[attr-defined]
    loud = [r for r in caplog.records if r.name.startswith("blockws") and r.levelno >= logging.INFO]
    assert loud == []
