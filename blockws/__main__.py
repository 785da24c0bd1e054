"""Command line: ``python -m blockws`` (offline demo) or ``python -m blockws URL``.

With no URL, an embedded echo server (:mod:`blockws.server`, the protocol core
in the server role) starts on 127.0.0.1, a short demo runs against it and
prints what was exchanged, and the process exits 0.

With a URL it is a client, like websocket-client's ``wsdump``: each line of
input is sent as a text message and every message received is printed
(``< text``; binary as a hexdump). Lines starting with ``/`` are commands
(see :data:`COMMANDS`, or ``--help``). ``--text`` or ``--binary`` send one
message instead, print the replies and close: for scripts, with an exit
status that says how the socket ended (:data:`EXIT_STATUSES`).

Errors (a bad URL, a refused connection, a TLS failure, a rejected upgrade)
are one line on stderr and a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import certifi

from . import __version__
from .exceptions import (
    BlockwsError,
    ConnectionClosed,
    InvalidURL,
    TLSError,
)
from .handshake import parse_url
from .server import EchoServer
from .trace import enable_trace
from .websocket import WebSocket, connect

#: Interactive commands, as ``--help`` lists them.
COMMANDS = {
    "/ping [TEXT]": "send a ping; its round trip is printed at the pong",
    "/close [CODE [REASON]]": "close (default 1000); exits when the close ends",
    "/binary HEX": "send a binary message: /binary 00 01 ff",
    "/stats": "latency, bytes and messages each way, HTTP version,\n"
    + " " * 27 + "subprotocol, extensions",
    "/help": "list these commands",
    "//TEXT": "send the text '/TEXT' (a line starting with /)",
}

#: Exit statuses with a URL.
EXIT_OK = 0  # the socket closed with 1000, or with the code we closed it with
EXIT_CLOSED_BY_SERVER = 1  # the server closed it with another code (1001, 1008, 4xxx...)
EXIT_USAGE = 2  # a bad option or URL
EXIT_NOT_OPENED = 3  # could not open: refused, DNS, TLS, upgrade rejected (4xx), timeout
EXIT_FAILED = 4  # the connection failed after it opened (1006, 1002, 1009, ...)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_STATUSES = {
    EXIT_OK: "closed normally (1000), or with the code you closed it with",
    EXIT_CLOSED_BY_SERVER: "the server closed the socket with another code",
    EXIT_USAGE: "bad option or URL",
    EXIT_NOT_OPENED: "could not open (refused, DNS, TLS failure, upgrade rejected, timeout)",
    EXIT_FAILED: "the connection failed after it opened (1006, 1002, 1009, ...)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


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


def hexdump(data: bytes, limit: int) -> list[str]:
    """Lines of a hexdump of ``data`` (offset, 16 bytes in hex, ASCII), at most
    ``limit`` bytes of it, then how many bytes were left out."""
    lines = []
    shown = data[:limit]
    for at in range(0, len(shown), 16):
        row = shown[at : at + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"  {at:06x}  {row.hex(' '):<47}  |{text}|")
    if len(data) > limit:
        lines.append(f"  ... {len(data) - limit} more bytes")
    return lines


class Usage(Exception):
    """A bad option value: one line on stderr, exit status 2."""


class Client:
    """One session with a URL: prints what comes, sends what is asked."""

    def __init__(self, ws: WebSocket, args: argparse.Namespace) -> None:
        self.ws = ws
        self.args = args
        self.lock = threading.Lock()  # one printer at a time (main and stdin threads)
        self.sent = self.received = 0
        self.eof_at: float | None = None  # when input ended (or the one-shot was sent)
        self.last_message = time.monotonic()
        self.we_closed = False

    def say(self, line: str, err: bool = False) -> None:
        with self.lock:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)

    # -- sending (the stdin thread, or the main thread for --text/--binary) --------------

    def send_text(self, text: str) -> None:
        self.ws.send(text)
        self.sent += 1

    def send_binary(self, data: bytes) -> None:
        self.ws.send(data)
        self.sent += 1

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.ws.close(code, reason)
        self.we_closed = True

    def command(self, line: str) -> bool:
        """Run one input line; False once the session should stop reading input."""
        ws = self.ws
        if not line.startswith("/"):
            self.send_text(line)
            return True
        if line.startswith("//"):
            self.send_text(line[1:])
            return True
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/close":
            parts = rest.split(maxsplit=1)
            code = int(parts[0]) if parts else 1000
            self.close(code, parts[1] if len(parts) > 1 else "")
            return False
        if name == "/ping":
            ws.ping(rest.encode() if rest else b"blockws-cli")
        elif name == "/binary":
            self.send_binary(bytes.fromhex(rest))
        elif name == "/stats":
            self.say(self.stats())
        elif name == "/help":
            for usage, meaning in COMMANDS.items():
                self.say(f"  {usage:<24} {meaning}")
        else:
            self.say(f"! unknown command {name} (/help lists them; // sends a line starting "
                     "with /)", err=True)
        return True

    def stats(self) -> str:
        ws = self.ws
        latency = "none yet" if ws.latency is None else f"{ws.latency * 1000:.2f} ms"
        extensions = ", ".join(e.offer() for e in ws.extensions) or "none"
        return (
            f"* stats: http_version {ws.http_version}, subprotocol {ws.protocol or 'none'}, "
            f"extensions {extensions}, latency {latency}, "
            f"sent {self.sent} messages / {ws.bytes_sent} bytes, "
            f"received {self.received} messages / {ws.bytes_received} bytes, "
            f"buffered {ws.buffered_amount} bytes"
        )

    def read_input(self) -> None:
        """The stdin thread: each line is a message or a command, until EOF or /close."""
        try:
            for raw in sys.stdin:
                line = raw.rstrip("\r\n")
                try:
                    if not self.command(line):
                        return
                except (BlockwsError, ValueError) as exc:
                    self.say(f"! {exc}", err=True)
        finally:
            self.eof_at = time.monotonic()

    # -- receiving (the main thread) -----------------------------------------------------

    def show(self, message: str | bytes) -> None:
        self.received += 1
        self.last_message = time.monotonic()
        if isinstance(message, str):
            self.say(f"< {message}")
        else:
            lines = [f"< binary, {len(message)} bytes"]
            lines += hexdump(message, self.args.dump_bytes)
            self.say("\n".join(lines))

    def run(self, one_shot: bool) -> int:
        ws, args = self.ws, self.args
        latency = ws.latency
        if one_shot:
            self.eof_at = time.monotonic()
        else:
            threading.Thread(target=self.read_input, name="blockws-cli-stdin", daemon=True).start()
        closing = False
        while True:
            try:
                message = ws.receive(timeout=0.05)
            except TimeoutError:
                pass
            except ConnectionClosed:
                break
            else:
                self.show(message)
            if ws.latency is not latency and ws.latency is not None:
                latency = ws.latency
                self.say(f"* pong: round trip {latency * 1000:.2f} ms")
            if closing or self.we_closed:
                continue
            now = time.monotonic()
            if one_shot and self.received >= args.replies:
                closing = True
            elif self.eof_at is not None:
                quiet = now - max(self.eof_at, self.last_message)
                closing = quiet >= args.eof_wait
            if closing:
                self.close()
        ws.join(ws.close_timeout)
        return self.ended()

    def ended(self) -> int:
        ws = self.ws
        cause = f": {ws.error}" if ws.error is not None else ""
        self.say(f"* closed: {ws.close_code} {ws.close_reason!r}{cause}")
        if ws.error is not None:
            return EXIT_FAILED
        if ws.close_code == 1000 or self.we_closed:
            return EXIT_OK
        return EXIT_CLOSED_BY_SERVER


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the options ask for, or None for blockws's default."""
    if not (args.cafile or args.insecure):
        return None
    ctx = ssl.create_default_context(cafile=certifi.where())
    if args.cafile:
        try:
            ctx.load_verify_locations(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise Usage(f"cannot load --cafile {args.cafile}: {exc}") from None
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    # A context passed in is used as it is: offer h2 only when HTTP/2 may be tried.
    ctx.set_alpn_protocols(["http/1.1"] if args.http1 else ["h2", "http/1.1"])
    return ctx


def socket_options(args: argparse.Namespace) -> dict[str, Any]:
    """WebSocket keywords from the command line; raises Usage for a bad value."""
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise Usage(f"bad header {h!r}: use -H 'Name: value'")
        headers.append((name.strip(), value.strip()))
    options: dict[str, Any] = {
        "headers": headers,
        "subprotocols": list(args.subprotocol),
        "origin": args.origin,
        "ssl_context": ssl_context(args),
        "open_timeout": args.timeout,
    }
    if args.http1:
        options["http2"] = False
    if args.ping is not None:
        if args.ping < 0.1:
            raise Usage("--ping takes 0.1 seconds or more")
        options.update(send_pings=True, ping_frequency=args.ping,
                       close_after_no_message=max(2.0, args.ping))
    if args.proxy is not None:
        options["proxy"] = args.proxy
    return options


def parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {usage:<24} {meaning}" for usage, meaning in COMMANDS.items())
    statuses = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_STATUSES.items())
    p = argparse.ArgumentParser(
        prog="python -m blockws",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Without a URL: an offline demo against an embedded echo server.\n"
            "With a URL: a WebSocket client. Each line of input is sent as a text message;\n"
            "messages received are printed ('< text', binary as a hexdump). End of input\n"
            "waits --eof-wait seconds for replies, then closes."
        ),
        epilog=f"interactive commands:\n{commands}\n\nexit statuses (with a URL):\n{statuses}",
    )
    p.add_argument("url", nargs="?", help="ws:// or wss:// URL")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="trace frames, headers (secrets redacted) and pings on stderr")
    g = p.add_argument_group("handshake")
    g.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="add a request header (repeatable)")
    g.add_argument("-s", "--subprotocol", action="append", default=[], metavar="NAME",
                   help="offer a subprotocol (repeatable, in order of preference)")
    g.add_argument("--origin", metavar="URL", help="send this Origin header")
    g.add_argument("--http1", action="store_true",
                   help="use HTTP/1.1 only (no WebSocket over HTTP/2 attempt)")
    g.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time allowed to connect and open (default 10)")
    g = p.add_argument_group("network")
    g.add_argument("--cafile", metavar="FILE",
                   help="also trust the CA certificates in this PEM file (a private CA)")
    g.add_argument("--insecure", action="store_true",
                   help="do NOT verify the server's certificate (testing only)")
    g.add_argument("--proxy", metavar="URL",
                   help="connect through this proxy (http://[user:pass@]host:port, https://, "
                        "socks5://, socks5h://, socks4://); default: the *_proxy environment "
                        "variables")
    g = p.add_argument_group("session")
    g.add_argument("--ping", type=float, metavar="SECONDS",
                   help="send a ping every SECONDS and print each round trip")
    g.add_argument("--eof-wait", type=float, default=1.0, metavar="SECONDS",
                   help="after end of input, close once no message came for SECONDS "
                   "(default 1; 0 closes at once)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--text", metavar="MSG", help="send one text message, print the "
                     "replies, close; the exit status says how the socket ended")
    one.add_argument("--binary", metavar="HEX", help="the same with a binary message (hex)")
    g.add_argument("--replies", type=int, default=1, metavar="N",
                   help="with --text/--binary: close after N replies (default 1), or after "
                   "--eof-wait seconds without one")
    g.add_argument("--dump-bytes", type=int, default=256, metavar="N",
                   help="bytes of a binary message shown in the hexdump (default 256)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.url is None:
        if args.text is not None or args.binary is not None:
            print("error: --text and --binary need a URL", file=sys.stderr)
            return EXIT_USAGE
        if args.verbose:
            enable_trace()
        return demo()
    try:
        options = socket_options(args)
        one_shot: bytes | str | None = args.text
        if args.binary is not None:
            try:
                one_shot = bytes.fromhex(args.binary)
            except ValueError:
                raise Usage(f"--binary takes hex digits, not {args.binary!r}") from None
        parse_url(args.url)  # the URL is checked before anything else
    except (Usage, InvalidURL, TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.insecure:
        print("WARNING: --insecure: the server's certificate is NOT verified; anyone on the "
              "network path can read and change this connection", file=sys.stderr)
    if args.verbose:
        enable_trace()
    try:
        ws = connect(args.url, timeout=args.timeout, **options)
    except TLSError as exc:
        print(f"error: {exc} (trust a private CA with --cafile FILE)", file=sys.stderr)
        return EXIT_NOT_OPENED
    except (BlockwsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_OPENED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    client = Client(ws, args)
    extensions = ", ".join(e.offer() for e in ws.extensions) or "none"
    client.say(f"* connected (HTTP/{ws.http_version}, subprotocol {ws.protocol or 'none'}, "
               f"extensions {extensions})")
    try:
        if isinstance(one_shot, str):
            client.send_text(one_shot)
        elif one_shot is not None:
            client.send_binary(one_shot)
        return client.run(one_shot=one_shot is not None)
    except KeyboardInterrupt:
        client.close()
        ws.join(ws.close_timeout)
        client.ended()
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
