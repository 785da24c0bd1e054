"""Command line: ``python -m blockws`` (offline demo) or ``python -m blockws URL``.

With no URL, an embedded echo server (:mod:`blockws.server`, the protocol core
in the server role) starts on 127.0.0.1, a short demo runs against it and
prints what was exchanged, and the process exits 0.

With a URL it is an interactive client, like wsdump: each line typed is sent
as a text message, and every message received is printed. ``/close [code
[reason]]`` closes, ``/ping`` sends a ping, end of input (Ctrl-D) closes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from . import __version__
from .buffers import BufferSegment
from .exceptions import BlockwsError
from .server import EchoServer
from .websocket import WebSocket, connect


def demo() -> int:
    """Run the offline demo; returns the exit status."""
    with EchoServer() as server:
        print(f"blockws {__version__} demo: embedded echo server at {server.url}")
        with connect(server.url, timeout=5, send_pings=True, ping_frequency=0.1) as ws:
            print(f"open over HTTP/{ws.http_version}")
            for text in ("hello, blockws", "héllo wörld ✓", "x" * 100_000):
                ws.send(text)
                echo = ws.receive(timeout=5)
                shown = text if len(text) < 40 else f"<{len(text)} chars>"
                print(f"> {shown}\n< {shown if echo == text else repr(echo)[:60]}")
                if echo != text:
                    print("echo mismatch", file=sys.stderr)
                    return 1
            blob = bytes(range(256)) * 64
            ws.send(blob)
            echo = ws.receive(timeout=5)
            print(f"> <{len(blob)} bytes binary>\n< <{len(echo)} bytes binary>")
            if echo != blob:
                print("binary echo mismatch", file=sys.stderr)
                return 1
            deadline = time.monotonic() + 5
            while ws.latency is None and time.monotonic() < deadline:
                ws.wait(0.05)
                ws.update()
            if ws.latency is not None:
                print(f"ping/pong latency: {ws.latency * 1000:.2f} ms")
            ws.close(1000, "demo done")
            ws.join(5)
            ws.update()
        print(f"closed: code {ws.close_code}, reason {ws.close_reason!r}, error {ws.error!r}")
    return 0 if ws.close_code == 1000 and ws.error is None else 1


def interactive(url: str, headers: Sequence[str], subprotocols: Sequence[str], ping: float) -> int:
    """Send stdin lines, print messages, until the socket or stdin closes."""
    done = threading.Event()

    def on_open(ws: WebSocket) -> None:
        print(f"* connected (HTTP/{ws.http_version}, subprotocol {ws.protocol!r})", flush=True)
        threading.Thread(target=read_stdin, name="blockws-cli-stdin", daemon=True).start()

    def on_message(ws: WebSocket, text: str) -> None:
        print(f"< {text}", flush=True)

    def on_binary(ws: WebSocket, seg: BufferSegment) -> None:
        data = bytes(seg)
        shown = data[:64].hex(" ") + (" ..." if len(data) > 64 else "")
        print(f"< [{len(data)} bytes] {shown}", flush=True)

    def on_closed(ws: WebSocket, code: int, reason: str) -> None:
        cause = f" ({ws.error})" if ws.error else ""
        print(f"* closed: {code} {reason!r}{cause}", flush=True)
        done.set()

    header_pairs = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep:
            print(f"bad header {h!r}: use 'Name: value'", file=sys.stderr)
            return 2
        header_pairs.append((name.strip(), value.strip()))
    ws = WebSocket(
        url,
        headers=header_pairs,
        subprotocols=list(subprotocols),
        send_pings=ping > 0,
        ping_frequency=max(ping, 0.1),
        close_after_no_message=max(2.0, ping),
        on_open=on_open,
        on_message=on_message,
        on_binary=on_binary,
        on_closed=on_closed,
    )

    def read_stdin() -> None:
        for line in sys.stdin:
            line = line.rstrip("\n")
            try:
                if line.startswith("/close"):
                    parts = line.split(maxsplit=2)
                    code = int(parts[1]) if len(parts) > 1 else 1000
                    ws.close(code, parts[2] if len(parts) > 2 else "")
                    return
                if line == "/ping":
                    ws.ping(b"cli")
                else:
                    ws.send(line)
            except (BlockwsError, ValueError) as exc:
                print(f"! {exc}", flush=True)
        ws.close()

    ws.open()
    try:
        while not done.is_set():
            ws.wait(0.1)
            ws.update()
    except KeyboardInterrupt:
        ws.close()
        ws.join(ws.close_timeout)
        ws.update()
    return 0 if ws.error is None else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blockws",
        description="Without a URL: an offline demo against an embedded echo server. "
        "With a URL: an interactive client (lines typed are sent).",
    )
    parser.add_argument("url", nargs="?", help="ws:// or wss:// URL")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("-s", "--subprotocol", action="append", default=[])
    parser.add_argument("--ping", type=float, default=0.0, help="ping interval in seconds")
    args = parser.parse_args(argv)
    if args.url is None:
        return demo()
    try:
        return interactive(args.url, args.header, args.subprotocol, args.ping)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
