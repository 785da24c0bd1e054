"""How much stack a blockws reader thread keeps, against a bare thread (tests/test_scale.py).

    python tests/stackprobe.py COUNT

Run in a fresh process, so that every thread gets a fresh stack: glibc hands
a new thread the cached stack of one that ended, pages still touched. Starts
COUNT bare threads, each blocked in ``recv(448)`` from a Python function,
then opens COUNT blockws sockets (callbacks, no compression) to the embedded
echo server, and prints, as JSON, the RSS in kB of each thread's stack:
the mapping that holds the stack pointer Linux reports for the thread
while it waits in a system call (``/proc/self/task/TID/syscall``). A page
of stack a thread touched once, at its deepest, stays in its RSS for its
whole life: with a reader per socket, that is RSS per idle socket.
Prints ``{"skip": why}`` where that cannot be read.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import blockws
from blockws.server import EchoServer


def _stack_maps() -> list[tuple[int, int, int]]:
    maps: list[tuple[int, int, int]] = []
    low = high = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
            elif head == "Rss:":
                maps.append((low, high, int(line.split()[1])))
    return maps


def _stack_kb(thread_ids: list[int]) -> list[int]:
    """Each thread's stack RSS (kB); a thread not in a system call is left out."""
    maps = _stack_maps()
    out = []
    for tid in thread_ids:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
        if len(fields) < 3 or fields[0] == "running":
            continue
        sp = int(fields[-2], 16)
        out += [rss for low, high, rss in maps if low <= sp < high]
    return out


def _blocked(sock: socket.socket) -> None:
    def read() -> bytes:
        return sock.recv(448)

    read()


def main(count: int) -> None:
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/syscall") as f:
            f.read()
    except OSError as exc:
        print(json.dumps({"skip": f"/proc/self/task/*/syscall: {exc}"}))
        return
    pairs = [socket.socketpair() for _ in range(count)]
    bare = [threading.Thread(target=_blocked, args=(a,), daemon=True) for a, _ in pairs]
    for thread in bare:
        thread.start()
    with EchoServer() as server:
        opened: list[object] = []
        sockets = [
            blockws.WebSocket(server.url, extensions=[], on_open=opened.append).open()
            for _ in range(count)
        ]
        deadline = time.monotonic() + 30
        while len(opened) < count and time.monotonic() < deadline:
            blockws.wait(0.1)
            blockws.update_all()
        time.sleep(0.2)  # every reader back in its blocking read
        readers = [
            t.native_id
            for t in threading.enumerate()
            if t.name.endswith("-reader") and t.native_id is not None
        ]
        print(
            json.dumps(
                {
                    "opened": len(opened),
                    "bare": _stack_kb([t.native_id for t in bare if t.native_id is not None]),
                    "readers": _stack_kb(readers),
                }
            )
        )
        sys.stdout.flush()
        for ws in sockets:
            ws.abort()
    os._exit(0)  # the bare threads never return


if __name__ == "__main__":
    main(int(sys.argv[1]))
