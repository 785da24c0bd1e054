"""The parser's cost per small message, compressed or not, on each loop.

    python -m benchmarks.parse [--rounds 5]

``Protocol.receive_data`` on reads of 100 whole messages of about 60 B each
(a game's JSON state), as a client receives them: plain text and binary
(the fast path for whole small frames), and the same compressed with
permessage-deflate and context takeover (the fast path for compressed
messages). Each on the C loops (``blockws._speedups``) and on the pure-Python
ones, in one process, interleaved; the best of ``--rounds`` runs of 20,000
messages, in nanoseconds a message. No sockets: this is the sans-I/O core
alone. Figures vary with the machine and its load; the ratios between the
rows are what to quote.
"""

from __future__ import annotations

import argparse
import time
import zlib
from typing import Any

from blockws import deflate as deflate_mod
from blockws import frames as frames_mod
from blockws.deflate import PerMessageDeflate
from blockws.protocol import Protocol, Role

READS = 200
PER_READ = 100


def _header(b0: int, n: int) -> bytes:
    return bytes((b0, n)) if n < 126 else bytes((b0, 126)) + n.to_bytes(2, "big")


def stream(opcode: int, compressed: bool) -> list[bytes]:
    """The reads: ``READS`` of ``PER_READ`` messages each."""
    comp = zlib.compressobj(1, zlib.DEFLATED, -15, 8)
    reads = []
    for r in range(READS):
        out = []
        for i in range(PER_READ):
            raw = b'{"id":%d,"x":%d.25,"y":%d.75,"hp":%d,"name":"player"}' % (
                i,
                r,
                i * 3,
                100 - i,
            )
            b0 = 0x80 | opcode
            if compressed:
                raw = (comp.compress(raw) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
                b0 |= 0x40
            out.append(_header(b0, len(raw)) + raw)
        reads.append(b"".join(out))
    return reads


def client(compressed: bool) -> Protocol:
    exts = []
    if compressed:
        ext = PerMessageDeflate().fresh()
        ext.accept([])
        exts.append(ext)
    proto = Protocol(Role.CLIENT, extensions=exts)
    proto.compact_messages = True
    return proto


def measure(reads: list[bytes], compressed: bool, c_loops: bool, rounds: int) -> float:
    saved = frames_mod.split_messages, deflate_mod._inflate_run
    if not c_loops:
        frames_mod.split_messages = frames_mod.py_split_messages
        deflate_mod._inflate_run = None
    try:
        best = float("inf")
        for _ in range(rounds):
            proto = client(compressed)
            start = time.perf_counter()
            got = 0
            for data in reads:
                got += len(proto.receive_data(data))
            best = min(best, time.perf_counter() - start)
            assert got == READS * PER_READ, got
    finally:
        frames_mod.split_messages, deflate_mod._inflate_run = saved
    return best / (READS * PER_READ) * 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parse")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    built = frames_mod.c_split_messages is not None and deflate_mod._inflate_run is not None
    print(f"C speedups built and in use: {'yes' if built else 'no'}")
    rows: list[tuple[str, Any, Any]] = []
    for label, opcode, compressed in (
        ("text", 1, False),
        ("binary", 2, False),
        ("compressed text", 1, True),
        ("compressed binary", 2, True),
    ):
        reads = stream(opcode, compressed)
        c = measure(reads, compressed, True, args.rounds) if built else None
        py = measure(reads, compressed, False, args.rounds)
        rows.append((label, c, py))
    print("| message (~60 B) | C loops, ns/msg | pure Python, ns/msg |")
    print("|---|---|---|")
    for label, c, py in rows:
        print(f"| {label} | {'-' if c is None else f'{c:.0f}'} | {py:.0f} |")


if __name__ == "__main__":
    main()
