"""Masking speed: blockws's pure-Python masking, its C speedup, and simpler ways.

    python -m benchmarks.mask

Prints MB/s per payload size and the ratio to a per-byte loop and to a
32-bit-word ``array`` loop. Figures vary with the machine; the
ratios are what to quote.
"""

from __future__ import annotations

import array
import os
import timeit

from blockws.frames import c_apply_mask, py_apply_mask


def mask_loop(data: bytes, key: bytes) -> bytes:
    """The textbook loop: one Python operation per byte."""
    out = bytearray(data)
    for i in range(len(out)):
        out[i] ^= key[i & 3]
    return bytes(out)


def mask_array(data: bytes, key: bytes) -> bytes:
    """32-bit words with the array module, the shape some clients use."""
    n = len(data)
    pad = (-n) % 4
    words = array.array("I", data + b"\x00" * pad)
    k = array.array("I", key)[0]
    for i in range(len(words)):
        words[i] ^= k
    return words.tobytes()[:n]


def measure(fn: object, data: bytes, key: bytes, budget: float = 0.3) -> float:
    timer = timeit.Timer(lambda: fn(data, key))  # type: ignore[operator]
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=3, number=max(1, number)))
    return len(data) * number / best / 1e6


def main() -> None:
    key = os.urandom(4)
    print(
        f"{'size':>9} {'python MB/s':>12} {'x loop':>7} {'x array':>8} {'C MB/s':>9} {'C x py':>7}"
    )
    for size in (32, 1024, 32768, 1 << 20):
        data = os.urandom(size)
        assert py_apply_mask(data, key) == mask_loop(data, key) == mask_array(data, key)
        fast = measure(py_apply_mask, data, key)
        loop = measure(mask_loop, data, key)
        arr = measure(mask_array, data, key)
        c = measure(c_apply_mask, data, key) if c_apply_mask is not None else float("nan")
        row = f"{size:>9} {fast:>12.1f} {fast / loop:>7.1f} {fast / arr:>8.1f}"
        print(f"{row} {c:>9.0f} {c / fast:>7.1f}")


if __name__ == "__main__":
    main()
