"""A small ASGI WebSocket echo app for hypercorn, for blockws's HTTP/2 (RFC 8441) tests.

Test peer for blockws. Usage (TLS with ALPN h2, plus h2c with prior knowledge)::

    cd tests/peers && python -m hypercorn -w 0 --certfile cert.pem --keyfile key.pem \\
        -b 127.0.0.1:TLSPORT --insecure-bind 127.0.0.1:CLEARPORT h2_asgi_app:app

Echoes text as text and binary as binary, except these text commands:

``!version``
    reply ``scope["http_version"]``: ``"2"`` when the WebSocket came over HTTP/2 (RFC 8441),
    ``"1.1"`` for an HTTP/1.1 upgrade.
``!close [CODE [REASON]]``
    close with that code (default 1000) and reason.
``!headers``
    reply a JSON text ``{"headers": {name: value}, "path": PATH}`` of the handshake request;
    names are lower-cased, repeated headers joined with ", ".

A WebSocket to the path ``/h1-only`` is refused (HTTP 403) when it comes over HTTP/2, and
accepted over HTTP/1.1: an RFC 8441 server that refuses the extended CONNECT. A WebSocket to
``/redirect`` gets HTTP 302 with ``Location: /redirected`` (over either version). A WebSocket to
``/slow`` is accepted after 3 seconds. Any plain HTTP request gets 404. hypercorn's WebSocket
is wsproto's, which accepts permessage-deflate when the client offers it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, Callable

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _headers(scope: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def _command(scope: Message, send: Send, text: str) -> bool:
    """Run a text command; False if ``text`` is not one (then it is echoed)."""
    name, _, rest = text.partition(" ")
    if name == "!version":
        reply = str(scope.get("http_version", ""))
    elif name == "!close":
        code_text, _, reason = rest.partition(" ")
        code = int(code_text) if code_text else 1000
        await send({"type": "websocket.close", "code": code, "reason": reason})
        return True
    elif name == "!headers":
        reply = json.dumps({"headers": _headers(scope), "path": scope["path"]})
    else:
        return False
    await send({"type": "websocket.send", "text": reply})
    return True


async def _websocket(scope: Message, receive: Receive, send: Send) -> None:
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    if scope["path"] == "/h1-only" and scope.get("http_version") == "2":
        await send({"type": "websocket.close", "code": 1000})  # before accept: HTTP 403
        return
    if scope["path"] == "/redirect":
        # The ASGI "websocket.http.response" extension: an HTTP answer instead of accepting.
        await send({"type": "websocket.http.response.start", "status": 302,
                    "headers": [(b"location", b"/redirected"), (b"content-length", b"0")]})
        await send({"type": "websocket.http.response.body", "body": b""})
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(3.0)
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        text = event.get("text")
        if text is not None:
            if not (text.startswith("!") and await _command(scope, send, text)):
                await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": event.get("bytes") or b""})


async def app(scope: Message, receive: Receive, send: Send) -> None:
    """The ASGI 3 application."""
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"WebSocket only\n"})
