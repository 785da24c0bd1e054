"""Large echoes by fragment size: ``python -m benchmarks.fragments``.

    python -m benchmarks.fragments                          # the sizes below, 3 rounds
    python -m benchmarks.fragments --sizes 2097152,300000 --rounds 1

blockws alone (no other client): one socket with ``max_fragment_size`` set to
each size echoes 1 MiB binary messages through ``receive()`` with 4 in
flight, against the benchmark server's ``/echo`` (which sends each fragment
back as it came, so the client receives the same fragments). The benchmark
server runs on one CPU, this process on the other. Printed per message, over
``--messages`` messages after a warm-up of 24 (the measured ones from an
idle socket to an idle socket, 4 in flight between): the client's minor page
faults and its CPU (``getrusage``, every thread of this process), and the
server's CPU (``/proc``): the server is what limits this echo (it spends
more than the client a message), and its cost grows with the number of
frames a message takes.

It shows what the C allocator does with a sender's and a receiver's large
buffers at each fragment size: a fragment masked into fresh memory, or a
message's buffer grown by copying, faults its pages in again every message
(a 4 KiB page a fault), about doubling the CPU of an echo; and what each
fragment costs the server (picows parses and echoes frame by frame), which
is what W3's ratio to picows, a client that sends one frame, is made of.
See benchmarks/README.md ("Found on the way").
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import blockws
import blockws.frames

from ._harness import free_port, pin, proc_cpu, server

#: Fragment sizes: the default, sizes that divide 1 MiB, sizes that do not,
#: and sizes above the pooled limit (blockws.sender.POOLED_FRAGMENT_MAX).
SIZES = (32768, 131072, 262144, 262145, 200000, 300000, 524288, 1 << 20, 2 << 20, 4 << 20)
MESSAGE = 1 << 20
IN_FLIGHT = 4
WARMUP = 24


def measure(port: int, fragment: int, messages: int, server_pid: int) -> tuple[float, float, float]:
    """(page faults, CPU microseconds, the server's CPU microseconds) a message
    for one fragment size."""
    ws = blockws.connect(
        f"ws://127.0.0.1:{port}/echo", timeout=10, extensions=[], max_fragment_size=fragment
    )
    try:
        payload = bytes(MESSAGE)
        for _ in range(IN_FLIGHT):
            ws.send(payload)
        for _ in range(WARMUP):
            ws.send(ws.receive(10))
        for _ in range(IN_FLIGHT):
            ws.receive(10)
        # Both sides idle here and at the end, where the server's CPU is read:
        # a running process's run time, read from another, advances by the
        # scheduler's ticks (4 ms), so it is read with exactly ``messages``
        # echoes done in between, and none under way.
        before = resource.getrusage(resource.RUSAGE_SELF)
        server_before = proc_cpu(server_pid)
        first = min(IN_FLIGHT, messages)
        for _ in range(first):
            ws.send(payload)
        for _ in range(messages - first):
            ws.send(ws.receive(10))
        for _ in range(first):
            ws.receive(10)
        server_after = proc_cpu(server_pid)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        ws.close()
        ws.join(10)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return (
        (after.ru_minflt - before.ru_minflt) / messages,
        cpu / messages * 1e6,
        (server_after - server_before) / messages * 1e6,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[0], cpus[-1]
    ws_port, tcp_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "benchmarks.server", str(ws_port), str(tcp_port)]
    frames = blockws.frames
    compiled = frames.c_apply_mask is not None and frames.apply_mask is frames.c_apply_mask
    print(f"blockws {blockws.__version__} ({blockws.__file__}), C speedups in use: {compiled}")
    with server(cmd, ws_port) as proc:
        pin(proc.pid, {server_cpu})
        os.sched_setaffinity(0, {client_cpu})
        results: dict[int, list[tuple[float, float, float]]] = {size: [] for size in sizes}
        for _ in range(args.rounds):
            for size in sizes:
                results[size].append(measure(ws_port, size, args.messages, proc.pid))
    print(
        f"{'fragment (B)':>12}  {'page faults a message':>24}  {'CPU a message (us)':>20}"
        f"  {'server CPU a message (us)':>26}"
    )
    for size, runs in results.items():
        faults = ", ".join(f"{f:.1f}" for f, _, _ in runs)
        cpu = ", ".join(f"{c:.0f}" for _, c, _ in runs)
        server_cpu = ", ".join(f"{c:.0f}" for _, _, c in runs)
        print(f"{size:>12}  {faults:>24}  {cpu:>20}  {server_cpu:>26}")


if __name__ == "__main__":
    main()
