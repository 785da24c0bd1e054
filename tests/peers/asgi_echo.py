"""A tiny ASGI echo app, served by hypercorn for blockws's tests.

Test peer for blockws; the same echo as ws_echo_server.py, as far as ASGI allows. Usage::

    cd tests/peers && python -m hypercorn -w 0 -b 127.0.0.1:PORT asgi_echo:app

hypercorn's WebSocket is wsproto's, which always offers permessage-deflate with its defaults
(no ASGI or hypercorn setting changes them). Echoes text as text and binary as binary, except
these text commands:

``!close [CODE [REASON]]``
    close the connection with that code (default 1000) and reason.
``!headers``
    reply a JSON text ``{"headers": {name: value}, "path": PATH}`` of the handshake request
    (PATH with its query string); names are lower-cased, repeated headers joined with ", ".
``!subprotocol``
    reply the negotiated subprotocol, or an empty string.
``!http_version``
    reply ``scope["http_version"]``: ``"1.1"``, or ``"2"`` for WebSocket over HTTP/2.
``!stats``, ``!ping``
    reply ``error: unsupported: ...``: ASGI shows neither frames nor pings to the app.

Subprotocols ``chat`` and ``superchat`` are accepted when offered (the first of them in the
client's order wins). Any plain HTTP request gets 404.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, Callable

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SUBPROTOCOLS = ("chat", "superchat")


def _headers(scope: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _close_args(rest: str) -> tuple[int, str] | str:
    """``(code, reason)`` for ``!close``, or an error text."""
    code_text, _, reason = rest.partition(" ")
    try:
        code = int(code_text) if code_text else 1000
    except ValueError:
        return f"error: invalid close code {code_text!r}"
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011)
            or 3000 <= code <= 4999):
        return f"error: invalid close code {code}"
    if len(reason.encode("utf-8")) > 123:
        return "error: close reason longer than 123 bytes"
    return code, reason


async def _command(scope: Message, send: Send, text: str, subprotocol: str | None) -> bool:
    """Run a text command; return False if the text is not a command (so it is echoed)."""
    name, _, rest = text.partition(" ")
    reply: str
    if name == "!close":
        args = _close_args(rest)
        if isinstance(args, tuple):
            await send({"type": "websocket.close", "code": args[0], "reason": args[1]})
            return True
        reply = args
    elif name == "!headers":
        path = scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        reply = json.dumps({"headers": _headers(scope), "path": path})
    elif name == "!subprotocol":
        reply = subprotocol or ""
    elif name == "!http_version":
        reply = str(scope.get("http_version", ""))
    elif name in ("!stats", "!ping"):
        reply = f"error: unsupported: {name} (ASGI hides frames and pings)"
    else:
        return False
    await send({"type": "websocket.send", "text": reply})
    return True


async def _websocket(scope: Message, receive: Receive, send: Send) -> None:
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    subprotocol = next((p for p in scope.get("subprotocols", ()) if p in SUBPROTOCOLS), None)
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        text = event.get("text")
        if text is not None:
            if text.startswith("!") and await _command(scope, send, text, subprotocol):
                continue
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": event.get("bytes") or b""})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _not_found(send: Send) -> None:
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"WebSocket only\n"})


async def app(scope: Message, receive: Receive, send: Send) -> None:
    """The ASGI 3 application."""
    kind = scope["type"]
    if kind == "websocket":
        await _websocket(scope, receive, send)
    elif kind == "lifespan":
        await _lifespan(receive, send)
    else:
        await _not_found(send)
