"""A ``wss://`` stream server with permessage-deflate, for the game-loop benchmark.

    python -m benchmarks.tls_stream PORT CERTDIR

Serves TLS on 127.0.0.1:PORT with a throwaway CA (``trustme``) whose
certificate it writes to ``CERTDIR/ca.pem`` for the client, and accepts
permessage-deflate (RFC 7692) with no parameters: 15-bit windows, context
takeover both ways, which is what a game server's default usually is. One
thread per connection. After a text message from the client it streams,
paced in 1 ms ticks, compressing every message (one zlib stream per
connection, as RFC 7692 7.2.1 describes):

* ``"json RATE SECONDS"``: RATE text messages a second of ~64 B of JSON,
  ``{"t":NS,"id":I,"x":X,"y":Y,"hp":H}``, ``t`` being
  ``time.perf_counter_ns()`` when it was built (CLOCK_MONOTONIC, one clock
  for every process of the host);
* ``"snapshot SIZE RATE SECONDS"``: RATE binary messages a second of SIZE
  bytes (a game-state-like pattern that compresses about 3:1), the first 8
  bytes ``perf_counter_ns()`` big-endian.

It then sends the text ``"done SENT"`` (uncompressed, as the RFC allows per
message) and goes on reading until the client closes. The client's own
frames (the short command, the close) come uncompressed (blockws sends
messages under 128 B plain), so the server side parses them with blockws's
protocol core in the server role.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import sys
import threading
import time
import zlib

from blockws.frames import Opcode
from blockws.handshake import accept_key
from blockws.protocol import Protocol, Role, TextMessage

_STAMP = struct.Struct("!Q")
_TAIL = b"\x00\x00\xff\xff"


def header(b0: int, n: int) -> bytes:
    """An unmasked frame header (server to client)."""
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n)
    return struct.pack("!BBQ", b0, 127, n)


def snapshot_body(size: int) -> bytearray:
    """Bytes that look like packed entity state: some fields repeat, some vary."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += struct.pack("!IffHH", i, (i * 7919) % 1000 / 3.0, i % 97 * 1.5, 100, i % 5)
        i += 1
    return out[:size]


class Stream:
    def __init__(self, conn: ssl.SSLSocket) -> None:
        self.conn = conn
        self.deflate = zlib.compressobj(1, zlib.DEFLATED, -15, 8)

    def compressed(self, opcode: int, payload: bytes) -> bytes:
        data = self.deflate.compress(payload) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        if data.endswith(_TAIL):
            data = data[:-4]
        return header(0xC0 | opcode, len(data)) + data  # FIN + RSV1

    def run(self, command: str) -> int:
        words = command.split()
        if words[0] == "json":
            rate, seconds, size = float(words[1]), float(words[2]), 0
        else:
            size, rate, seconds = int(words[1]), float(words[2]), float(words[3])
        body = snapshot_body(size) if size else bytearray()
        sent = 0
        start = time.perf_counter()
        tick = start
        while True:
            now = time.perf_counter()
            if now - start >= seconds:
                break
            due = int((now - start) * rate) - sent
            out = []
            for _ in range(max(0, due)):
                ns = time.perf_counter_ns()
                if size:
                    body[:8] = _STAMP.pack(ns)
                    out.append(self.compressed(Opcode.BINARY, bytes(body)))
                else:
                    x, y, hp = (sent % 640) * 1.25, (sent % 480) * 0.75, 100 - sent % 100
                    text = f'{{"t":{ns},"id":{sent % 16},"x":{x:.2f},"y":{y:.2f},"hp":{hp}}}'
                    out.append(self.compressed(Opcode.TEXT, text.encode()))
                sent += 1
            if out:
                self.conn.sendall(b"".join(out))
            tick += 0.001
            delay = tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                tick = time.perf_counter()
        done = f"done {sent}".encode()
        self.conn.sendall(header(0x81, len(done)) + done)
        return sent


def handshake(conn: ssl.SSLSocket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        buf += data
    head, _, extra = buf.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "permessage-deflate" not in headers.get("sec-websocket-extensions", ""):
        raise ConnectionError("the client did not offer permessage-deflate")
    conn.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        ).encode("latin-1")
    )
    return extra


def serve(conn: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError, ConnectionError), conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = handshake(conn)
        proto = Protocol(Role.SERVER, max_message_size=None)
        stream = Stream(conn)
        while True:
            for event in proto.receive_data(data) if data else []:
                if isinstance(event, TextMessage):
                    stream.run(event.text)
            reply = proto.data_to_send()
            if reply:
                conn.sendall(b"".join(reply))
            if proto.close_received is not None or proto.failure is not None:
                return
            data = conn.recv(65536)
            if not data:
                return


def main() -> None:
    import trustme

    port, certdir = int(sys.argv[1]), sys.argv[2]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(certdir, "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])  # no HTTP/2: this is a plain wss:// stream
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        raw, _ = listener.accept()
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
