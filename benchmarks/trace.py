"""What frame tracing costs: off (the default), off again after being on, and on.

    python -m benchmarks.trace [--messages N] [--rounds R] [--baseline DIR]

Each mode runs in a fresh subprocess against the picows benchmark server's
``/echo`` (its own process), round after round, interleaved (A B C, A B C,
...); the median of the rounds is printed: throughput, and the client
process's CPU time per message (all its threads), which hardly moves when
other processes load the machine, with its ratio to the reference mode.
The workload is the one where per-frame costs show most: N 32-byte text
messages pipelined (send them all, then receive them all with
``receive()``), then N 32-byte echoes one at a time.

Modes:

* ``off``: tracing never turned on (the default);
* ``off-after-on``: ``enable_trace()`` then ``enable_trace(False)`` before
  the socket opens;
* ``on-filtered``: tracing on, but the ``blockws.trace`` logger's level set
  above DEBUG, so every record is dropped (the wrapper's parsing still runs);
* ``on``: tracing on, records formatted and discarded by a handler;
* ``baseline`` (with ``--baseline DIR``): the default mode with ``DIR`` (a
  checkout of blockws without tracing, for instance the previous commit in a
  ``git worktree``) first on ``sys.path``: the same code path without any
  trace hook at all.

"Costs nothing measurable" means ``off`` and ``off-after-on`` within the
run-to-run noise of ``baseline``: no trace code runs per frame, message or
read in those modes (see :mod:`blockws.trace`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

from benchmarks._harness import ROOT, free_port, server

MODES = ["off", "off-after-on", "on-filtered", "on"]


def child(mode: str, url: str, messages: int) -> dict[str, float]:
    """Runs in the subprocess: one measurement, returned as JSON on stdout."""
    import blockws

    if mode == "off-after-on":
        blockws.enable_trace()
        blockws.enable_trace(False)
    elif mode in ("on", "on-filtered"):
        logging.getLogger("blockws.trace").addHandler(_Discard())
        blockws.enable_trace()
        if mode == "on-filtered":
            logging.getLogger("blockws.trace").setLevel(logging.WARNING)
    payload = "x" * 32
    with blockws.connect(url, timeout=10, extensions=[]) as ws:
        for _ in range(200):  # warm up
            ws.send(payload)
            ws.receive(10)
        # CPU time of this process (all its threads) per message: unlike the
        # wall clock, it hardly moves when other processes load the machine.
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(messages):
            ws.send(payload)
        for _ in range(messages):
            ws.receive(10)
        pipelined = messages / (time.perf_counter() - start)
        pipelined_cpu = (time.process_time() - cpu) / messages * 1e6
        n = max(1, messages // 10)
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(n):
            ws.send(payload)
            ws.receive(10)
        echo = n / (time.perf_counter() - start)
        echo_cpu = (time.process_time() - cpu) / n * 1e6
    return {"pipelined": pipelined, "pipelined_cpu": pipelined_cpu, "echo": echo,
            "echo_cpu": echo_cpu}


class _Discard(logging.Handler):
    """Formats each record, as a real handler would, and drops it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a blockws checkout without tracing, to compare with")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, url, n = args.child
        print(json.dumps(child(mode, url, int(n))))
        return 0

    modes = (["baseline"] if args.baseline else []) + MODES
    port, tcp_port = free_port(), free_port()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    cmd = [sys.executable, "-m", "benchmarks.server", str(port), str(tcp_port)]
    with server(cmd, port):
        url = f"ws://127.0.0.1:{port}/echo"
        for _ in range(args.rounds):
            for mode in modes:
                path = [ROOT]
                if mode == "baseline":
                    path.insert(0, os.path.abspath(args.baseline))
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
                env.pop("BLOCKWS_TRACE", None)
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.trace", "--child",
                     "off" if mode == "baseline" else mode, url, str(args.messages)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True,
                )
                results[mode].append(json.loads(out.stdout))
    reference = "baseline" if args.baseline else "off"
    keys = ("pipelined", "pipelined_cpu", "echo", "echo_cpu")

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    print(f"{args.messages} x 32 B pipelined, {max(1, args.messages // 10)} x 32 B echoes one "
          f"at a time; median of {args.rounds} rounds; CPU: client process, all threads, "
          f"per message; x: CPU time relative to {reference}")
    print(f"{'mode':<14} {'pipelined msg/s':>15} {'CPU us/msg':>10} {'x':>5} "
          f"{'echo rt/s':>9} {'CPU us/rt':>9} {'x':>5}")
    for mode in modes:
        p, pc, e, ec = (median(mode, k) for k in keys)
        print(f"{mode:<14} {p:>15,.0f} {pc:>10.2f} {pc / median(reference, keys[1]):>5.2f} "
              f"{e:>9,.0f} {ec:>9.2f} {ec / median(reference, keys[3]):>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
