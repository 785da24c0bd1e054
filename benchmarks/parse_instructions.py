"""Instructions the receive-side parser spends per message, counted by callgrind.

    python -m benchmarks.parse_instructions [--compare PATH] [--workloads W2,W4,W3,W3b,W3f,W3bf]

Socket-free: a ``Protocol`` set up as a WebSocket sets it up (client role,
``compact_messages``) is fed a server's byte stream in reads of the
transport's size (127 KiB, cut wherever they fall, so frames span reads), and
the parsed messages are dropped (pooled buffers given back to the pool, as
after an ``on_binary`` callback). Each figure is the difference between a run
of ``base + n`` and one of ``base`` messages, divided by ``n``, so start-up
and imports cancel out, less the same difference for runs that only build
the stream and cut its reads. Workloads, after benchmarks/workloads.py:

* W2: 32 B text messages, many per read (the pipelined echo's receive side);
* W4: 64 B binary messages for ``receive()`` (``binary_as_bytes``);
* W3: 1 MiB binary messages for ``on_binary`` (pooled memory);
* W3b: 1 MiB binary messages for ``receive()`` (``binary_as_bytes``);
* W3f, W3bf: the same in 32 KiB fragments (blockws's default
  ``max_fragment_size``: what the W3 echo server sends back to blockws).

``--compare PATH`` measures another checkout too (a ``git worktree`` of an
older commit with its built ``_speedups`` copied in) and prints the ratio.
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

CHILD = """
import sys
from blockws import frames
from blockws.buffers import BufferPool
from blockws.protocol import BinaryMessage, Protocol, Role
size, binary, as_bytes = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
n, parse, frag = int(sys.argv[4]), sys.argv[5] == "parse", int(sys.argv[6])
payload = (b"x" if binary else b"y") * size
if frag:  # fragments of frag bytes, as blockws sends a message and an echo returns it
    frame = b"".join(
        frames.Frame(0 if i else (2 if binary else 1), payload[i : i + frag],
                     fin=i + frag >= size).serialize(None)
        for i in range(0, size, frag)
    )
else:
    frame = frames.Frame(2 if binary else 1, payload).serialize(None)
read = 127 * 1024
stream = frame * n
reads = [stream[i : i + read] for i in range(0, len(stream), read)]
pool = BufferPool()  # as a WebSocket's parser has it (options.buffer_pool)
proto = Protocol(Role.CLIENT, allocate=pool.allocate, release=pool.give_back)
proto.compact_messages = True
proto.binary_as_bytes = as_bytes
got = 0
if parse:
    for data in reads:
        events = proto.receive_data(data)
        got += len(events)
        if not as_bytes:  # on_binary's buffer goes back to the pool after the callback
            for event in events:
                if type(event) is BinaryMessage:
                    pool.give_back(event.data)
    assert got == n, got
print(frames.__file__, "C speedups:", frames.apply_mask is frames.c_apply_mask)
"""

WORKLOADS = {  # name: (size, binary, binary_as_bytes, base messages, more messages, fragment)
    "W2": (32, False, True, 2000, 40000, 0),
    "W4": (64, True, True, 2000, 40000, 0),
    "W3": (1 << 20, True, False, 4, 40, 0),
    "W3b": (1 << 20, True, True, 4, 40, 0),
    "W3f": (1 << 20, True, False, 4, 40, 32768),
    "W3bf": (1 << 20, True, True, 4, 40, 32768),
}


def count(code: Path, script: str, args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        # A fixed hash seed: with a random one, dict and set lookups (hash
        # collisions) changed a 1 MiB message's figure by up to 3 %.
        env = dict(os.environ, PYTHONPATH=str(code), PYTHONHASHSEED="0")

        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, script, *args],
            env=env, capture_output=True, text=True, timeout=900, check=True,
        )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{proc.stderr[-2000:]}")
    if not proc.stdout.strip().startswith(str(code)):
        raise RuntimeError(f"wrong blockws: {proc.stdout} (wanted {code})")
    return int(found.group(1))


def measure(code: Path, script: str, names: list[str]) -> dict[str, float]:
    result = {}
    for name in names:
        size, binary, as_bytes, base, more, frag = WORKLOADS[name]
        flags = [str(size), "1" if binary else "0", "1" if as_bytes else "0"]
        runs = {}
        for mode in ("parse", "setup"):
            low = count(code, script, [*flags, str(base), mode, str(frag)])
            high = count(code, script, [*flags, str(base + more), mode, str(frag)])
            runs[mode] = high - low
        # Building the stream and cutting the reads is not the parser's work.
        result[name] = (runs["parse"] - runs["setup"]) / more
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="another blockws checkout to measure")
    parser.add_argument("--workloads", default="W2,W4,W3,W3b,W3f,W3bf")
    args = parser.parse_args()
    names = args.workloads.split(",")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
        script = f.name
    try:
        checkouts = [HERE] + ([args.compare.resolve()] if args.compare else [])
        results = {code: measure(code, script, names) for code in checkouts}
    finally:
        os.unlink(script)
    for code, figures in results.items():
        print(f"{code}: instructions per message: "
              + ", ".join(f"{name} {value:,.0f}" for name, value in figures.items()))
    if args.compare:
        this, other = results[HERE], results[args.compare.resolve()]
        print("this / compared: " + ", ".join(
            f"{name} {this[name] / other[name]:.3f}" for name in this))


if __name__ == "__main__":
    main()
