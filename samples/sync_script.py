"""A plain synchronous script: connect, send, receive, close.

    python samples/sync_script.py [URL]

Without a URL it starts blockws's embedded echo server, so it runs offline.
"""

from __future__ import annotations

import contextlib
import sys

import blockws
from blockws.server import EchoServer


def main(url: str) -> None:
    # connect() waits until the socket is open (or raises why it could not open).
    with blockws.connect(url, timeout=10) as ws:
        for i in range(3):
            ws.send(f"message {i}")
            print("received:", ws.receive(timeout=5))
        ws.send(b"\x00\x01\x02 binary")
        print("received:", ws.receive(timeout=5))
    # Leaving the block closed the socket and waited for the closing handshake.
    print(f"closed with code {ws.close_code}")


if __name__ == "__main__":
    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            target = sys.argv[1]
        else:
            target = stack.enter_context(EchoServer()).url
        main(target)
