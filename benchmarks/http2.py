"""blockws over HTTP/2 (RFC 8441) next to HTTP/1.1, through the same server.

    python -m benchmarks.http2 [--rounds 7] [--quick]

The server is ``nghttpx`` (C) as a gateway in front of the picows benchmark
server (``benchmarks/server.py``: ``/echo`` and ``/flood``):
its cleartext frontend takes both HTTP/1.1 upgrades and h2c with prior
knowledge, so both protocols cross the same gateway and the same backend, and
the ratio isolates the cost of HTTP/2 framing in the client. The gateway's
HTTP/2 windows are raised to blockws's own (4 MiB per stream, 16 MiB per
connection); at nghttpx's 64 KiB default, a bulk sender stalls for a
WINDOW_UPDATE round trip every 64 KiB, which measures the window, not the
client.

Workloads (binary, compression off so that framing is all that differs):

* ``small``: 20 000 × 32 B pipelined echo (a writer thread sends, the main
  thread receives); messages per second;
* ``bulk``: 64 × 1 MiB echo, 4 in flight; MB/s;
* ``flood``: the server sends 200 000 × 64 B binary; messages per second.

The gateway and its backend run on one CPU and the client on another (on a
machine with two or more), as in the other benchmarks. A bulk round is a
fifth of a second, so a round's figure swings with the host: the medians are
over 7 rounds by default.

The report gives, per workload, HTTP/2 throughput as a fraction of HTTP/1.1
and the client CPU per message, so the added cost per message is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from ._harness import cpu_seconds, free_port, median, pin, run_child, server, table

# name: (count, size, in flight; 0 = a writer thread sends all, -1 = the server floods)
WORKLOADS = {"small": (20_000, 32, 0), "bulk": (64, 1 << 20, 4), "flood": (200_000, 64, -1)}


def child(workload: str, url: str, version: str, scale: float, profile: bool) -> None:
    import blockws
    from blockws.http2 import HTTP2Settings

    count, size, window = WORKLOADS[workload]
    count = max(4, int(count * scale))
    payload = bytes(range(256)) * (size // 256) if size >= 256 else b"x" * size
    path = "flood" if window < 0 else "echo"
    ws = blockws.connect(
        url + path,
        timeout=10,
        extensions=[],
        max_message_size=None,
        http2=HTTP2Settings(enabled=version == "2", cleartext=True),
    )
    assert ws.http_version == version, ws.http_version
    if profile:
        import yappi  # profiles every thread (the work is on the reader and writer)

        yappi.set_clock_type("cpu")
        yappi.start()
    start, cpu = time.perf_counter(), cpu_seconds()
    if window < 0:
        ws.send(f"{count} {size}")  # the server sends count messages of size bytes
        for _ in range(count):
            ws.receive(60)
    elif window == 0:
        writer = threading.Thread(target=lambda: [ws.send(payload) for _ in range(count)])
        writer.start()
        for _ in range(count):
            ws.receive(60)
        writer.join()
    else:
        sent = 0
        for _ in range(window):
            ws.send(payload)
            sent += 1
        for _ in range(count):
            ws.receive(60)
            if sent < count:
                ws.send(payload)
                sent += 1
    if profile:
        yappi.stop()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    ws.close()
    ws.join(5)
    result: dict[str, Any] = {"elapsed": elapsed, "cpu": cpu, "count": count, "bytes": count * size}
    if profile:
        stats = sorted(yappi.get_func_stats(), key=lambda st: -st.tsub)[:14]
        total = sum(st.tsub for st in yappi.get_func_stats()) or 1.0
        lines = [
            f"{100 * st.tsub / total:5.1f}%  {st.name}  ({st.module.rsplit('/', 2)[-1]})"
            for st in stats
        ]
        result["profile"] = "\n".join(lines)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http2")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload")
    parser.add_argument("--url")
    parser.add_argument("--version")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument(
        "--profile", action="store_true", help="print where HTTP/2 time goes (needs yappi)"
    )
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        if args.cpus:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        child(args.workload, args.url, args.version, args.scale, args.profile)
        return
    if args.quick:
        args.rounds, args.scale = 1, 0.2
    backend, front = free_port(), free_port()
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    gateway = [
        "nghttpx",
        "--conf=/dev/null",
        "--single-process",
        "--no-ocsp",
        "--workers=1",
        f"--frontend=127.0.0.1,{front};no-tls",
        # Windows of 4/16 MiB like blockws's own: with nghttpx's 64 KiB default,
        # bulk sends wait for a WINDOW_UPDATE round trip every 64 KiB.
        "--frontend-http2-window-size=4M",
        "--frontend-http2-connection-window-size=16M",
        f"--backend=127.0.0.1,{backend}",
    ]
    picows = [sys.executable, "-m", "benchmarks.server", str(backend), str(free_port())]
    # The servers on one CPU, the client on the other (on a machine with
    # more than one), as in the other benchmarks: the client's cost is what
    # differs between the two protocols, the gateway's should not compete with it.
    cpus = sorted(os.sched_getaffinity(0))
    pinned = ["--cpus", str(cpus[-1])] if len(cpus) > 1 else []
    with server(picows, backend) as backend_proc, server(gateway, front) as gateway_proc:
        if pinned:
            pin(backend_proc.pid, {cpus[0]})
            pin(gateway_proc.pid, {cpus[0]})
        url = f"ws://127.0.0.1:{front}/"
        for workload in WORKLOADS:
            runs: dict[str, list[dict[str, Any]]] = {"1.1": [], "2": []}
            for _ in range(args.rounds):
                for version in ("1.1", "2"):
                    runs[version].append(
                        run_child(
                            "benchmarks.http2",
                            [
                                "--workload",
                                workload,
                                "--url",
                                url,
                                "--version",
                                version,
                                "--scale",
                                str(args.scale),
                                *pinned,
                            ],
                        )
                    )
            if args.profile:
                r = run_child(
                    "benchmarks.http2",
                    [
                        "--workload",
                        workload,
                        "--url",
                        url,
                        "--version",
                        "2",
                        "--scale",
                        str(args.scale),
                        "--profile",
                    ],
                )
                profiles[workload] = r["profile"]
            base = None
            for version in ("1.1", "2"):
                rs = runs[version]
                elapsed = median([r["elapsed"] for r in rs])
                row = {
                    "workload": workload,
                    "http": version,
                    "msgs/s": rs[0]["count"] / elapsed,
                    "MB/s": rs[0]["bytes"] / elapsed / 1e6,
                    "cpu us/msg": 1e6 * median([r["cpu"] / r["count"] for r in rs]),
                }
                base = base or row
                row["vs 1.1"] = row["msgs/s"] / base["msgs/s"]
                rows.append(row)
    print(f"HTTP/2 vs HTTP/1.1 through nghttpx, {args.rounds} round(s), scale {args.scale}")
    print(
        table(
            rows,
            [
                ("workload", "workload", "s"),
                ("http", "HTTP", "s"),
                ("msgs/s", "msgs/s", ",.0f"),
                ("MB/s", "MB/s", ".1f"),
                ("vs 1.1", "throughput vs 1.1", ".2f"),
                ("cpu us/msg", "client CPU µs/msg", ".1f"),
            ],
        )
    )
    for workload, text in profiles.items():
        print(f"\nWhere the HTTP/2 client time goes ({workload}):\n{text}")


if __name__ == "__main__":
    main()
