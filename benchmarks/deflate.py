"""permessage-deflate throughput: blockws beside websockets' sync client and aiohttp.

    python -m benchmarks.deflate [--rounds 5] [--quick]

Workloads, with compression negotiated by every client against one server in
its own process: ``benchmarks/reflector.js``, which sends each frame back as
it came (compressed frames included), so it does no zlib work and costs the
same for every client. Node's ``ws`` with deflate was tried first and was
the bottleneck (80-95% CPU at ~5-9 k msgs/s).

* ``small``: 20 000 compressible JSON messages of about 320 B, pipelined: a
  writer thread (a task for aiohttp) sends them all while the main thread
  receives the echoes; messages per second.
* ``large``: 256 compressible JSON messages of 1 MiB (64 distinct ones,
  cycled), 4 in flight; messages per second (and MB/s). A short run is
  dominated by start-up costs, which is why it is this long.

Each measurement runs in a fresh process; clients are interleaved per round
and the median is reported with the ratio to websockets' sync client. Client
and server CPU seconds per run show who was the bottleneck. Each child
reports its build (``benchmarks/builds.py``: blockws' and websockets' C
masking, aiohttp's Cython reader and mask); a client without its compiled
build gets no ratio and the run exits 3 (``--allow-uncompiled``: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Callable

from . import builds
from ._harness import cpu_seconds, free_port, median, run_child, server, table

CLIENTS = ("blockws", "websockets", "aiohttp")
WORKLOADS = {"small": (20_000, 320, 0), "large": (256, 1 << 20, 4)}  # count, size, window
#: Distinct messages per run (cycled): enough that compression sees variety,
#: few enough that building 256 MiB of JSON does not dominate the child's time.
DISTINCT = 64


def make_message(i: int, size: int) -> str:
    """Compressible JSON of about ``size`` bytes, different for each ``i``."""
    record = {
        "type": "state",
        "seq": i,
        "player": f"player-{i % 97:03d}",
        "pos": [round(i * 0.25, 2), round(i * 0.5, 2), 0.0],
        "vel": [1.0, 0.0, -0.5],
        "hp": 100 - i % 10,
        "flags": ["visible", "grounded"],
    }
    one = json.dumps(record)
    if size <= len(one) * 2:
        pad = max(0, size - len(one) - 12)
        record["note"] = ("status ok; " * (pad // 11 + 1))[:pad]
        return json.dumps(record)
    items = []
    total = 0
    j = 0
    while total < size:
        record["seq"] = i * 10_000 + j
        text = json.dumps(record)
        items.append(text)
        total += len(text) + 1
        j += 1
    return "[" + ",".join(items) + "]"


# -- clients (run in the child process) ----------------------------------------------


def _pipeline(
    send: Callable[[str], None], recv: Callable[[], Any], msgs: list[str], window: int
) -> None:
    n = len(msgs)
    if window == 0:
        writer = threading.Thread(target=lambda: [send(m) for m in msgs], name="bench-writer")
        writer.start()
        for _ in range(n):
            recv()
        writer.join()
        return
    sent = 0
    for _ in range(min(window, n)):
        send(msgs[sent])
        sent += 1
    for _ in range(n):
        recv()
        if sent < n:
            send(msgs[sent])
            sent += 1


def run_blockws(url: str, msgs: list[str], window: int) -> dict[str, Any]:
    import blockws

    ws = blockws.connect(url, timeout=10, max_message_size=None)
    negotiated = bool(ws.extensions)
    start, cpu = time.perf_counter(), cpu_seconds()
    _pipeline(ws.send, lambda: ws.receive(60), msgs, window)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    ws.close()
    ws.join(5)
    return {"elapsed": elapsed, "cpu": cpu, "deflate": negotiated}


def run_websockets(url: str, msgs: list[str], window: int) -> dict[str, Any]:
    from websockets.sync.client import connect

    ws = connect(url, max_size=None, compression="deflate")
    negotiated = bool(ws.protocol.extensions)
    start, cpu = time.perf_counter(), cpu_seconds()
    _pipeline(ws.send, lambda: ws.recv(60), msgs, window)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    ws.close()
    return {"elapsed": elapsed, "cpu": cpu, "deflate": negotiated}


def run_aiohttp(url: str, msgs: list[str], window: int) -> dict[str, Any]:
    import asyncio

    import aiohttp

    async def main() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, compress=15, max_msg_size=0) as ws:
                negotiated = bool(ws.compress)
                n = len(msgs)
                start, cpu = time.perf_counter(), cpu_seconds()
                if window == 0:

                    async def writer() -> None:
                        for m in msgs:
                            await ws.send_str(m)

                    task = asyncio.ensure_future(writer())
                    for _ in range(n):
                        await ws.receive()
                    await task
                else:
                    sent = 0
                    for _ in range(min(window, n)):
                        await ws.send_str(msgs[sent])
                        sent += 1
                    for _ in range(n):
                        await ws.receive()
                        if sent < n:
                            await ws.send_str(msgs[sent])
                            sent += 1
                elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
                return {"elapsed": elapsed, "cpu": cpu, "deflate": negotiated}

    return asyncio.run(main())


RUNNERS = {"blockws": run_blockws, "websockets": run_websockets, "aiohttp": run_aiohttp}


def child(client: str, workload: str, url: str, scale: float) -> None:
    count, size, window = WORKLOADS[workload]
    count = max(2, int(count * scale))
    unique = count if size < 65536 else min(count, DISTINCT)  # small ones all differ
    distinct = [make_message(i, size) for i in range(unique)]
    msgs = [distinct[i % len(distinct)] for i in range(count)]
    result = RUNNERS[client](url, msgs, window)
    result.update(
        client=client,
        workload=workload,
        count=count,
        bytes=sum(map(len, msgs)),
        build=builds.probe(client),
    )
    print(json.dumps(result))


# -- the parent: server, rounds, table ---------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deflate")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client")
    parser.add_argument("--workload")
    parser.add_argument("--url")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round at 1/5 scale")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--allow-uncompiled",
        action="store_true",
        help="exit 0 even when a client ran without its compiled build (no ratio for it)",
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args.client, args.workload, args.url, args.scale)
        return
    if args.quick:
        args.rounds, args.scale = 1, 0.2
    port = free_port()
    node = ["node", "benchmarks/reflector.js", str(port)]
    rows: list[dict[str, Any]] = []
    with server(node, port) as proc:
        url = f"ws://127.0.0.1:{port}"
        for workload in WORKLOADS:
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CLIENTS}
            for _ in range(args.rounds):
                for client in CLIENTS:
                    before = proc_cpu(proc.pid)
                    r = run_child(
                        "benchmarks.deflate",
                        [
                            "--client",
                            client,
                            "--workload",
                            workload,
                            "--url",
                            url,
                            "--scale",
                            str(args.scale),
                        ],
                    )
                    r["server_cpu"] = proc_cpu(proc.pid) - before
                    runs[client].append(r)
            for client in CLIENTS:
                rs = runs[client]
                count = rs[0]["count"]
                elapsed = median([r["elapsed"] for r in rs])
                bad = sorted({p for r in rs for p in builds.problems(client, r.get("build"))})
                rows.append(
                    {
                        "workload": workload,
                        "client": client,
                        "build": "INVALID: " + "; ".join(bad) if bad else "compiled",
                        "builds": [r.get("build") for r in rs],
                        "deflate": "yes" if all(r["deflate"] for r in rs) else "NO",
                        "msgs/s": count / elapsed,
                        "MB/s": rs[0]["bytes"] / elapsed / 1e6,
                        "client cpu %": 100 * median([r["cpu"] / r["elapsed"] for r in rs]),
                        "server cpu %": 100 * median([r["server_cpu"] / r["elapsed"] for r in rs]),
                    }
                )
            # A column without its compiled build gets no ratio, nor serves as the reference.
            ref = next(r for r in rows if r["workload"] == workload and r["client"] == "websockets")
            for row in rows:
                valid = row["build"] == "compiled" and ref["build"] == "compiled"
                if row["workload"] == workload and valid:
                    row["x websockets"] = row["msgs/s"] / ref["msgs/s"]
    print(f"permessage-deflate, {args.rounds} round(s), scale {args.scale}, median per client")
    print(
        table(
            rows,
            [
                ("workload", "workload", "s"),
                ("client", "client", "s"),
                ("deflate", "deflate", "s"),
                ("build", "build", "s"),
                ("msgs/s", "msgs/s", ",.0f"),
                ("MB/s", "MB/s", ".1f"),
                ("x websockets", "x websockets sync", ".2f"),
                ("client cpu %", "client CPU %", ".0f"),
                ("server cpu %", "server CPU %", ".0f"),
            ],
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "rows": rows}, f, indent=2)
    refused = sorted({f"{r['client']} ({r['build']})" for r in rows if r["build"] != "compiled"})
    if refused:
        print("benchmarks.deflate: without their compiled build: " + ", ".join(refused),
              file=sys.stderr)  # fmt: skip
        if not args.allow_uncompiled:
            raise SystemExit(3)


if __name__ == "__main__":
    main()
