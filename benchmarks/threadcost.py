"""W7's floor: the RSS a blocked reader thread costs before any client code.

    python -m benchmarks.threadcost [--count 500]

Each line runs in a fresh child process, measured as W7 measures (a warm-up
batch as large as the count first, kept and left out of the base; then
the marginal RSS of ``count`` more):

- ``threading.Thread``: a socket pair per thread, each thread blocked in a
  Python function that calls ``recv(448)`` (what a blockws reader does when
  its socket is quiet);
- ``_thread``: the same body started with ``_thread.start_new_thread`` (no
  ``Thread`` object, no ``Event``): what the ``threading`` bookkeeping adds;
- ``socket pair only``: the sockets alone, no thread.

A design with one reader thread per socket cannot cost less per idle socket
than the first line.
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import threading
import time

from .clients import proc_status, w7_warm_count

MODES = ("threading.Thread", "_thread", "socket pair only")


def _body(sock: socket.socket) -> None:
    def read() -> bytes:
        return sock.recv(448)

    read()


def _start(mode: str, count: int, keep: list[object]) -> None:
    import _thread

    for _ in range(count):
        a, b = socket.socketpair()
        keep += (a, b)
        if mode == "threading.Thread":
            threading.Thread(target=_body, args=(a,), daemon=True).start()
        elif mode == "_thread":
            _thread.start_new_thread(_body, (a,))


def _child(mode: str, count: int) -> None:
    keep: list[object] = []
    _start(mode, w7_warm_count(count), keep)
    time.sleep(0.2)
    gc.collect()
    base = proc_status()["VmRSS"]
    _start(mode, count, keep)
    time.sleep(0.5)  # every thread blocked in its read
    gc.collect()
    print(f"{(proc_status()['VmRSS'] - base) / count:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.count)
        return
    print(f"Python {sys.version.split()[0]}; {args.count} more after {w7_warm_count(args.count)}")
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.threadcost", "--child", mode, "--count",
             str(args.count)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"{mode:>18}: {out} kB of RSS each")


if __name__ == "__main__":
    main()
