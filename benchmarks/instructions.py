"""Client CPU instructions per operation, counted by valgrind's callgrind.

    python -m benchmarks.instructions [--compare PATH] [--rounds N] [--workloads W1,W3,W3r,W3w,W5b]

Wall-clock figures on a shared machine swing by tens of percent; callgrind
counts user-space instructions, which repeat to within a fraction of a
percent whatever else the machine is doing. This measures the blockws
client's instructions per operation: the difference between a run of
``base + N`` and one of ``base`` operations, divided by ``N``, so start-up
and imports cancel out.

- **W1** (the default): a 32 B echo round trip, through callbacks (``wait()``
  + ``update()``) and through ``receive()``; ``--rounds`` of them (1000)
  past a base of 200, against the embedded :class:`blockws.server.EchoServer`.
- **W3**: a 1 MiB binary echo with 4 in flight, through ``on_binary``, against
  the benchmark server's ``/echo`` (it sends back the 32 KiB fragments it
  got, as in ``python -m benchmarks``); a tenth of ``--rounds`` past 20.
- **W3r**: W3 through ``receive()`` (each message as exact ``bytes``), with
  4 in flight.
- **W3w**: W3 with each message in one frame (``max_fragment_size`` above
  1 MiB), so the echo comes back as one 1 MiB frame, as most servers send
  a large message: its rest is read straight into the message's buffer.
- **W5b**: 1 MiB binary messages sent to the benchmark server's ``/sink``, all
  queued at once (one payload object: no memory grows), then one query
  answered when they are all in; a tenth of ``--rounds`` past 20.

The large-message figures vary by a few percent between runs (how the
kernel cuts the stream into reads depends on timing); W1's much less.
Either server runs in another process and is not counted.

``--compare PATH`` measures a second checkout of blockws too (for example a
``git worktree`` of an older commit, with the built ``_speedups`` copied into
it) and prints the ratio. Kernel time (system calls, wake-ups) is not
counted: this is the client's own Python and C work only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ._harness import free_port, server

HERE = Path(__file__).resolve().parent.parent

CLIENT = """
import sys
import blockws
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
url = f"ws://127.0.0.1:{port}/"
msg = "x" * 32
if mode in ("W3", "W3w"):
    payload = bytes(range(256)) * 4096
    st = {"got": 0, "sent": 0}
    def on_binary(ws, segment):
        st["got"] += 1
        if st["sent"] < n:
            ws.send(payload)
            st["sent"] += 1
    whole = {"max_fragment_size": 2 * len(payload)} if mode == "W3w" else {}
    ws = blockws.connect(
        url + "echo", timeout=60, on_binary=on_binary, extensions=[], **whole
    )
    for _ in range(min(4, n)):
        ws.send(payload)
        st["sent"] += 1
    while st["got"] < n:
        ws.wait(1.0)
        ws.update()
elif mode == "W3r":
    payload = bytes(range(256)) * 4096
    ws = blockws.connect(url + "echo", timeout=60, extensions=[])
    sent = 0
    for _ in range(min(4, n)):
        ws.send(payload)
        sent += 1
    for _ in range(n):
        assert len(ws.receive(60)) == len(payload)
        if sent < n:
            ws.send(payload)
            sent += 1
elif mode == "W5b":
    payload = bytes(range(256)) * 4096
    ws = blockws.connect(url + "sink", timeout=60, extensions=[])
    for _ in range(n):
        ws.send(payload)
    ws.send("?")
    assert ws.receive(600) == f"{n} {n * len(payload)}"
elif mode == "callbacks":
    st = {"n": 0, "done": False}
    def on_message(ws, text):
        st["n"] += 1
        if st["n"] >= n:
            st["done"] = True
        else:
            ws.send(msg)
    ws = blockws.connect(url, timeout=60, on_message=on_message, extensions=[])
    ws.send(msg)
    while not st["done"]:
        ws.wait(1.0)
        ws.update()
else:
    ws = blockws.connect(url, timeout=60, extensions=[])
    for _ in range(n):
        ws.send(msg)
        ws.receive(60)
ws.close()
ws.join(10)
ws.update()
from blockws import frames
print(blockws.__file__, "C speedups:", frames.apply_mask is frames.c_apply_mask)
"""

SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
from blockws.server import EchoServer
server = EchoServer().start()
print(server.port, flush=True)
sys.stdin.read()
server.close()
"""


def count(code: Path, script: str, port: int, n: int, mode: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, PYTHONPATH=str(code))
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, script, str(port), str(n), mode],
            env=env, capture_output=True, text=True, timeout=900, check=True,
        )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{proc.stderr[-2000:]}")
    loaded = proc.stdout.strip()
    if not loaded.startswith(str(code)) or not loaded.endswith("C speedups: True"):
        raise RuntimeError(f"wrong blockws or no C speedups: {loaded} (wanted {code})")
    return int(found.group(1))


def measure(
    code: Path, script: str, ports: dict[str, int], workloads: list[str], rounds: int
) -> dict[str, float]:
    result = {}
    for workload in workloads:
        if workload == "W1":
            for mode in ("callbacks", "receive"):
                base = count(code, script, ports["W1"], 200, mode)
                more = count(code, script, ports["W1"], 200 + rounds, mode)
                result[f"W1 {mode}"] = (more - base) / rounds
        else:
            n = max(1, rounds // 10)
            base = count(code, script, ports["bench"], 20, workload)
            more = count(code, script, ports["bench"], 20 + n, workload)
            result[workload] = (more - base) / n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="another blockws checkout to measure")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument(
        "--workloads", default="W1", help="of W1, W3, W3r, W3w, W5b (default: W1)"
    )
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or not set(workloads) <= {"W1", "W3", "W3r", "W3w", "W5b"}:
        raise SystemExit("--workloads: a comma-separated list of W1, W3, W3r, W3w, W5b")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CLIENT)
        script = f.name
    echo = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(HERE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    bench_port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.server", str(bench_port), str(free_port())]
    try:
        assert echo.stdout is not None
        ports = {"W1": int(echo.stdout.readline()), "bench": bench_port}
        checkouts = [HERE] + ([args.compare.resolve()] if args.compare else [])
        with server(cmd, bench_port):
            results = {
                code: measure(code, script, ports, workloads, args.rounds) for code in checkouts
            }
    finally:
        assert echo.stdin is not None
        echo.stdin.close()
        echo.wait(10)
        os.unlink(script)
    for code, figures in results.items():
        print(f"{code}: instructions per operation: "
              + ", ".join(f"{mode} {value / 1000:.1f} k" for mode, value in figures.items()))
    if args.compare:
        this, other = results[HERE], results[args.compare.resolve()]
        print("this / compared: " + ", ".join(
            f"{mode} {this[mode] / other[mode]:.3f}" for mode in this))


if __name__ == "__main__":
    main()
