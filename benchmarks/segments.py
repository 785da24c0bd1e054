"""One small ``send()`` per message is bistable: ``python -m benchmarks.segments``.

    python -m benchmarks.segments                 # 200,000 x 64 B, 2 rounds of each receiver
    python -m benchmarks.segments --messages 50000 --rounds 1

A sender pinned to one CPU makes one ``send()`` of 64 bytes per message
(TCP_NODELAY, as picows and asyncio transports do whenever their write buffer
is empty); a receiver in another process, pinned to the other CPU, reads:

* ``keeps up``: a blocking ``recv_into`` loop that reads whatever has arrived;
* ``lags``: the same loop with a 2 ms sleep after each read and a 64 KiB
  receive buffer, so the sender's data waits in its own socket.

When the receiver keeps up, every ``send()`` leaves as its own segment and the
sender's system call carries it through the whole loopback TCP path (the
receiver's side included, in the sender's context); when the receiver lags,
``send()`` only appends to a socket buffer that leaves in large segments. The
printed CPU per ``send()`` is the difference, without any WebSocket library:
a client that writes one segment per message (picows on W2/W5) runs at one
speed or the other depending on whether the server happened to fall behind,
and stays there, because each state keeps itself going. A client that joins
its messages before writing (blockws' writer thread: hundreds per ``send()``)
does not have the two states. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
from typing import Any

SIZE = 64


def _cpus() -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[0]}, {cpus[-1]}


def _receiver(port_q: Any, lag: bool, total: int, cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port_q.put(ls.getsockname()[1])
        conn, _ = ls.accept()
    with conn:
        if lag:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        buf = bytearray(1 << 20)
        got = reads = 0
        while got < total:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
            reads += 1
            if lag:
                time.sleep(0.002)
        conn.sendall(str(reads).encode())


def run(lag: bool, messages: int) -> dict[str, float]:
    """One sender run against one receiver; the sender's rate and CPU per send()."""
    server_cpus, client_cpus = _cpus()
    q: Any = mp.Queue()
    proc = mp.Process(target=_receiver, args=(q, lag, messages * SIZE, server_cpus))
    proc.start()
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cpus)
        with socket.create_connection(("127.0.0.1", q.get(timeout=30)), timeout=60) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(None)  # a plain blocking send(): no poll() around it
            msg, send = b"x" * SIZE, s.sendall
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(messages):
                send(msg)
            took, cpu = time.perf_counter() - t0, time.process_time() - c0
            reads = int(s.recv(64))
        os.sched_setaffinity(0, before)
    finally:
        proc.join(30)
    return {
        "sends_per_s": messages / took,
        "cpu_us_per_send": cpu / messages * 1e6,
        "msgs_per_read": messages / max(1, reads),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.segments", description=__doc__)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    print("| receiver | sends/s | sender CPU us/send | messages per read |")
    print("|---|---|---|---|")
    for _ in range(args.rounds):
        for lag in (False, True):
            r = run(lag, args.messages)
            print(
                f"| {'lags' if lag else 'keeps up'} | {r['sends_per_s']:,.0f} | "
                f"{r['cpu_us_per_send']:.2f} | {r['msgs_per_read']:.1f} |"
            )


if __name__ == "__main__":
    main()
