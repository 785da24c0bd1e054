"""Echo server built on the ``websockets`` package (asyncio API, websockets>=13).

Test peer for blockws. Usage::

    python tests/peers/ws_echo_server.py --port PORT [--deflate]
        [--server-no-context-takeover] [--client-no-context-takeover]
        [--server-max-window-bits N] [--client-max-window-bits N] [--deflate-no-defaults]
        [--certfile cert.pem --keyfile key.pem]

``--deflate`` enables websockets' default permessage-deflate (it answers
``server_max_window_bits=12; client_max_window_bits=12``). The four parameter flags, and
``--deflate-no-defaults``, configure ``ServerPerMessageDeflateFactory`` with exactly those
parameters instead (unset ones: no limit, context takeover allowed), and imply deflate. The
server may then impose them on a client that did not ask (RFC 7692 section 7.1).

Binds 127.0.0.1 only. Echoes text as text and binary as binary, except these text commands:

``!stats``
    reply a JSON text ``{"frames": N, "messages": M}``: the data frames (text, binary and
    continuation) and the messages this connection received before the command message.
``!close [CODE [REASON]]``
    close the connection with that code (default 1000) and reason.
``!ping``
    send a ping whose payload is ``b"srv"``; nothing is echoed.
``!headers``
    reply a JSON text ``{"headers": {name: value}, "path": PATH}`` of the handshake request;
    names are lower-cased, repeated headers are joined with ", ".
``!subprotocol``
    reply the negotiated subprotocol, or an empty string.

Subprotocols ``chat`` and ``superchat`` are accepted when offered (the first of them in the
client's order wins); a client offering neither still connects, without a subprotocol.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import weakref
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ProtocolError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request

SUBPROTOCOLS = ("chat", "superchat")
DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


class FrameStats:
    """Counts incoming data frames and, for each message, what came before it."""

    def __init__(self) -> None:
        self.frames = 0
        self.messages = 0
        self._message_start = 0
        # One (frames, messages) snapshot per complete message, taken at its first frame:
        # the handler pops one per message it reads, so pipelined frames can't skew !stats.
        self.before_message: collections.deque[tuple[int, int]] = collections.deque()

    def count(self, frame: Frame) -> None:
        if frame.opcode not in DATA_OPCODES:
            return
        if frame.opcode is not Opcode.CONT:
            self._message_start = self.frames
        self.frames += 1
        if frame.fin:
            self.before_message.append((self._message_start, self.messages))
            self.messages += 1


STATS: weakref.WeakKeyDictionary[ServerConnection, FrameStats] = weakref.WeakKeyDictionary()


def process_request(connection: ServerConnection, request: Request) -> None:
    # Runs during the opening handshake, before the response is sent, so no frame can be
    # parsed before the hook is in place. Protocol.parse() looks up self.recv_frame for every
    # frame, so wrapping it on the instance sees every frame (after decompression).
    stats = FrameStats()
    STATS[connection] = stats
    protocol = connection.protocol
    original: Callable[[Frame], None] = protocol.recv_frame

    def recv_frame(frame: Frame) -> None:
        stats.count(frame)
        original(frame)

    protocol.recv_frame = recv_frame  # type: ignore[method-assign]


def select_subprotocol(connection: ServerConnection, offered: Any) -> str | None:
    for subprotocol in offered:
        if subprotocol in SUBPROTOCOLS:
            return str(subprotocol)
    return None


async def send_ping(connection: ServerConnection) -> None:
    # websockets refuses a second ping with the same payload while the first awaits its pong;
    # forget the older one so that "!ping" always sends a ping.
    for name in ("pending_pings", "pong_waiters"):  # websockets >= 14, 13
        pending = getattr(connection, name, None)
        if isinstance(pending, dict):
            pending.pop(b"srv", None)
    await connection.ping(b"srv")


async def handle_command(connection: ServerConnection, command: str, snapshot: tuple[int, int]
                         ) -> bool:
    """Run a text command; return False if the text is not a command (so it is echoed)."""
    name, _, rest = command.partition(" ")
    if name == "!stats":
        frames, messages = snapshot
        await connection.send(json.dumps({"frames": frames, "messages": messages}))
    elif name == "!close":
        code_text, _, reason = rest.partition(" ")
        try:
            code = int(code_text) if code_text else 1000
            Close(code, reason).serialize()  # validate before closing
        except (ValueError, ProtocolError) as exc:
            await connection.send(f"error: {exc}")
        else:
            await connection.close(code, reason)
    elif name == "!ping":
        await send_ping(connection)
    elif name == "!headers":
        request = connection.request
        assert request is not None
        headers: dict[str, str] = {}
        for key, value in request.headers.raw_items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        await connection.send(json.dumps({"headers": headers, "path": request.path}))
    elif name == "!subprotocol":
        await connection.send(connection.subprotocol or "")
    else:
        return False
    return True


async def handler(connection: ServerConnection) -> None:
    stats = STATS.get(connection) or FrameStats()
    try:
        async for message in connection:
            snapshot = stats.before_message.popleft() if stats.before_message else (0, 0)
            if isinstance(message, str) and message.startswith("!"):
                if await handle_command(connection, message, snapshot):
                    continue
            await connection.send(message)
    except ConnectionClosed:
        pass


def deflate_factories(args: argparse.Namespace) -> list[ServerExtensionFactory] | None:
    """The ``extensions`` for serve() when a deflate parameter flag was given, else None."""
    custom = (
        args.deflate_no_defaults
        or args.server_no_context_takeover
        or args.client_no_context_takeover
        or args.server_max_window_bits is not None
        or args.client_max_window_bits is not None
    )
    if not custom:
        return None
    return [
        ServerPerMessageDeflateFactory(
            server_no_context_takeover=args.server_no_context_takeover,
            client_no_context_takeover=args.client_no_context_takeover,
            server_max_window_bits=args.server_max_window_bits,
            client_max_window_bits=args.client_max_window_bits,
        )
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--server-no-context-takeover", action="store_true",
                        help="deflate: impose server_no_context_takeover")
    parser.add_argument("--client-no-context-takeover", action="store_true",
                        help="deflate: impose client_no_context_takeover")
    parser.add_argument("--server-max-window-bits", type=int, metavar="N",
                        help="deflate: server window at most N bits (9-15)")
    parser.add_argument("--client-max-window-bits", type=int, metavar="N",
                        help="deflate: client window at most N bits (8-15), if offered")
    parser.add_argument("--deflate-no-defaults", action="store_true",
                        help="deflate with only the parameter flags given (none: no limits)")
    parser.add_argument("--certfile", help="serve wss:// with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="private key for --certfile (PEM)")
    args = parser.parse_args()

    ssl_context = None
    if args.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(args.certfile, args.keyfile)
        ssl_context.set_alpn_protocols(["http/1.1"])

    extensions = deflate_factories(args)
    async with serve(
        handler,
        "127.0.0.1",
        args.port,
        ssl=ssl_context,
        compression="deflate" if args.deflate and extensions is None else None,
        extensions=extensions,
        max_size=None,
        ping_interval=None,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
    ):
        await asyncio.get_running_loop().create_future()  # serve until killed


if __name__ == "__main__":
    asyncio.run(main())
