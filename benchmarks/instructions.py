"""Client CPU instructions per W1 round trip, counted by valgrind's callgrind.

    python -m benchmarks.instructions [--compare PATH] [--rounds N]

Wall-clock figures on a shared machine swing by tens of percent; callgrind
counts user-space instructions, which repeat to within a fraction of a
percent whatever else the machine is doing. This measures the blockws
client's instructions per 32 B echo round trip (W1), through callbacks
(``wait()`` + ``update()``) and through ``receive()``: the difference between
a run of ``--rounds + 200`` and one of 200 round trips, divided by
``--rounds``, so start-up and imports cancel out. The echo server is the
embedded :class:`blockws.server.EchoServer` in another process, not counted.

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

HERE = Path(__file__).resolve().parent.parent

CLIENT = """
import sys
import blockws
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
url = f"ws://127.0.0.1:{port}/"
msg = "x" * 32
if mode == "callbacks":
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


def measure(code: Path, script: str, port: int, rounds: int) -> dict[str, float]:
    result = {}
    for mode in ("callbacks", "receive"):
        base = count(code, script, port, 200, mode)
        more = count(code, script, port, 200 + rounds, mode)
        result[mode] = (more - base) / rounds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="another blockws checkout to measure")
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CLIENT)
        script = f.name
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(HERE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        checkouts = [HERE] + ([args.compare.resolve()] if args.compare else [])
        results = {code: measure(code, script, port, args.rounds) for code in checkouts}
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
        os.unlink(script)
    for code, figures in results.items():
        print(f"{code}: instructions per round trip: "
              + ", ".join(f"{mode} {value / 1000:.1f} k" for mode, value in figures.items()))
    if args.compare:
        this, other = results[HERE], results[args.compare.resolve()]
        print("this / compared: " + ", ".join(
            f"{mode} {this[mode] / other[mode]:.3f}" for mode in this))


if __name__ == "__main__":
    main()
